"""Building blocks of the procedural CT phantoms, shared by every phantom kind.

The kinds (:mod:`.phantoms_ccta`, :mod:`.phantoms_abdomen`) build their cases from these: smooth random
fields, elastically deformed ellipsoids, distance to tube centrelines, the CT image formation
(partial-volume blur + correlated noise, HU rounding), and the :class:`PhantomCase` / :class:`PhantomKind`
containers. The dataset writer and the kind registry live in :mod:`.phantoms`, which imports the kinds;
the kinds import only this module, so no import runs back up.

Conventions: arrays are indexed (X, Y, Z) like the NIfTI files written by
:func:`~nnunet_promptlesion.dataset_conversion.raw_writer.save_nifti`; spacing is (x, y, z) in mm; the
voxel centre of index ``i`` lies at ``i * spacing`` mm (zero origin). Images are int16 HU, labels uint8.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

from ..lesions.spec import LesionSpec

HU_MIN, HU_MAX = -1024, 3071


# ----------------------------------------------------------------------------------------------
# Case container
# ----------------------------------------------------------------------------------------------
@dataclass
class PhantomCase:
    """One generated case.

    image: (X, Y, Z) int16, HU.
    label: (X, Y, Z) uint8, the dataset's labels.
    spacing: (x, y, z) voxel size in mm.
    lesions: one dict per lesion (class name, label, centre in voxels, drawn equivalent radius in mm,
        voxel count after clipping, "early"/"late" stage where that applies, HU contrast).
    parent_regions: per lesion label, the boolean (X, Y, Z) region the lesion was clipped to
        (its parent structure or, for lesions allowed to leave it, the body). Kept for checks, not written.
    aux: other boolean (X, Y, Z) masks of unlabelled or pre-lesion structures (e.g. the CCTA lumen, the
        abdominal organs before tumours overwrote them). Kept for checks, not written.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    lesions: list[dict] = field(default_factory=list)
    parent_regions: dict[int, np.ndarray] = field(default_factory=dict)
    aux: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------
def voxel_grid_mm(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """(X, Y, Z, 3) float32 voxel-centre coordinates in mm."""
    axes = [np.arange(n, dtype=np.float32) * float(s) for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def smooth_noise(shape: Sequence[int], sigma_vox: float | Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit standard deviation (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32), sigma_vox, mode="reflect")
    sd = float(f.std())
    return (f - f.mean()) / (sd if sd > 0 else 1.0)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a Gaussian matrix with sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def semi_axes_for_radius(r_eq_mm: float, rng: np.random.Generator, anisotropy: float = 0.25,
                         elongation: Sequence[float] | None = None) -> np.ndarray:
    """Ellipsoid semi-axes (mm) whose equivalent-sphere radius is ``r_eq_mm``.

    ``elongation`` fixes the relative axis lengths; otherwise each axis is scaled by a random factor
    in [1 - anisotropy, 1 + anisotropy]. The product of the three axes equals ``r_eq_mm ** 3``.
    """
    e = np.asarray(elongation, float) if elongation is not None else rng.uniform(1 - anisotropy, 1 + anisotropy, 3)
    e = e / np.prod(e) ** (1.0 / 3.0)
    return float(r_eq_mm) * e


def deformed_ellipsoid(shape: Sequence[int], spacing: Sequence[float], center_mm: Sequence[float],
                       semi_axes_mm: Sequence[float], rotation: np.ndarray, rng: np.random.Generator,
                       roughness: float = 0.25, smoothness: float = 0.35) -> np.ndarray:
    """Boolean (X, Y, Z) mask of an elastically deformed ellipsoid.

    The ellipsoid's implicit function q(x) = |A^-1 R^T (x - c)|^2 (A = semi-axes in mm, R's columns =
    axis directions) is multiplied by (1 + roughness * n(x)), n being a smooth random field whose
    correlation length is ``smoothness`` times the mean semi-axis; the mask is q <= 1. This gives
    lobulated, non-convex shapes like DiffTumor's elastic ellipsoids. Only a bounding box around the
    centre is evaluated, so small lesions in large volumes stay cheap.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, float)
    c = np.asarray(center_mm, float)
    a = np.asarray(semi_axes_mm, float)
    reach = a.max() * (1.0 + 2.0 * roughness) + spacing.max()
    lo = np.maximum(np.floor((c - reach) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((c + reach) / spacing).astype(int) + 1, shape)
    mask = np.zeros(shape, bool)
    if np.any(hi <= lo):
        return mask
    sub = tuple(int(h - l) for l, h in zip(lo, hi))
    axes = [(np.arange(l, h) * s - cc) for l, h, s, cc in zip(lo, hi, spacing, c)]
    d = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) @ rotation  # local coordinates
    q = np.sum((d / a) ** 2, axis=-1)
    if roughness > 0:
        corr_mm = max(smoothness * float(a.mean()), float(spacing.min()))
        q = q * (1.0 + roughness * smooth_noise(sub, corr_mm / spacing, rng))
    mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = q <= 1.0
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (clipping can leave detached specks)."""
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0
    return comps == int(sizes.argmax())


def smooth_curve(control_points_mm: np.ndarray, step_mm: float) -> np.ndarray:
    """Densely sampled (N, 3) points of a C2 cubic spline through the control points (mm).

    Points are spaced ~``step_mm`` apart along the curve (re-parameterised by arc length).
    """
    cp = np.asarray(control_points_mm, float)
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(cp, axis=0), axis=1))])
    spline = CubicSpline(t, cp, axis=0, bc_type="natural")
    fine = spline(np.linspace(0.0, t[-1], max(int(t[-1] / (step_mm * 0.25)), 16)))
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))])
    n = max(int(s[-1] / step_mm), 2)
    return np.stack([np.interp(np.linspace(0.0, s[-1], n), s, fine[:, k]) for k in range(3)], axis=1)


