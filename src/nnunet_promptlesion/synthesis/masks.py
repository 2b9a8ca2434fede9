"""Lesion mask generation: elastic ellipsoid shape priors and a bank of real lesion masks.

All arrays are in the array axis order of the patch they are placed into (nnU-Net's
preprocessed order, usually (z, y, x) or (x, y, z) as stored); ``spacing`` is given in mm in that
same order, so sizes in mm become the right voxel extents on anisotropic grids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .lesion_spec import LesionClass


def equivalent_radius_mm(n_voxels: int, spacing: Sequence[float]) -> float:
    """Radius (mm) of the sphere with the volume of ``n_voxels`` voxels of size ``spacing`` (mm)."""
    volume = float(n_voxels) * float(np.prod(spacing))
    return (3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0)


def sample_radius_mm(lesion: LesionClass, rng: np.random.Generator) -> float:
    """Draw a size class by ``radius_weights``, then a radius (mm) uniformly inside it."""
    k = rng.choice(len(lesion.radius_mm), p=lesion.radius_weights)
    lo, hi = lesion.radius_mm[k]
    return float(rng.uniform(lo, hi))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def elastic_ellipsoid(radius_mm: float, spacing: Sequence[float], rng: np.random.Generator,
                      elastic: bool = True, axis_ratio: tuple[float, float] = (0.7, 1.3),
                      elastic_strength: float = 0.25) -> np.ndarray:
    """A randomly oriented ellipsoid of equivalent radius ``radius_mm``, optionally deformed.

    The semi-axes are ``radius_mm`` scaled by random factors in ``axis_ratio`` (renormalised
    so the volume matches the sphere of ``radius_mm``). The elastic deformation perturbs the
    implicit surface with smooth low-frequency noise (a few control points per axis, as in
    DiffTumor), with an amplitude of ``elastic_strength`` times the radius.

    Returns a bool array (tight bounding box, odd side lengths, lesion centred).
    """
    spacing = np.asarray(spacing, dtype=float)
    f = rng.uniform(*axis_ratio, size=3)
    f /= np.prod(f) ** (1.0 / 3.0)
    semi = radius_mm * f
    half = np.ceil(semi.max() * (1.0 + elastic_strength + 0.05) / spacing).astype(int) + 1
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    pts = np.stack([g.ravel() for g in grids], axis=0)  # (3, N) mm
    local = _random_rotation(rng) @ pts
    r = np.sqrt(((local / semi[:, None]) ** 2).sum(0)).reshape(grids[0].shape)
    if elastic:
        coarse = rng.normal(size=(3, 3, 3))
        zoom = [n / 3.0 for n in r.shape]
        field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: r.shape[0], : r.shape[1], : r.shape[2]]
        field /= max(np.abs(field).max(), 1e-6)
        r = r + elastic_strength * field
    mask = r <= 1.0
    if not mask.any():
        mask[tuple(h for h in half)] = True
    return mask


def random_flip_rotate(mask: np.ndarray, spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Random flips along every axis and a random 90-degree rotation in a plane of equal spacing.

    Rotations are restricted to axis pairs with (nearly) equal spacing so the physical shape
    is preserved on anisotropic grids.
    """
    out = mask
    for ax in range(3):
        if rng.random() < 0.5:
            out = np.flip(out, axis=ax)
    pairs = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if abs(spacing[a] - spacing[b]) <= 0.05 * max(spacing[a], spacing[b])]
    if pairs:
        a, b = pairs[rng.integers(len(pairs))]
        out = np.rot90(out, k=int(rng.integers(4)), axes=(a, b))
    return np.ascontiguousarray(out)


@dataclass
class MaskBank:
    """Real lesion masks harvested from the training labels, per lesion label.

    Each entry is a tight bool crop (axis order and spacing of the preprocessed data).
    """

    masks: dict[int, list[np.ndarray]]
    spacing: tuple[float, float, float]

    def count(self, label: int) -> int:
        return len(self.masks.get(label, []))

    def sample(self, label: int, rng: np.random.Generator) -> np.ndarray | None:
        entries = self.masks.get(label)
        if not entries:
            return None
        return random_flip_rotate(entries[rng.integers(len(entries))], self.spacing, rng)

    @classmethod
    def empty(cls, spacing: Sequence[float]) -> "MaskBank":
        return cls(masks={}, spacing=tuple(float(s) for s in spacing))

    def add_components(self, seg: np.ndarray, label: int, max_per_case: int = 20, min_voxels: int = 2) -> list[np.ndarray]:
        """Harvest the connected components of ``label`` in ``seg`` (X, Y, Z) into the bank."""
        comps = connected_components(seg == label, min_voxels=min_voxels)[:max_per_case]
        self.masks.setdefault(label, []).extend(comps)
        return comps


def connected_components(mask: np.ndarray, min_voxels: int = 1) -> list[np.ndarray]:
    """Tight bool crops of the 26-connected components of ``mask``, largest first."""
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    out = []
    for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
        if sl is None:
            continue
        comp = labelled[sl] == i
        if comp.sum() >= min_voxels:
            out.append(comp)
    out.sort(key=lambda c: -int(c.sum()))
    return out


def paste_centered(shape: Sequence[int], local: np.ndarray, centre: Sequence[int]) -> np.ndarray:
    """Place bool array ``local`` into a zero array of ``shape`` with its centre at voxel ``centre``."""
    out = np.zeros(shape, dtype=bool)
    src, dst = [], []
    for n, c, m in zip(shape, centre, local.shape):
        start = int(c) - m // 2
        lo, hi = max(start, 0), min(start + m, n)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    out[tuple(dst)] = local[tuple(src)]
    return out


class MaskSampler:
    """Draws a lesion mask of a given class inside a parent structure of a patch.

    shape "ellipsoid" uses the elastic ellipsoid prior, "bank" real harvested masks, "mixed"
    the bank with probability ``bank_probability`` (falling back to the prior when the bank
    holds no mask of that class).
    """

    def __init__(self, spacing: Sequence[float], bank: MaskBank | None = None, max_tries: int = 10):
        self.spacing = tuple(float(s) for s in spacing)
        self.bank = bank
        self.max_tries = max_tries

    def _shape(self, lesion: LesionClass, rng: np.random.Generator) -> np.ndarray:
        use_bank = lesion.shape == "bank" or (lesion.shape == "mixed" and rng.random() < lesion.bank_probability)
        if use_bank and self.bank is not None:
            m = self.bank.sample(lesion.label, rng)
            if m is not None:
                return m
        return elastic_ellipsoid(sample_radius_mm(lesion, rng), self.spacing, rng, elastic=lesion.elastic)

    def sample(self, lesion: LesionClass, parent: np.ndarray, rng: np.random.Generator,
               centre_region: tuple[slice, ...] | None = None) -> np.ndarray | None:
        """A bool mask (shape of ``parent``) of a lesion centred on a parent voxel.

        The centre is drawn among parent voxels inside ``centre_region`` (default: anywhere);
        unless ``lesion.may_leave_parent`` the mask is clipped to the parent. Returns None when
        the region holds no parent voxel or every try came out empty.
        """
        region = np.zeros_like(parent, dtype=bool)
        region[centre_region if centre_region is not None else (slice(None),) * parent.ndim] = True
        candidates = np.argwhere(parent & region)
        if len(candidates) == 0:
            return None
        for _ in range(self.max_tries):
            centre = candidates[rng.integers(len(candidates))]
            mask = paste_centered(parent.shape, self._shape(lesion, rng), centre)
            if not lesion.may_leave_parent:
                mask &= parent
            if mask.any():
                return mask
        return None
