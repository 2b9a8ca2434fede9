"""PromptLesionTrainer on the paths real users take (issue 10): region-based labels, 2D and cascade
configurations, DDP, real loader worker processes, the spawn start method, failed placements, the
start-up scan and its cache. All on the CPU with nnU-Net's own planning and preprocessing."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.utilities.file_and_folder_operations import load_json
from conftest import BIN, nnunet_env, run

from nnunet_promptlesion.utils.errors import PromptLesionConfigError
from nnunet_promptlesion.placement.index import MAX_CENTRES_PER_CASE, centre_box, centre_slices
from nnunet_promptlesion.trainers.mixing_loader import STATS_KEY
from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
from nnunet_promptlesion.trainers.settings import SETTINGS_ENV
from nnunet_promptlesion.trainers.transforms import training_transforms

CCTA = "Dataset601_PhantomCCTA"
KITS_ID, KITS = 611, "Dataset611_KiTS23"


def make_trainer(pre: Path, configuration="3d_fullres", plans=None, fold=0):
    plans = plans or load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    return PromptLesionTrainer(plans, configuration, fold, load_json(str(pre / "dataset.json")),
                               device=torch.device("cpu"))


def build_loader(trainer, with_transforms=True):
    """The training loader exactly as PromptLesionTrainer.get_dataloaders builds it (no worker pool)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer.initialize()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    ds_tr, _ = trainer.get_tr_and_val_datasets()
    ps = trainer.configuration_manager.patch_size
    if not with_transforms:
        return trainer.build_train_loader(ds_tr, ps, None), ds_tr
    initial, tr = training_transforms(trainer)
    return trainer.build_train_loader(ds_tr, initial, tr), ds_tr


