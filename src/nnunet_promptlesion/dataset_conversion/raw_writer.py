"""Writing nnU-Net raw datasets (DatasetXXX_Name/imagesTr, labelsTr, imagesTs, labelsTs, dataset.json).

Every dataset is assembled in a temporary sibling folder and renamed into place at the end
(see :func:`nnunet_promptlesion.utils.atomic.atomic_dir`), so an interrupted conversion leaves
nothing half-written and an existing dataset is only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from ..lesions.spec import LESION_SPEC_FILENAME, LesionSpec
from ..utils.atomic import write_json_atomic

FILE_ENDING = ".nii.gz"


def nnunet_raw_dir() -> Path:
    """The ``nnUNet_raw`` folder from the environment, with a clear error when unset."""
    p = os.environ.get("nnUNet_raw")
    if not p:
        raise RuntimeError("nnUNet_raw is not set. export nnUNet_raw=/path/to/nnUNet_raw (see nnU-Net's setting_up_paths.md)")
    return Path(p)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise ValueError(f"dataset id must be in 1..999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"dataset name '{name}' may only contain letters, digits, '_' and '-'")
    return f"Dataset{int(dataset_id):03d}_{name}"


def existing_dataset_with_id(raw_dir: Path, dataset_id: int) -> list[Path]:
    prefix = f"Dataset{int(dataset_id):03d}_"
    return [p for p in raw_dir.glob(prefix + "*") if p.is_dir()] if raw_dir.is_dir() else []


def save_nifti(array_xyz: np.ndarray, spacing_xyz: Sequence[float], path: Path, dtype=None,
               affine: np.ndarray | None = None) -> None:
    """Save an (X, Y, Z) array with voxel spacing in mm (x, y, z) as NIfTI.

    Without an explicit ``affine`` a diagonal RAS affine with the given spacing is written.
    """
    arr = np.asarray(array_xyz if dtype is None else array_xyz.astype(dtype))
    if affine is None:
        affine = np.diag([float(spacing_xyz[0]), float(spacing_xyz[1]), float(spacing_xyz[2]), 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(tuple(float(s) for s in spacing_xyz))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def make_dataset_json(labels: dict[str, int], num_training: int, channel_names: dict[str, str] | None = None,
                      file_ending: str = FILE_ENDING, **extra) -> dict:
    """dataset.json content in nnU-Net v2 format. ``labels`` must contain "background": 0."""
    if labels.get("background") != 0:
        raise ValueError("labels must map 'background' to 0")
    d = {
        "channel_names": channel_names or {"0": "CT"},
        "labels": labels,
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    d.update(extra)
    return d


def write_dataset_metadata(folder: Path, dataset_json: dict, spec: LesionSpec | None) -> None:
    write_json_atomic(dataset_json, folder / "dataset.json")
    if spec is not None:
        spec.validate_against_dataset(dataset_json)
        spec.save(folder / LESION_SPEC_FILENAME)
