"""Lesion mask generation: elastic ellipsoid shape priors and a bank of real lesion masks.

All arrays are in the array axis order of the patch they are placed into (nnU-Net's
preprocessed order, usually (z, y, x) or (x, y, z) as stored); ``spacing`` is given in mm in that
same order, so sizes in mm become the right voxel extents on anisotropic grids. 2D arrays with two
spacings (nnU-Net 2D configurations, one slice) work the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from .components import equivalent_radius_mm, label_components
from .spec import LesionClass


def sample_radius_mm(lesion: LesionClass, rng: np.random.Generator) -> float:
    """Draw a size class by ``radius_weights``, then a radius (mm) uniformly inside it."""
    k = rng.choice(len(lesion.radius_mm), p=lesion.radius_weights)
    lo, hi = lesion.radius_mm[k]
    return float(rng.uniform(lo, hi))


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (ndim x ndim, ndim 2 or 3)."""
    if ndim == 2:
        a = rng.uniform(0, 2 * np.pi)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def _spline_weights(n: int, n_ctrl: int) -> np.ndarray:
    """(n, n_ctrl) float32: cubic-spline interpolation of ``n_ctrl`` control points onto ``n`` samples.

    Spline zooming is linear and separable, so a zoomed control grid equals the tensor product of
    these 1-D weights: the deformation field can be evaluated slab by slab without building it whole.
    """
    return ndimage.zoom(np.eye(n_ctrl), (n / n_ctrl, 1), order=3, mode="nearest")[:n].astype(np.float32)


#: voxels per slab when drawing a mask; bounds the float32 temporaries to a few MB each
_SLAB_VOXELS = 1 << 21


