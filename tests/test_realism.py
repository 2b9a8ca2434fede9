"""Lesion realism: Fréchet distance, lesion-centred patches, features, KS tests and the blinded montage.
(The command end to end, with the encoder of a trained nnU-Net model, runs in test_experiment.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from nnunet_promptlesion.evaluation.realism import (IntensityShapeFeatures, LesionPatch, NnUNetEncoderFeatures,
                                                    blinded_montage, centre_on_lesion, format_realism_markdown,
                                                    frechet_distance, realism_report)


def test_frechet_distance_hand_computed():
    # 1-D: means 1 and 4, both variances 2 -> (1 - 4)^2 + 2 + 2 - 2 * sqrt(2 * 2) = 9
    assert frechet_distance([[0.0], [2.0]], [[3.0], [5.0]]) == pytest.approx(9.0)
    # 2-D, independent axes: a has mean (1, 1), cov diag(4/3); b = 2a + 5: mean (7, 7), cov diag(16/3)
    a = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], float)
    assert frechet_distance(a, 2 * a + 5) == pytest.approx(72 + 2 * (4 / 3 + 16 / 3 - 2 * 8 / 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a[:1], a) is None


def test_centre_on_lesion_pads_and_centres():
    img = np.arange(10 * 12 * 8, dtype=np.float32).reshape(1, 10, 12, 8)
    m = np.zeros((10, 12, 8), bool)
    m[0:2, 0:2, 0:2] = True                       # a lesion in the corner: the crop runs past the volume
    ci, cm = centre_on_lesion(img, m, (6, 6, 6), pad_value=-5)
    assert ci.shape == (1, 6, 6, 6) and cm.sum() == 8
    # centroid 0.5 rounds (half to even) to voxel 0, which lands on the centre voxel 3 of the crop
    assert np.allclose(np.argwhere(cm).mean(0), [3.5, 3.5, 3.5])
    assert ci[0, 0, 0, 0] == -5 and ci[0, 3, 3, 3] == img[0, 0, 0, 0]


def _cube_patch(source, hu, radius, rng, cls="lesion"):
    img = rng.normal(0.0, 5.0, (1, 16, 16, 16)).astype(np.float32)
    m = np.zeros((16, 16, 16), bool)
    m[8 - radius:8 + radius, 8 - radius:8 + radius, 8 - radius:8 + radius] = True
    img[0][m] += hu
    return LesionPatch(source, cls, "case", img, m)


def test_report_separates_different_lesions_and_not_equal_ones(tmp_path):
    rng = np.random.default_rng(0)
    real = [_cube_patch("real", 100.0, 2, rng) for _ in range(12)]
    same = [_cube_patch("synthetic", 100.0, 2, rng) for _ in range(12)]
    other = [_cube_patch("synthetic", 300.0, 3, rng) for _ in range(12)]
    identity = lambda z: z                                            # noqa: E731 (patches are already "HU")
    r_same = realism_report(real + same, IntensityShapeFeatures(), (1.0, 1.0, 1.0), identity, rng)["classes"]["lesion"]
    r_other = realism_report(real + other, IntensityShapeFeatures(), (1.0, 1.0, 1.0), identity, rng)["classes"]["lesion"]
    assert r_other["frechet"] > 100 * r_same["frechet"]
    assert r_other["ks_mean_hu"]["statistic"] == 1.0 and r_other["ks_mean_hu"]["p"] < 1e-4
    assert r_same["ks_radius_mm"]["statistic"] == 0.0                 # identical sizes
    # 64 voxels at 1 mm: equivalent radius (3 * 64 / 4 pi)^(1/3)
    assert r_same["real_radius_mm_median"] == pytest.approx((3 * 64 / (4 * np.pi)) ** (1 / 3))
    assert r_other["real_mean_hu_median"] == pytest.approx(100, abs=3) and r_other["synthetic_mean_hu_median"] == \
        pytest.approx(300, abs=3)
    md = format_realism_markdown({"extractor": "intensity_shape", "classes": {"lesion": r_other}})
    assert "| lesion | 12 | 12 |" in md


def test_nnunet_encoder_features_pool_over_the_mask():
    torch = pytest.importorskip("torch")
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, [8, 16, 32], torch.nn.Conv3d, 3, [1, 2, 2], [1, 1, 1], 2, [1, 1], conv_bias=True,
                        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    ext = NnUNetEncoderFeatures(net)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 1, 16, 16, 16)).astype(np.float32)
    full = np.ones((3, 16, 16, 16), bool)
    f = ext(x, full)
    assert f.shape == (3, 8 + 16 + 32)
    with torch.no_grad():
        skips = net.encoder(torch.from_numpy(x))
    expected = torch.cat([s.mean(dim=(2, 3, 4)) for s in skips], 1).double().numpy()
    assert np.allclose(f, expected, atol=1e-5)                        # a full mask is the global average
    part = np.zeros_like(full)
    part[:, 4:12, 4:12, 4:12] = True
    assert not np.allclose(ext(x, part), f)


def test_blinded_montage_and_key(tmp_path):
    rng = np.random.default_rng(0)
    patches = [_cube_patch("real", 100.0, 2, rng) for _ in range(5)] + \
              [_cube_patch("synthetic", 100.0, 2, rng) for _ in range(4)]
    key = blinded_montage(patches, tmp_path / "m.png", tmp_path / "key.json", (-50, 200), np.random.default_rng(3))
    assert open(tmp_path / "m.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "key.json").read_text())
    assert saved == key and [k["panel"] for k in key] == list(range(1, 10))
    assert sorted(k["source"] for k in key) == ["real"] * 5 + ["synthetic"] * 4
    assert [k["source"] for k in key] != ["real"] * 5 + ["synthetic"] * 4   # shuffled (seeded)


def test_real_lesion_crops_centre_each_lesion_even_when_their_centroid_is_empty():
    from nnunet_promptlesion.evaluation.montage import real_lesion_crops

    seg = np.zeros((6, 40, 40), np.int16)
    seg[3, 5:8, 5:8] = 2        # two lesions of one class: their common centroid (row ~20) holds neither
    seg[3, 30:34, 30:34] = 2
    seg[3, 10:13, 25:35] = 1    # another label
    image = np.arange(seg.size, dtype=np.float32).reshape(1, *seg.shape)
    crops = real_lesion_crops(image, seg, 2, (16, 16), limit=5)    # a 2D configuration: 1 x 16 x 16 slices
    assert len(crops) == 2
    for img, m in crops:
        assert img.shape == (1, 1, 16, 16) and m.shape == (1, 16, 16)
        assert m[0, 8, 8] and m.sum() in (9, 16)                   # the lesion is in the middle, whole
        assert img[0, 0, 8, 8] in image[0][seg == 2]                # and the image crop is the same place
    assert [m.sum() for _, m in real_lesion_crops(image, seg, 2, (16, 16), limit=1)] == [9]
    c3 = real_lesion_crops(image, seg, 2, (4, 8, 8), limit=5)      # 3D patch past the volume: padded
    assert [img.shape for img, _ in c3] == [(1, 4, 8, 8)] * 2 and all(m[2, 4, 4] for _, m in c3)


# ---------------------------------------------------------------------------------------------- 2D configurations
def test_lesion_patch_of_a_2d_configuration_is_the_largest_section_in_plane():
    from nnunet_promptlesion.evaluation.realism import lesion_patch, lesion_measurements

    img = np.arange(8 * 30 * 20, dtype=np.float32).reshape(1, 8, 30, 20)
    m = np.zeros((8, 30, 20), bool)
    m[2, 10:13, 5:8] = True                       # 9 voxels
    m[3, 9:14, 4:9] = True                        # 25 voxels: the largest section
    m[4, 11, 6] = True
    ci, cm = lesion_patch(img, m, (12, 12))       # a 2D configuration's patch: (X, Y) of the slices
    assert ci.shape == (1, 12, 12) and cm.shape == (12, 12) and cm.sum() == 25
    assert cm[6, 6] and ci[0, 6, 6] == img[0, 3, 11, 6]
    ci3, cm3 = lesion_patch(img, m, (4, 12, 12))  # a 3D patch: unchanged behaviour
    assert ci3.shape == (1, 4, 12, 12) and cm3.sum() == 35
    with pytest.raises(ValueError, match="lesion_patch"):
        centre_on_lesion(img, m, (12, 12))
    # a synthetic 2D sample: (C, 1, X, Y) data and (1, X, Y) mask
    s_img, s_m = lesion_patch(img[:, 3:4], m[3:4], (12, 12))
    assert np.array_equal(s_m, cm) and np.array_equal(s_img, ci)
    # 2D size: the equivalent circle of the section at the in-plane spacing (2 values for a 2D configuration)
    meas = lesion_measurements(LesionPatch("real", "l", "c", ci, cm), (0.5, 0.5), lambda z: z)
    assert meas["radius_mm"] == pytest.approx(np.sqrt(25 * 0.25 / np.pi))


def test_realism_cli_on_a_2d_configuration(ccta_dataset, tmp_path):
    """promptlesion_realism -c <2D configuration inheriting 3d_fullres> (the demo's 2d_demo) runs: real lesions as
    their largest section, synthetic ones painted per slice by the 2D trainer's loader, both (C, X, Y)."""
    import shutil

    from conftest import BIN, run
    from nnunet_promptlesion.cli.demo import add_demo_configuration_2d

    root, did, env = ccta_dataset
    src = next((root / "preprocessed").glob(f"Dataset{did}_*"))
    pre = tmp_path / "preprocessed"
    shutil.copytree(src, pre / src.name)          # the session fixture stays read-only (the scan writes a cache)
    cfg = add_demo_configuration_2d(pre / src.name / "nnUNetPlans.json")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"synthesizer": "rule_based", "synthetic_fraction": 0.5}))
    out = tmp_path / "realism"
    e = {k: v for k, v in env.items() if k != "PROMPTLESION_SETTINGS"}
    e.update(nnUNet_preprocessed=str(pre), OMP_NUM_THREADS="1")
    run([BIN / "promptlesion_realism", "-d", did, "-c", "2d_demo", "-f", "0", "--settings", settings,
         "--features", "intensity_shape", "--per-class", 4, "--montage-per-class", 2, "-o", out], e, timeout=900)
    rep = json.loads((out / "realism.json").read_text())
    assert rep["configuration"] == "2d_demo" and rep["patch_size"] == cfg["patch_size"]
    calc = rep["classes"]["calcified_plaque"]
    assert calc["n_synthetic"] == 4 and calc["n_real"] >= 2 and calc["frechet"] is not None
    assert all(m["radius_mm"] > 0 for s in ("real", "synthetic") for m in calc["measurements"][s])
    assert (out / "blinded_calcified_plaque.png").is_file()


def test_nnunet_encoder_features_of_a_2d_network():
    torch = pytest.importorskip("torch")
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    net = PlainConvUNet(1, 2, [8, 16], torch.nn.Conv2d, 3, [1, 2], [1, 1], 2, [1], conv_bias=True,
                        norm_op=torch.nn.InstanceNorm2d, norm_op_kwargs={"affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    x = np.random.default_rng(0).normal(size=(3, 1, 16, 16)).astype(np.float32)
    m = np.zeros((3, 16, 16), bool)
    m[:, 5:10, 6:11] = True
    f = NnUNetEncoderFeatures(net)(x, m)          # 2D lesion patches (C, X, Y) of a 2D configuration
    assert f.shape == (3, 8 + 16) and np.all(np.isfinite(f))
