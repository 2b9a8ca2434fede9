"""Axis order, spacing and world coordinates of every array this package handles: one definition.

Three kinds of arrays meet in this package:

NIfTI arrays (nibabel order)
    ``np.asarray(nib.load(f).dataobj)``: axis k is the file's voxel axis k (i, j, k); the file's affine maps a
    voxel index to world mm (RAS+, nibabel's convention). Single-CT synthesis, reconstruction and the generators'
    NIfTI-folder training read CT this way.
nnU-Net reader arrays
    What an nnU-Net reader/writer returns (spatial axes). All four NIfTI readers of nnunetv2 2.8 return the
    voxel axes *reversed*, (k, j, i): ``SimpleITKIO`` because SimpleITK's numpy view is (z, y, x), ``NibabelIO``
    because it transposes nibabel's array by (2, 1, 0) "to be consistent with SimpleITK" (both read the same
    file into the same array); the ``...WithReorient`` readers first reorient the image to the closest canonical
    (RAS) orientation and then do the same, so their axes are the reoriented image's voxel axes, reversed.
    Other readers (tif, png) have no NIfTI meaning; their arrays are described in their own order.
nnU-Net preprocessed arrays
    The reader array permuted by the plans' ``transpose_forward``, cropped to the non-zero bounding box
    (``properties['bbox_used_for_cropping']``, in transposed order) and resampled to the configuration's
    spacing (mm, transposed order). nnU-Net and scikit-image resample with ``align_corners=False``: output voxel
    ``n`` samples input position ``(n + 0.5) * old / new - 0.5``.

:class:`ArrayAxes` says, for each axis of an array, which voxel axis of the NIfTI file it runs along (and
whether the file was reoriented first); :func:`array_axes` derives it from nnU-Net plans, a generator's data
source description or a reader name. :class:`ArrayGeometry` is the affine from an array index (float voxels,
voxel centres at integers, array axis order) to world mm (RAS+), built from a NIfTI image, from a reader's
properties or from a preprocessed case's properties; :class:`NiftiView` shows a NIfTI volume in any
:class:`ArrayAxes` order and maps results back to the file's grid.

Axis permutations follow numpy: ``b = a.transpose(perm)`` means axis k of ``b`` is axis ``perm[k]`` of ``a``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

#: nnU-Net's NIfTI readers -> whether they reorient to the closest canonical orientation before reading
NIFTI_READERS: dict[str, bool] = {"SimpleITKIO": False, "NibabelIO": False,
                                  "SimpleITKIOWithReorient": True, "NibabelIOWithReorient": True}
#: what nnU-Net picks for ``.nii.gz`` when the plans name no reader (first match in its reader registry)
DEFAULT_READER = "SimpleITKIO"

_IDENTITY = (0, 1, 2)
_REVERSED = (2, 1, 0)


@dataclass(frozen=True)
class ArrayAxes:
    """For each array axis, the voxel axis (0 = i, 1 = j, 2 = k) of the NIfTI file it runs along.

    ``reorient``: the file is first reoriented to its closest canonical (RAS+) orientation (nnU-Net's
    ``...WithReorient`` readers); ``axes`` then refer to the reoriented image's voxel axes.
    """

    axes: tuple[int, int, int] = _IDENTITY
    reorient: bool = False

    def __post_init__(self):
        if sorted(self.axes) != [0, 1, 2]:
            raise ValueError(f"axes must be a permutation of (0, 1, 2), got {self.axes}")

    def permutation_to(self, other: "ArrayAxes") -> tuple[int, int, int]:
        """``perm`` with ``other_array = self_array.transpose(perm)`` (orientation flips are not part of it)."""
        return tuple(self.axes.index(a) for a in other.axes)

    def to_dict(self) -> dict:
        return {"axes": list(self.axes), "reorient": self.reorient}


def reader_axes(reader: str | None) -> ArrayAxes:
    """Axes of the arrays nnU-Net reader/writer ``reader`` (a class name, e.g. ``plans['image_reader_writer']``)
    returns, relative to the file's voxel axes. ``None``: :data:`DEFAULT_READER`."""
    reader = reader or DEFAULT_READER
    if reader not in NIFTI_READERS:
        return ArrayAxes(_IDENTITY, False)  # tif / png readers: no NIfTI axes, described in their own order
    return ArrayAxes(_REVERSED, NIFTI_READERS[reader])


