"""Real CT, real tumours: CPU configurations added the nnU-Net way, mass placement, the noise-matched painter,
false positives by size, and the shipped sarcoma experiment on 3 of the ../shared/data/ibsi_sts cases."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, nnunet_env, run
from nnunet_promptlesion.experiments.plans_configs import add_2d_configuration, add_coarse_configuration
from nnunet_promptlesion.experiments.prepare import PrepareError, check_prepare
from nnunet_promptlesion.lesions.intensity_stats import LesionIntensityStats
from nnunet_promptlesion.lesions.masks import MaskSampler, brighter_than_parent
from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpecError
from nnunet_promptlesion.synthesis.rule_based import RuleBasedSynthesizer, _grain_sigma

IBSI_STS = Path(os.environ.get("PROMPTLESION_IBSI_STS", REPO.parent / "shared" / "data" / "ibsi_sts"))
BIN = Path(sys.executable).parent


def _plans(tmp_path: Path) -> Path:
    """A plans file shaped like nnU-Net's for 3.27 x 0.98 x 0.98 mm CT (what the sarcoma data gets)."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
                            "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6,
                            "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [64, 160, 192], "median_image_size_in_voxels": [65, 188, 195],
        "spacing": [3.27, 0.9765625, 0.9765625], "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False], "architecture": arch, "batch_dice": False}}}
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(plans))
    return f


