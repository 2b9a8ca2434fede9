"""Tumour sizes and early/late staging of lesion connected components.

A lesion's size is its *equivalent-sphere radius* r = (3 V / (4 pi))^(1/3), with the component
volume V = voxel count x voxel volume (mm^3) taken from the voxel spacing, so anisotropic CT
(e.g. 0.8 x 0.8 x 5 mm) is measured in millimetres, not voxels. A component is "early" when
r <= :data:`EARLY_RADIUS_MM` (10 mm, diameter <= 2 cm, the DiffTumor definition) and "late"
otherwise. Components are 26-connected (face, edge and corner neighbours), so a lesion drawn with
diagonal voxel steps is one lesion.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..lesions.components import label_components
from ..lesions.components import equivalent_radius_mm
from ..lesions.spec import DIFFTUMOR_RADIUS_CLASSES_MM, EARLY_RADIUS_MM, radius_ranges_from_observed


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected components of a 3D boolean mask: (component map 1..N, voxel count per component)."""
    cc, n = label_components(mask)
    counts = np.bincount(cc.ravel(), minlength=n + 1)[1:]
    return cc, counts


def component_radii_mm(seg: np.ndarray, value: int, spacing: Sequence[float]) -> list[float]:
    """Equivalent radii (mm) of the connected components of ``seg == value``."""
    mask = seg == value
    if not mask.any():
        return []
    _, counts = components(mask)
    return equivalent_radius_mm(counts, spacing).tolist()


def stage_components(seg: np.ndarray, value: int, late_value: int, spacing: Sequence[float],
                     early_radius_mm: float = EARLY_RADIUS_MM) -> tuple[list[float], list[float]]:
    """Relabel, in place, each component of ``seg == value`` whose equivalent radius exceeds
    ``early_radius_mm`` to ``late_value``; early components keep ``value``.

    ``seg`` is a 3D integer array; ``spacing`` the voxel size in mm in the same axis order as
    ``seg`` (only its product matters). Returns (early radii, late radii) in mm.
    """
    mask = seg == value
    if not mask.any():
        return [], []
    cc, counts = components(mask)
    radii = equivalent_radius_mm(counts, spacing)
    late_ids = np.flatnonzero(radii > early_radius_mm) + 1
    if late_ids.size:
        seg[np.isin(cc, late_ids)] = late_value
    return radii[radii <= early_radius_mm].tolist(), radii[radii > early_radius_mm].tolist()


def radius_ranges(radii_mm: Sequence[float], stage: str | None = None) -> list[tuple[float, float]]:
    """Radius ranges (mm) for a lesion spec from observed radii, clipped to the stage's size band.

    ``stage`` None: the observed range (DiffTumor's tiny/small classes when nothing was observed);
    "early": within (0, 10] mm (tiny/small when none observed); "late": from 10 mm up
    (medium/large when none observed).
    """
    r = [float(x) for x in radii_mm if x > 0]
    if stage is None:
        return radius_ranges_from_observed(r)
    if stage == "early":
        if not r:
            return [DIFFTUMOR_RADIUS_CLASSES_MM["tiny"], DIFFTUMOR_RADIUS_CLASSES_MM["small"]]
        out = []
        for lo, hi in radius_ranges_from_observed(r):
            lo, hi = min(lo, EARLY_RADIUS_MM), min(hi, EARLY_RADIUS_MM)
            out.append((lo, max(hi, lo)))
        return out
    if stage == "late":
        if not r:
            return [DIFFTUMOR_RADIUS_CLASSES_MM["medium"], DIFFTUMOR_RADIUS_CLASSES_MM["large"]]
        out = []
        for lo, hi in radius_ranges_from_observed(r):
            lo = max(lo, EARLY_RADIUS_MM)
            out.append((lo, max(hi, lo)))
        return out
    raise ValueError(f"stage must be None, 'early' or 'late', got {stage!r}")
