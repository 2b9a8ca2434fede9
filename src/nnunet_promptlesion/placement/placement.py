"""What a placement is: where a synthetic lesion goes, in a carrier case's voxel grid.

Axis order: nnU-Net's preprocessed grid (after ``transpose_forward``), boxes ``[[lo, hi], ...]`` per spatial
axis, half-open, in voxels; 2D configurations use the pseudo-3D layout with axis 0 of extent 1. For an
in-memory case (one NIfTI volume, :class:`~.placer.ArrayCases`) the grid is that array's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[tuple[int, int], ...]


@dataclass
class Placement:
    """Where a synthetic lesion goes; enough to rebuild carrier and mask from the preprocessed case.

    case: carrier case identifier (nnU-Net preprocessed dataset).
    bbox: crop of the (initial, pre-augmentation) patch in the case's voxel grid, ``[[lo, hi], ...]``
        per spatial axis (a list of lists, as acvl_utils' ``crop_and_pad_nd`` wants it; may extend past the
        volume: the crop is padded, data 0, seg -1).
    class_idx: index into the lesion spec's ``lesions``; label: the label value written into the seg.
    lesion_box: tight box of the lesion inside the patch (patch voxel coordinates).
    lesion_mask: bool, shape of ``lesion_box``: the lesion voxels (already inside the allowed region:
        the parent, plus background when the class may leave its parent; never another label or padding).
    centre: the lesion centre voxel in patch coordinates.
    seed: a seed for rendering (diffusion noise, texture) so a placement renders reproducibly.
    rendered: the lesion already rendered into the case (a ``RenderedLesion`` from a cache or a producer) that
        this placement was cut around, or None for a fresh placement.
    attributes: requested attribute bins of a fresh placement (attribute prompts; one index per attribute of the
        generator, 0 = null), or None (none requested).
    """

    case: str
    bbox: list[list[int]]
    class_idx: int
    label: int
    lesion_box: Box
    lesion_mask: np.ndarray
    centre: tuple[int, ...]
    seed: int
    rendered: Any = None
    attributes: tuple[int, ...] | None = None

    @property
    def patch_shape(self) -> tuple[int, ...]:
        return tuple(int(hi - lo) for lo, hi in self.bbox)

    @property
    def lesion_slices(self) -> tuple[slice, ...]:
        """Slices of the lesion box in patch coordinates."""
        return tuple(slice(lo, hi) for lo, hi in self.lesion_box)

    def mask(self) -> np.ndarray:
        """The lesion mask as a bool array of the patch shape."""
        out = np.zeros(self.patch_shape, dtype=bool)
        out[self.lesion_slices] = self.lesion_mask
        return out

    def lesion_box_in_case(self) -> Box:
        """The lesion box in the case's voxel grid."""
        return tuple((int(b[0] + lo), int(b[0] + hi)) for b, (lo, hi) in zip(self.bbox, self.lesion_box))

    @classmethod
    def from_mask(cls, case: str, bbox, class_idx: int, label: int, mask: np.ndarray, centre, seed: int,
                  rendered: Any = None, attributes: tuple[int, ...] | None = None) -> "Placement":
        """Build from a patch-shaped bool mask (must hold at least one voxel)."""
        idx = np.argwhere(mask)
        lo, hi = idx.min(0), idx.max(0) + 1
        box = tuple((int(a), int(b)) for a, b in zip(lo, hi))
        return cls(case=case, bbox=[[int(a), int(b)] for a, b in bbox], class_idx=int(class_idx),
                   label=int(label), lesion_box=box,
                   lesion_mask=np.ascontiguousarray(mask[tuple(slice(a, b) for a, b in box)]),
                   centre=tuple(int(c) for c in centre), seed=int(seed), rendered=rendered,
                   attributes=None if attributes is None else tuple(int(a) for a in attributes))