def test_coarse_and_2d_configurations_resolve_through_nnunet_and_are_idempotent(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    f = _plans(tmp_path)
    add_coarse_configuration(f, "3d_cpu", "3d_fullres", (1, 2, 2))
    add_2d_configuration(f, "2d_cpu", "3d_cpu", batch_size=8, patch_size=(96, 96))
    mtime = f.stat().st_mtime_ns
    before = f.read_text()
    add_coarse_configuration(f, "3d_cpu", "3d_fullres", (1, 2, 2))
    add_2d_configuration(f, "2d_cpu", "3d_cpu", batch_size=8, patch_size=(96, 96))
    assert f.read_text() == before and f.stat().st_mtime_ns == mtime   # nothing rewritten
    pm = PlansManager(json.loads(f.read_text()))
    coarse, two_d = pm.get_configuration("3d_cpu"), pm.get_configuration("2d_cpu")
    assert coarse.data_identifier == "nnUNetPlans_3d_cpu"            # its own preprocessed data
    assert np.allclose(coarse.spacing, [3.27, 1.953125, 1.953125])
    assert coarse.median_image_size_in_voxels == [65, 94, 98]
    assert two_d.data_identifier == "nnUNetPlans_3d_cpu"             # slices of the coarse data
    assert np.allclose(two_d.spacing, [1.953125, 1.953125])
    # 96 > the 94-voxel median slice: capped to a multiple of 8 so that all 4 stages halve both axes
    assert list(two_d.patch_size) == [88, 96]
    assert two_d.network_arch_init_kwargs["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert two_d.batch_size == 8 and two_d.network_arch_init_kwargs["conv_op"].endswith("Conv2d")


@pytest.mark.parametrize("section, words", [
    ([], "must be an object"),
    ({"convert": "nifti"}, "list of promptlesion_convert arguments"),
    ({"configurations": [{"name": "x", "kind": "3d"}]}, "needs a \"name\""),
    ({"configurations": [{"name": "x", "kind": "2d", "spacing_factor": [1, 2, 2]}]}, "unknown keys ['spacing_factor']"),
    ({"configurations": [{"name": "x", "kind": "coarse", "spacing_factor": [1, 0, 2]}]}, "positive numbers"),
    ({"configurations": [{"name": "x", "kind": "2d", "batch_size": True}]}, "batch_size must be an integer"),
    ({"plan": {}}, "unknown keys ['plan']"),
])
def test_prepare_section_refusals_name_the_key(section, words):
    with pytest.raises(PrepareError) as e:
        check_prepare(section, "cfg.json")
    assert "cfg.json" in str(e.value) and words in str(e.value)


def test_mass_lesions_stay_whole_in_the_parent_and_avoid_brighter_background():
    """A mass is kept whole (no holes from a ragged parent), holds >= min_parent_fraction parent voxels and never
    covers background brighter than its parent (bone)."""
    rng = np.random.default_rng(0)
    shape = (1, 64, 64)
    seg = np.ones(shape, np.int16)
    seg[:, ::6, :] = 0                    # fat septa: a ragged parent, as a HU window makes it
    seg[:, 40:50, 40:50] = 0              # a bone
    image = np.zeros(shape, np.float32)
    image[:, ::6, :] = -2.0
    image[:, 40:50, 40:50] = 5.0
    lesion = LesionClass("mass", 2, [1], radius_mm=[(6.0, 8.0)], shape="ellipsoid", min_parent_fraction=0.8)
    sampler = MaskSampler(spacing=(1.0, 1.0, 1.0))
    allowed = (seg >= 0) & ~brighter_than_parent(image, seg, [1])
    assert not allowed[0, 40:50, 40:50].any() and allowed[0, ::6][:, :40].all()
    for _ in range(20):
        out = sampler.sample_with_centre(lesion, seg == 1, rng, allowed=allowed)
        assert out is not None
        mask, _ = out
        assert not (mask & ~allowed).any()
        assert (mask & (seg == 1)).sum() >= 0.8 * mask.sum()
        assert (mask & (seg == 0)).any()   # it crosses the septa instead of being clipped by them
    clipped = LesionClass("clip", 2, [1], radius_mm=[(6.0, 8.0)], shape="ellipsoid")
    mask, _ = sampler.sample_with_centre(clipped, seg == 1, rng)
    assert not (mask & (seg == 0)).any()   # the default still clips voxel by voxel
    with pytest.raises(LesionSpecError, match="min_parent_fraction"):
        LesionClass("bad", 2, [1], min_parent_fraction=1.5)


def test_grain_estimate_recovers_the_blur_of_noise():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for sigma in (0.6, 1.0, 1.5):
        noise = ndimage.gaussian_filter(rng.standard_normal((1, 256, 256)), (0, sigma, sigma))
        est = _grain_sigma(noise, np.ones_like(noise, bool))
        # lag-1 correlation of 65k voxel pairs: sampling error well under 10 % of sigma at these sizes
        assert abs(est - sigma) < 0.1 * sigma, (sigma, est)


@pytest.mark.parametrize("texture", ["synthetic", "carrier_noise", "matched_noise"])
def test_painter_textures_keep_level_and_touch_only_the_dilated_mask(texture):
    from scipy import ndimage

    rng = np.random.default_rng(2)
    carrier = (ndimage.gaussian_filter(rng.standard_normal((1, 1, 96, 96)), (0, 0, 0.8, 0.8)) * 3.0).astype(np.float32)
    mask = np.zeros((1, 96, 96), bool)
    yy, xx = np.mgrid[:96, :96]
    mask[0] = (yy - 48) ** 2 + (xx - 48) ** 2 < 20 ** 2
    parent = np.ones_like(mask)
    stats = LesionIntensityStats()
    stats.add(1.0, 0.5)                   # contrast +1, texture std 0.5 (the data's units)
    painter = RuleBasedSynthesizer({2: stats}, blend_sigma_voxels=(1.0, 1.0), texture=texture)
    lesion = LesionClass("l", 2, [1], radius_mm=[(5, 10)])
    out = painter.paint(carrier, mask, parent, lesion, np.random.default_rng(3))
    core = ndimage.binary_erosion(mask[0], iterations=4)
    ring = (ndimage.binary_dilation(mask[0], iterations=6) & ~mask[0])
    # the lesion's level: ring mean + contrast, within a few standard errors of its texture
    level = out[0, 0][core].mean() - carrier[0, 0][ring].mean()
    assert abs(level - 1.0) < 0.25, level
    # the painter's promise: bit-identical outside the mask dilated by ceil(3 sigma) + 1 voxels (any direction)
    far = ~ndimage.binary_dilation(mask[0], structure=np.ones((3, 3), bool), iterations=int(np.ceil(3 * 1.0)) + 1)
    assert np.array_equal(out[0, 0][far], carrier[0, 0][far])
    if texture == "matched_noise":
        assert abs(out[0, 0][core].std() - 0.5) < 0.1


def test_false_positives_are_counted_by_size():
    from nnunet_promptlesion.evaluation.statistics import fp_by_size

    reps = {0: {"cases": [{"case": "a"}, {"case": "b"}],
                "false_positives": [{"class": "t", "voxels": 3}, {"class": "t", "voxels": 50},
                                    {"class": "t", "voxels": 5000}, {"class": "u", "voxels": 500}]},
            1: {"cases": [{"case": "a"}, {"case": "b"}], "false_positives": []}}
    got = fp_by_size(reps, "t")
    # repeat 0: >=10: 2, >=100: 1, >=1000: 1 over 2 cases; repeat 1: none; mean over repeats
    assert got == {">=10": 0.5, ">=100": 0.25, ">=1000": 0.25}
    assert fp_by_size({0: {"cases": [], "false_positives": None}}, "t") is None


@pytest.mark.slow
def test_sarcoma_experiment_prepares_and_runs_on_six_real_cases(tmp_path):
    """The shipped sarcoma config, on 6 of the real cases (5 training: nnU-Net's 5-fold split) at 1 iteration: convert (derived parent, test split),
    plan with --verify_dataset_integrity, the CPU configurations, nnU-Net's preprocessing, training, prediction,
    evaluation and the report; a re-run prepares nothing again."""
    if not (IBSI_STS / "imagesTr").is_dir():
        pytest.skip(f"real sarcoma data not found at {IBSI_STS} (set PROMPTLESION_IBSI_STS): needs ../shared")
    src = tmp_path / "sts"
    for sub in ("imagesTr", "labelsTr"):
        (src / sub).mkdir(parents=True)
        for case in ("STS_003", "STS_004", "STS_005", "STS_007", "STS_008", "STS_009"):
            shutil.copy(IBSI_STS / sub / f"{case}.nii.gz", src / sub / f"{case}.nii.gz")
    cfg = json.loads((REPO / "src/nnunet_promptlesion/experiments/configs/sarcoma.json").read_text())
    conv = cfg["prepare"]["convert"]
    conv[conv.index("--test-cases") + 1] = "1"
    cfg.update(dataset=931, repeats=1, jobs=1, folds=["all"], scarcity={**cfg["scarcity"], "keep_carriers": 1},
               budget={**cfg["budget"], "epochs": 1, "iterations_per_epoch": 1, "final_validation": False},
               arms=[a for a in cfg["arms"] if a["name"] in ("real_scarce", "rule_based")])
    cfg.pop("postprocessing", None)
    f = tmp_path / "sarcoma_tiny.json"
    f.write_text(json.dumps(cfg))
    env = nnunet_env(tmp_path, PROMPTLESION_IBSI_STS=str(src), nnUNet_n_proc_DA="0")
    out = tmp_path / "exp"
    p = run([BIN / "promptlesion_experiment", f, "-o", out], env, timeout=1200)
    pre = tmp_path / "preprocessed"
    ds = next(pre.glob("Dataset931_*"))
    plans = json.loads((ds / "nnUNetPlans.json").read_text())
    assert {"3d_cpu", "2d_cpu"} <= set(plans["configurations"])
    assert (ds / "nnUNetPlans_3d_cpu").is_dir() and not (ds / "nnUNetPlans_3d_fullres").exists()
    raw = next((tmp_path / "raw").glob("Dataset931_*"))
    assert len(list((raw / "imagesTs").glob("*.nii.gz"))) == 1
    spec = json.loads((raw / "lesion_spec.json").read_text())["lesions"][0]
    assert spec["name"] == "sarcoma" and spec.get("min_parent_fraction") is not None
    report = (out / "results" / "report.txt").read_text()
    assert "sarcoma" in report and "rule_based" in report and "FP>=" in report
    assert "[prepare] 4/4" in p.stdout or "[prepare]" in p.stdout
    p2 = run([BIN / "promptlesion_experiment", f, "-o", out], env, timeout=600)
    assert "converted dataset exists" in p2.stdout and "preprocessed:" in p2.stdout
    assert "skipped (finished)" in p2.stdout
