"""PNG montage of synthetic samples: one row per lesion class, the slice through each lesion."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..lesions.components import label_components
from ..utils.atomic import atomic_path
from .realism import centre_on_lesion


def lesion_slice(image: np.ndarray, mask: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 2D slice (along ``axis`` of (X, Y, Z) arrays) holding the most lesion voxels."""
    counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    k = int(np.argmax(counts))
    return np.take(image, k, axis=axis), np.take(mask, k, axis=axis)


def real_lesion_crops(image: np.ndarray, seg: np.ndarray, label: int, patch_size: Sequence[int],
                      limit: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``limit`` (image crop, lesion mask crop) pairs, one per connected lesion of ``label`` in one case.

    image: (C, X, Y, Z), seg: (X, Y, Z), in voxels of the same grid. Each crop has the size of a training patch
    (``patch_size``; a 2D configuration's patch is one slice, so the crop is 1 x patch) and is centred on the lesion
    voxel nearest the lesion's centroid: the centroid of several lesions, or of a curved one, can lie outside them.
    Crops past the volume are padded with 0 (image) and False (mask). Returned image crops are (C, *crop)."""
    components, n = label_components(seg == label)
    fov = [1] * (seg.ndim - len(patch_size)) + list(patch_size)
    out = []
    for k in range(1, min(n, max(limit, 0)) + 1):
        m = components == k
        pts = np.argwhere(m)
        out.append(centre_on_lesion(image, m, fov, centre=pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))]))
    return out


def save_montage(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, np.ndarray]]]], path: str | Path,
                 window: tuple[float, float] | None = None, title: str | None = None) -> None:
    """rows: (class name, [(image (X,Y,Z), lesion mask (X,Y,Z)), ...]). Written atomically."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    ncols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.2 * ncols, 2.3 * len(rows)), squeeze=False)
    for i, (name, samples) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(samples):
                continue
            img2d, m2d = lesion_slice(*samples[j])
            lo, hi = window if window else np.percentile(img2d, [1, 99])
            ax.imshow(img2d.T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            if m2d.any():
                ax.contour(m2d.T.astype(float), levels=[0.5], colors="r", linewidths=0.8, origin="lower")
            if j == 0:
                ax.set_title(name, fontsize=9, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
