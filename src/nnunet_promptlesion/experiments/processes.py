"""The runner's child processes: run a command into its log, stop a command with every process it started,
SIGTERM handled like Ctrl-C. Linux-specific where it matters (/proc, the parent-death signal); elsewhere the
process tree is not traced and only the child itself is stopped.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable


def one_line_at_a_time(out: Callable[[str], None]) -> Callable[[str], None]:
    """``out`` behind a lock: parallel chains print whole lines (print writes text and newline separately)."""
    lock = threading.Lock()

    def locked(line: str) -> None:
        with lock:
            out(line)
    return locked


def run_command(cmd: list[str], env: dict, log: Path, show: tuple[str, ...] = (),
                echo: Callable[[str], None] | None = None, running: set | None = None) -> int:
    """Run ``cmd`` with its output appended to ``log``; return its exit status. Never leaves a process behind.

    The child stays in our process group (Ctrl-C or a kill of the group reaches it directly) and gets SIGTERM
    from the kernel when we die (Linux parent-death signal). When we are interrupted (KeyboardInterrupt, or
    SIGTERM turned into one by the runner), the child and every process it started (nnU-Net's data
    augmentation workers, a synthesis producer) are stopped: SIGTERM first so that they release shared memory,
    SIGKILL for what is left after a grace period. Its descendants are listed before the child is signalled,
    because once it is gone they are re-parented and no longer traceable to it. ``running``, when given, holds
    the child while it runs (for a caller that must stop it from another thread).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE if show else f, stderr=subprocess.STDOUT, env=env,
                                 preexec_fn=_die_with_parent, text=bool(show), errors="replace" if show else None)
        if running is not None:
            running.add(child)
        try:
            if show:
                for line in child.stdout:
                    f.write(line)
                    f.flush()
                    if any(s in line for s in show):
                        (echo or print)("    " + line.rstrip())
            return child.wait()
        finally:
            if child.poll() is None:
                stop_process_tree(child)
            if child.stdout is not None:
                child.stdout.close()
            if running is not None:
                running.discard(child)


def _proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every live process (Linux /proc; empty elsewhere)."""
    out = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()   # fields after "(comm)": state ppid ... starttime (22nd)
            out[int(d.name)] = (int(rest[1]), rest[19])
    return out


def descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below ``pid`` (children, grandchildren, ...)."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = {}, [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out[k] = table[k][1]
                todo.append(k)
    return out


def alive(pids: dict[int, str]) -> dict[int, str]:
    """The processes of ``pids`` ({pid: start time}, as :func:`descendants` gives them) still running."""
    table = _proc_table()
    return {p: t for p, t in pids.items() if p in table and table[p][1] == t}   # same start time: not a reused pid


def stop_process_tree(child: subprocess.Popen, grace_s: float = 30.0, orphan_wait_s: float = 10.0) -> None:
    """SIGTERM ``child`` and, after it ended (or ``grace_s``), its remaining descendants; SIGKILL stragglers.

    Descendants get ``orphan_wait_s`` to end by themselves once the child is gone (nnU-Net's workers notice
    their parent's death) before they are signalled."""
    tree = descendants(child.pid)
    child.terminate()
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    end_orphans(tree, orphan_wait_s)


def end_orphans(tree: dict[int, str], wait_s: float) -> None:
    """Give the processes of ``tree`` ({pid: start time}) ``wait_s`` to end by themselves, then SIGTERM and
    after 5 s SIGKILL whatever is left."""
    deadline = time.time() + wait_s
    while alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in alive(tree):
            try:
                os.kill(p, sig)
            except OSError:
                pass
        end = time.time() + 5.0
        while alive(tree) and time.time() < end:
            time.sleep(0.1)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the runner dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def raise_interrupt(signum, frame):
    """A signal handler that turns the signal (SIGTERM) into a KeyboardInterrupt, i.e. into Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")
