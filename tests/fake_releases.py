"""Tiny fake copies of official dataset releases, laid out exactly like the originals.

File names, folder structure, label values, NIfTI orientation (KiTS's (z, y, x) voxel axes with a
permuting affine, LiTS's flipped in-plane axes, uncompressed .nii), MSD's dataset.json with its
macOS '._' resource forks, 4D multi-channel MSD images, and TIFF slice stacks for CCTA. Every
volume holds an organ ellipsoid with spherical lesions of known radius (mm), so tests can check
staging and lesion specs against ground truth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np


@dataclass
class Sphere:
    """A lesion: centre in voxels (array axes of the generated volume), radius in mm, label value."""

    center: tuple[int, int, int]
    radius_mm: float
    value: int


def phantom(shape, spacing, spheres, organ_value=1, seed=0, dtype=np.int16):
    """CT-like volume and label map on an array of ``shape``; ``spacing`` in mm per array axis.

    Organ: an ellipsoid filling the central ~70 % (HU ~60), body ~0 HU, air -1000 outside a
    cylinder; lesions: spheres (hypodense, HU ~20) of the given radii labelled ``value``.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    rel = [(g - (n - 1) / 2) / ((n - 1) / 2) for g, n in zip(grids, shape)]
    organ = (rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) <= 0.7 ** 2
    lab = np.zeros(shape, np.uint8)
    lab[organ] = organ_value
    img = np.where((rel[1] ** 2 + rel[2] ** 2) <= 0.95, 0.0, -1000.0)
    img[organ] = 60.0
    for s in spheres:
        d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, s.center, spacing))
        m = d2 <= s.radius_mm ** 2
        lab[m] = s.value
        img[m] = 20.0
    img = img + rng.normal(0, 10, shape)
    return img.astype(dtype), lab


