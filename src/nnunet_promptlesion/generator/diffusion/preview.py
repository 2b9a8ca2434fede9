"""PNG previews: three orthogonal planes through a point, with the lesion mask as a contour overlay.

Arrays are 3D (axis 0, 1, 2 in the array order of the data); the three panels are the planes normal to
axis 0, 1 and 2 through ``centre`` (voxel indices). A 2D array (a 2D generator's slice) is one panel, shown
whole. Intensities are shown in a fixed window (model space
[-1, 1] or HU), so panels of one figure are comparable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ...utils.atomic import atomic_path


def _planes(vol: np.ndarray, c: Sequence[int]) -> list[np.ndarray]:
    if vol.ndim == 2:
        return [vol]
    return [vol[c[0], :, :], vol[:, c[1], :], vol[:, :, c[2]]]


def mask_centre(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Centre of mass (voxel) of ``mask``, or the array centre when it is empty / None."""
    if mask is None or not np.any(mask):
        return tuple(int(s) // 2 for s in shape)
    return tuple(int(round(v)) for v in np.argwhere(mask).mean(0))


def save_grid(rows: list[tuple[str, list[tuple[np.ndarray, np.ndarray | None]]]], path: str | os.PathLike,
              title: str, window: tuple[float, float] = (-1.0, 1.0), centre: Sequence[int] | None = None,
              aspect: Sequence[float] | None = None) -> None:
    """A figure of rows; each row is (label, [(volume, mask or None), ...]); each volume -> 3 plane panels.

    ``aspect`` (voxel spacing in mm, array order) keeps anisotropic planes in proportion.
    """
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    per = 3 if rows[0][1][0][0].ndim == 3 else 1  # panels per volume
    ncols = max(len(cols) for _, cols in rows) * per
    fig, axes = plt.subplots(len(rows), ncols, figsize=(max(1.6 * ncols, 3.0), 1.7 * len(rows) + 0.4), squeeze=False)
    sp = list(aspect) if aspect is not None else [1.0] * (3 if per == 3 else 2)
    plane_aspect = [sp[1] / sp[2], sp[0] / sp[2], sp[0] / sp[1]] if per == 3 else [sp[0] / sp[1]]
    for r, (label, cols) in enumerate(rows):
        for j in range(ncols):
            axes[r, j].axis("off")
        for k, (vol, mask) in enumerate(cols):
            c = centre if centre is not None else mask_centre(mask, vol.shape)
            for p, (img, asp) in enumerate(zip(_planes(vol, c), plane_aspect)):
                ax = axes[r, per * k + p]
                ax.imshow(img.T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                          aspect=1.0 / asp if asp else 1.0, interpolation="nearest")
                if mask is not None and np.any(_planes(mask, c)[p]):
                    ax.contour(_planes(mask.astype(float), c)[p].T, levels=[0.5], colors="r", linewidths=0.7)
        axes[r, 0].set_title(label, fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
