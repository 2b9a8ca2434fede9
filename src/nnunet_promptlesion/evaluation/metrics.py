"""Array-level segmentation metrics: Dice (nnU-Net's definition), voxel IoU / precision / recall, normalised
surface Dice, HD95 and ASSD, lesion matching.

All functions take boolean masks of one class with the *same* axis order as ``spacing``: for images read
with nnU-Net's reader/writers that is the array order of ``read_seg`` (SimpleITK: z, y, x) and the
``spacing`` entry of its properties, in mm. 2D and 3D masks are accepted; an axis of length 1 (a 2D image
read as a one-slice volume, e.g. nnU-Net's PNG reader with its dummy spacing 999) is dropped by the surface
metrics, so that the surface of a 2D mask is its in-plane contour.

Empty masks, per case (NaN is left out of every mean, as nnU-Net does for Dice):

=================  ===========  ====================  ====================
metric             both empty   prediction empty      reference empty
=================  ===========  ====================  ====================
Dice, IoU          NaN          0                     0
voxel precision    NaN          NaN                   0
voxel recall       NaN          0                     NaN
NSD                NaN          0                     0
HD95, ASSD (mm)    NaN          NaN                   NaN
=================  ===========  ====================  ====================

A distance to an empty mask does not exist (MONAI returns inf or NaN there), so HD95 and ASSD are only
averaged over cases where both masks hold the class: a missed or a spurious class shows in Dice, IoU, NSD
and precision/recall, never in the distances.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn
from scipy import ndimage

from ..lesions.components import label_components
from ..lesions.components import equivalent_radius_mm


def dice_counts(ref: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> dict:
    """nnU-Net's per-class numbers: {"Dice", "TP", "FP", "FN", "n_ref", "n_pred"} (voxel counts).

    Dice is NaN when the class is absent from both reference and prediction (nnU-Net leaves such cases
    out of its class means; so do we).
    """
    tp, fp, fn, _ = compute_tp_fp_fn_tn(ref, pred, ignore)
    tp, fp, fn = int(tp), int(fp), int(fn)
    dice = float("nan") if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"Dice": dice, "TP": tp, "FP": fp, "FN": fn, "n_ref": tp + fn, "n_pred": tp + fp}


def voxel_overlap(tp: int, fp: int, fn: int) -> dict:
    """{"IoU", "voxel_precision", "voxel_recall"} from voxel counts (e.g. those of :func:`dice_counts`, so the
    ignore label is left out the same way), each in [0, 1].

    IoU = TP / (TP + FP + FN), NaN when both masks are empty, 0 when exactly one is (Dice's rule; per case
    IoU = Dice / (2 - Dice)). Precision = TP / (TP + FP), NaN without a predicted voxel. Recall = TP / (TP + FN),
    NaN without a reference voxel. Voxel-wise, not the lesion-wise precision (components) of the evaluation.
    """
    nan = float("nan")
    return {"IoU": nan if tp + fp + fn == 0 else tp / (tp + fp + fn),
            "voxel_precision": nan if tp + fp == 0 else tp / (tp + fp),
            "voxel_recall": nan if tp + fn == 0 else tp / (tp + fn)}


def surface_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> dict:
    """{"NSD", "HD95_mm", "ASSD_mm"} of one class, from one pass over both surfaces.

    Surface = boundary voxels (the mask minus its 6-neighbour erosion in 3D, 4-neighbour in 2D); distances are
    Euclidean in mm from ``spacing`` (same axis order as the arrays), from every boundary voxel of one mask to the
    nearest of the other, both directions: MONAI's ``get_edge_surface_distance(symmetric=True)``, the routine
    behind its ``compute_surface_dice``, ``compute_hausdorff_distance`` and ``compute_average_surface_distance``,
    called once here instead of once per metric (the distance transforms are the cost: a third of the time on an
    organ-sized mask). The three reductions are MONAI's:

    * NSD (Nikolov et al. 2021) at ``tolerance_mm``: boundary voxels of both masks within the tolerance of the
      other surface, over all boundary voxels, in [0, 1];
    * HD95: the larger of the two directed 95th percentiles (``torch.quantile``, linear interpolation between
      order statistics);
    * ASSD: the mean over the distances of both directions together (every boundary voxel of either mask once).

    Computed on :func:`surface_crop`, which gives the whole-image values (see there); MONAI measures distances in
    float64, so values agree with its functions to float32 rounding (they return float32). Empty masks: NSD NaN
    when both are empty and 0 when one is; HD95 and ASSD NaN when either is (module docstring).
    """
    # deferred: MONAI costs ~2.6 s CPU at import (measured here), for the surface metrics alone; the experiment
    # report imports this module's users to read finished results
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    ref, pred = _masks(ref, pred, spacing)
    nan = float("nan")
    if not ref.any() or not pred.any():
        return {"NSD": nan if not ref.any() and not pred.any() else 0.0, "HD95_mm": nan, "ASSD_mm": nan}
    ref, pred, spacing = surface_crop(ref, pred, spacing)
    with _monai_quiet():
        _, (d_pred, d_ref), _ = get_edge_surface_distance(torch.from_numpy(pred), torch.from_numpy(ref),
                                                          spacing=spacing, symmetric=True)
    d_pred, d_ref = d_pred.double(), d_ref.double()
    within = int((d_pred <= tolerance_mm).sum()) + int((d_ref <= tolerance_mm).sum())
    return {"NSD": within / (d_pred.numel() + d_ref.numel()),
            "HD95_mm": float(max(torch.quantile(d_pred, 0.95), torch.quantile(d_ref, 0.95))),
            "ASSD_mm": float(torch.cat([d_pred, d_ref]).mean())}


def normalized_surface_dice(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm``, in [0, 1]: :func:`surface_metrics`' "NSD". NaN when both masks
    are empty, 0 when exactly one is."""
    return surface_metrics(ref, pred, spacing, tolerance_mm)["NSD"]


