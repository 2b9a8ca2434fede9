"""Procedural CT phantom datasets in nnU-Net raw format (shared machinery).

Two phantom kinds exist, each in its own module:

* ``ccta``    (:mod:`.phantoms_ccta`): coronary-CTA-like patches with contrast-filled vessels, a labelled
  vessel wall and calcified / non-calcified plaques.
* ``abdomen`` (:mod:`.phantoms_abdomen`): a miniature abdomen with liver, kidneys, pancreas and their
  tumours (early and late).

This module holds what both share: smooth random fields, elastically deformed ellipsoids, distance to
tube centrelines, the CT image formation (partial-volume blur + correlated noise, HU rounding), the
dataset-level lesion plan (class imbalance, healthy cases) and the writer that produces
``DatasetNNN_Name/{imagesTr,labelsTr,imagesTs,labelsTs}``, ``dataset.json``, ``lesion_spec.json`` and
``phantom_manifest.json`` atomically.

Conventions: arrays are indexed (X, Y, Z) like the NIfTI files written by
:func:`~nnunet_promptlesion.dataset_conversion.raw_writer.save_nifti`; spacing is (x, y, z) in mm; the
voxel centre of index ``i`` lies at ``i * spacing`` mm (zero origin). Images are int16 HU, labels uint8.

Determinism: every case is generated from its own ``np.random.SeedSequence([seed, split, index])``,
so the same seed gives bit-identical files, and a case does not change when ``--cases`` or
``--test-cases`` changes (only the dataset-level lesion plan depends on the number of cases).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline
from scipy.spatial import cKDTree

from ..lesions.spec import LesionSpec
from ..utils.atomic import atomic_dir, write_json_atomic
from .raw_writer import (
    dataset_folder_name,
    existing_dataset_with_id,
    make_dataset_json,
    save_nifti,
    write_dataset_metadata,
)

logger = logging.getLogger(__name__)

PHANTOM_VERSION = 1
MANIFEST_FILENAME = "phantom_manifest.json"
HU_MIN, HU_MAX = -1024, 3071
TRAIN, TEST = 0, 1


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


def random_unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


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


def equivalent_radius_mm(n_voxels: int, spacing: Sequence[float]) -> float:
    """Radius (mm) of the sphere with the volume of ``n_voxels`` voxels."""
    vol = float(n_voxels) * float(np.prod(spacing))
    return (3.0 * vol / (4.0 * math.pi)) ** (1.0 / 3.0)


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
# Dataset-level lesion plan (class imbalance, healthy cases)
# ----------------------------------------------------------------------------------------------
def plan_lesion_presence(n_cases: int, class_fractions: dict[str, float], healthy_fraction: float,
                         rng: np.random.Generator) -> list[set[str]]:
    """Decide which lesion classes each case contains.

    Stratified rather than independent draws, so small datasets still have the intended imbalance:
    ``round(fraction * n)`` cases get each class (at least one when ``n >= 2``, so every class exists
    in the split), ``round(healthy_fraction * n)`` cases (at least one when ``n >= 2``) get none.
    Every diseased case gets at least one class: the most frequent class goes to uncovered cases first
    (it exceeds its share only if the other classes cannot cover the rest).
    """
    n = int(n_cases)
    if n <= 0:
        return []
    order = rng.permutation(n)
    n_healthy = int(round(healthy_fraction * n))
    if n >= 2:
        n_healthy = min(max(n_healthy, 1), n - 1)
    else:
        n_healthy = 0
    diseased = [int(i) for i in order[n_healthy:]]
    plan: list[set[str]] = [set() for _ in range(n)]
    # Rarer classes first (random cases); the most frequent class then goes to uncovered cases first,
    # so that every diseased case has a lesion without inflating the most frequent class.
    names = sorted(class_fractions, key=lambda c: (class_fractions[c], c))
    for j, name in enumerate(names):
        k = int(round(class_fractions[name] * n))
        if n >= 2:
            k = max(k, 1)
        k = min(k, len(diseased))
        if j < len(names) - 1:
            chosen = [int(i) for i in rng.permutation(diseased)[:k]]
        else:
            uncovered = [int(i) for i in rng.permutation(diseased) if not plan[int(i)]]
            covered = [int(i) for i in rng.permutation(diseased) if plan[int(i)]]
            chosen = uncovered + covered[:max(k - len(uncovered), 0)]
        for i in chosen:
            plan[i].add(name)
    return plan


def case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(split), int(index)]))


def plan_rng(seed: int, split: int) -> np.random.Generator:
    # A separate stream (third entry 2**31) from every case stream, so the plan never correlates with geometry.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(split), 2 ** 31]))


# ----------------------------------------------------------------------------------------------
# Phantom kinds and the dataset writer
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


def _kinds() -> dict[str, PhantomKind]:
    from . import phantoms_abdomen, phantoms_ccta

    return {"ccta": phantoms_ccta.KIND, "abdomen": phantoms_abdomen.KIND}


def phantom_kinds() -> dict[str, PhantomKind]:
    """All phantom kinds by name ("ccta", "abdomen")."""
    return _kinds()


def get_config(kind: str, preset: str = "default", **overrides):
    """The named preset's config dataclass of a kind, with field overrides."""
    k = _kinds()[kind]
    if preset not in k.presets:
        raise ValueError(f"unknown preset '{preset}' for phantom kind '{kind}'; choose from {sorted(k.presets)}")
    cfg = k.presets[preset]
    return dataclasses.replace(cfg, **overrides) if overrides else dataclasses.replace(cfg)