def array_axes(description: Mapping | None) -> ArrayAxes:
    """Axes of the arrays a data description stands for.

    ``description``: nnU-Net plans (preprocessed data: reader axes permuted by ``transpose_forward``); a patch
    source description (``PatchSource.describe()``: ``type`` ``"nnunet_preprocessed"`` with the plans'
    ``transpose_forward`` and ``image_reader_writer``, or ``"nifti_folder"``); a VQGAN checkpoint's ``source``
    (``{"train": ..., "eval": ...}``) or a generator checkpoint ``meta`` holding one; None: NIfTI order.
    """
    d = dict(description or {})
    if "source" in d and isinstance(d["source"], Mapping):
        d = dict(d["source"])
    if isinstance(d.get("train"), Mapping):
        d = dict(d["train"])
    is_plans = "configurations" in d and "transpose_forward" in d
    if not is_plans and d.get("type") != "nnunet_preprocessed":
        return ArrayAxes(_IDENTITY, False)  # NIfTI folders (and no description): nibabel order
    base = reader_axes(d.get("image_reader_writer"))
    tf = [int(t) for t in (d.get("transpose_forward") or _IDENTITY)]
    return ArrayAxes(tuple(int(base.axes[t]) for t in tf), base.reorient)


# ---------------------------------------------------------------------------------------------- world <-> index
def _perm_matrix(perm: Sequence[int]) -> np.ndarray:
    """4x4 matrix taking an index of ``a.transpose(perm)`` to the index of ``a``."""
    m = np.zeros((4, 4))
    for k, p in enumerate(perm):
        m[p, k] = 1.0
    m[3, 3] = 1.0
    return m


@dataclass(frozen=True)
class ArrayGeometry:
    """World position of every voxel of an array: ``affine`` (4x4) maps an array index (array axis order,
    voxels, voxel centres at integers) to world mm (RAS+, as nibabel); ``shape`` is the array's spatial shape."""

    affine: np.ndarray
    shape: tuple[int, ...]

    @property
    def spacing(self) -> tuple[float, ...]:
        """mm per voxel along each array axis."""
        return tuple(float(s) for s in np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0))

    def index_to_world(self, index) -> np.ndarray:
        """(..., 3) array indices -> (..., 3) world mm."""
        idx = np.asarray(index, dtype=np.float64)
        a = np.asarray(self.affine, dtype=np.float64)
        return idx @ a[:3, :3].T + a[:3, 3]

    def world_to_index(self, world) -> np.ndarray:
        """(..., 3) world mm -> (..., 3) float array indices (round for the nearest voxel)."""
        p = np.asarray(world, dtype=np.float64)
        a = np.asarray(self.affine, dtype=np.float64)
        return np.linalg.solve(a[:3, :3], (p - a[:3, 3]).T.reshape(3, -1)).T.reshape(p.shape)

    # geometry of derived arrays
    def transposed(self, perm: Sequence[int]) -> "ArrayGeometry":
        """Geometry of ``array.transpose(perm)``."""
        perm = [int(p) for p in perm]
        return ArrayGeometry(np.asarray(self.affine) @ _perm_matrix(perm), tuple(self.shape[p] for p in perm))

    def cropped(self, lo: Sequence[int], shape: Sequence[int]) -> "ArrayGeometry":
        """Geometry of ``array[lo[0]:lo[0] + shape[0], ...]``."""
        t = np.eye(4)
        t[:3, 3] = np.asarray(lo, dtype=np.float64)
        return ArrayGeometry(np.asarray(self.affine) @ t, tuple(int(s) for s in shape))

    def resized(self, shape: Sequence[int]) -> "ArrayGeometry":
        """Geometry after resampling to ``shape`` with ``align_corners=False`` (nnU-Net, scikit-image resize)."""
        scale = np.asarray(self.shape, np.float64) / np.asarray(shape, np.float64)
        t = np.diag([*scale, 1.0])
        t[:3, 3] = (scale - 1.0) / 2.0
        return ArrayGeometry(np.asarray(self.affine) @ t, tuple(int(s) for s in shape))

    # constructors
    @classmethod
    def from_nifti(cls, img) -> "ArrayGeometry":
        """Geometry of a nibabel image's array (nibabel order)."""
        return cls(np.asarray(img.affine, np.float64), tuple(int(s) for s in img.shape[:3]))

    @classmethod
    def from_reader_properties(cls, properties: Mapping, shape: Sequence[int]) -> "ArrayGeometry":
        """Geometry of the array an nnU-Net NIfTI reader returned with ``properties`` (``shape``: its spatial shape).

        SimpleITK readers store spacing, origin and direction (ITK's LPS world, index (i, j, k)); nibabel readers
        store the (reoriented) affine (RAS+, index (i, j, k)). The array index is (k, j, i) for both.
        """
        rev = _perm_matrix(_REVERSED)
        if "sitk_stuff" in properties:
            st = properties["sitk_stuff"]
            if len(st["spacing"]) != 3:
                raise ValueError(f"world geometry needs a 3D image; this one has spacing {st['spacing']}")
            lps = np.eye(4)
            lps[:3, :3] = np.asarray(st["direction"], np.float64).reshape(3, 3) * np.asarray(st["spacing"], np.float64)
            lps[:3, 3] = np.asarray(st["origin"], np.float64)
            ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # ITK's LPS world -> nibabel's RAS+
            return cls(ras @ rev, tuple(int(s) for s in shape))
        if "nibabel_stuff" in properties:
            nb = properties["nibabel_stuff"]
            aff = nb.get("reoriented_affine", nb["original_affine"])
            return cls(np.asarray(aff, np.float64) @ rev, tuple(int(s) for s in shape))
        raise ValueError("these reader properties hold no world geometry (neither 'sitk_stuff' nor 'nibabel_stuff'): "
                         "only nnU-Net's NIfTI readers (SimpleITKIO, NibabelIO and their ...WithReorient variants) "
                         "record where the image lies")

    @classmethod
    def from_preprocessed(cls, properties: Mapping, transpose_forward: Sequence[int], shape: Sequence[int]
                          ) -> "ArrayGeometry":
        """Geometry of an nnU-Net preprocessed case (``case.pkl`` ``properties``, ``shape``: the spatial shape of
        its ``data``): the reader array, transposed, cropped and resampled exactly as nnU-Net's preprocessor does."""
        tf = [int(t) for t in transpose_forward]
        before = [int(s) for s in properties["shape_before_cropping"]]  # transposed order
        reader_shape = [0, 0, 0]
        for k, t in enumerate(tf):
            reader_shape[t] = before[k]
        g = cls.from_reader_properties(properties, reader_shape).transposed(tf)
        bbox = properties["bbox_used_for_cropping"]
        g = g.cropped([int(b[0]) for b in bbox], properties["shape_after_cropping_and_before_resampling"])
        return g.resized(shape)