def surface_distances(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> dict:
    """{"HD95_mm", "ASSD_mm"} of :func:`surface_metrics` (mm); NaN when either mask is empty."""
    out = surface_metrics(ref, pred, spacing, 0.0)
    return {"HD95_mm": out["HD95_mm"], "ASSD_mm": out["ASSD_mm"]}


def surface_crop(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(ref, pred, spacing) cut to the bounding box of ``ref | pred`` plus one voxel of background on every side,
    axes of length 1 of the whole image dropped (with their spacing). Needs at least one voxel in the union.

    Why the surface metrics are unchanged: MONAI's boundary of a mask is the mask minus its binary erosion
    (cross-shaped element, outside the array counted as background). Every voxel outside the union bounding
    box is background in both masks, and the one-voxel margin is background too, so each mask voxel sees the
    same neighbourhood in the crop as in the whole image: both boundary sets are the whole image's, moved by
    the crop origin, and Euclidean distances between them do not change under that move. (MONAI crops to the
    same box itself once it holds the arrays, after converting the whole image to float tensors; cropping
    first spares that memory and time on large volumes, benchmarks/bench_library_choices.py.) The only
    difference is rounding: MONAI scales voxel indices by the spacing in float64 (relative error ~1e-16,
    index-dependent), then rounds each distance to float32, so a distance may differ by one float32 ulp.

    An axis of length 1 in the whole image would make every mask voxel a boundary voxel (its two neighbours
    along that axis lie outside), i.e. a 2D image's interior would count as surface; without the axis the
    surface is the in-plane contour. (Dropped only while two axes remain.)
    """
    keep = [d for d, n in enumerate(ref.shape) if n > 1]
    if 2 <= len(keep) < ref.ndim:   # a single row or voxel stays as it is: MONAI measures 2D and 3D images
        ref = ref.reshape([ref.shape[d] for d in keep])
        pred = pred.reshape(ref.shape)
        spacing = [spacing[d] for d in keep]
    idx = np.argwhere(ref | pred)
    if idx.size == 0:
        raise ValueError("surface_crop needs a voxel in one of the masks")
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    return np.pad(ref[sl], 1), np.pad(pred[sl], 1), [float(s) for s in spacing]


class _monai_quiet(warnings.catch_warnings):
    """MONAI 1.5-1.6 passes its own deprecated ``get_mask_edges(always_return_as_numpy=...)`` inside its surface
    metrics: a FutureWarning per evaluated class that no caller can act on."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        return out


def _masks(ref, pred, spacing) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape or len(spacing) != ref.ndim:
        raise ValueError(f"shapes {ref.shape} vs {pred.shape} and spacing {tuple(spacing)} do not match")
    return ref, pred


@dataclass
class SizeBins:
    """Contiguous equivalent-radius bins (mm): bin i holds radii in (upper[i-1], upper[i]]; the last bin is open.

    Built from the lesion spec's ``radius_mm`` ranges: their upper bounds become the bin edges, and one
    more bin catches lesions larger than every range (real lesions may exceed the synthesis ranges).
    """

    upper: list[float]  # increasing; the last bin (> upper[-1]) is implicit

    @classmethod
    def from_ranges(cls, ranges: Sequence[Sequence[float]] | None) -> "SizeBins":
        if not ranges:
            return cls(upper=[])
        return cls(upper=sorted({float(r[1]) for r in ranges}))

    @property
    def names(self) -> list[str]:
        if not self.upper:
            return ["all"]
        names = [f"<={self.upper[0]:g}mm"]
        names += [f"{a:g}-{b:g}mm" for a, b in zip(self.upper[:-1], self.upper[1:])]
        names.append(f">{self.upper[-1]:g}mm")
        return names

    def assign(self, radius_mm: float) -> str:
        names = self.names
        for i, u in enumerate(self.upper):
            if radius_mm <= u:
                return names[i]
        return names[-1]


@dataclass
class LesionMatch:
    """Lesion-wise result of one class in one case.

    lesions: one dict per ground-truth connected component: {"id", "voxels", "radius_mm", "dice", "detected",
        "centroid" (voxel indices, array axis order)}.
    false_positives: one dict per predicted component that touches no ground-truth lesion:
        {"voxels", "radius_mm", "centroid"}.
    n_pred: number of predicted components.
    """

    lesions: list[dict] = field(default_factory=list)
    false_positives: list[dict] = field(default_factory=list)
    n_pred: int = 0


def match_lesions(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], min_dice: float = 0.0) -> LesionMatch:
    """Match connected components (26-connectivity) of reference and prediction of one class.

    A ground-truth lesion's Dice is computed against the union of the predicted components that overlap
    it (DiffTumor/LiTS style); it is *detected* when that Dice is > ``min_dice`` (default 0: any overlap).
    A missed lesion has Dice 0. Predicted components that overlap no ground-truth lesion are false
    positives.
    """
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    ref_lab, n_ref = label_components(ref)
    pred_lab, n_pred = label_components(pred)
    out = LesionMatch(n_pred=int(n_pred))
    if n_ref == 0 and n_pred == 0:
        return out
    # Overlap table between reference and predicted components: one pass over the overlapping voxels.
    both = ref & pred
    pairs = np.unique(np.stack([ref_lab[both], pred_lab[both]]), axis=1) if both.any() else np.zeros((2, 0), int)
    ref_sizes = np.bincount(ref_lab.ravel(), minlength=n_ref + 1)
    pred_sizes = np.bincount(pred_lab.ravel(), minlength=n_pred + 1)
    ref_slices = ndimage.find_objects(ref_lab)
    pred_slices = ndimage.find_objects(pred_lab)
    for i in range(1, n_ref + 1):
        touching = pairs[1][pairs[0] == i]
        if touching.size:
            # Overlap of lesion i with the union of its touching predicted components.
            sl = _union_slice([ref_slices[i - 1]] + [pred_slices[j - 1] for j in touching])
            les = ref_lab[sl] == i
            pr = np.isin(pred_lab[sl], touching)
            inter = int((les & pr).sum())
            dice = 2.0 * inter / (ref_sizes[i] + pred_sizes[touching].sum())
        else:
            dice = 0.0
        out.lesions.append({"id": i, "voxels": int(ref_sizes[i]), "radius_mm": equivalent_radius_mm(ref_sizes[i], spacing),
                            "dice": float(dice), "detected": bool(dice > min_dice),
                            "centroid": _centroid(ref_slices[i - 1], ref_lab, i)})
    matched_pred = set(int(j) for j in pairs[1])
    for j in range(1, n_pred + 1):
        if j not in matched_pred:
            out.false_positives.append({"voxels": int(pred_sizes[j]),
                                        "radius_mm": equivalent_radius_mm(pred_sizes[j], spacing),
                                        "centroid": _centroid(pred_slices[j - 1], pred_lab, j)})
    return out


def _union_slice(slices: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(s[d].start for s in slices), max(s[d].stop for s in slices)) for d in range(len(slices[0])))


def _centroid(sl: tuple[slice, ...], lab: np.ndarray, i: int) -> list[float]:
    idx = np.argwhere(lab[sl] == i)
    return [round(float(c + s.start), 1) for c, s in zip(idx.mean(0), sl)]
