"""Mapping between nnU-Net preprocessed patches and a generator's own grid, intensity and axis order.

Two sides:

data side (nnU-Net)
    arrays (C, X, Y, Z) in nnU-Net's preprocessed axis order: the image reader's order (every nnU-Net NIfTI
    reader returns (z, y, x), the reverse of nibabel) permuted by the plans' ``transpose_forward``
    (:func:`~nnunet_promptlesion.utils.geometry.array_axes`); spacing = the configuration's spacing (mm, that
    order); intensities are
    CTNormalization z-scores (:meth:`IntensitySpace.from_nnunet_plans`).
generator side (checkpoint meta)
    ``spacing`` (mm) and ``patch_size`` (voxels) in the array order of the data it was trained on (nnU-Net
    order of *its* plans for ``source.type == "nnunet_preprocessed"``, nibabel order for a NIfTI folder),
    ``intensity`` (:class:`IntensitySpace`, model space [-1, 1]).

Both array orders are described by :func:`~nnunet_promptlesion.utils.geometry.array_axes`: for every array
axis, the NIfTI voxel axis it runs along. The mapping permutes axes accordingly (no flips: both sides keep the reader's orientation),
resamples a local generator patch around the lesion with trilinear interpolation (generator voxel centres
placed symmetrically around the ROI centre, in mm), converts z-scores -> HU -> model space, and on the way
back samples the decoded patch only at the data voxels inside the blend support (the lesion mask dilated by
``blend_margin(sigma)``) and blends there in the data grid. Every voxel outside that support is returned
bit-identical. When the generator was trained on this very configuration (same axes, spacing within
``1e-3`` relative, same intensity space) the mapping is the identity: a plain crop, no interpolation.

2D generators (``meta["spatial_dims"] == 2``) work on slices: both sides are then in-plane grids, (Y, X) of
nnU-Net's pseudo-3D (Z, Y, X) arrays (a 2D configuration's spacing has the two in-plane entries; a 2D generator
was trained on slices along its array axis 0), and the mapping runs on one slice with bilinear interpolation.
:meth:`GridSpec.in_plane` gives the data side of a 3D configuration in plane. A 2D generator on a 3D grid (or the
reverse) is refused, naming both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..generator.intensity import IntensitySpace
from ..lesions.blending import blend_margin, blend_weights, dilate
from ..utils.geometry import array_axes


class SpaceMismatchError(ValueError):
    """The generator cannot represent the dataset (intensity window, channels, classes); the message names both."""


class DoesNotFitError(ValueError):
    """The lesion's blend support does not fit into the generator patch (lesion too large for the generator)."""


@dataclass(frozen=True)
class GridSpec:
    """One side of the mapping: spacing (mm) and NIfTI voxel axis per array axis (``array_axes(...).axes``), and
    the intensity space. Three entries each for 3D grids; two for slice grids (the in-plane axes 1, 2 of the
    pseudo-3D arrays of a 2D configuration or a 2D generator)."""

    spacing: tuple[float, ...]
    axes: tuple[int, ...]
    intensity: IntensitySpace

    @property
    def spatial_dims(self) -> int:
        return len(self.spacing)

    @classmethod
    def from_nnunet(cls, plans: dict, configuration: str) -> "GridSpec":
        # deferred: nnU-Net loads torch (~1.4 s CPU at import, measured here); settings validation imports this
        # module (through the diffusion sources) and never builds a GridSpec
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        cm = PlansManager(plans).get_configuration(configuration)
        spacing = tuple(float(s) for s in cm.spacing)
        axes = array_axes(plans).axes
        # a 2D configuration's spacing holds the in-plane axes (1, 2) of its pseudo-3D arrays
        return cls(spacing, axes[len(axes) - len(spacing):], IntensitySpace.from_nnunet_plans(plans, configuration))

    @classmethod
    def from_generator_meta(cls, meta: dict) -> "GridSpec":
        if not meta.get("intensity") or not meta.get("spacing"):
            raise SpaceMismatchError("the generator checkpoint records no spacing/intensity space; retrain it with this "
                                     "package's promptlesion_train_vqgan / promptlesion_train_diffusion")
        spacing = tuple(float(s) for s in meta["spacing"])
        axes = array_axes(meta.get("source") or {}).axes
        # a 2D generator was trained on slices along its array axis 0: its spacing holds axes 1 and 2
        return cls(spacing, axes[len(axes) - len(spacing):], IntensitySpace.from_dict(meta["intensity"]))

    def in_plane(self) -> "GridSpec":
        """The slice grid (array axes 1, 2) of a 3D grid; a slice grid is returned as it is."""
        if self.spatial_dims == 2:
            return self
        return GridSpec(self.spacing[1:], self.axes[1:], self.intensity)