def elastic_ellipsoid(radius_mm: float, spacing: Sequence[float], rng: np.random.Generator,
                      elastic: bool = True, axis_ratio: tuple[float, float] = (0.7, 1.3),
                      elastic_strength: float = 0.25) -> np.ndarray:
    """A randomly oriented ellipsoid (ellipse for 2 spacings) of equivalent radius ``radius_mm``.

    spacing: mm per voxel, one value per array axis (2 or 3 axes). The semi-axes are ``radius_mm``
    scaled by random factors in ``axis_ratio`` (renormalised so the volume matches the sphere of
    ``radius_mm``). The elastic deformation perturbs the implicit surface with smooth low-frequency
    noise (3 control points per axis, as in DiffTumor), amplitude ``elastic_strength`` x the radius.

    Memory: drawn on a grid the size of the lesion, slab by slab in float32; the peak is the bool
    output plus a few MB (a 64 mm lesion at 0.8 mm: ~20 MB output, < 100 MB peak).

    Returns a bool array (odd side lengths, lesion centred).
    """
    spacing = np.asarray(spacing, dtype=float)
    ndim = len(spacing)
    f = rng.uniform(*axis_ratio, size=ndim)
    f /= np.prod(f) ** (1.0 / ndim)
    semi = radius_mm * f
    half = np.ceil(semi.max() * (1.0 + elastic_strength + 0.05) / spacing).astype(int) + 1
    shape = tuple(int(2 * h + 1) for h in half)
    rot = _random_rotation(ndim, rng)
    axes = [(np.arange(-h, h + 1) * s).astype(np.float32) for h, s in zip(half, spacing)]  # mm
    coarse = rng.normal(size=(3,) * ndim).astype(np.float32) if elastic else None
    weights = [_spline_weights(n, 3) for n in shape] if elastic else None
    plane = int(np.prod(shape[1:]))
    step = max(1, _SLAB_VOXELS // plane)
    slabs = [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]

    def field(sl: slice) -> np.ndarray:
        sub = [weights[0][sl]] + weights[1:]
        spec = "abc,xa,yb,zc->xyz" if ndim == 3 else "ab,xa,yb->xy"
        return np.einsum(spec, coarse, *sub, optimize=True)

    scale = 0.0
    if elastic:
        scale = max(max(float(np.abs(field(sl)).max()) for sl in slabs), 1e-6)
    mask = np.empty(shape, dtype=bool)
    bshape = [[-1 if a == b else 1 for b in range(ndim)] for a in range(ndim)]
    for sl in slabs:
        ax = [axes[0][sl]] + axes[1:]
        r2 = np.zeros((sl.stop - sl.start,) + shape[1:], dtype=np.float32)
        for i in range(ndim):
            local = sum(np.float32(rot[i, j]) * ax[j].reshape(bshape[j]) for j in range(ndim))
            r2 += (local / np.float32(semi[i])) ** 2
        r = np.sqrt(r2, out=r2)
        if elastic:
            r += np.float32(elastic_strength / scale) * field(sl)
        mask[sl] = r <= 1.0
    if not mask.any():
        mask[tuple(half)] = True
    return mask


def random_flip_rotate(mask: np.ndarray, spacing: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Random flips along every axis and a random 90-degree rotation in a plane of equal spacing.

    Rotations are restricted to axis pairs with (nearly) equal spacing so the physical shape
    is preserved on anisotropic grids.
    """
    out = mask
    for ax in range(out.ndim):
        if rng.random() < 0.5:
            out = np.flip(out, axis=ax)
    pairs = [(a, b) for a in range(out.ndim) for b in range(a + 1, out.ndim)
             if abs(spacing[a] - spacing[b]) <= 0.05 * max(spacing[a], spacing[b])]
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
    labelled, n = label_components(mask)
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

    def _shape(self, lesion: LesionClass, rng: np.random.Generator,
               radius_range_mm: tuple[float, float] | None = None) -> np.ndarray:
        use_bank = lesion.shape == "bank" or (lesion.shape == "mixed" and rng.random() < lesion.bank_probability)
        if use_bank and self.bank is not None:
            m = self.bank.sample(lesion.label, rng)
            if m is not None and (radius_range_mm is None or self._in_range(m, radius_range_mm)):
                return m
        radius = sample_radius_mm(lesion, rng) if radius_range_mm is None else float(rng.uniform(*radius_range_mm))
        return elastic_ellipsoid(radius, self.spacing, rng, elastic=lesion.elastic)

    def _in_range(self, mask: np.ndarray, radius_range_mm: tuple[float, float]) -> bool:
        r = equivalent_radius_mm(int(mask.sum()), self.spacing)
        return radius_range_mm[0] <= r <= radius_range_mm[1]

    def sample(self, lesion: LesionClass, parent: np.ndarray, rng: np.random.Generator,
               centre_region: tuple[slice, ...] | None = None, allowed: np.ndarray | None = None,
               radius_range_mm: tuple[float, float] | None = None) -> np.ndarray | None:
        """A bool mask (shape of ``parent``) of a lesion centred on a parent voxel, or None."""
        out = self.sample_with_centre(lesion, parent, rng, centre_region, allowed, radius_range_mm)
        return None if out is None else out[0]

    def sample_with_centre(self, lesion: LesionClass, parent: np.ndarray, rng: np.random.Generator,
                           centre_region: tuple[slice, ...] | None = None, allowed: np.ndarray | None = None,
                           radius_range_mm: tuple[float, float] | None = None
                           ) -> tuple[np.ndarray, np.ndarray] | None:
        """(mask, centre voxel): a lesion centred on a parent voxel inside ``centre_region``.

        The mask is clipped to ``allowed`` (default: the parent, or everything when
        ``lesion.may_leave_parent``). A *mass* (``lesion.min_parent_fraction`` set) is not clipped: a drawn shape
        is kept whole when it lies inside ``allowed`` and holds at least that fraction of parent voxels, else
        redrawn. Returns None when the region holds no parent voxel or every try came out empty (or, for a
        mass, did not fit).

        ``radius_range_mm`` (lo, hi): a requested radius bin (attribute prompts). The shape is drawn with a radius in
        the range and the final mask (after clipping) is kept only if its equivalent radius
        (:func:`equivalent_radius_mm`: sphere in 3D, disc for a 2D mask) lies in [lo, hi]; three times the
        usual tries.
        """
        mass = lesion.min_parent_fraction
        if allowed is None:
            allowed = parent if not (lesion.may_leave_parent or mass) else np.ones_like(parent, dtype=bool)
        sub = parent[centre_region] if centre_region is not None else parent
        candidates = np.argwhere(sub)
        if len(candidates) == 0:
            return None
        offset = np.array([s.start or 0 for s in centre_region]) if centre_region is not None else 0
        ok = (lambda m: True) if radius_range_mm is None else (lambda m: self._in_range(m, radius_range_mm))
        for _ in range(self.max_tries * (1 if radius_range_mm is None else 3)):
            centre = candidates[rng.integers(len(candidates))] + offset
            mask = paste_centered(parent.shape, self._shape(lesion, rng, radius_range_mm), centre)
            if mass:
                n = int(mask.sum())
                if n and not (mask & ~allowed).any() and (mask & parent).sum() >= mass * n and ok(mask):
                    return mask, centre
                continue
            mask &= allowed
            if mask.any() and ok(mask):
                return mask, centre
        return None


def brighter_than_parent(image: np.ndarray, seg: np.ndarray, parents, percentile: float = 99.0) -> np.ndarray:
    """Non-parent voxels brighter than the parent's ``percentile`` in ``image`` (*spatial, one channel).

    Where a mass (``min_parent_fraction``) may not go: it displaces fat (darker than soft tissue), not bone or
    calcium (brighter). image and seg share one grid (any axis order); units are the image's own (z-scores
    for nnU-Net CT data). All False when the crop holds no parent voxel.
    """
    parent = np.isin(seg, parents)
    if not parent.any():
        return np.zeros(seg.shape, dtype=bool)
    return ~parent & (image > np.percentile(image[parent], percentile))