def generate_split(kind: str, n_cases: int, seed: int, split: int = TRAIN, config=None) -> list[PhantomCase]:
    """Generate all cases of one split in memory (used by tests and notebooks)."""
    k = _kinds()[kind]
    cfg = config if config is not None else get_config(kind)
    fractions, healthy = split_fractions(k, cfg, split)
    plan = plan_lesion_presence(n_cases, fractions, healthy, plan_rng(seed, split))
    return [k.generate(cfg, plan[i], case_rng(seed, split, i)) for i in range(n_cases)]


def split_fractions(k: PhantomKind, cfg, split: int) -> tuple[dict[str, float], float]:
    """(class fractions, healthy fraction) of a split: the config's ``test_fractions`` (if it has them)
    replace the training fractions on the test split; classes it does not name keep theirs."""
    fractions, healthy = dict(k.class_fractions(cfg)), float(k.healthy_fraction(cfg))
    override = getattr(cfg, "test_fractions", None) if split == TEST else None
    if override:
        unknown = set(override) - set(fractions) - {"healthy"}
        if unknown:
            raise ValueError(f"test_fractions names unknown classes {sorted(unknown)}; known: {sorted(fractions)}")
        healthy = float(override.get("healthy", healthy))
        fractions.update({c: float(v) for c, v in override.items() if c != "healthy"})
    return fractions, healthy


def default_test_cases(n_train: int) -> int:
    return max(2, int(n_train) // 4)


def _case_record(case_id: str, case: PhantomCase, classes: set) -> dict:
    return {
        "case": case_id,
        "planned_classes": sorted(classes),
        "label_voxels": {int(v): int(c) for v, c in zip(*np.unique(case.label, return_counts=True))},
        "lesions": case.lesions,
    }


def write_phantom_dataset(kind: str, dataset_id: int, n_cases: int, seed: int, n_test: int | None = None,
                          name: str | None = None, output_root: str | Path | None = None, overwrite: bool = False,
                          preset: str = "default", config=None, progress: bool = True) -> Path:
    """Write a phantom dataset ``DatasetNNN_Name`` in nnU-Net raw format and return its folder.

    The dataset is assembled in a hidden temporary sibling and renamed into place at the end, so an
    interrupted run leaves nothing behind. An existing ``DatasetNNN_*`` folder with the same id (any
    name) is refused unless ``overwrite`` is set; with ``overwrite`` the target is replaced and other
    folders with the same id are removed, since nnU-Net refuses ambiguous ids.
    """
    from tqdm import tqdm

    from .raw_writer import nnunet_raw_dir

    kinds = _kinds()
    if kind not in kinds:
        raise ValueError(f"unknown phantom kind '{kind}'; choose from {sorted(kinds)}")
    k = kinds[kind]
    if n_cases < 1:
        raise ValueError(f"--cases must be >= 1, got {n_cases}")
    n_test = default_test_cases(n_cases) if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"--test-cases must be >= 0, got {n_test}")
    cfg = config if config is not None else get_config(kind, preset)
    root = Path(output_root) if output_root is not None else nnunet_raw_dir()
    folder_name = dataset_folder_name(dataset_id, name or k.default_dataset_name)
    target = root / folder_name
    clashes = existing_dataset_with_id(root, dataset_id)
    if clashes and not overwrite:
        raise FileExistsError(
            f"{', '.join(str(c) for c in clashes)} already uses dataset id {dataset_id:03d}; "
            "pass --overwrite to replace it or choose another --dataset-id")

    spec = k.lesion_spec(cfg)
    prefix = f"{k.default_dataset_name.lower()}"
    splits = [("Tr", TRAIN, n_cases), ("Ts", TEST, n_test)]
    records: dict[str, list] = {"training": [], "test": []}
    with atomic_dir(target, overwrite=True) as tmp:
        for sub, split, n in splits:
            if n == 0:
                continue
            (tmp / f"images{sub}").mkdir()
            (tmp / f"labels{sub}").mkdir()
            fractions, healthy = split_fractions(k, cfg, split)
            plan = plan_lesion_presence(n, fractions, healthy, plan_rng(seed, split))
            bar = tqdm(range(n), desc=f"{folder_name} {'train' if split == TRAIN else 'test'}", unit="case",
                       disable=not progress)
            for i in bar:
                case_id = f"{prefix}_{'tr' if split == TRAIN else 'ts'}{i:03d}"
                case = k.generate(cfg, plan[i], case_rng(seed, split, i))
                save_nifti(case.image, case.spacing, tmp / f"images{sub}" / f"{case_id}_0000.nii.gz", dtype=np.int16)
                save_nifti(case.label, case.spacing, tmp / f"labels{sub}" / f"{case_id}.nii.gz", dtype=np.uint8)
                records["training" if split == TRAIN else "test"].append(_case_record(case_id, case, plan[i]))
        ds_json = make_dataset_json(
            k.labels, n_cases, channel_names={"0": "CT"},
            name=folder_name,
            description=k.description,
            reference="procedural phantom generated by nnunet_promptlesion (promptlesion_make_phantoms)",
            licence="CC0 (synthetic data)",
            numTest=n_test,
            spacing_mm=list(cfg.spacing),
        )
        write_dataset_metadata(tmp, ds_json, spec)
        write_json_atomic({
            "phantom_version": PHANTOM_VERSION,
            "kind": kind,
            "preset": preset,
            "seed": int(seed),
            "config": dataclasses.asdict(cfg),
            "class_fractions": k.class_fractions(cfg),
            "healthy_fraction": k.healthy_fraction(cfg),
            "test_class_fractions": split_fractions(k, cfg, TEST)[0],
            "test_healthy_fraction": split_fractions(k, cfg, TEST)[1],
            **records,
        }, tmp / MANIFEST_FILENAME)
    for other in clashes:
        if other.resolve() != target.resolve() and other.exists():
            logger.warning("removing %s: it used the same dataset id as the new %s", other, target)
            shutil.rmtree(other)
    return target