def _save_nib(arr, affine, path: Path, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr if dtype is None else arr.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


# KiTS: voxel axes (z, y, x); affine maps voxel axis 0 to -z, 1 to -y, 2 to -x (RAS world).
KITS_SPACING_ZYX = (3.0, 0.8, 0.8)


def kits_affine(spacing_zyx=KITS_SPACING_ZYX):
    sz, sy, sx = spacing_zyx
    return np.array([[0, 0, -sx, 0], [0, -sy, 0, 0], [-sz, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


KITS_LESIONS = {"tumor": 5.0, "small_tumor": 2.4, "cyst": 3.0}  # radii in mm


def fake_kits(root: Path, version: str = "kits23", n_cases: int = 3, unlabelled: int = 0) -> Path:
    """KiTS release under ``root``; returns the folder with case_XXXXX (data/ or dataset/)."""
    base = root / ("dataset" if version == "kits23" else "data")
    seg_name = "aggregated_MAJ_seg.nii.gz" if version == "kits21" else "segmentation.nii.gz"
    for i in range(n_cases + unlabelled):
        shape = (12 + 2 * i, 40, 38)  # (z, y, x): few thick slices like real KiTS
        spheres = [Sphere((shape[0] // 2, 12, 12), KITS_LESIONS["tumor"], 2),
                   Sphere((shape[0] // 2, 30, 28), KITS_LESIONS["small_tumor"], 2)]
        if version != "kits19":
            spheres.append(Sphere((shape[0] // 2 - 1, 10, 28), KITS_LESIONS["cyst"], 3))
        img, lab = phantom(shape, KITS_SPACING_ZYX, spheres, seed=i, dtype=np.float32)
        d = base / f"case_{i:05d}"
        _save_nib(img, kits_affine(), d / "imaging.nii.gz")
        if i < n_cases:
            _save_nib(lab, kits_affine(), d / seg_name)
    return base


LITS_SPACING_XYZ = (0.7, 0.7, 2.5)


def lits_affine(spacing_xyz=LITS_SPACING_XYZ, origin=(172.0, 180.0, -400.0)):
    sx, sy, sz = spacing_xyz
    return np.array([[-sx, 0, 0, origin[0]], [0, -sy, 0, origin[1]], [0, 0, sz, origin[2]], [0, 0, 0, 1]])


LITS_LESIONS = {  # radius in mm -> expected stage at spacing LITS_SPACING_XYZ
    "early": 6.0,
    "late": 12.5,
}


def fake_lits(root: Path, n_cases: int = 3, with_test: bool = False) -> Path:
    """LiTS release: 'Training Batch 1' / 'Training Batch 2' with volume-N.nii / segmentation-N.nii."""
    for i in range(n_cases):
        batch = root / ("Training Batch 1" if i < 2 else "Training Batch 2")
        shape = (64, 60, 16 + i)  # (x, y, z) voxel axes, in-plane first like the real files
        z = shape[2] // 2
        spheres = [Sphere((22, 22, z), LITS_LESIONS["late"], 2), Sphere((50, 48, z), LITS_LESIONS["early"], 2)]
        img, lab = phantom(shape, LITS_SPACING_XYZ, spheres, seed=10 + i)
        _save_nib(img, lits_affine(), batch / f"volume-{i}.nii")
        _save_nib(lab, lits_affine(), batch / f"segmentation-{i}.nii")
    if with_test:
        img, _ = phantom((40, 40, 12), LITS_SPACING_XYZ, [], seed=99)
        _save_nib(img, lits_affine(), root / "Test" / "test-volume-0.nii")
    return root


def fake_msd(root: Path, task: str = "Task03_Liver", organ: str = "liver", n_cases: int = 3, n_test: int = 1,
             channels: tuple[str, ...] = ("CT",), lesion_name: str = "cancer") -> Path:
    """MSD task folder with dataset.json, imagesTr/labelsTr/imagesTs, macOS '._' files; 4D if several channels."""
    base = root / task
    prefix = organ.lower()
    sp = (0.8, 0.8, 2.0)
    aff = np.diag([-sp[0], -sp[1], sp[2], 1.0])
    training = []
    for i in range(n_cases + n_test):
        shape = (32, 30, 14 + i)
        img, lab = phantom(shape, sp, [Sphere((16, 15, shape[2] // 2), 4.0, 2)], seed=20 + i)
        if len(channels) > 1:
            img = np.stack([img + 100 * c for c in range(len(channels))], axis=-1)  # MSD 4D: channels last
        split = "imagesTr" if i < n_cases else "imagesTs"
        name = f"{prefix}_{i}.nii.gz"
        _save_nib(img, aff, base / split / name)
        if i < n_cases:
            _save_nib(lab, aff, base / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            # the official tarballs ship AppleDouble files next to every NIfTI
            (base / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
            (base / "labelsTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    ds = {
        "name": task.split("_", 1)[1], "description": f"fake {task}", "reference": "fake", "licence": "CC-BY-SA 4.0",
        "release": "1.0", "tensorImageSize": "4D" if len(channels) > 1 else "3D",
        "modality": {str(i): c for i, c in enumerate(channels)},
        "labels": {"0": "background", "1": organ, "2": lesion_name},
        "numTraining": n_cases, "numTest": n_test, "training": training,
        "test": [f"./imagesTs/{prefix}_{i}.nii.gz" for i in range(n_cases, n_cases + n_test)],
    }
    (base / "dataset.json").write_text(json.dumps(ds, indent=4))
    return base


CCTA_SPACING_XYZ = (0.4, 0.4, 0.5)


def fake_ccta(root: Path, n_cases: int = 3) -> tuple[Path, Path]:
    """CCTA folder: case 0 as NIfTI, case 1 as a multi-page 3D TIFF, others as folders of 2D TIFF slices.

    Source label values: 1 wall, 2 calcified plaque, 3 non-calcified plaque, 7 (an annotation
    marker to ignore) in case 0.
    """
    import tifffile

    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        shape = (20, 28, 28)  # (z, y, x)
        spheres = [Sphere((10, 9, 9), 1.5, 2), Sphere((10, 19, 19), 2.0, 3)]
        img, lab = phantom(shape, CCTA_SPACING_XYZ[::-1], spheres, seed=30 + i)
        key = f"patient{i + 1}"
        if i == 0:
            lab[0, 0, 0] = 7
            aff = np.diag(list(CCTA_SPACING_XYZ) + [1.0])
            _save_nib(np.transpose(img, (2, 1, 0)), aff, images / f"{key}.nii.gz")
            _save_nib(np.transpose(lab, (2, 1, 0)), aff, labels / f"{key}.nii.gz")
        elif i == 1:
            tifffile.imwrite(images / f"{key}.tif", img)
            tifffile.imwrite(labels / f"{key}.tif", lab)
        else:
            for z in range(shape[0]):
                for arr, folder in ((img, images), (lab, labels)):
                    (folder / key).mkdir(exist_ok=True)
                    tifffile.imwrite(folder / key / f"slice{z}.tif", arr[z])
    return images, labels
