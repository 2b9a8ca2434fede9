"""The online diffusion producer: one spawned process that owns the generator and keeps a ring of fresh lesions.

Data flow (``"synthesizer": "diffusion_online"``)::

    loader workers (forked, CPU)                      producer (spawned, owns the GPU model)
      placer.place(class) -> LesionRequest -- queue --> render a batch (space mapping, inpainting, blend)
      take(class)  <-- shared-memory ring <------------ optional quality filter, write into the ring

:class:`SharedRing` is a bounded block of shared memory: ``slots_per_class`` slots per lesion class, each
large enough for the biggest lesion box the generator patch allows. The producer overwrites the oldest slot
of a class; workers copy a random ready slot of the drawn class (a slot may be read many times: the reuse
rate and the age of the samples read are counted in shared counters and logged per epoch). One lock guards
slot copies (a few kB to a few MB, microseconds to milliseconds), so a reader never sees half a sample. Every
acquisition of that lock times out (``lock_timeout_s``) into :class:`ProducerDeadError`: a producer killed
while it holds the lock (inside ``put``) stops training with a message instead of blocking every worker forever.

Failures are fatal, never silent: the trainer checks the producer at every iteration
(:meth:`~nnunet_promptlesion.synthesis.diffusion_source.DiffusionOnlineSource.raise_if_failed`) and stops with
the producer's traceback when it reported an error or died; the ring is never served stale for the rest of a run.

GPU share: the producer sleeps after each batch so that it is busy at most ``duty_cycle`` of the wall time
(``"producer_duty_cycle"``, default 0.2: if training and rendering fully serialised on one GPU, training would get
at least 80 % of it, i.e. iterations at most 1 / 0.8 = 1.25x slower than without rendering). A pause flag
stops rendering while the trainer measures its no-rendering baseline iteration time.

Stop and pause are plain flags in the ring's shared memory, not ``multiprocessing.Event``: an Event's ``set()``
waits for every process sleeping in ``wait()`` to acknowledge, so a producer killed while it slept in one
would hang the trainer's clean-up forever. Messages to the trainer are kept below the pipe's atomic write size.

The producer ends with the trainer: the trainer's ``close()`` sets the stop flag and joins it (killing it
after a timeout); if the trainer process dies without that (SIGKILL, crash), the producer notices through
``PR_SET_PDEATHSIG`` (Linux) and a watchdog thread that polls its parent id, and exits.

Fault injection for tests (environment of the trainer, inherited by the producer): ``PROMPTLESION_PRODUCER_FAULT``
= ``raise_at_render`` (the first render raises, as CUDA running out of memory would).
``PROMPTLESION_SHM_FREE_BYTES`` overrides the free space
:func:`shm_free_bytes` reports (simulates a small ``/dev/shm``).
"""
from __future__ import annotations

import os
import queue as queue_mod
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np

from ..utils.lifetime import die_with_parent, set_pdeathsig
from ..lesions.spec import LesionSpec
from .diffusion_render import CaseReader, DiffusionRenderer, LesionRequest, RenderedLesion
from .space import GridSpec

SHM_DIR = "/dev/shm"
SHM_FREE_ENV = "PROMPTLESION_SHM_FREE_BYTES"
FAULT_ENV = "PROMPTLESION_PRODUCER_FAULT"


class ProducerDeadError(RuntimeError):
    """The online diffusion producer failed or died; training cannot go on with fresh diffusion lesions."""


