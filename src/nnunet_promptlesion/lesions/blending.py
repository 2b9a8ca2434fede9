"""Lesion-background blending in image space (DiffTumor style), with a hard outer limit.

``out = (1 - g) * original + g * lesion`` with ``g`` a Gaussian-blurred lesion mask (held at 1
inside the mask). ``g`` is
forced to exactly zero outside the mask dilated by ``blend_margin(sigma)`` voxels, so every
voxel outside that dilated mask is returned bit-identical to the original.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def blend_margin(sigma_voxels: float) -> int:
    """Dilation radius (voxels) outside which the blend weight is exactly zero."""
    return int(np.ceil(3.0 * float(sigma_voxels))) + 1


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a bool (X, Y, Z) mask by a cube of half-width ``radius`` voxels."""
    if radius <= 0:
        return mask.copy()
    return ndimage.maximum_filter(mask.astype(np.uint8), size=2 * radius + 1, mode="constant", cval=0).astype(bool)


def blend_weights(mask: np.ndarray, sigma_voxels: float) -> tuple[np.ndarray, np.ndarray]:
    """(g, support): float32 blend weight in [0, 1] and the bool region where it may be non-zero."""
    support = dilate(mask, blend_margin(sigma_voxels))
    if sigma_voxels <= 0:
        g = mask.astype(np.float32)
    else:
        g = ndimage.gaussian_filter(mask.astype(np.float32), sigma=float(sigma_voxels), mode="constant")
        # Full strength inside the mask, soft rim outside it: blurring alone would halve the contrast of
        # thin lesions (a plaque a few voxels thick in a vessel wall).
        g = np.maximum(g, mask)
    g = np.where(support, g, 0.0).astype(np.float32)
    return g, support


def blend(original: np.ndarray, lesion: np.ndarray, mask: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Blend ``lesion`` into ``original`` (both (C, X, Y, Z) or (X, Y, Z)) under ``mask`` (X, Y, Z).

    Voxels outside the mask dilated by ``blend_margin(sigma_voxels)`` keep their exact value.
    """
    g, support = blend_weights(mask, sigma_voxels)
    if original.ndim == mask.ndim + 1:
        g, support = g[None], support[None]
    mixed = (1.0 - g) * original + g * lesion
    return np.where(support, mixed, original).astype(original.dtype, copy=False)
