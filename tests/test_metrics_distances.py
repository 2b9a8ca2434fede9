"""HD95, ASSD (mm) and voxel IoU / precision / recall: hand-computed values, the cropped computation against MONAI
on the whole image, the rules for empty masks."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from nnunet_promptlesion.evaluation.metrics import (dice_counts, normalized_surface_dice, surface_crop,
                                                    surface_distances, voxel_overlap)

EPS32 = float(np.finfo(np.float32).eps)
# The crop moves both boundary sets by one offset: MONAI's float64 coordinates (index x spacing) round differently
# by ~1e-16 relative, then each distance is rounded to float32 (one ulp, EPS32, at most). HD95 interpolates two
# such order statistics; ASSD sums n of them in float32, whose rounding may then differ by up to ~log2(n) ulps
# (n < 2^14 boundary voxels here). 32 ulps bounds both; every case tried so far was bit-identical.
REL = 32 * EPS32


def _monai_whole(ref: np.ndarray, pred: np.ndarray, spacing) -> tuple[float, float]:
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    y_pred, y = (torch.from_numpy(m[None, None]) for m in (pred, ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
        asd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                               spacing=list(spacing))
    return float(hd.item()), float(asd.item())


def _blobs(rng, shape) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.53


@pytest.mark.parametrize("ndim", [3, 2])
def test_cropped_distances_equal_monai_on_the_whole_image(ndim):
    rng = np.random.default_rng(ndim)
    checked = 0
    while checked < 6:
        shape = tuple(int(n) for n in rng.integers(6, 28 if ndim == 3 else 90, size=ndim))
        ref, pred = _blobs(rng, shape), _blobs(rng, shape)
        if checked % 2:   # a small object in a large image: the crop removes most of it
            ref[tuple(slice(n // 3, None) for n in shape)] = False
            pred[tuple(slice(n // 2, None) for n in shape)] = False
        if not ref.any() or not pred.any():
            continue
        # blobs reach the image border on some shapes: the margin of the crop must match MONAI's outside
        spacing = [float(s) for s in rng.uniform(0.4, 4.0, size=ndim)]
        ours = surface_distances(ref, pred, spacing)
        hd, asd = _monai_whole(ref, pred, spacing)
        assert ours["HD95_mm"] == pytest.approx(hd, rel=REL, abs=0) and ours["ASSD_mm"] == pytest.approx(asd, rel=REL,
                                                                                                         abs=0)
        checked += 1
    # the crop is the union bounding box plus one background voxel per side
    ref = np.zeros((30, 40, 50), bool)
    pred = np.zeros_like(ref)
    ref[5:8, 10:12, 20:30] = True
    pred[6:9, 11:15, 21:22] = True
    r, p, s = surface_crop(ref, pred, (1.0, 2.0, 3.0))
    assert r.shape == p.shape == (4 + 2, 5 + 2, 10 + 2) and s == [1.0, 2.0, 3.0]
    assert r.sum() == ref.sum() and p.sum() == pred.sum() and not r[0].any() and not r[:, :, -1].any()


@pytest.mark.parametrize("axis", [0, 2])
def test_hand_computed_cubes_offset_along_one_axis(axis):
    """Two 3x3x3 cubes, the prediction moved by k voxels along ``axis`` of spacing s. Boundary = 26 voxels each
    (all but the centre). k = 2: 9 boundary voxels of each cube lie on the shared face (distance 0), its ring of 8
    is one slice away (s), the far face of 9 two slices (2 s): ASSD = 2 (8 s + 18 s) / 52 = s; the 95th
    percentile of 9 x 0, 8 x s, 9 x 2s (positions 23 and 24 of 0..25) is 2 s. k = 5 (a gap of 2 voxels):
    9 x 3s, 8 x 4s, 9 x 5s per direction: ASSD = 104 s / 26 = 4 s, HD95 = 5 s. The other axes' spacing never
    enters."""
    spacing = [0.7, 1.3, 0.9]
    spacing[axis] = 2.5
    s = spacing[axis]
    for k, hd95, assd in ((2, 2 * s, s), (5, 5 * s, 4 * s)):
        ref = np.zeros((12, 12, 12), bool)
        ref[1:4, 1:4, 1:4] = True
        pred = np.roll(ref, k, axis=axis)
        got = surface_distances(ref, pred, spacing)
        assert got["HD95_mm"] == pytest.approx(hd95, rel=EPS32) and got["ASSD_mm"] == pytest.approx(assd, rel=EPS32)
        assert surface_distances(pred, ref, spacing) == got   # symmetric
    # identical masks: every boundary voxel has distance 0
    assert surface_distances(ref, ref, spacing) == {"HD95_mm": 0.0, "ASSD_mm": 0.0}


def test_hd95_is_the_larger_directed_percentile_and_ignores_outliers():
    """A 2D strip of 40 pixels against the same strip plus one far-away pixel: prediction -> reference has 40
    zeros and one 30 mm distance (its 95th percentile interpolates between zeros: 0), reference -> prediction
    only zeros, so HD95 = 0 while the maximum (Hausdorff) would be 30 mm; ASSD = 30 / 81."""
    ref = np.zeros((40, 40), bool)
    ref[2, 0:40] = True
    pred = ref.copy()
    pred[32, 5] = True
    got = surface_distances(ref, pred, (1.0, 0.5))
    assert got["HD95_mm"] == 0.0 and got["ASSD_mm"] == pytest.approx(30 / 81, rel=EPS32)


def test_a_one_slice_volume_is_measured_as_the_2d_image():
    """nnU-Net reads a 2D PNG as a (1, y, x) array with a dummy spacing of 999 on the first axis. Its surface is
    the in-plane contour, so every surface metric equals the one of the 2D array with the in-plane spacing."""
    rng = np.random.default_rng(7)
    ref, pred = _blobs(rng, (50, 60)), _blobs(rng, (50, 60))
    flat, thick = (0.8, 1.2), (999.0, 0.8, 1.2)
    assert surface_distances(ref[None], pred[None], thick) == surface_distances(ref, pred, flat)
    assert normalized_surface_dice(ref[None], pred[None], thick, 2.0) == normalized_surface_dice(ref, pred, flat, 2.0)
    # and the 2D values are MONAI's 2D ones (interior pixels are not surface: ASSD well below a filled-mask one)
    hd, asd = _monai_whole(ref, pred, flat)
    d = surface_distances(ref, pred, flat)
    assert d["HD95_mm"] == pytest.approx(hd, rel=REL, abs=0) and d["ASSD_mm"] == pytest.approx(asd, rel=REL, abs=0)


def test_empty_mask_rules():
    full = np.zeros((6, 6, 6), bool)
    full[2:4, 2:4, 2:4] = True
    empty = np.zeros_like(full)
    sp = (1.0, 1.0, 2.0)

    def all_metrics(ref, pred):
        c = dice_counts(ref, pred)
        return {**c, **voxel_overlap(c["TP"], c["FP"], c["FN"]), **surface_distances(ref, pred, sp),
                "NSD": normalized_surface_dice(ref, pred, sp, 1.0)}

    nan = math.isnan
    both = all_metrics(empty, empty)
    assert all(nan(both[k]) for k in ("Dice", "IoU", "voxel_precision", "voxel_recall", "HD95_mm", "ASSD_mm", "NSD"))
    missed = all_metrics(full, empty)          # prediction empty
    assert missed["Dice"] == missed["IoU"] == missed["voxel_recall"] == missed["NSD"] == 0.0
    assert nan(missed["voxel_precision"]) and nan(missed["HD95_mm"]) and nan(missed["ASSD_mm"])
    spurious = all_metrics(empty, full)        # reference empty
    assert spurious["Dice"] == spurious["IoU"] == spurious["voxel_precision"] == spurious["NSD"] == 0.0
    assert nan(spurious["voxel_recall"]) and nan(spurious["HD95_mm"]) and nan(spurious["ASSD_mm"])


def test_voxel_overlap_from_counts():
    ref = np.zeros((5, 5, 5), bool)
    pred = np.zeros_like(ref)
    ref[0:2, 0:3, 0:2] = True                    # 12 voxels
    pred[1:3, 0:3, 0:2] = True                   # 12 voxels, 6 shared
    c = dice_counts(ref, pred)
    o = voxel_overlap(c["TP"], c["FP"], c["FN"])
    assert o == {"IoU": pytest.approx(6 / 18), "voxel_precision": pytest.approx(6 / 12),
                 "voxel_recall": pytest.approx(6 / 12)}
    assert o["IoU"] == pytest.approx(c["Dice"] / (2 - c["Dice"]))
    # the ignore label leaves its voxels out of every count, as for Dice
    ignore = np.zeros_like(ref)
    ignore[2] = True                             # the prediction's 6 voxels outside the reference
    c = dice_counts(ref, pred & ~ignore, ignore)
    assert voxel_overlap(c["TP"], c["FP"], c["FN"]) == {"IoU": 0.5, "voxel_precision": 1.0, "voxel_recall": 0.5}
    with pytest.raises(ValueError, match="do not match"):
        surface_distances(ref, pred, (1.0, 1.0))
