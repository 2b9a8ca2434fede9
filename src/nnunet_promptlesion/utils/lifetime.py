"""Process lifetime helpers: children that end with their parent, SIGTERM handled like Ctrl-C.

Why: ``kill``, ``docker stop`` and a cluster's pre-emption send SIGTERM to one process (the trainer). Python's
default action for SIGTERM ends it without running ``finally`` blocks, so the processes it started (nnU-Net's
batchgenerators workers, the online producer) and the shared memory it created would be left behind. And a
process that is SIGKILLed cannot clean up at all: its children must notice by themselves.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_fork_hook_installed = False
_forking_from_main_thread = [True]


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM, poll_s: float = 0.5) -> None:
    """End this process when ``parent_pid`` is no longer its parent (the parent died; we were re-parented).

    Two mechanisms: Linux's ``PR_SET_PDEATHSIG`` (the kernel sends ``sig`` when the parent *thread* that
    created us ends; only armed when ``use_pdeathsig``), and a daemon thread that polls ``os.getppid()`` every
    ``poll_s`` seconds and calls ``os._exit(1)`` (works everywhere, whichever thread forked us).
    """
    def watchdog():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(poll_s)

    threading.Thread(target=watchdog, daemon=True, name="promptlesion-parent-watchdog").start()
    if os.getppid() != parent_pid:
        os._exit(1)


def set_pdeathsig(sig: int = signal.SIGTERM) -> None:
    """Linux: ask the kernel to send ``sig`` when our parent (thread) ends. No-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig))
    except Exception:  # noqa: BLE001 - not Linux / no libc: the watchdog thread still works
        pass


def _before_fork() -> None:
    _forking_from_main_thread[0] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    # A forked child (nnU-Net's loader workers) inherits the parent's Python SIGTERM handler: give it the
    # default action back, so that terminating a worker ends it instead of raising inside batchgenerators.
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread of the child (cannot happen after fork, but be safe)
        pass
    if _forking_from_main_thread[0]:
        # PDEATHSIG fires when the *thread* that forked us ends: only safe when that is the main thread
        set_pdeathsig(signal.SIGKILL)
    die_with_parent(os.getppid())


def children_die_with_this_process() -> None:
    """From now on every child this process *forks* (``os.fork``, multiprocessing's fork context) ends when
    this process dies, also by SIGKILL (Linux pdeathsig + a parent-pid watchdog thread in the child).
    Spawned children (fork+exec) are not affected. Idempotent."""
    global _fork_hook_installed
    if _fork_hook_installed:
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _fork_hook_installed = True


class TerminatedBySignal(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM arrives; a KeyboardInterrupt so that code that already cleans
    up after Ctrl-C (nnU-Net, batchgenerators, our ``finally`` blocks) does the same for SIGTERM."""


_terminated: list[str] = []


def _raise_terminated(signum, frame):
    # Remember it as well: Python runs the handler at the next bytecode of the main thread, and when that is
    # inside a callback whose exceptions are ignored (an at-fork hook, __del__, a weakref callback) the raise is
    # lost. raise_if_terminated() at the next checkpoint (every training iteration) raises it again.
    _terminated.append(signal.Signals(signum).name)
    raise TerminatedBySignal(f"received signal {_terminated[-1]}")


def raise_if_terminated() -> None:
    """Raise TerminatedBySignal if SIGTERM arrived (see sigterm_as_keyboard_interrupt), e.g. when the handler's
    own raise was swallowed. Cheap: call it in loops."""
    if _terminated:
        raise TerminatedBySignal(f"received signal {_terminated[-1]}")


def sigterm_as_keyboard_interrupt():
    """Install a SIGTERM handler that raises :class:`TerminatedBySignal` in the main thread.

    Returns the previous handler (pass it to ``signal.signal`` to restore), or None when not called from the
    main thread (where Python cannot install handlers; then nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _terminated.clear()
    return signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def spawn_without_main():
    """Start spawned processes inside this block without re-running the parent's ``__main__`` in them.

    A child of multiprocessing's "spawn" start method first re-imports the parent's main module (as
    ``__mp_main__``) and only then unpickles its target. Under ``nnUNetv2_train`` that main module is nnU-Net's
    console script, so every child imports all of nnU-Net's training code (seaborn, torch._dynamo, ...: ~8 CPU-s
    and a few hundred MB per child on a CPU of CI's kind) that it never uses. For a target and arguments that
    live in importable modules (never in ``__main__``), hiding the main module's name and path while
    ``Process.start()`` reads them makes the child skip that import. The child's ``__main__`` is then the
    bare interpreter's; anything pickled by reference to ``__main__`` would fail to unpickle in it.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)