@pytest.fixture(scope="module")
def kits_regions(tmp_path_factory):
    """A KiTS23-style region dataset written by promptlesion_convert --region-labels, planned and preprocessed."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_releases import fake_kits

    root = tmp_path_factory.mktemp("kits_regions")
    env = nnunet_env(root)
    fake_kits(root / "src", "kits23", n_cases=5)
    run([BIN / "promptlesion_convert", "kits", root / "src", "--version", "kits23", "--region-labels",
         "-d", KITS_ID, "--no-progress"], env)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", KITS_ID, "-c", "3d_fullres", "-np", 1, "-npfp", 1], env)
    return root, env


@pytest.fixture
def use_env(monkeypatch):
    def apply(env):
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            monkeypatch.setenv(k, env[k])
        monkeypatch.delenv(SETTINGS_ENV, raising=False)
    return apply


# ------------------------------------------------------------------------------------------------ regions
def test_region_dataset_from_converter_trains_with_synthetic_samples(kits_regions):
    """promptlesion_convert kits --region-labels -> nnU-Net plan/preprocess -> nnUNetv2_train -tr ..._smoke,
    with real data-augmentation worker processes."""
    root, env = kits_regions
    ds = json.loads((root / "raw" / KITS / "dataset.json").read_text())
    assert isinstance(ds["labels"]["kidney"], list) and "regions_class_order" in ds
    run([BIN / "nnUNetv2_train", KITS_ID, "3d_fullres", 0, "-tr", "PromptLesionTrainer_smoke", "-device", "cpu"],
        {**env, "nnUNet_n_proc_DA": "2", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}, timeout=1500)
    out = root / "results" / KITS / "PromptLesionTrainer_smoke__nnUNetPlans__3d_fullres" / "fold_0"
    assert (out / "checkpoint_final.pth").is_file()
    log = next(out.glob("training_log_*.txt")).read_text()
    assert "batch 2 = 1 real + 1 synthetic" in log
    line = next(l for l in log.splitlines() if "PromptLesion: epoch stats" in l)
    stats = json.loads(line.split("epoch stats ", 1)[1].split(" (", 1)[0])["loader"]
    assert stats["batches"] == 2
    n_syn = sum(v for k, v in stats.items() if k.startswith("synthetic/"))
    assert n_syn + stats.get("fallback_real", 0) == 2 and n_syn >= 1


def test_region_targets_follow_nnunet_region_conversion(kits_regions, use_env):
    """The lesion label written into the segmentation becomes the right region channels after nnU-Net's
    own region conversion: kidney (1|2|3) and masses (2|3) on for a cyst, tumour (2) only for tumours."""
    root, env = kits_regions
    use_env(env)
    trainer = make_trainer(Path(env["nnUNet_preprocessed"]) / KITS)
    loader, _ = build_loader(trainer, with_transforms=False)
    lm = trainer.label_manager
    assert lm.has_regions
    val_tr = trainer.get_validation_transforms(None, is_cascaded=False, foreground_labels=lm.foreground_labels,
                                               regions=lm.foreground_regions, ignore_label=lm.ignore_label)
    regions = [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in lm.foreground_regions]
    np.random.seed(0)
    for class_idx, lesion in enumerate(loader.index.spec.lesions):
        for _ in range(3):
            s = loader.make_synthetic(class_idx)
            m = s.mask
            assert m.any()
            target = val_tr(image=torch.from_numpy(s.data), segmentation=torch.from_numpy(s.seg))["segmentation"]
            for ch, region in enumerate(regions):
                assert bool(target[ch][torch.from_numpy(m)].all()) == (lesion.label in region)
                assert not bool(target[ch][torch.from_numpy(m)].any()) or lesion.label in region


# ------------------------------------------------------------------------------------------------ 2D, cascade
@pytest.fixture(scope="module")
def ccta_2d(ccta_dataset):
    root, did, env = ccta_dataset
    # the phantom is shared with other xdist workers, but only this module uses (and writes) its 2d data
    if not (root / "preprocessed" / CCTA / "nnUNetPlans_2d").is_dir():
        run([BIN / "nnUNetv2_preprocess", "-d", did, "-c", "2d", "-np", 1], env)
    return root, env


def test_2d_configuration_places_lesions_per_slice(ccta_2d, use_env):
    root, env = ccta_2d
    use_env(env)
    pre = root / "preprocessed" / CCTA
    trainer = make_trainer(pre, "2d")
    loader, ds = build_loader(trainer)
    ps = tuple(trainer.configuration_manager.patch_size)
    assert len(ps) == 2 and loader.patch_size_was_2d
    np.random.seed(1)
    batch = loader.generate_train_batch()
    bs = trainer.batch_size
    assert tuple(batch["data"].shape) == (bs, 1, *ps)
    assert tuple(batch["target"][0].shape) == (bs, 1, *ps)
    assert int(batch["synthetic"].sum()) == bs // 2
    spec = loader.index.spec
    # untransformed samples: one slice, lesion inside the parent of that slice, centred in the centre region
    raw, _ = build_loader(make_trainer(pre, "2d"), with_transforms=False)
    for i in range(6):
        s = raw.make_synthetic(i % len(spec.lesions))
        assert s.data.shape[1] == 1 and s.placement.lesion_box[0] == (0, 1)
        data, seg, _, _ = ds.load_case(s.case)
        orig = crop_and_pad_nd(seg, s.bbox, -1)[0]
        lesion = spec.by_label(s.label)
        assert np.isin(orig[s.mask], lesion.parents).all()
        assert (s.seg[0][s.mask] == s.label).all()
        assert np.array_equal(s.seg[0][~s.mask], orig[~s.mask])


def test_cascade_is_refused_at_initialize(nnunet_paths):
    _, _, env = nnunet_paths
    pre = Path(env["nnUNet_preprocessed"]) / CCTA
    plans = load_json(str(pre / "nnUNetPlans.json"))
    cfg = dict(plans["configurations"]["3d_fullres"])
    plans["configurations"]["3d_lowres"] = dict(cfg, next_stage="3d_cascade_fullres")
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    trainer = make_trainer(pre, "3d_cascade_fullres", plans=plans)
    with pytest.raises(PromptLesionConfigError, match="cascade.*3d_fullres"):
        trainer.initialize()


# ------------------------------------------------------------------------------------------------ failures
def test_failed_placements_fall_back_to_real_samples_and_are_counted(nnunet_paths, tmp_path, monkeypatch):
    _, _, env = nnunet_paths
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"synthetic_fraction": 1.0, "placement_tries": 3, "draw_tries": 2}))
    monkeypatch.setenv(SETTINGS_ENV, str(settings))
    trainer = make_trainer(Path(env["nnUNet_preprocessed"]) / CCTA)
    loader, ds = build_loader(trainer)
    # Point every carrier of the first class at a background voxel: no parent voxel in any centre region.
    first = loader.index.spec.lesions[0]
    case = loader.placer.pools[0][0][0]
    _, seg, _, props = ds.load_case(case)
    bg = np.argwhere(np.asarray(seg[0]) == 0)[:5].astype(np.uint16)
    loader.placer.pools[0] = [(case, bg)]
    loader.class_probs = np.eye(len(loader.class_probs))[0]
    np.random.seed(2)
    batch = loader.generate_train_batch()
    assert batch["synthetic"].tolist() == [False, False]  # both slots fell back to real samples
    stats = batch[STATS_KEY]
    assert stats["fallback_real"] == 2 and stats["draw_failures"] == 4
    assert stats["placement_failures"] == 4 and stats["placement_retries"] == 12
    assert not any(k.startswith("synthetic/") for k in stats), first.name
    # the trainer sums the counters of the batches it trains on and logs them per epoch
    trainer._promptlesion_epoch_stats.update(stats)
    trainer._promptlesion_epoch_stats.update(loader.generate_train_batch()[STATS_KEY])
    summary = trainer.promptlesion_epoch_summary()["loader"]
    assert summary["fallback_real"] == 4 and summary["batches"] == 2


# ------------------------------------------------------------------------------------------------ scan
def _reference_healthy(seg: np.ndarray, lesion_labels, box) -> np.ndarray:
    """Brute force: voxel c is a healthy centre iff [c - box // 2, c + box // 2] holds no lesion voxel."""
    from scipy import ndimage
    return ~(ndimage.maximum_filter(np.isin(seg, lesion_labels).astype(np.uint8), size=tuple(box),
                                    mode="constant") > 0)


def test_scan_carriers_are_exactly_the_healthy_parent_locations(loader_and_data_ccta):
    trainer, loader, ds = loader_and_data_ccta
    index = loader.index
    spec = index.spec
    box = centre_box(trainer.configuration_manager.patch_size, trainer.promptlesion_settings.centre_fraction)
    for p, entries in index.carriers.items():
        for case, xyz in entries:
            assert xyz.dtype == np.uint16
            _, seg, _, props = ds.load_case(case)
            seg = np.asarray(seg[0])
            healthy = _reference_healthy(seg, spec.labels, box)
            locs = np.asarray(props["class_locations"][p])[:, 1:]
            expected = {tuple(int(a) for a in v) for v in locs if healthy[tuple(v)]}
            got = {tuple(int(a) for a in v) for v in xyz}
            # every healthy location, subsampled to MAX_CENTRES_PER_CASE
            assert got <= expected and len(got) == len(xyz) == min(len(expected), MAX_CENTRES_PER_CASE)
            # and in the loader's own coordinates: the centre region of every carrier patch is lesion-free
            region = centre_slices(loader.patch_size, loader.placer.centre_box)
            for v in xyz[:: max(1, len(xyz) // 50)]:
                crop = crop_and_pad_nd(seg[None], loader.placer.carrier_bbox(v), -1)[0]
                assert not np.isin(crop[region], spec.labels).any()


def test_scan_is_cached_with_a_fingerprint_and_pickles_small(nnunet_paths, tmp_path, monkeypatch):
    _, _, env = nnunet_paths
    pre = Path(env["nnUNet_preprocessed"]) / CCTA
    t1 = make_trainer(pre)
    build_loader(t1, with_transforms=False)
    t2 = make_trainer(pre)
    loader, _ = build_loader(t2, with_transforms=False)
    assert t2.promptlesion_index_origin == "cache"
    # a different spec is a different fingerprint: rebuilt, not loaded
    spec = json.loads((pre.parents[1] / "raw" / CCTA / "lesion_spec.json").read_text())
    spec["lesions"][0]["bank_probability"] = 0.25
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "s.json").write_text(json.dumps({"lesion_spec": str(tmp_path / "spec.json")}))
    monkeypatch.setenv(SETTINGS_ENV, str(tmp_path / "s.json"))
    t3 = make_trainer(pre)
    build_loader(t3, with_transforms=False)
    assert t3.promptlesion_index_origin == "built"
    assert len(pickle.dumps(loader.index)) < 2_000_000


def _spawned_batch(payload: bytes, queue) -> None:
    loader = pickle.loads(payload)
    np.random.seed(5)
    b = loader.generate_train_batch()
    queue.put((b["synthetic"].tolist(), b[STATS_KEY], tuple(b["data"].shape)))


def test_loader_runs_in_a_spawned_process(loader_and_data_ccta):
    trainer, loader, _ = loader_and_data_ccta
    payload = pickle.dumps(loader)
    assert len(payload) < 5_000_000
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_spawned_batch, args=(payload, q))
    p.start()
    try:
        synthetic, stats, shape = q.get(timeout=300)
    finally:
        p.join(timeout=60)
    assert p.exitcode == 0
    assert synthetic == [False, True] and shape[0] == 2 and stats["batches"] == 1


@pytest.fixture(scope="module")
def loader_and_data_ccta(ccta_dataset):
    root, _, env = ccta_dataset
    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(k, env[k])
        mp.delenv(SETTINGS_ENV, raising=False)
        trainer = make_trainer(root / "preprocessed" / CCTA)
        loader, ds = build_loader(trainer)
        yield trainer, loader, ds


# ------------------------------------------------------------------------------------------------ workers
_PROBE: list = [None]


class _TorchProbe:
    """Draws torch.rand() before nnU-Net's transforms and writes it into voxel 0 of the transformed image:
    the first draw of every worker shows whether the workers share one torch generator state."""

    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, **d):
        _PROBE[0] = torch.rand(())
        d = self.transforms(**d)
        d["image"][(0,) * d["image"].ndim] = _PROBE[0]
        return d


