"""Reading volumes and checking a conversion's inputs before anything is written.

Every check collects *all* problems of a source (each naming its file) instead of stopping at
the first, so a user fixes a broken release in one round. Geometry is compared the way
nnU-Net's ``verify_dataset_integrity`` compares it (``np.allclose`` on size, spacing, origin and
direction as SimpleITK reports them), with a configurable relative tolerance.

Conventions: SimpleITK images; sizes, spacings (mm) and origins (mm) in SimpleITK's (x, y, z)
order; numpy arrays from :func:`SimpleITK.GetArrayFromImage` in (z, y, x) order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile

TIFF_SUFFIXES = (".tif", ".tiff")
SLICE_SUFFIXES = (".tif", ".tiff", ".png")


class ConversionError(RuntimeError):
    """One or more problems with a conversion's inputs; ``problems`` lists each with its file."""

    def __init__(self, problems: Sequence[str], header: str = "conversion refused, nothing was written"):
        self.problems = list(problems)
        shown = self.problems[:50]
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{header}. {len(self.problems)} problem(s):\n  - " + "\n  - ".join(shown) + more)


@dataclass
class VolumeInfo:
    """Header of a 3D (or 4D) volume. size/spacing/origin in (x, y, z[, t]) order, direction row-major."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    dimension: int
    components: int = 1

    def spatial(self) -> "VolumeInfo":
        """The first three axes of a 4D header (the 3D geometry shared by its channels)."""
        if self.dimension == 3:
            return self
        d = np.asarray(self.direction).reshape(self.dimension, self.dimension)[:3, :3]
        return VolumeInfo(tuple(self.size[:3]), tuple(self.spacing[:3]), tuple(self.origin[:3]),
                          tuple(d.ravel().tolist()), 3, self.components)


def natural_key(s: str):
    """Sort key that orders 'slice2' before 'slice10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def strip_image_suffix(name: str) -> str:
    """File name without its image suffix (.nii.gz, .nii, .mha, .nrrd, .tif ...)."""
    for suf in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tiff", ".tif", ".png"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def is_hidden(path: Path) -> bool:
    """macOS resource forks ('._liver_0.nii.gz' in the MSD tarballs) and other dot/underscore files."""
    return path.name.startswith(".") or path.name.startswith("_")


def _slice_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not is_hidden(p) and p.suffix.lower() in SLICE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def _needs_spacing(path: Path) -> bool:
    return path.is_dir() or path.suffix.lower() in TIFF_SUFFIXES


def _stack_info(path: Path, spacing: Sequence[float] | None) -> VolumeInfo:
    if spacing is None:
        raise ValueError("TIFF files and slice folders carry no reliable voxel spacing: give --spacing SX SY SZ (mm)")
    if path.is_dir():
        files = _slice_files(path)
        if not files:
            raise ValueError(f"slice folder contains no {'/'.join(SLICE_SUFFIXES)} files")
        first = _read_slice(files[0])
        if first.ndim != 2:
            raise ValueError(f"slice {files[0].name} is not a 2D grey-value image (shape {first.shape})")
        zyx = (len(files),) + first.shape
    else:
        with tifffile.TiffFile(path) as tf:
            shape = tf.series[0].shape
        if len(shape) == 2:
            shape = (1,) + tuple(shape)
        if len(shape) != 3:
            raise ValueError(f"TIFF holds an array of shape {shape}; expected (slices, rows, columns)")
        zyx = tuple(shape)
    return VolumeInfo((zyx[2], zyx[1], zyx[0]), tuple(float(s) for s in spacing), (0.0, 0.0, 0.0),
                      (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 3)


def _read_slice(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        return np.asarray(tifffile.imread(path))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def read_info(path: Path, spacing: Sequence[float] | None = None) -> VolumeInfo:
    """Header only (no voxel data) of a NIfTI/MHA/NRRD file, a 3D TIFF or a folder of 2D slices.

    ``spacing`` (mm, x y z) is required for TIFF inputs and slice folders and ignored otherwise.
    """
    path = Path(path)
    if _needs_spacing(path):
        return _stack_info(path, spacing)
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return VolumeInfo(tuple(r.GetSize()), tuple(r.GetSpacing()), tuple(r.GetOrigin()), tuple(r.GetDirection()),
                      r.GetDimension(), r.GetNumberOfComponents())


def read_volume(path: Path, spacing: Sequence[float] | None = None) -> sitk.Image:
    """Read a volume as a SimpleITK image (voxel data included); see :func:`read_info` for ``spacing``."""
    path = Path(path)
    if not _needs_spacing(path):
        return sitk.ReadImage(str(path))
    info = _stack_info(path, spacing)
    if path.is_dir():
        arr = np.stack([_read_slice(f) for f in _slice_files(path)], axis=0)
    else:
        arr = np.asarray(tifffile.imread(path))
        if arr.ndim == 2:
            arr = arr[None]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(info.spacing)
    return img


def check_readable(path: Path, spacing: Sequence[float] | None = None) -> None:
    """Decode all voxel data of ``path``; raise if it is truncated or corrupt.

    SimpleITK silently accepts truncated NIfTI files (.nii and .nii.gz alike, filling the rest),
    so NIfTI files are decoded with nibabel, which checks the data length and the gzip stream.
    """
    path = Path(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        img = nib.load(str(path), mmap=False)
        np.asarray(img.dataobj)
    else:
        read_volume(path, spacing)


def geometry_problems(ref: VolumeInfo, other: VolumeInfo, ref_name: str, other_name: str, rtol: float = 1e-5,
                      atol: float = 1e-5) -> list[str]:
    """Differences in size, spacing, origin, direction between two 3D headers, as readable messages."""
    out = []
    if tuple(ref.size) != tuple(other.size):
        out.append(f"{other_name}: size {tuple(other.size)} (x, y, z) differs from {ref_name} {tuple(ref.size)}")
        return out
    for what in ("spacing", "origin", "direction"):
        a, b = np.asarray(getattr(ref, what), float), np.asarray(getattr(other, what), float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
            fmt = lambda v: "(" + ", ".join(f"{x:.6g}" for x in v) + ")"  # noqa: E731
            out.append(f"{other_name}: {what} {fmt(b)} differs from {ref_name} {fmt(a)}; "
                       f"the label map must lie on the image's voxel grid")
    return out


def label_value_problems(arr: np.ndarray, allowed: Iterable[int], name: str) -> list[str]:
    """Non-integer or unexpected values in a label array."""
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            return [f"{name}: label map holds non-integer values (dtype {arr.dtype}); expected integer labels"]
    values = set(np.unique(arr).astype(np.int64).tolist())
    unexpected = sorted(values - set(int(a) for a in allowed))
    if unexpected:
        return [f"{name}: unexpected label value(s) {unexpected}; expected only {sorted(set(int(a) for a in allowed))}"]
    return []


def duplicate_problems(case_sources: dict[str, list[str]]) -> list[str]:
    """Case ids produced by more than one source file."""
    return [f"case '{cid}' appears more than once: {', '.join(srcs)}"
            for cid, srcs in case_sources.items() if len(srcs) > 1]