def shm_free_bytes(folder: str = SHM_DIR) -> int | None:
    """Free bytes of the shared-memory filesystem (``/dev/shm``), or None where there is none (not Linux).

    ``PROMPTLESION_SHM_FREE_BYTES`` overrides the probe (tests simulate a small /dev/shm with it)."""
    env = os.environ.get(SHM_FREE_ENV)
    if env:
        return int(float(env))
    try:
        st = os.statvfs(folder)
    except (FileNotFoundError, OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def check_shm_space(nbytes: int, what: str = "the online producer's ring") -> None:
    """Refuse (ProducerDeadError's sibling: a ValueError with instructions) when ``nbytes`` do not fit /dev/shm.

    Shared memory on Linux is a sparse file in /dev/shm: creating a segment larger than the free space succeeds
    and the process dies of SIGBUS, without a traceback, when it first writes past it. Docker's default
    /dev/shm is 64 MiB."""
    free = shm_free_bytes()
    if free is None or nbytes <= free:
        return
    need_gib = max(1, -(-int(nbytes * 1.5 + (1 << 30)) // (1 << 30)))  # the ring, nnU-Net's pinned queues, headroom
    raise ValueError(
        f"{what} needs {nbytes / 2**20:.1f} MiB of shared memory, but {SHM_DIR} has only {free / 2**20:.1f} MiB free. "
        f"Raise it: `docker run --shm-size={need_gib}g ...` (Docker's default is 64m; Kubernetes: an emptyDir with "
        f"medium Memory mounted at /dev/shm; bare Linux: `sudo mount -o remount,size={need_gib}G /dev/shm`), or make "
        "the ring smaller (\"ring_slots_per_class\" in promptlesion_settings.json).")

# header layout (int64 per slot)
_H_SEQ, _H_LABEL, _H_LO, _H_SHAPE, _H_CENTRE, _H_SEED, _H_USES, _H_CASE, _H_NVALS = 0, 1, 2, 5, 8, 11, 12, 13, 14
_HEADER = 16
# counters (float64)
COUNTERS = ("draws", "reused_draws", "age_sum_s", "age_max_s", "empty_class", "rendered", "did_not_fit",
            "requests_dropped", "quality_tested", "quality_accepted", "producer_batches", "producer_busy_s")
_C = {n: i for i, n in enumerate(COUNTERS)}
_FLAGS = {"stop": 0, "pause": 1}
#: messages on the status queue stay below this (bytes of text): pipe writes up to PIPE_BUF (4096) are atomic, so a
#: producer killed while writing cannot leave half a message that blocks the trainer's read
_MAX_MESSAGE = 3500


@dataclass
class RingSpec:
    """Geometry of a ring; picklable, passed to the producer (which attaches by name)."""

    name: str
    labels: list[int]
    slots_per_class: int
    max_voxels: int
    n_counters: int = len(COUNTERS)
    n_class_counters: int = 3  # per class: rendered, quality_tested, quality_accepted

    @property
    def n_slots(self) -> int:
        return len(self.labels) * self.slots_per_class

    def layout(self) -> dict[str, tuple[int, tuple, type]]:
        """name -> (byte offset, shape, dtype)."""
        out, off = {}, 0
        for key, shape, dt in (("header", (self.n_slots, _HEADER), np.int64), ("created", (self.n_slots,), np.float64),
                               ("counters", (self.n_counters,), np.float64),
                               ("class_counters", (len(self.labels), self.n_class_counters), np.float64),
                               ("next_slot", (len(self.labels),), np.int64),
                               ("control", (len(_FLAGS),), np.int64),
                               ("values", (self.n_slots, self.max_voxels), np.float32),
                               ("mask", (self.n_slots, self.max_voxels), np.uint8),
                               ("support", (self.n_slots, self.max_voxels), np.uint8)):
            off = (off + 63) // 64 * 64
            out[key] = (off, shape, dt)
            off += int(np.prod(shape)) * np.dtype(dt).itemsize
        out["_size"] = (off, (), np.uint8)
        return out


class SharedRing:
    """Shared-memory ring of rendered lesions (see the module docstring). Create in the trainer, attach elsewhere."""

    def __init__(self, spec: RingSpec, lock, create: bool = False, cases: Sequence[str] = (),
                 lock_timeout_s: float = 60.0):
        self.spec = spec
        self.lock = lock
        self.lock_timeout_s = float(lock_timeout_s)
        self.cases = list(cases)
        self._case_idx = {c: i for i, c in enumerate(self.cases)}
        lay = spec.layout()
        if create:
            check_shm_space(lay["_size"][0])
            self.shm = shared_memory.SharedMemory(name=spec.name, create=True, size=lay["_size"][0])
            self.owner = True
        else:
            # Attaching registers the name with the resource tracker again; spawned children share the creator's
            # tracker, where names form a set, so this is a no-op and only the creator's unlink unregisters it.
            # If everything dies without unlinking, the tracker removes the segment when the last process exits.
            self.shm = shared_memory.SharedMemory(name=spec.name)
            self.owner = False
        self._arrays = {}
        for key, (off, shape, dt) in lay.items():
            if key.startswith("_"):
                continue
            self._arrays[key] = np.ndarray(shape, dtype=dt, buffer=self.shm.buf, offset=off)
        if create:
            for a in self._arrays.values():
                a[...] = 0
        self._class = {l: i for i, l in enumerate(spec.labels)}

    def __getstate__(self):
        raise TypeError("SharedRing is not picklable; pass its RingSpec and attach")

    def flag(self, name: str) -> int:
        """A control flag (``stop``, ``pause``), read without the lock (one aligned int64)."""
        return int(self._arrays["control"][_FLAGS[name]]) if self._arrays else 0

    def set_flag(self, name: str, value: int) -> None:
        if self._arrays:
            self._arrays["control"][_FLAGS[name]] = int(value)

    def _locked(self):
        """The ring lock, acquired with a timeout: a holder that never releases it is a dead producer."""
        return _TimedLock(self.lock, self.lock_timeout_s)

    @property
    def header(self) -> np.ndarray:
        return self._arrays["header"]

    @property
    def counters(self) -> np.ndarray:
        return self._arrays["counters"]

    def add(self, name: str, value: float = 1.0, maximum: bool = False) -> None:
        with self._locked():
            i = _C[name]
            self.counters[i] = max(self.counters[i], value) if maximum else self.counters[i] + value

    def add_class(self, label: int, col: int, value: float = 1.0) -> None:
        with self._locked():
            self._arrays["class_counters"][self._class[label], col] += value

    # ------------------------------------------------------------------ producer side
    def put(self, r: RenderedLesion) -> bool:
        """Write a rendered lesion into the oldest slot of its class. False if it does not fit a slot."""
        n = int(np.prod(r.mask.shape))
        if n > self.spec.max_voxels or r.label not in self._class or r.case not in self._case_idx:
            return False
        ci = self._class[r.label]
        full = np.zeros(r.support.shape, np.float32)
        full[r.support] = r.values
        with self._locked():
            k = int(self._arrays["next_slot"][ci])
            self._arrays["next_slot"][ci] = (k + 1) % self.spec.slots_per_class
            s = ci * self.spec.slots_per_class + k
            h = self.header[s]
            h[_H_SEQ] += 1
            h[_H_LABEL] = r.label
            h[_H_LO:_H_LO + 3] = r.box_lo
            h[_H_SHAPE:_H_SHAPE + 3] = r.mask.shape
            h[_H_CENTRE:_H_CENTRE + 3] = r.centre
            h[_H_SEED] = r.seed
            h[_H_USES] = 0
            h[_H_CASE] = self._case_idx[r.case]
            h[_H_NVALS] = n
            self._arrays["values"][s, :n] = full.ravel()
            self._arrays["mask"][s, :n] = r.mask.ravel()
            self._arrays["support"][s, :n] = r.support.ravel()
            self._arrays["created"][s] = time.time()
        return True

    # ------------------------------------------------------------------ worker side
    def ready(self, label: int) -> int:
        ci = self._class[label]
        sl = slice(ci * self.spec.slots_per_class, (ci + 1) * self.spec.slots_per_class)
        return int((self.header[sl, _H_SEQ] > 0).sum())

    def take(self, label: int, rng: np.random.Generator) -> RenderedLesion | None:
        """A copy of a random ready sample of ``label`` (counts the draw, its reuse and age); None if none."""
        if label not in self._class:
            return None
        ci = self._class[label]
        base = ci * self.spec.slots_per_class
        with self._locked():
            seqs = self.header[base:base + self.spec.slots_per_class, _H_SEQ]
            ready = np.flatnonzero(seqs > 0)
            c = self.counters
            if len(ready) == 0:
                c[_C["empty_class"]] += 1
                return None
            s = base + int(ready[rng.integers(len(ready))])
            h = self.header[s].copy()
            n = int(h[_H_NVALS])
            shape = tuple(int(v) for v in h[_H_SHAPE:_H_SHAPE + 3])
            vals = self._arrays["values"][s, :n].copy()
            mask = self._arrays["mask"][s, :n].astype(bool)
            sup = self._arrays["support"][s, :n].astype(bool)
            age = time.time() - float(self._arrays["created"][s])
            c[_C["draws"]] += 1
            c[_C["reused_draws"]] += float(h[_H_USES] > 0)
            c[_C["age_sum_s"]] += age
            c[_C["age_max_s"]] = max(c[_C["age_max_s"]], age)
            self.header[s, _H_USES] += 1
        support = sup.reshape(shape)
        return RenderedLesion(case=self.cases[int(h[_H_CASE])], label=int(h[_H_LABEL]), seed=int(h[_H_SEED]),
                              box_lo=h[_H_LO:_H_LO + 3].astype(int), mask=mask.reshape(shape), support=support,
                              values=vals.reshape(shape)[support], centre=h[_H_CENTRE:_H_CENTRE + 3].astype(int))

    def snapshot_and_reset(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(counters, per-class counters, ready slots per class) since the last call; counters reset."""
        with self._locked():
            c = self.counters.copy()
            cc = self._arrays["class_counters"].copy()
            self.counters[...] = 0
            self._arrays["class_counters"][...] = 0
            ready = [self.ready(l) for l in self.spec.labels]
        return c, cc, ready

    def close(self) -> None:
        self._arrays = {}
        try:
            self.shm.close()
        except BufferError:
            pass
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass


class _TimedLock:
    def __init__(self, lock, timeout: float):
        self.lock, self.timeout = lock, timeout

    def __enter__(self):
        if not self.lock.acquire(timeout=self.timeout):
            raise ProducerDeadError(
                f"the shared lesion ring's lock was not released within {self.timeout:.0f} s: a process holding it "
                "died - the diffusion producer most likely died while writing a sample (killed, out of memory). "
                "Training stops here instead of hanging; see the producer's messages above, fix the cause and resume "
                "with nnUNetv2_train ... --c.")
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


# ---------------------------------------------------------------------------------------------- producer
@dataclass
class ProducerConfig:
    diffusion: str
    vqgan: str | None
    device: str
    sampler: str
    steps: int
    guidance: float
    batch: int
    plans: dict
    configuration: str
    data_folder: str
    train_ids: list[str]
    spec: dict
    parent_pid: int
    num_threads: int = 1
    quality: dict | None = None
    duty_cycle: float = 0.2
    lock_timeout_s: float = 60.0


def _die_with_parent(parent_pid: int) -> None:
    set_pdeathsig(signal.SIGTERM)  # Linux: the kernel sends SIGTERM when the parent dies
    die_with_parent(parent_pid)


def _sleep(ring: "SharedRing", seconds: float) -> None:
    """Sleep up to ``seconds``, returning early when the stop flag is set (polled every 0.1 s)."""
    end = time.monotonic() + seconds
    while not ring.flag("stop"):
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else "[...]\n" + text[-_MAX_MESSAGE:]


def producer_main(cfg: ProducerConfig, ring_spec: RingSpec, lock, requests, status) -> None:
    """Entry point of the spawned producer process."""
    _die_with_parent(cfg.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which stops us through `stop`
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fault = os.environ.get(FAULT_ENV, "")
    duty = min(max(float(cfg.duty_cycle), 1e-3), 1.0)
    ring = None
    try:
        ring = SharedRing(ring_spec, lock, create=False, cases=cfg.train_ids, lock_timeout_s=cfg.lock_timeout_s)
        # deferred: torch (~1 s CPU at import) and the quality filter's nnU-Net are the spawned producer's alone;
        # the trainer's settings validation imports this module through diffusion_source
        import torch

        torch.set_num_threads(max(1, int(cfg.num_threads)))

        spec = LesionSpec.from_dict(cfg.spec)
        reader = CaseReader(cfg.data_folder, cfg.train_ids)
        renderer = DiffusionRenderer(cfg.diffusion, GridSpec.from_nnunet(cfg.plans, cfg.configuration), spec, reader,
                                     vqgan=cfg.vqgan, device=cfg.device, sampler=cfg.sampler, steps=cfg.steps,
                                     guidance=cfg.guidance, labels=ring_spec.labels)
        quality = None
        if cfg.quality:
            from .quality import QualityFilter  # deferred: torch + nnU-Net, see above

            quality = QualityFilter(cfg.quality["model"], cfg.quality["fold"], device=cfg.device,
                                    min_iou=cfg.quality["min_iou"], expect_plans=cfg.plans,
                                    configuration=cfg.configuration)
        status.put(("ready", renderer.identity()))
        while not ring.flag("stop"):
            if ring.flag("pause"):
                _sleep(ring, 0.1)  # the trainer measures its no-rendering baseline
                continue
            reqs: list[LesionRequest] = []
            try:
                reqs.append(requests.get(timeout=0.2))
                while len(reqs) < cfg.batch:
                    reqs.append(requests.get_nowait())
            except queue_mod.Empty:
                pass
            if not reqs:
                continue
            t0 = time.perf_counter()
            if fault == "raise_at_render":
                raise RuntimeError(f"injected fault ({FAULT_ENV}=raise_at_render)")
            rendered = renderer.render(reqs)
            ok = [r for r in rendered if r is not None]
            ring.add("did_not_fit", len(rendered) - len(ok))
            if quality is not None and ok:
                verdicts = quality.accept(ok, reader)
                for r, v in zip(ok, verdicts):
                    ring.add_class(r.label, 1)
                    ring.add_class(r.label, 2, float(v))
                ring.add("quality_tested", len(ok))
                ring.add("quality_accepted", float(sum(verdicts)))
                ok = [r for r, v in zip(ok, verdicts) if v]
            for r in ok:
                if ring.put(r):
                    ring.add_class(r.label, 0)
            busy = time.perf_counter() - t0
            ring.add("rendered", len(ok))
            ring.add("producer_batches", 1)
            ring.add("producer_busy_s", busy)
            if duty < 1.0:
                # bounded GPU share: busy for `busy` seconds, then idle so that busy / (busy + idle) <= duty
                _sleep(ring, busy * (1.0 - duty) / duty)
    except BaseException as e:  # noqa: BLE001 - report anything to the trainer, then exit
        try:
            status.put(("error", _short(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
        except Exception:  # noqa: BLE001
            pass
        raise SystemExit(1)
    finally:
        if ring is not None:
            ring.close()
