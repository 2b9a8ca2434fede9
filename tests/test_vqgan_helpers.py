"""Synthetic CT-like volumes for the VQGAN tests (no test functions here).

A body ellipsoid of soft tissue (~40 HU, smooth texture) in air, a liver-like organ (label 1, ~60 HU),
a hypodense lesion (label 2, ~0 HU) and a bone rim (~700 HU): enough structure for an autoencoder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter


def synthetic_ct(shape=(40, 40, 40), seed=0, texture_hu=40.0, noise_hu=5.0) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) float32 HU volume and int16 label map (1 organ, 2 lesion)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = ((g[0] / 0.9) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.95) ** 2) < 1
    rim = body & ~(((g[0] / 0.8) ** 2 + (g[1] / 0.7) ** 2 + (g[2] / 0.85) ** 2) < 1)
    c = rng.uniform(-0.2, 0.2, 3)
    organ = (((g[0] - c[0]) / 0.45) ** 2 + ((g[1] - c[1]) / 0.35) ** 2 + ((g[2] - c[2]) / 0.4) ** 2) < 1
    lc = c + rng.uniform(-0.1, 0.1, 3)
    lesion = (((g[0] - lc[0]) ** 2 + (g[1] - lc[1]) ** 2 + (g[2] - lc[2]) ** 2) < 0.15 ** 2) & organ
    tex = gaussian_filter(rng.normal(0, 1, shape), 1.5) * texture_hu
    hu = np.full(shape, -1000.0)
    hu[body] = 40 + tex[body]
    hu[organ] = 60 + tex[organ]
    hu[lesion] = 0 + tex[lesion]
    hu[rim] = 700
    hu = hu + rng.normal(0, noise_hu, shape)
    lab = np.zeros(shape, np.int16)
    lab[organ] = 1
    lab[lesion] = 2
    return hu.astype(np.float32), lab


def write_nifti_dataset(folder: Path, n: int, shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0), labels=True, **kw) -> tuple[Path, Path]:
    from nnunet_promptlesion.dataset_conversion.raw_writer import save_nifti

    img_dir, lab_dir = Path(folder) / "images", Path(folder) / "labels"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hu, lab = synthetic_ct(shape, seed=i, **kw)
        save_nifti(hu, spacing, img_dir / f"case{i:03d}_0000.nii.gz")
        if labels:
            save_nifti(lab, spacing, lab_dir / f"case{i:03d}.nii.gz", dtype=np.uint8)
    return img_dir, lab_dir
