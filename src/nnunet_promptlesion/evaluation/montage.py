"""PNG montage of synthetic samples: one row per lesion class, the slice through each lesion."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def lesion_slice(image: np.ndarray, mask: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The 2D slice (along ``axis`` of (X, Y, Z) arrays) holding the most lesion voxels."""
    counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    k = int(np.argmax(counts))
    return np.take(image, k, axis=axis), np.take(mask, k, axis=axis)


def save_montage(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, np.ndarray]]]], path: str | Path,
                 window: tuple[float, float] | None = None, title: str | None = None) -> None:
    """rows: (class name, [(image (X,Y,Z), lesion mask (X,Y,Z)), ...]). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.atomic import atomic_path

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