def check_intensity_representable(data: IntensitySpace, gen: IntensitySpace, min_overlap: float = 0.5) -> None:
    """Refuse a generator whose HU range covers less than ``min_overlap`` of the dataset's CT window.

    The dataset window is nnU-Net's foreground 0.5-99.5 percentile range; a generator trained on a narrower
    window (e.g. DiffTumor's [-175, 250] HU) would clip everything outside it (calcium, contrast-filled vessels).
    """
    dlo, dhi = data.hu_range()
    glo, ghi = gen.hu_range()
    overlap = max(0.0, min(dhi, ghi) - max(dlo, glo))
    if overlap < min_overlap * (dhi - dlo):
        raise SpaceMismatchError(
            f"the generator cannot represent this dataset's intensities: dataset {data.describe()} spans "
            f"[{dlo:.0f}, {dhi:.0f}] HU, generator {gen.describe()} spans [{glo:.0f}, {ghi:.0f}] HU "
            f"(overlap {overlap:.0f} HU < {min_overlap:.0%} of the dataset window). Train the VQGAN/diffusion model "
            "on this dataset (promptlesion_pretrain) or with an intensity window that covers it.")


class SpaceMapping:
    """Crop-resample-inpaint-resample-blend between a data grid and a generator grid.

    ``patch_size``: generator patch (voxels, generator axis order), divisible by the VQGAN factor.
    ``perm[k]``: the data axis that generator axis k runs along.
    """

    def __init__(self, data: GridSpec, gen: GridSpec, patch_size: Sequence[int], spacing_rtol: float = 1e-3,
                 min_intensity_overlap: float = 0.5):
        n = len(gen.spacing)
        if len(data.spacing) != n or len(patch_size) != n:
            raise SpaceMismatchError(f"the generator is {n}D ({n} spacing entries {list(gen.spacing)}, patch "
                                     f"{list(patch_size)}) but the data grid is {len(data.spacing)}D (spacing "
                                     f"{list(data.spacing)}): use a {n}D configuration with this generator")
        if n == 3 and (sorted(data.axes) != [0, 1, 2] or sorted(gen.axes) != [0, 1, 2]):
            raise SpaceMismatchError(f"axis descriptions must be permutations of (0, 1, 2): data {data.axes}, "
                                     f"generator {gen.axes}")
        if n == 2 and sorted(data.axes) != sorted(gen.axes):
            raise SpaceMismatchError(f"the 2D generator's slices span NIfTI voxel axes {sorted(gen.axes)} but the "
                                     f"data's slices span {sorted(data.axes)}: they cut the volume in other planes")
        check_intensity_representable(data.intensity, gen.intensity, min_intensity_overlap)
        self.data, self.gen = data, gen
        self.patch_size = tuple(int(p) for p in patch_size)
        self.perm = tuple(data.axes.index(a) for a in gen.axes)
        # spacing of the data grid in generator order
        self.data_spacing_g = np.array([data.spacing[a] for a in self.perm], dtype=np.float64)
        self.gen_spacing = np.array(gen.spacing, dtype=np.float64)
        same_spacing = np.allclose(self.data_spacing_g, self.gen_spacing, rtol=spacing_rtol, atol=0)
        self.same_intensity = data.intensity.same_as(gen.intensity)
        self.ndim = n
        self.identity_grid = self.perm == tuple(range(n)) and bool(same_spacing)
        # footprint of the generator patch in data voxels, per data axis
        half_mm = (np.asarray(self.patch_size) - 1) / 2.0 * self.gen_spacing
        self._half_data = np.empty(n)
        for k, a in enumerate(self.perm):
            # exact half-integers on the identity grid, so its crops land on data voxels
            self._half_data[a] = (self.patch_size[k] - 1) / 2.0 if self.identity_grid else half_mm[k] / data.spacing[a]

    # ---------------------------------------------------------------- description
    def describe(self) -> dict:
        return {"identity_grid": self.identity_grid, "same_intensity": self.same_intensity,
                "generator_axes_in_data_axes": list(self.perm), "data_spacing_mm": list(self.data.spacing),
                "generator_spacing_mm": list(self.gen.spacing), "generator_patch": list(self.patch_size),
                "data_intensity": self.data.intensity.describe(), "generator_intensity": self.gen.intensity.describe()}

    def footprint(self) -> np.ndarray:
        """Data-grid extent (voxels, data axis order) that a generator patch covers."""
        return np.floor(2 * self._half_data + 1e-6).astype(int) + 1

    # ---------------------------------------------------------------- intensities
    def data_to_model(self, x: np.ndarray) -> np.ndarray:
        if self.same_intensity:
            return np.asarray(self.gen.intensity.to_model(x), np.float32)
        return np.asarray(self.gen.intensity.hu_to_model(self.data.intensity.to_hu(x)), np.float32)

    def model_to_data(self, y: np.ndarray) -> np.ndarray:
        if self.same_intensity:
            return np.asarray(self.gen.intensity.from_model(y), np.float32)
        return np.asarray(self.data.intensity.from_hu(self.gen.intensity.model_to_hu(y)), np.float32)

    # ---------------------------------------------------------------- geometry
    def centre_for(self, support: np.ndarray) -> np.ndarray:
        """ROI centre (data voxel coordinates, float) for a blend support: the centre of its bounding box.

        On the identity grid the centre is snapped so that the generator patch starts on a data voxel.
        """
        idx = np.argwhere(support)
        c = (idx.min(0) + idx.max(0)) / 2.0
        if self.identity_grid:
            c = np.floor(c - self._half_data + 0.5) + self._half_data
        return c

    def _gen_coords(self, centre: np.ndarray) -> np.ndarray:
        """Data-grid coordinates (n, *patch), data axis order, of every generator voxel centre."""
        axes = []
        for k, a in enumerate(self.perm):
            scale = 1.0 if self.identity_grid else self.gen_spacing[k] / self.data.spacing[a]
            axes.append(centre[a] + (np.arange(self.patch_size[k]) - (self.patch_size[k] - 1) / 2.0) * scale)
        grid = np.meshgrid(*axes, indexing="ij")  # generator order
        out = np.empty((self.ndim, *self.patch_size))
        for k, a in enumerate(self.perm):
            out[a] = grid[k]
        return out

    def _to_gen_coords(self, centre: np.ndarray, voxels: np.ndarray) -> np.ndarray:
        """Generator-grid coordinates (n, N), generator axis order, of data voxels (N, n)."""
        out = np.empty((self.ndim, len(voxels)))
        for k, a in enumerate(self.perm):
            scale = 1.0 if self.identity_grid else self.data.spacing[a] / self.gen_spacing[k]
            out[k] = (voxels[:, a] - centre[a]) * scale + (self.patch_size[k] - 1) / 2.0
        return out

    def to_generator(self, image: np.ndarray, masks: Sequence[np.ndarray], centre: np.ndarray):
        """Cut the generator patch around ``centre`` (data voxels) from a data-grid crop.

        image: (X, Y, Z) float32 z-scores (data grid, data order; (Y, X) of one slice for a 2D mapping); masks:
        bool arrays of the same shape (lesion, parent...). Returns (model-space image (*patch) float32 in [-1, 1],
        [bool masks (*patch)]), generator order.
        Outside the crop the image is extended with its nearest voxel, masks with False.
        """
        if self.identity_grid:
            lo = np.round(centre - self._half_data).astype(int)
            bbox = [[int(l), int(l) + p] for l, p in zip(lo, self.patch_size)]
            img = _crop_pad_edge(image, bbox)
            out_masks = [_crop_pad(m, bbox, False) for m in masks]
            return self.data_to_model(img), out_masks
        coords = self._gen_coords(centre)
        img = ndimage.map_coordinates(np.asarray(image, np.float32), coords, order=1, mode="nearest")
        out_masks = []
        for m in masks:
            g = ndimage.map_coordinates(np.asarray(m, np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
            if not g.any() and np.asarray(m).any():
                # a structure thinner than a generator voxel: keep the generator voxel nearest its centre
                cm = np.argwhere(m).mean(0)
                u = np.clip(np.round(self._to_gen_coords(centre, cm[None])[:, 0]).astype(int), 0,
                            np.asarray(self.patch_size) - 1)
                g[tuple(u)] = True
            out_masks.append(g)
        return self.data_to_model(img), out_masks

    def support(self, mask: np.ndarray, sigma_voxels: float) -> np.ndarray:
        """Where blending may change voxels: ``mask`` dilated by ``blend_margin(sigma)`` (data grid)."""
        return dilate(mask, blend_margin(sigma_voxels))

    def check_fits(self, support: np.ndarray, centre: np.ndarray) -> None:
        vox = np.argwhere(support)
        u = self._to_gen_coords(centre, vox)
        hi = np.asarray(self.patch_size)[:, None] - 1
        if (u < -1e-6).any() or (u > hi + 1e-6).any():
            ext = (vox.max(0) - vox.min(0) + 1) * np.asarray(self.data.spacing)
            raise DoesNotFitError(f"lesion blend region {np.round(ext, 1).tolist()} mm does not fit the generator patch "
                                  f"{self.patch_size} voxels at {self.gen.spacing} mm")

    def from_generator(self, original: np.ndarray, decoded_model: np.ndarray, mask: np.ndarray, centre: np.ndarray,
                       sigma_voxels: float) -> np.ndarray:
        """Blend the decoded generator patch into the data-grid crop ``original`` (X, Y, Z) under ``mask``.

        decoded_model: (P0, P1, P2) model space, generator order. Only voxels inside the blend support change;
        all other voxels keep their exact value. Raises :class:`DoesNotFitError` if the support leaves the patch.
        """
        g, support = blend_weights(mask, sigma_voxels)
        self.check_fits(support, centre)
        vox = np.argwhere(support)
        dec = self.model_to_data(decoded_model)
        if self.identity_grid:
            lo = np.round(centre - self._half_data).astype(int)
            vals = dec[tuple((vox - lo).T)]
        else:
            vals = ndimage.map_coordinates(dec, self._to_gen_coords(centre, vox), order=1, mode="nearest")
        out = np.array(original, dtype=np.float32, copy=True)
        idx = tuple(vox.T)
        w = g[idx]
        o = out[idx]
        out[idx] = ((1.0 - w) * o + w * vals).astype(np.float32)
        return out


def _crop_pad(a: np.ndarray, bbox, fill) -> np.ndarray:
    out = np.full([b - a_ for a_, b in bbox], fill, dtype=a.dtype)
    src = tuple(slice(max(lo, 0), min(hi, s)) for (lo, hi), s in zip(bbox, a.shape))
    dst = tuple(slice(s.start - lo, s.stop - lo) for s, (lo, _) in zip(src, bbox))
    if all(s.stop > s.start for s in src):
        out[dst] = a[src]
    return out


def _crop_pad_edge(a: np.ndarray, bbox) -> np.ndarray:
    """Crop with edge extension (like map_coordinates mode='nearest')."""
    idx = [np.clip(np.arange(lo, hi), 0, s - 1) for (lo, hi), s in zip(bbox, a.shape)]
    return np.asarray(a[np.ix_(*idx)], dtype=np.float32)


def prompt_ids_for(spec, vocabulary, labels: Sequence[int] | None = None) -> dict[int, int]:
    """Lesion label -> generator prompt id, matched by prompt name first, then by label.

    Raises :class:`SpaceMismatchError` naming the classes the generator does not know (``labels``: the classes
    that must be covered, default every class of the spec).
    """
    want = [spec.by_label(l) for l in labels] if labels is not None else list(spec.lesions)
    out, missing = {}, []
    for l in want:
        if l.prompt in vocabulary.names:
            out[l.label] = vocabulary.names.index(l.prompt)
        elif l.name in vocabulary.names:
            out[l.label] = vocabulary.names.index(l.name)
        else:
            missing.append(l.name)
    if missing:
        raise SpaceMismatchError(
            f"the generator's prompt vocabulary {vocabulary.names[1:]} has no prompt for lesion class(es) {missing} "
            "of this dataset. Give them weight 0 in 'class_weights' or train the diffusion model on this dataset.")
    return out


__all__ = ["SpaceMapping", "GridSpec", "SpaceMismatchError", "DoesNotFitError",
           "check_intensity_representable", "prompt_ids_for"]