def test_real_worker_processes_draw_distinct_samples_with_per_worker_torch_seeds(loader_and_data_ccta):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    trainer, loader, _ = loader_and_data_ccta
    old = loader.transforms
    # the probe runs first, so each worker's first torch draw shows whether the workers share one torch state
    loader.transforms = _TorchProbe(old)
    aug = NonDetMultiThreadedAugmenter(loader, None, 2, num_cached=2, seeds=None, pin_memory=False, wait_time=0.002)
    try:
        batches = [next(aug) for _ in range(8)]
    finally:
        aug._finish()
        loader.transforms = old
    probes = [float(b["data"][i].reshape(-1)[0]) for b in batches for i in range(len(b["keys"]))]
    assert len(set(probes)) == len(probes), "torch streams repeat across workers"
    syn = [b["data"][i] for b in batches for i in np.flatnonzero(b["synthetic"].numpy())]
    assert len(syn) == 8
    for i in range(len(syn)):
        for j in range(i + 1, len(syn)):
            assert not torch.equal(syn[i], syn[j]), "numpy streams repeat across workers"
    assert sum(b[STATS_KEY]["batches"] for b in batches) == 8


# ------------------------------------------------------------------------------------------------ DDP
DDP_SCRIPT = r"""
import json, os, sys
import numpy as np, torch, torch.distributed as dist
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
from nnunet_promptlesion.trainers.mixing_loader import STATS_KEY

dist.init_process_group("gloo")
rank = dist.get_rank()
pre, out = sys.argv[1], sys.argv[2]
plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
plans["continue_training"] = False
t = PromptLesionTrainer(plans, "3d_fullres", 0, load_json(os.path.join(pre, "dataset.json")), torch.device("cpu"))
t.device = torch.device("cpu")  # nnU-Net assumes CUDA under DDP; the loader path does not need a device
# nnU-Net's initialize() would wrap a CPU network in DDP with device_ids; run the parts the loader needs
t.promptlesion_setup()
t._set_batch_size_and_oversample()
t.dataset_class = infer_dataset_class(t.preprocessed_dataset_folder)
ds_tr, _ = t.get_tr_and_val_datasets()
loader = t.build_train_loader(ds_tr, t.configuration_manager.patch_size, None)
np.random.seed(100 + rank)
flags = []
for _ in range(4):
    b = loader.generate_train_batch()
    flags.append(b["synthetic"].tolist())
    t._promptlesion_epoch_stats.update(b[STATS_KEY])
summary = t.promptlesion_epoch_summary()
json.dump({"rank": rank, "batch_size": t.batch_size, "flags": flags, "origin": t.promptlesion_index_origin,
           "summary": summary}, open(os.path.join(out, f"rank{rank}.json"), "w"))
dist.destroy_process_group()
"""


