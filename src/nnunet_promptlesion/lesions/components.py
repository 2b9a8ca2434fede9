"""Connected components of a lesion mask: the package's one definition of "a lesion".

A lesion is a fully connected component (26-connectivity in 3D, 8 in 2D): two voxels touching at a corner
belong to one lesion. Labelling uses connected-components-3d (cc3d); benchmarks/bench_components.py checks
that it gives the same partition as ``scipy.ndimage.label`` with a full structure, at 2-6x less CPU time.
"""
from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels, n): component ids 1..n (numbering order unspecified), 0 = background.

    ``mask`` is a 2D or 3D array, any axis order (connectivity is symmetric); non-zero = foreground.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"label_components takes a 2D or 3D mask, got shape {mask.shape}")
    if mask.dtype != bool:
        mask = mask != 0
    if mask.size == 0 or not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), 0
    labels, n = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26 if mask.ndim == 3 else 8,
                                          return_N=True)
    return labels, int(n)


def equivalent_radius_mm(n_voxels: int | np.ndarray, spacing: Sequence[float]) -> float | np.ndarray:
    """Equivalent radius (mm) of ``n_voxels`` voxels of size ``spacing`` (mm per voxel): of the sphere with their
    volume for 3 spacings, of the disc with their area for 2 (a 2D cross-section).

    Only the voxel size (the product of ``spacing``) enters, so the axis order of ``spacing`` does not
    matter. ``n_voxels`` is a count (returns a float) or an array of counts (returns an array of radii).
    """
    size = np.asarray(n_voxels, dtype=float) * float(np.prod(np.asarray(spacing, dtype=float)))
    radius = np.sqrt(size / np.pi) if len(spacing) == 2 else np.cbrt(3.0 * size / (4.0 * np.pi))
    return float(radius) if radius.ndim == 0 else radius
