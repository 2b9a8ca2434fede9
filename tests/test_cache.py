"""promptlesion_build_cache and the diffusion_cache source on a real nnU-Net preprocessed phantom (CPU, tiny generator)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, run
from diffusion_fixtures import build_cache_cmd, build_in_process, diffusion_setup

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return diffusion_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_a(setup, tmp_path_factory):
    """An uninterrupted cache: 3 classes x 2 samples in 3 shards of 2."""
    out = tmp_path_factory.mktemp("cache") / "a"
    code, stdout, stderr = build_in_process(setup, out)
    assert code == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1]) == {"synthesizer": "diffusion_cache",
                                                           "cache": str(out.resolve())}
    return out


def _shards(folder: Path) -> dict:
    from nnunet_promptlesion.synthesis.cache import read_shard

    return {p.name: read_shard(p) for p in sorted((folder / "shards").glob("shard_*.npz"))}


def _env_paths(setup, monkeypatch):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, setup["env"][k])


def test_cache_holds_only_training_cases_of_the_fold_and_a_montage(setup, cache_a, monkeypatch):
    from nnunet_promptlesion.generator.data import nnunet_fold_split
    from nnunet_promptlesion.synthesis.cache import read_manifest

    _env_paths(setup, monkeypatch)
    m = read_manifest(cache_a)
    assert m["complete"] and m["counts"] == {"4": 2, "5": 2, "6": 2}
    ids = sorted(p.name[:-5] for p in (setup["pre"] / "nnUNetPlans_3d_fullres").glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    tr, val = nnunet_fold_split(setup["pre"], ids, 0)
    assert val and set(m["fingerprint"]["train_cases"]) == set(tr)
    cases = {str(c) for s in _shards(cache_a).values() for c in s["case"]}
    assert cases and cases <= set(tr) and not cases & set(val)
    assert (cache_a / "montage.png").stat().st_size > 5000
    assert m["generator"]["mapping"]["identity_grid"] is False  # NIfTI-trained generator: axes/intensity mapped


def test_cached_sample_rebuilds_exactly_outside_its_blend_support(setup, cache_a, monkeypatch):
    from nnunet_promptlesion.synthesis.cache import LesionCache
    from nnunet_promptlesion.synthesis.diffusion_render import CaseReader
    from nnunet_promptlesion.lesions.spec import LesionSpec

    _env_paths(setup, monkeypatch)
    cache = LesionCache(cache_a)
    spec = LesionSpec.from_dict(cache.manifest["build"]["lesion_spec"])
    reader = CaseReader(setup["pre"] / "nnUNetPlans_3d_fullres", cache.manifest["fingerprint"]["train_cases"])
    changed_any = False
    for label, samples in cache.samples.items():
        for s in samples:
            lo = np.asarray(s.box_lo) - 5
            size = np.asarray(s.mask.shape) + 10
            img, seg = reader.crop(s.case, lo, size)
            new = img.copy()
            mask = s.paste(new, lo)
            support = np.zeros(mask.shape, bool)
            support[tuple(slice(5, 5 + n) for n in s.mask.shape)] = s.support
            assert np.array_equal(new[0][~support], img[0][~support])
            changed_any |= not np.array_equal(new[0][mask], img[0][mask])
            lesion = spec.by_label(label)
            allowed = np.isin(seg[0], lesion.parents) | ((seg[0] == 0) if lesion.may_leave_parent else False)
            assert mask.any() and allowed[mask].all()
    assert changed_any


def test_kill_and_resume_equals_uninterrupted(setup, cache_a, tmp_path):
    out = tmp_path / "b"
    # a first run stopped cleanly after one shard, then a run killed (SIGKILL) while rendering, then a resume
    assert build_in_process(setup, out, extra=["--stop-after-shards", 1])[0] == 0
    assert [p.name for p in (out / "shards").glob("*.npz")] == ["shard_000000.npz"]
    p = subprocess.Popen([str(c) for c in build_cache_cmd(setup, out)], env=setup["env"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300 and not (out / "shards" / "shard_000001.npz").exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    for f in (out / "shards").iterdir():  # whatever is on disk is complete (partials are hidden temp files)
        if f.name.startswith("shard_"):
            _shards(out)
    assert build_in_process(setup, out)[0] == 0
    a, b = _shards(cache_a), _shards(out)
    assert list(a) == list(b) == ["shard_000000.npz", "shard_000001.npz", "shard_000002.npz"]
    for name in a:
        for key in ("case", "label", "seed", "item", "box_lo", "box_shape", "centre", "mask_bits", "support_bits"):
            assert np.array_equal(a[name][key], b[name][key]), (name, key)
        np.testing.assert_allclose(a[name]["values"], b[name]["values"], rtol=0, atol=1e-5)
    assert not [f for f in (out / "shards").iterdir() if f.name.startswith(".")]
    ma, mb = json.loads((cache_a / "manifest.json").read_text()), json.loads((out / "manifest.json").read_text())
    assert ma["fingerprint"] == mb["fingerprint"] and ma["counts"] == mb["counts"]
    # the same folder with other build settings is refused
    code, _, stderr = build_in_process(setup, out, per_class=3)
    assert code == 2 and "other build settings" in stderr


def test_fingerprint_mismatch_is_refused(setup, cache_a, monkeypatch):
    from nnunet_promptlesion.synthesis.cache import CacheError, LesionCache, run_fingerprint

    _env_paths(setup, monkeypatch)
    cache = LesionCache(cache_a)
    plans = json.loads((setup["pre"] / "nnUNetPlans.json").read_text())
    fp = cache.manifest["fingerprint"]
    state = dict(data_folder=setup["pre"] / "nnUNetPlans_3d_fullres", lesion_spec=fp["lesion_spec"],
                 labels=json.loads((setup["pre"] / "dataset.json").read_text())["labels"])
    same = run_fingerprint(plans, "3d_fullres", 0, fp["train_cases"], setup["name"], **state)
    cache.check_run(same)
    with pytest.raises(CacheError, match=r"fold: cache \"0\", this run \"1\".*train_cases: only in the cache "
                                         r"\['[^']+'\], only in this run \['x'\].*promptlesion_build_cache"):
        cache.check_run(run_fingerprint(plans, "3d_fullres", 1, fp["train_cases"][1:] + ["x"], setup["name"], **state))
    plans["configurations"]["3d_fullres"]["spacing"] = [1.0, 1.0, 1.0]
    with pytest.raises(CacheError, match="spacing"):
        cache.check_run(run_fingerprint(plans, "3d_fullres", 0, fp["train_cases"], setup["name"], **state))


def test_cli_help_and_errors(setup, tmp_path):
    r = subprocess.run([str(BIN / "python"), "-m", "nnunet_promptlesion.cli.build_cache", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--per-class" in r.stdout and "torchrun" in r.stdout
    code, _, stderr = build_in_process(setup, tmp_path / "x", extra=["--classes", "nope"])
    assert code == 2 and "--classes" in stderr


@pytest.mark.slow
def test_torchrun_ranks_render_disjoint_shards_equal_to_one_process(setup, cache_a, tmp_path):
    out = tmp_path / "tr"
    cmd = build_cache_cmd(setup, out)
    run([BIN / "torchrun", "--standalone", "--nproc_per_node", 2, *cmd[1:]], setup["env"])
    log = (out / "build.log").read_text()
    assert "rank0 shard 0 written" in log and "rank1 shard 1 written" in log and "rank0 shard 2 written" in log
    a, b = _shards(cache_a), _shards(out)
    assert list(a) == list(b)
    for name in a:
        assert np.array_equal(a[name]["seed"], b[name]["seed"]) and np.array_equal(a[name]["case"], b[name]["case"])
        np.testing.assert_allclose(a[name]["values"], b[name]["values"], rtol=0, atol=1e-5)
    seeds = np.concatenate([s["seed"] for s in b.values()])
    assert len(set(seeds.tolist())) == len(seeds)


def test_pretrain_plans_skips_finished_steps_and_prints_settings(setup, monkeypatch, capsys):
    from nnunet_promptlesion.cli.pretrain import main

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, setup["env"][k])
    assert main(["-d", str(setup["did"]), "-f", "0", "--preset", "tiny", "--cache-per-class", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[1/3] vqgan: promptlesion_train_vqgan -d 903" in out and "--steps 2000" in out
    assert "[3/3] cache: promptlesion_build_cache" in out and "--per-class 4" in out
    res = Path(setup["env"]["nnUNet_results"]) / setup["name"]
    for d in ("promptlesion_vqgan__tiny__3d_fullres__fold0", "promptlesion_diffusion__tiny__3d_fullres__fold0"):
        (res / d).mkdir(parents=True, exist_ok=True)
        (res / d / "checkpoint_final.pt").write_bytes(b"")
    try:
        assert main(["-d", str(setup["did"]), "-f", "0", "--preset", "tiny"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert "exists, skipped" in lines[0] and "exists, skipped" in lines[1]
        assert json.loads(lines[-1]) == {"synthesizer": "diffusion_online", "diffusion": str(
            (res / "promptlesion_diffusion__tiny__3d_fullres__fold0" / "checkpoint_final.pt").resolve())}
    finally:
        for d in ("promptlesion_vqgan__tiny__3d_fullres__fold0", "promptlesion_diffusion__tiny__3d_fullres__fold0"):
            (res / d / "checkpoint_final.pt").unlink()


def _copy_dataset(setup, root: Path) -> Path:
    """A copy of the preprocessed dataset that keeps file sizes and mtimes (shutil.copy2), as `cp -a` would."""
    dst = root / "preprocessed" / setup["name"]
    shutil.copytree(setup["pre"], dst, copy_function=shutil.copy2,
                    ignore=shutil.ignore_patterns("promptlesion_cache", "promptlesion_index"))
    return dst


def test_cache_built_before_a_label_edit_is_refused_naming_the_difference(setup, cache_a, tmp_path, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from nnunet_promptlesion.synthesis.cache import CacheError, LesionCache, describe_difference, run_fingerprint

    cache = LesionCache(cache_a)
    fp = cache.manifest["fingerprint"]
    pre = _copy_dataset(setup, tmp_path)
    data = pre / "nnUNetPlans_3d_fullres"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    labels = json.loads((pre / "dataset.json").read_text())["labels"]

    def fingerprint(**kw):
        args = dict(data_folder=data, labels=labels, lesion_spec=fp["lesion_spec"])
        args.update(kw)
        return run_fingerprint(plans, "3d_fullres", 0, fp["train_cases"], setup["name"], **args)

    cache.check_run(fingerprint())  # an unchanged copy of the data is the same data
    # dataset.json labels edited: named
    edited = {**labels, "renamed_structure": max(labels.values()) + 1}
    with pytest.raises(CacheError, match=r"labels \(dataset.json\).*renamed_structure"):
        cache.check_run(fingerprint(labels=edited))
    # a corrected segmentation of one training case (the seg file rewritten, as an edit + re-preprocessing does)
    case = fp["train_cases"][1]
    seg = np.asarray(nnUNetDatasetBlosc2(str(data), [case]).load_case(case)[1][:])
    fg = np.argwhere(seg > 0)[0]
    seg[tuple(fg)] = 0
    time.sleep(0.01)  # a distinct mtime on coarse-grained filesystems
    nnUNetDatasetBlosc2.save_seg(seg, str(data / f"{case}_seg"))
    assert f"['{case}']" in describe_difference(fp, fingerprint())
    # the real path: nnUNetv2_train with this cache on the edited copy refuses to start and names the case
    sfile = tmp_path / "settings.json"
    sfile.write_text(json.dumps({"synthesizer": "diffusion_cache", "cache": str(cache_a), "class_weights": "uniform"}))
    env = {**setup["env"], "nnUNet_preprocessed": str(pre.parent), "PROMPTLESION_SETTINGS": str(sfile),
           "nnUNet_n_proc_DA": "0"}
    r = subprocess.run([str(BIN / "nnUNetv2_train"), str(setup["did"]), "3d_fullres", "0", "-tr",
                        "PromptLesionTrainer_checked", "-device", "cpu"], env=env, capture_output=True, text=True,
                       timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "case_files: the preprocessed files of 1 training case(s) changed" in out and case in out, out[-3000:]
    assert "Rebuild it" in out


def test_cache_is_memory_mapped_ids_are_not_cut_and_sources_pickle(setup, cache_a, tmp_path, monkeypatch):
    import pickle

    from nnunet_promptlesion.synthesis.cache import LesionCache, read_shard, write_shard

    _env_paths(setup, monkeypatch)
    cache = LesionCache(cache_a)
    # memory-mapped arrays, nothing decompressed into the heap; a pickle carries the path, not the data
    assert all(isinstance(v, np.memmap) for v in cache._a.values())
    blob = pickle.dumps(cache)
    assert len(blob) < len(pickle.dumps(cache.manifest)) + 1024  # folder + manifest, no sample data
    back = pickle.loads(blob)
    for label in cache.labels():
        assert back.count(label) == cache.count(label) > 0
        a, b = cache.get(label, 0), back.get(label, 0)
        assert a.case == b.case and np.array_equal(a.mask, b.mask) and np.array_equal(a.values, b.values)
        assert a.mask.dtype == bool and a.mask.shape == tuple(a.box_shape)  # unpacked per draw
    # a case id longer than 128 characters survives a shard round trip whole
    s = cache.get(cache.labels()[0], 0)
    long_id = "case_" + "x" * 300
    s.case = long_id
    write_shard(tmp_path / "s.npz", [s], [0], {})
    assert str(read_shard(tmp_path / "s.npz")["case"][0]) == long_id
    # the diffusion_cache source, built by a real trainer, pickles (no trainer logger closure inside)
    import torch

    from nnunet_promptlesion.synthesis.sources import SourceContext, build_source
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
    from nnunet_promptlesion.trainers.settings import PromptLesionSettings

    plans = json.loads((setup["pre"] / "nnUNetPlans.json").read_text())
    dj = json.loads((setup["pre"] / "dataset.json").read_text())
    plans["continue_training"] = False  # set by nnUNetv2_train's entry point; nnU-Net's __init__ pops it
    t = PromptLesionTrainer(plans, "3d_fullres", 0, dj, device=torch.device("cpu"))
    t.promptlesion_setup()
    settings = PromptLesionSettings.from_dict({"synthesizer": "diffusion_cache", "cache": str(cache_a)}, "test")
    cm = t.configuration_manager
    ctx = SourceContext(settings=settings, spec=t.promptlesion_spec, index=None, spacing=tuple(cm.spacing),
                        patch_size=tuple(cm.patch_size), initial_patch_size=tuple(cm.patch_size),
                        intensity=t._intensity_properties(), trainer=t, log=lambda msg: None)
    src = build_source("diffusion_cache", ctx)
    src2 = pickle.loads(pickle.dumps(src))
    lab = cache.labels()[0]
    assert np.array_equal(src2.cache.get(lab, 0).values, src.cache.get(lab, 0).values)


def test_a_lesion_does_not_depend_on_its_batch_companions(setup, cache_a, monkeypatch):
    """Each request draws noise from its own recorded seed: the same request rendered beside another
    companion gives the same lesion (it used to take the whole batch's noise from the first request's seed)."""
    from nnunet_promptlesion.synthesis.cache import LesionCache
    from nnunet_promptlesion.synthesis.cache_build import RunContext
    from nnunet_promptlesion.synthesis.diffusion_render import DiffusionRenderer, LesionRequest

    _env_paths(setup, monkeypatch)
    ctx = RunContext(setup["did"], "3d_fullres", 0, "nnUNetPlans")
    renderer = DiffusionRenderer(setup["checkpoint"], ctx.grid, ctx.spec, ctx.reader, vqgan=setup["vqgan"],
                                 device="cpu", sampler="ddim", steps=2)
    samples = [s for ss in LesionCache(cache_a).samples.values() for s in ss]
    reqs = [LesionRequest(case=s.case, label=int(s.label), mask_lo=np.asarray(s.box_lo), mask=s.mask,
                          seed=1000 + i, sigma=1.0) for i, s in enumerate(samples[:3])]
    with_a = renderer.render([reqs[0], reqs[2]])[1]
    with_b = renderer.render([reqs[1], reqs[2]])[1]
    assert with_a is not None and with_b is not None
    assert np.array_equal(with_a.mask, with_b.mask) and np.array_equal(with_a.support, with_b.support)
    # Same shapes, same per-row arithmetic: equal up to rounding. A nearest-code flip at the decoder can move a
    # few voxels by more, so the check is on the share of voxels that differ, not on every voxel.
    differs = np.abs(with_a.values - with_b.values) > 1e-3 * max(1.0, float(np.abs(with_a.values).max()))
    assert differs.mean() < 0.01, f"{differs.mean():.1%} of the lesion's voxels depend on the other request"