def test_ddp_two_gloo_ranks_keep_the_global_synthetic_share(nnunet_paths, tmp_path):
    """Global batch 2 over 2 ranks (1 sample each): one rank synthetic, one real, every step; rank 0 scans,
    rank 1 loads the cached index; the per-epoch counters are summed over ranks."""
    _, _, env = nnunet_paths
    pre = Path(env["nnUNet_preprocessed"]) / CCTA
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    # a private copy without the index cache, so that rank 0 really builds: the shared phantom's cache can be written
    # by a test in another xdist worker between an unlink here and the ranks' start (seen in CI)
    iso = tmp_path / "preprocessed"
    shutil.copytree(pre, iso / CCTA, ignore=shutil.ignore_patterns("promptlesion_index"))
    pre = iso / CCTA
    e = {**env, "OMP_NUM_THREADS": "1", "nnUNet_n_proc_DA": "0", "nnUNet_preprocessed": str(iso)}
    e.pop(SETTINGS_ENV, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(pre), str(tmp_path)], env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["batch_size"] == r1["batch_size"] == 1
    for f0, f1 in zip(r0["flags"], r1["flags"]):
        assert f0 + f1 == [False, True]
    assert r0["origin"] == "built" and r1["origin"] == "rank 0"
    for r_ in (r0, r1):
        loader = r_["summary"]["loader"]
        assert loader["batches"] == 8
        assert sum(v for k, v in loader.items() if k.startswith("synthetic/")) + loader.get("fallback_real", 0) == 4
