"""Fault injection on real processes (CPU): what a user relies on when the online producer or the machine fails.

- the producer killed mid-run, or raising at warm-up: nnUNetv2_train exits non-zero within a bounded time,
  naming the producer (no hang, no silent fallback, no stale ring reused for the rest of the run);
- a producer that dies while holding the ring lock: readers time out into an error instead of blocking forever;
- /dev/shm smaller than the ring: refused at start with the size needed and how to raise it;
- SIGTERM to nnUNetv2_train (online mode): no process of the run and no shared-memory segment left.

Every run gets its own environment tag, so "no process left" covers the trainer, its batchgenerators workers,
the producer and multiprocessing's helpers, whatever their parent is after a kill.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import BIN, processes_with_env, wait_until_gone
from diffusion_fixtures import diffusion_setup

TAG = "PROMPTLESION_FAULT_TEST_TAG"
TRAINER = "PromptLesionTrainer_5epochs"  # 250 iterations per epoch: still training when the fault is injected


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return diffusion_setup(tmp_path_factory)


def _online(setup, **kw) -> dict:
    return {"synthesizer": "diffusion_online", "diffusion": str(setup["checkpoint"]), "steps": 2, "online_batch": 2,
            "class_weights": "uniform", "ring_slots_per_class": 2, "online_warmup_s": 600, **kw}


class Run:
    """One nnUNetv2_train in the background, its output in a file, its processes found by a unique env tag."""

    def __init__(self, setup, tmp: Path, settings: dict, extra_env: dict | None = None, trainer: str = TRAINER):
        sfile = tmp / "settings.json"
        sfile.write_text(json.dumps(settings))
        self.tag = uuid.uuid4().hex
        env = {**setup["env"], "PROMPTLESION_SETTINGS": str(sfile), "nnUNet_n_proc_DA": "2", TAG: self.tag,
               **(extra_env or {})}
        out = Path(env["nnUNet_results"]) / setup["name"] / f"{trainer}__nnUNetPlans__3d_fullres"
        shutil.rmtree(out, ignore_errors=True)
        self.fold = out / "fold_0"
        self.out_file = tmp / "stdout.txt"
        self._fh = open(self.out_file, "w")
        self.proc = subprocess.Popen([str(BIN / "nnUNetv2_train"), str(setup["did"]), "3d_fullres", "0", "-tr",
                                      trainer, "-device", "cpu"], env=env, stdout=self._fh, stderr=subprocess.STDOUT)

    def log(self) -> str:
        logs = sorted(self.fold.glob("training_log_*.txt"))
        return logs[-1].read_text() if logs else ""

    def output(self) -> str:
        self._fh.flush()
        return self.out_file.read_text()

    def wait_for_log(self, text: str, timeout: float = 900) -> None:
        t0 = time.time()
        while text not in self.log() and self.proc.poll() is None and time.time() - t0 < timeout:
            time.sleep(0.2)
        assert text in self.log(), f"'{text}' never logged (rc {self.proc.poll()}):\n{self.output()[-4000:]}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"nnUNetv2_train still running {timeout:.0f} s after the fault (hang):\n"
                                 f"{self.output()[-4000:]}")

    def close(self) -> None:
        """Kill whatever is left (a failed test must not leave processes either)."""
        for pid in processes_with_env(TAG, self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._fh.close()
        for seg in Path("/dev/shm").glob(f"pl_ring_{self.proc.pid}_*"):  # SIGKILLed above: nothing else unlinks it
            seg.unlink(missing_ok=True)

    def producer_pid(self) -> int:
        import re

        m = re.search(r"producer pid (\d+)", self.log())
        assert m, self.log()[-3000:]
        return int(m.group(1))


def _ring_segments(trainer_pid: int) -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"pl_ring_{trainer_pid}_*")]


def _assert_nothing_left(run: Run) -> None:
    left = wait_until_gone(TAG, run.tag, timeout=30)
    assert not left, f"processes of the run left behind: {left}"
    assert not _ring_segments(run.proc.pid), _ring_segments(run.proc.pid)


@pytest.mark.slow
def test_producer_killed_mid_run_stops_training_naming_the_producer(setup, tmp_path):
    run = Run(setup, tmp_path, _online(setup, baseline_iterations=0))
    try:
        run.wait_for_log("producer ready")
        pid = run.producer_pid()
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        rc = run.wait(timeout=180)
        out = run.output()
        assert rc != 0, out[-3000:]
        assert f"diffusion producer (pid {pid}) was killed by signal 9" in out, out[-3000:]
        assert "ProducerDeadError" in out
        assert time.time() - t0 < 180
        _assert_nothing_left(run)
    finally:
        run.close()


@pytest.mark.slow
def test_producer_raising_at_warmup_stops_training_with_its_traceback(setup, tmp_path):
    run = Run(setup, tmp_path, _online(setup), extra_env={"PROMPTLESION_PRODUCER_FAULT": "raise_at_render"})
    try:
        rc = run.wait(timeout=600)
        out = run.output()
        assert rc != 0, out[-3000:]
        # the producer's own traceback, relayed by the trainer, and no training iteration on a fallback
        assert "diffusion producer (pid" in out and "injected fault" in out and "producer_main" in out, out[-3000:]
        assert "ring after warm-up" not in run.log()
        _assert_nothing_left(run)
    finally:
        run.close()


def test_small_dev_shm_is_refused_with_the_size_needed(setup, tmp_path):
    run = Run(setup, tmp_path, _online(setup), extra_env={"PROMPTLESION_SHM_FREE_BYTES": "4096"})
    try:
        rc = run.wait(timeout=600)
        out = run.output()
        assert rc != 0
        assert "MiB of shared memory, but /dev/shm has only 0.0 MiB free" in out, out[-3000:]
        assert "docker run --shm-size=" in out and "ring_slots_per_class" in out
        assert "producer pid" not in run.log()  # refused before anything was started
        _assert_nothing_left(run)
    finally:
        run.close()


@pytest.mark.slow
def test_sigterm_to_online_training_leaves_no_process_and_no_segment(setup, tmp_path):
    run = Run(setup, tmp_path, _online(setup))
    try:
        run.wait_for_log("producer ready")
        pid = run.producer_pid()
        assert _ring_segments(run.proc.pid)
        assert len(processes_with_env(TAG, run.tag)) >= 3  # trainer, producer, loader workers / resource tracker
        run.proc.send_signal(signal.SIGTERM)
        rc = run.wait(timeout=120)
        assert rc != 0  # interrupted, like Ctrl-C
        assert "TerminatedBySignal" in run.output() or "SIGTERM" in run.output()
        _assert_nothing_left(run)
        assert pid not in processes_with_env(TAG, run.tag)
    finally:
        run.close()


def _hold_lock_and_die(lock) -> None:
    lock.acquire()
    os._exit(9)  # as a producer SIGKILLed (or OOM-killed) inside SharedRing.put


def test_ring_lock_held_by_a_dead_producer_times_out_into_an_error():
    import numpy as np

    from nnunet_promptlesion.synthesis.online_producer import ProducerDeadError, RingSpec, SharedRing

    ctx = mp.get_context("spawn")
    lock = ctx.Lock()
    spec = RingSpec(name=f"pl_test_lock_{os.getpid()}", labels=[4], slots_per_class=1, max_voxels=8)
    ring = SharedRing(spec, lock, create=True, cases=["a"], lock_timeout_s=1.0)
    try:
        p = ctx.Process(target=_hold_lock_and_die, args=(lock,))
        p.start()
        p.join(60)
        assert p.exitcode == 9
        t0 = time.time()
        with pytest.raises(ProducerDeadError, match="producer most likely died"):
            ring.take(4, np.random.default_rng(0))
        assert time.time() - t0 < 10
        with pytest.raises(ProducerDeadError):
            ring.snapshot_and_reset()
    finally:
        ring.close()


@pytest.mark.parametrize("synthesizer", ["diffusion_cache", "diffusion_online"])
def test_multichannel_ct_is_refused_by_the_diffusion_sources(synthesizer):
    """The generators are one-channel CT models: a lesion pasted into channel 0 of a 2-channel dataset would sit
    under a lesion label in channel 0 only. Refused with what to do (rule_based paints every channel)."""
    from nnunet_promptlesion.synthesis.sources import SourceContext, build_source
    from nnunet_promptlesion.trainers.settings import PromptLesionSettings
    from nnunet_promptlesion.utils.errors import PromptLesionConfigError

    settings = PromptLesionSettings.from_dict({"synthesizer": synthesizer}, "test")
    props = {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}
    ctx = SourceContext(settings=settings, spec=None, index=None, spacing=(1.0, 1.0, 1.0), patch_size=(32, 32, 32),
                        initial_patch_size=(32, 32, 32), intensity=[props, props], trainer=None, log=lambda m: None)
    with pytest.raises(PromptLesionConfigError, match="renders single-channel CT, but this dataset has 2 input "
                                                      "channels. Use the rule_based synthesizer"):
        build_source(synthesizer, ctx)
