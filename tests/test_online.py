"""Diffusion lesions inside real nnUNetv2_train runs (CPU, tiny generator, nnUNet_n_proc_DA=2 worker processes):
diffusion_cache and diffusion_online, and the online producer's lifetime (normal end, exception, SIGKILL)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, processes_with_env, wait_until_gone
from diffusion_fixtures import build_in_process, diffusion_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return diffusion_setup(tmp_path_factory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _train(setup, tmp_path, settings: dict, trainer: str, check=True, popen=False, extra_env=None):
    sfile = tmp_path / f"settings_{trainer}.json"
    sfile.write_text(json.dumps(settings))
    env = {**setup["env"], "PROMPTLESION_SETTINGS": str(sfile), "nnUNet_n_proc_DA": "2", **(extra_env or {})}
    out = Path(env["nnUNet_results"]) / setup["name"] / f"{trainer}__nnUNetPlans__3d_fullres"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(BIN / "nnUNetv2_train"), str(setup["did"]), "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out / "fold_0"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if check and p.returncode != 0:
        raise AssertionError(f"nnUNetv2_train failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p, out / "fold_0"


def _log(fold_dir: Path) -> str:
    logs = sorted(fold_dir.glob("training_log_*.txt"))
    return logs[-1].read_text() if logs else ""


def _producer_pid(text: str) -> int:
    m = re.search(r"producer pid (\d+)", text)
    assert m, text[-3000:]
    return int(m.group(1))


def _epoch_stats(text: str) -> list[dict]:
    return [json.loads(m.group(1)) for m in re.finditer(r"PromptLesion: epoch stats (\{.*\})", text)]


def _check_batches(fold_dir: Path, labels: set[int]) -> list[dict]:
    recs = [json.loads(l) for l in (fold_dir / "promptlesion_batches.jsonl").read_text().splitlines()]
    assert recs, "no training batch recorded"
    for r in recs:  # batch 2 = 1 real + 1 synthetic, every time; the drawn class is in the target
        assert r["batch"] == 2 and r["synthetic"] == 1, r
        assert all(s["in_target"] and s["label"] in labels for s in r["samples"]), r
    return recs


def test_shared_ring_round_trip_reuse_and_unlink():
    from nnunet_promptlesion.synthesis.diffusion_render import RenderedLesion
    from nnunet_promptlesion.synthesis.online_producer import RingSpec, SharedRing

    lock = mp.get_context("spawn").Lock()
    spec = RingSpec(name=f"pl_test_{os.getpid()}", labels=[4, 5], slots_per_class=2, max_voxels=1000)
    ring = SharedRing(spec, lock, create=True, cases=["a", "b"])
    rng = np.random.default_rng(0)
    assert ring.take(4, rng) is None
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 1:3, 2:4] = True
    sup = np.ones_like(mask)
    r = RenderedLesion(case="b", label=4, seed=7, box_lo=np.array([1, 2, 3]), mask=mask, support=sup,
                       values=np.arange(sup.sum(), dtype=np.float32), centre=np.array([2, 3, 5]))
    assert ring.put(r)
    other = SharedRing(spec, lock, create=False, cases=["a", "b"])  # what a worker / the producer sees
    got = other.take(4, rng)
    assert got.case == "b" and got.seed == 7 and np.array_equal(got.mask, mask) and np.array_equal(got.values, r.values)
    assert np.array_equal(got.box_lo, r.box_lo) and np.array_equal(got.centre, r.centre)
    other.take(4, rng)
    assert other.take(5, rng) is None
    c, cc, ready = ring.snapshot_and_reset()
    from nnunet_promptlesion.synthesis.online_producer import COUNTERS
    d = dict(zip(COUNTERS, c))
    assert d["draws"] == 2 and d["reused_draws"] == 1 and d["empty_class"] == 2 and ready == [1, 0]
    big = RenderedLesion(case="a", label=5, seed=1, box_lo=np.zeros(3, int), mask=np.ones((11, 10, 10), bool),
                         support=np.ones((11, 10, 10), bool), values=np.zeros(1100, np.float32), centre=np.zeros(3, int))
    assert not ring.put(big)  # larger than a slot: refused, never truncated
    other.close()
    ring.close()
    from multiprocessing import shared_memory
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=spec.name)


@pytest.fixture(scope="module")
def cache_run(setup, tmp_path_factory):
    """A cache (3 classes x 2) and a real nnUNetv2_train run on it (2 loader workers)."""
    tmp = tmp_path_factory.mktemp("cache_run")
    cache = tmp / "cache"
    code, _, err = build_in_process(setup, cache, per_class=2)
    assert code == 0, err[-3000:]
    _, fold = _train(setup, tmp, {"synthesizer": "diffusion_cache", "cache": str(cache), "class_weights": "uniform"},
                     "PromptLesionTrainer_checked")
    return {"cache": cache, "fold": fold}


@pytest.mark.slow
def test_nnunetv2_train_with_diffusion_cache(cache_run):
    fold = cache_run["fold"]
    _check_batches(fold, {4, 5, 6})
    stats = _epoch_stats(_log(fold))
    assert stats and stats[0]["loader"].get("diffusion_cache/draws", 0) >= 1 and not stats[0]["loader"].get("fallback_real")
    assert (fold / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_nnunetv2_train_with_diffusion_online(setup, tmp_path):
    online = {"synthesizer": "diffusion_online", "diffusion": str(setup["checkpoint"]), "steps": 2, "online_batch": 4,
              "class_weights": "uniform", "ring_slots_per_class": 4, "online_warmup_s": 600,
              "baseline_iterations": 0}
    _, fold = _train(setup, tmp_path, online, "PromptLesionTrainer_checked")
    _check_batches(fold, {4, 5, 6})
    text = _log(fold)
    assert "ring after warm-up" in text
    st = _epoch_stats(text)[0]
    assert st["loader"].get("diffusion_online/diffusion", 0) >= 1 and not st["loader"].get("fallback_real")
    src = st["source"]
    assert src["producer_alive"] and src["draws"] >= 1 and 0.0 <= src["reuse_rate"] <= 1.0 and src["mean_age_s"] >= 0
    assert src["rendered"] >= 1
    pid = _producer_pid(text)
    assert not _alive(pid), "the producer outlived the trainer"


@pytest.mark.slow
def test_quality_filter_with_a_trained_nnunet_model(setup, cache_run, monkeypatch, tmp_path):
    from nnunet_promptlesion.synthesis.cache import LesionCache, read_manifest
    from nnunet_promptlesion.synthesis.diffusion_render import CaseReader
    from nnunet_promptlesion.synthesis.quality import QualityFilter, QualityModelError

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, setup["env"][k])
    model = cache_run["fold"].parent
    plans = json.loads((setup["pre"] / "nnUNetPlans.json").read_text())
    cache = LesionCache(cache_run["cache"])
    samples = [s for v in cache.samples.values() for s in v]
    reader = CaseReader(setup["pre"] / "nnUNetPlans_3d_fullres", cache.manifest["fingerprint"]["train_cases"])
    q = QualityFilter(model, "0", min_iou=0.5, expect_plans=plans, configuration="3d_fullres")
    ious = q.iou(samples, reader)
    assert len(ious) == len(samples) and all(0.0 <= v <= 1.0 for v in ious)
    assert q.accept(samples, reader) == [v >= 0.5 for v in ious]
    other = json.loads(json.dumps(plans))
    other["configurations"]["3d_fullres"]["spacing"] = [1.0, 1.0, 1.0]
    with pytest.raises(QualityModelError, match="another preprocessed space"):
        QualityFilter(model, "0", expect_plans=other, configuration="3d_fullres")
    # the cache command applies the filter and records the acceptance per class (threshold 0: all pass)
    out = tmp_path / "qcache"
    code, _, err = build_in_process(setup, out, per_class=1, shard_size=3,
                                    extra=["--quality-model", model, "--quality-min-iou", "0.0"])
    assert code == 0, err[-3000:]
    m = read_manifest(out)
    assert m["build"]["quality"]["min_iou"] == 0.0
    assert {k: v["acceptance_rate"] for k, v in m["quality_acceptance"].items()} == {"4": 1.0, "5": 1.0, "6": 1.0}


@pytest.mark.slow
def test_producer_ends_after_exception_and_after_sigkill(setup, tmp_path):
    online = {"synthesizer": "diffusion_online", "diffusion": str(setup["checkpoint"]), "steps": 2, "online_batch": 2,
              "class_weights": "uniform", "ring_slots_per_class": 2, "online_warmup_s": 600}
    p, fold = _train(setup, tmp_path, online, "PromptLesionTrainer_crash", check=False)
    assert p.returncode != 0 and "deliberate crash" in p.stdout + p.stderr
    pid = _producer_pid(_log(fold))
    t0 = time.time()
    while _alive(pid) and time.time() - t0 < 30:
        time.sleep(0.2)
    assert not _alive(pid), "the producer outlived a crashed trainer"

    tag = {"PROMPTLESION_ONLINE_TEST_TAG": uuid.uuid4().hex}
    proc, fold = _train(setup, tmp_path, online, "PromptLesionTrainer_checked", popen=True, extra_env=tag)
    try:
        t0 = time.time()
        # kill the trainer once the producer runs (a producer still in multiprocessing's spawn bootstrap, which
        # re-imports nnU-Net, exits as soon as that bootstrap ends: slower to observe on a loaded machine)
        while "producer ready" not in _log(fold) and time.time() - t0 < 900 and proc.poll() is None:
            time.sleep(0.2)
        pid = _producer_pid(_log(fold))
        assert _alive(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.time()
        while _alive(pid) and time.time() - t0 < 60:
            time.sleep(0.2)
        assert not _alive(pid), "the producer outlived a SIGKILLed trainer"
        # and so must every other process of the run (nnU-Net's loader workers, multiprocessing's helpers)
        left = wait_until_gone(*next(iter(tag.items())), timeout=60)
        assert not left, f"processes of a SIGKILLed trainer left running: {left}"
    finally:
        for p in processes_with_env(*next(iter(tag.items()))):
            os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def _take_in_child(src, label, out):
    """Runs in a spawned process: the unpickled source re-attaches to the ring by name and reads a sample."""
    r = src._attach_ring().take(label, np.random.default_rng(0))
    out.put(None if r is None else (r.case, r.seed, r.values.tolist()))
    src.ring.close()


def test_online_source_pickles_into_a_spawned_process(setup, monkeypatch):
    """Linux defaults to forkserver from Python 3.14: the online source must travel to a non-forked worker (no
    trainer logger closure, ring re-attached by name, lock and queues inherited through spawning)."""
    import torch

    from nnunet_promptlesion.synthesis.diffusion_render import RenderedLesion
    from nnunet_promptlesion.synthesis.sources import SourceContext, build_source
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
    from nnunet_promptlesion.trainers.settings import PromptLesionSettings

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, setup["env"][k])
    plans = json.loads((setup["pre"] / "nnUNetPlans.json").read_text())
    dj = json.loads((setup["pre"] / "dataset.json").read_text())
    plans["continue_training"] = False  # set by nnUNetv2_train's entry point; nnU-Net's __init__ pops it
    t = PromptLesionTrainer(plans, "3d_fullres", 0, dj, device=torch.device("cpu"))
    t.promptlesion_setup()
    settings = PromptLesionSettings.from_dict({"synthesizer": "diffusion_online", "diffusion": str(setup["checkpoint"]),
                                               "ring_slots_per_class": 1}, "test")
    cm = t.configuration_manager
    ctx = SourceContext(settings=settings, spec=t.promptlesion_spec, index=None, spacing=tuple(cm.spacing),
                        patch_size=tuple(cm.patch_size), initial_patch_size=tuple(cm.patch_size),
                        intensity=t._intensity_properties(), trainer=t, log=lambda msg: None)
    src = build_source("diffusion_online", ctx)
    try:
        label = src.labels[0]
        mask = np.ones((2, 2, 2), bool)
        src.ring.put(RenderedLesion(case=src.train_ids[0], label=label, seed=11, box_lo=np.zeros(3, int), mask=mask,
                                    support=mask, values=np.arange(8, dtype=np.float32), centre=np.ones(3, int)))
        q = src._ctx.Queue()
        p = src._ctx.Process(target=_take_in_child, args=(src, label, q))
        p.start()
        got = q.get(timeout=300)
        p.join(60)
        assert p.exitcode == 0 and got == (src.train_ids[0], 11, list(range(8)))
    finally:
        src.close()


SPAWN_PROG = """
import multiprocessing as mp, os, sys
open(os.path.join(os.environ["MARKS"], str(os.getpid())), "w").close()   # every process that runs this file
from nnunet_promptlesion.utils.lifetime import spawn_without_main
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    main = sys.modules["__main__"]
    before = (main.__spec__, main.__file__)
    for hide in (False, True):
        p = ctx.Process(target=os.getpid)
        if hide:
            with spawn_without_main():
                p.start()
        else:
            p.start()
        p.join()
        print(hide, p.exitcode, len(os.listdir(os.environ["MARKS"])))
    assert (main.__spec__, main.__file__) == before
"""


def test_producer_spawn_skips_the_parents_main_module(tmp_path):
    """A spawned child re-runs the parent's __main__ (under nnUNetv2_train: all of nnU-Net's training imports); the
    producer is started without it, and the parent's main module is left as it was."""
    prog, marks = tmp_path / "prog.py", tmp_path / "marks"
    prog.write_text(SPAWN_PROG)
    marks.mkdir()
    r = subprocess.run([sys.executable, str(prog)], env={**os.environ, "MARKS": str(marks)}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # parent + the ordinary child ran the file; the child started inside spawn_without_main did not
    assert r.stdout.split("\n")[:2] == ["False 0 2", "True 0 2"], r.stdout