def curve_tangents(points: np.ndarray) -> np.ndarray:
    """Unit tangents (N, 3) of a sampled curve."""
    t = np.gradient(points, axis=0)
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)


def distance_to_curve(points_mm: np.ndarray, grid_mm: np.ndarray, max_dist_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of every voxel to the nearest sampled curve point, and that point's index.

    Voxels farther than ``max_dist_mm`` get distance ``inf`` and index ``len(points)``; sample the
    curve finely (well below the voxel size) so the error of the point-set distance is negligible.
    """
    tree = cKDTree(points_mm)
    flat = grid_mm.reshape(-1, 3)
    d, idx = tree.query(flat, k=1, distance_upper_bound=max_dist_mm)
    return d.reshape(grid_mm.shape[:-1]).astype(np.float32), idx.reshape(grid_mm.shape[:-1])


# ----------------------------------------------------------------------------------------------
# CT image formation
# ----------------------------------------------------------------------------------------------
def form_ct_image(hu: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, psf_sigma_mm: Sequence[float],
                  noise_sd_hu: float, noise_corr_vox: float = 0.6) -> np.ndarray:
    """Turn an ideal HU map into a CT-like int16 image.

    The scanner's point-spread function is a Gaussian of ``psf_sigma_mm`` (x, y, z), which gives
    partial-volume mixing at every boundary and blooming of dense calcium; CT noise is spatially
    correlated, modelled as white noise smoothed by ``noise_corr_vox`` voxels and rescaled to
    ``noise_sd_hu`` standard deviation. Result clipped to [-1024, 3071] HU.
    """
    blurred = ndimage.gaussian_filter(hu.astype(np.float32), np.asarray(psf_sigma_mm, float) / np.asarray(spacing, float),
                                      mode="nearest")
    noise = smooth_noise(hu.shape, noise_corr_vox, rng) * float(noise_sd_hu)
    return np.clip(np.rint(blurred + noise), HU_MIN, HU_MAX).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# What a phantom kind declares
# ----------------------------------------------------------------------------------------------
@dataclass
class PhantomKind:
    """What the writer needs to know about a phantom kind.

    generate(config, classes, rng) -> PhantomCase makes one case containing the lesion classes named in
    ``classes`` (a set of lesion class names; empty = healthy).
    """

    name: str
    default_dataset_name: str
    labels: dict[str, int]
    presets: dict[str, object]
    generate: Callable[[object, set, np.random.Generator], PhantomCase]
    lesion_spec: Callable[[object], LesionSpec]
    class_fractions: Callable[[object], dict[str, float]]
    healthy_fraction: Callable[[object], float]
    description: str = ""