# ---------------------------------------------------------------------------------------------- NIfTI volumes
def _invert_ornt(ornt: np.ndarray) -> np.ndarray:
    inv = np.zeros_like(ornt)
    for i, (p, f) in enumerate(ornt):
        inv[int(p)] = (i, f)
    return inv


class NiftiView:
    """A NIfTI image seen in the array order ``order`` (e.g. a generator's, from :func:`array_axes`).

    ``to_view`` turns a nibabel-order array of the image's grid into that order (reoriented first when
    ``order.reorient``); ``from_view`` undoes it exactly (a permutation and flips, no resampling);
    ``geometry`` is the view's :class:`ArrayGeometry` and ``spacing`` its mm per voxel, view order.
    """

    def __init__(self, img, order: ArrayAxes):
        shape = tuple(int(s) for s in img.shape[:3])
        self.order = order
        self.file_geometry = ArrayGeometry.from_nifti(img)
        if order.reorient:
            self._ornt = io_orientation(np.asarray(img.affine, np.float64))
        else:
            self._ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        canon_shape = [0, 0, 0]
        for i, (p, _) in enumerate(self._ornt):
            canon_shape[int(p)] = shape[i]
        canon = ArrayGeometry(self.file_geometry.affine @ inv_ornt_aff(self._ornt, shape), tuple(canon_shape))
        self.geometry = canon.transposed(order.axes)

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.geometry.spacing)

    @property
    def permutation(self) -> tuple[int, int, int]:
        """Axis permutation from the (reoriented) nibabel array to the view (flips not included)."""
        return tuple(int(a) for a in self.order.axes)

    def to_view(self, arr: np.ndarray) -> np.ndarray:
        a = apply_orientation(np.asarray(arr), self._ornt) if self.order.reorient else np.asarray(arr)
        return np.ascontiguousarray(a.transpose(self.order.axes))

    def from_view(self, arr: np.ndarray) -> np.ndarray:
        a = np.asarray(arr).transpose(np.argsort(self.order.axes))
        if self.order.reorient:
            a = apply_orientation(a, _invert_ornt(self._ornt))
        return np.ascontiguousarray(a)


__all__ = ["ArrayAxes", "ArrayGeometry", "NiftiView", "array_axes", "reader_axes", "NIFTI_READERS", "DEFAULT_READER"]


def read_nifti_3d(path) -> tuple[object, np.ndarray]:
    """(nibabel image, float32 array in the file's voxel order) of a 3D NIfTI; ValueError saying what is wrong."""
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for unreadable files
        raise ValueError(f"could not read {path} as NIfTI: {e}") from e
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {arr.shape}")
    return img, arr
