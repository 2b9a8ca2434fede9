"""Coronary-CTA-like phantom: curved contrast-filled vessels, labelled wall, calcified and
non-calcified plaques.

Labels: 0 background, 1 vessel_wall, 2 calcified_plaque, 3 noncalcified_plaque. The contrast-filled
lumen is part of the image only (unlabelled), as in CCTA plaque datasets.

Default preset: 64 x 64 x 48 voxels (X, Y, Z) at (0.5, 0.5, 0.6) mm, i.e. a 32 x 32 x 28.8 mm field of
view. Vessels are drawn larger than real coronaries relative to the grid (lumen radius 1.0-2.0 mm =
2-4 voxels, wall 0.75-1.25 mm = 1.5-2.5 voxels) so a network can learn them at this size.

Image content (HU before blur and noise):
  myocardium-like soft tissue 30-55, epicardial fat -120..-80 (random blobs plus a perivascular
  fat sleeve), lung-like -850..-750 at one border in ~40 % of cases, vessel wall 40-60, lumen 300-450
  (decreasing by up to 10 % along the vessel), calcified plaque 750-1300 (>= 600 after blur), non-calcified plaque
  20-50 below the case's wall value (lipid-rich, hypodense), which thickens the wall outward and narrows
  the lumen. Then a Gaussian PSF (partial volume, calcium blooming) and correlated noise of 12-20 HU SD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..lesions.spec import LesionClass, LesionSpec
from ..lesions.components import equivalent_radius_mm
from .phantom_base import (
    PhantomCase,
    PhantomKind,
    curve_tangents,
    deformed_ellipsoid,
    distance_to_curve,
    form_ct_image,
    largest_component,
    semi_axes_for_radius,
    smooth_curve,
    smooth_noise,
    voxel_grid_mm,
)

LABELS = {"background": 0, "vessel_wall": 1, "calcified_plaque": 2, "noncalcified_plaque": 3}
CALCIFIED, NONCALCIFIED = "calcified_plaque", "noncalcified_plaque"


@dataclass(frozen=True)
class CCTAPhantomConfig:
    """Geometry and intensity parameters of the CCTA phantom (lengths in mm, intensities in HU).

    shape: (X, Y, Z) voxels; spacing: (x, y, z) mm.
    n_vessels_probs: probability of 1, 2, 3 vessels per case.
    calcified_fraction / noncalcified_fraction: fraction of cases containing that plaque class
        (stratified per split, see ``plan_lesion_presence``); healthy_fraction: plaque-free cases.
    calcified_count: (min, max) calcified plaques in a case that has them; non-calcified: always 1.
    *_radius_mm: equivalent-sphere radius range the plaque ellipsoid is drawn from (before clipping).
    min_plaque_voxels: a plaque left smaller than this after clipping to the vessel is redrawn (up to 8
        times), since a few-voxel speck blurs below calcium HU and is not a learnable lesion.
    """

    shape: tuple[int, int, int] = (64, 64, 48)
    spacing: tuple[float, float, float] = (0.5, 0.5, 0.6)
    n_vessels_probs: tuple[float, float, float] = (0.3, 0.4, 0.3)
    lumen_radius_mm: tuple[float, float] = (1.0, 2.0)
    wall_thickness_mm: tuple[float, float] = (0.75, 1.25)
    lumen_hu: tuple[float, float] = (300.0, 450.0)
    wall_hu: tuple[float, float] = (40.0, 60.0)
    tissue_hu: tuple[float, float] = (30.0, 55.0)
    fat_hu: tuple[float, float] = (-120.0, -80.0)
    lung_hu: tuple[float, float] = (-850.0, -750.0)
    lung_probability: float = 0.4
    calcified_hu: tuple[float, float] = (750.0, 1300.0)
    noncalcified_delta_hu: tuple[float, float] = (20.0, 50.0)
    calcified_fraction: float = 0.7
    noncalcified_fraction: float = 0.25
    healthy_fraction: float = 0.2
    calcified_count: tuple[int, int] = (1, 3)
    calcified_radius_mm: tuple[float, float] = (0.75, 1.75)
    noncalcified_radius_mm: tuple[float, float] = (1.0, 2.0)
    noncalcified_thickening_mm: tuple[float, float] = (0.5, 1.0)
    min_plaque_voxels: int = 16
    psf_sigma_mm: tuple[float, float, float] = (0.3, 0.3, 0.35)
    noise_sd_hu: tuple[float, float] = (12.0, 20.0)
    #: fractions used for the *test* split instead of the ones above ({class name or "healthy": fraction});
    #: None = the same as training. Lets an evaluation set hold enough rare lesions for a paired test
    #: while the training set keeps the intended imbalance.
    test_fractions: dict | None = None
    #: lesion spec: may synthetic non-calcified plaques leave the vessel-wall label? The phantom's own soft
    #: plaques do (they fill part of the unlabelled lumen and bulge outward), so a synthesizer clipped to the
    #: wall paints something different: a faint darkening inside the wall instead of a filling defect.
    noncalcified_may_leave_wall: bool = False


# The demo preset: what a 2-core CPU can learn in a few minutes (see docs/phantoms.md, "demo preset").
# Smaller field of view (fewer sliding windows at inference, denser vessels), calcified plaques larger and
# more numerous (moderate calcification, 2.5-5 mm across) so the common class is learnable at a small
# budget, non-calcified plaques rarer and still subtle, and a test split enriched in non-calcified plaques.
DEMO = CCTAPhantomConfig(
    shape=(48, 48, 40),
    calcified_fraction=0.75,
    noncalcified_fraction=0.2,
    healthy_fraction=0.15,
    calcified_count=(2, 4),
    calcified_radius_mm=(1.25, 2.5),
    noncalcified_radius_mm=(1.5, 2.5),
    min_plaque_voxels=24,
    test_fractions={CALCIFIED: 0.6, NONCALCIFIED: 0.6, "healthy": 0.1},
    noncalcified_may_leave_wall=True,
)

PRESETS = {
    "default": CCTAPhantomConfig(),
    # Twice the field of view per axis at the same resolution; for users with more compute.
    "large": CCTAPhantomConfig(shape=(96, 96, 64)),
    "demo": DEMO,
}


@dataclass
class _Vessel:
    points: np.ndarray  # (N, 3) centreline, mm
    tangents: np.ndarray  # (N, 3)
    r_lumen: np.ndarray  # (N,) mm
    wall: float  # mm
    lumen_hu: np.ndarray  # (N,) HU
    dist: np.ndarray | None = None  # (X, Y, Z) mm to the centreline (inf far away)
    idx: np.ndarray | None = None  # (X, Y, Z) nearest centreline index (N far away)

    def radius_at(self, which: str) -> np.ndarray:
        """Per-voxel lumen or outer radius (mm); inf-distance voxels get 0."""
        r = self.r_lumen if which == "lumen" else self.r_lumen + self.wall
        return np.concatenate([r, [0.0]])[self.idx]


def _random_centreline(cfg: CCTAPhantomConfig, rng: np.random.Generator) -> np.ndarray:
    """Control points of a vessel crossing the field of view from one face to the opposite one."""
    ext = np.asarray(cfg.shape, float) * np.asarray(cfg.spacing, float)
    axis = int(rng.choice(3, p=[0.25, 0.25, 0.5]))  # running through slices is most common in CCTA
    others = [a for a in range(3) if a != axis]
    n_ctrl = 5
    cp = np.zeros((n_ctrl, 3))
    cp[:, axis] = np.linspace(-0.1, 1.1, n_ctrl) * ext[axis]
    for a in others:
        start = rng.uniform(0.25, 0.75) * ext[a]
        drift = rng.uniform(-0.3, 0.3) * ext[a]
        wiggle = rng.normal(0.0, 0.08 * ext[a], n_ctrl)
        cp[:, a] = np.clip(start + np.linspace(0, 1, n_ctrl) * drift + wiggle, 0.15 * ext[a], 0.85 * ext[a])
    return cp


def _make_vessels(cfg: CCTAPhantomConfig, grid: np.ndarray, rng: np.random.Generator) -> list[_Vessel]:
    n_target = int(rng.choice([1, 2, 3], p=np.asarray(cfg.n_vessels_probs) / sum(cfg.n_vessels_probs)))
    step = 0.2 * min(cfg.spacing)
    vessels: list[_Vessel] = []
    for _ in range(n_target * 15):
        if len(vessels) == n_target:
            break
        pts = smooth_curve(_random_centreline(cfg, rng), step)
        n = len(pts)
        r0 = rng.uniform(*cfg.lumen_radius_mm)
        taper = rng.uniform(0.7, 1.0)
        r = r0 * np.linspace(1.0, taper, n) * (1.0 + 0.08 * np.sin(np.linspace(0, rng.uniform(2, 6) * math.pi, n)
                                                                    + rng.uniform(0, 2 * math.pi)))
        r = np.maximum(r, cfg.lumen_radius_mm[0] * 0.8)
        wall = rng.uniform(*cfg.wall_thickness_mm)
        # Vessels must not touch: keep 2 mm of tissue between outer walls.
        ok = True
        for v in vessels:
            d = np.linalg.norm(pts[:, None, :] - v.points[None, ::5, :], axis=-1).min()
            if d < r.max() + wall + v.r_lumen.max() + v.wall + 2.0:
                ok = False
                break
        if not ok:
            continue
        hu0 = rng.uniform(*cfg.lumen_hu)
        lumen_hu = hu0 * np.linspace(1.0, rng.uniform(0.9, 1.0), n)
        vessels.append(_Vessel(pts, curve_tangents(pts), r, wall, lumen_hu))
    reach = cfg.lumen_radius_mm[1] * 1.2 + cfg.wall_thickness_mm[1] + 4.0
    for v in vessels:
        v.dist, v.idx = distance_to_curve(v.points, grid, reach)
    return vessels


def _plaque(cfg: CCTAPhantomConfig, kind: str, vessel: _Vessel, rng: np.random.Generator,
            spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Mask of one plaque, the region it was clipped to, and its record."""
    n = len(vessel.points)
    ext = np.asarray(cfg.shape) * spacing
    # Keep the plaque centre away from the volume border so it is not cut off.
    inside = np.all((vessel.points > 2.0) & (vessel.points < ext - 2.0), axis=1)
    candidates = np.flatnonzero(inside[int(0.1 * n):int(0.9 * n)]) + int(0.1 * n)
    i = int(rng.choice(candidates)) if candidates.size else n // 2
    t = vessel.tangents[i]
    u = np.cross(t, rng.standard_normal(3))
    u /= np.linalg.norm(u)
    w = np.cross(t, u)
    rot = np.stack([t, u, w], axis=1)  # local axes: along vessel, radial, circumferential
    r_l = float(vessel.r_lumen[i])
    if kind == CALCIFIED:
        r_eq = rng.uniform(*cfg.calcified_radius_mm)
        axes = semi_axes_for_radius(r_eq, rng, elongation=(rng.uniform(1.3, 2.0), rng.uniform(0.6, 0.9), 1.0))
        # Centre inside the wall, sometimes near the lumen so the calcium bulges into it.
        centre = vessel.points[i] + u * (r_l + rng.uniform(0.1, 0.8) * vessel.wall)
        region = vessel.dist <= vessel.radius_at("outer")
    else:
        r_eq = rng.uniform(*cfg.noncalcified_radius_mm)
        axes = semi_axes_for_radius(r_eq, rng, elongation=(rng.uniform(1.8, 2.6), rng.uniform(0.7, 1.0), 1.0))
        centre = vessel.points[i] + u * (r_l + 0.3 * vessel.wall)
        thickening = rng.uniform(*cfg.noncalcified_thickening_mm)
        # A soft plaque thickens the wall outward and narrows the lumen, leaving a residual lumen.
        region = (vessel.dist <= vessel.radius_at("outer") + thickening) & (vessel.dist >= 0.35 * vessel.radius_at("lumen"))
    mask = largest_component(deformed_ellipsoid(cfg.shape, spacing, centre, axes, rot, rng, roughness=0.2, smoothness=0.5) & region)
    rec = {
        "class": kind,
        "label": LABELS[kind],
        "center_vox": [round(float(c), 2) for c in centre / spacing],
        "radius_mm_drawn": round(float(r_eq), 3),
        "voxels": int(mask.sum()),
        "radius_mm_equivalent": round(equivalent_radius_mm(int(mask.sum()), spacing), 3),
    }
    return mask, region, rec


def generate_case(cfg: CCTAPhantomConfig, classes: set, rng: np.random.Generator) -> PhantomCase:
    """One CCTA phantom case containing the plaque classes named in ``classes`` (empty = plaque-free)."""
    shape = tuple(cfg.shape)
    spacing = np.asarray(cfg.spacing, float)
    grid = voxel_grid_mm(shape, spacing)

    # --- background: myocardium-like tissue with epicardial fat blobs and an optional lung border.
    tissue = rng.uniform(*cfg.tissue_hu) + 6.0 * smooth_noise(shape, 4.0, rng)
    fat_hu = rng.uniform(*cfg.fat_hu)
    fat_field = smooth_noise(shape, 6.0, rng)
    fat = fat_field > rng.uniform(-0.2, 0.6)

    vessels = _make_vessels(cfg, grid, rng)
    lumen = np.zeros(shape, bool)
    outer = np.zeros(shape, bool)
    sleeve = np.zeros(shape, bool)
    lumen_hu = np.zeros(shape, np.float32)
    for v in vessels:
        r_l, r_o = v.radius_at("lumen"), v.radius_at("outer")
        lm = v.dist < r_l
        lumen |= lm
        outer |= v.dist <= r_o
        sleeve |= v.dist <= r_o + rng.uniform(1.5, 3.0)
        lumen_hu = np.where(lm, np.concatenate([v.lumen_hu, [0.0]])[v.idx], lumen_hu)
    wall = outer & ~lumen
    fat |= sleeve  # coronaries run in epicardial fat: that is what makes the wall visible

    hu = np.where(fat, fat_hu + 8.0 * smooth_noise(shape, 2.0, rng), tissue).astype(np.float32)
    if rng.random() < cfg.lung_probability:
        axis, side = int(rng.integers(3)), int(rng.integers(2))
        coord = grid[..., axis] / (shape[axis] * spacing[axis])
        depth = rng.uniform(0.12, 0.25) + 0.04 * smooth_noise(shape, 8.0, rng)
        lung = (coord < depth) if side == 0 else (coord > 1.0 - depth)
        lung &= ~sleeve
        hu = np.where(lung, rng.uniform(*cfg.lung_hu) + 25.0 * smooth_noise(shape, 1.5, rng), hu)

    wall_hu = rng.uniform(*cfg.wall_hu)
    hu = np.where(wall, wall_hu + 4.0 * smooth_noise(shape, 1.0, rng), hu)
    hu = np.where(lumen, lumen_hu, hu)

    label = np.zeros(shape, np.uint8)
    label[wall] = LABELS["vessel_wall"]

    lesions: list[dict] = []
    parent_regions: dict[int, np.ndarray] = {}
    plaque_masks: list[tuple[str, np.ndarray, float]] = []
    if vessels:
        # Non-calcified first, so calcium wins where both overlap (spotty calcium inside soft plaque).
        todo = []
        if NONCALCIFIED in classes:
            todo.append(NONCALCIFIED)
        if CALCIFIED in classes:
            todo += [CALCIFIED] * int(rng.integers(cfg.calcified_count[0], cfg.calcified_count[1] + 1))
        for kind in todo:
            for _attempt in range(8):
                v = vessels[int(rng.integers(len(vessels)))]
                mask, region, rec = _plaque(cfg, kind, v, rng, spacing)
                if rec["voxels"] >= cfg.min_plaque_voxels:
                    break
            if rec["voxels"] == 0:
                continue
            lab = LABELS[kind]
            parent_regions[lab] = parent_regions.get(lab, np.zeros(shape, bool)) | region
            if kind == CALCIFIED:
                contrast = rng.uniform(*cfg.calcified_hu)
                value = contrast * (1.0 + 0.08 * smooth_noise(shape, 1.0, rng))
                value = np.maximum(value, cfg.calcified_hu[0])
            else:
                contrast = wall_hu - rng.uniform(*cfg.noncalcified_delta_hu)
                value = contrast + 5.0 * smooth_noise(shape, 1.0, rng)
            hu = np.where(mask, value, hu)
            label[mask] = lab
            rec["hu"] = round(float(contrast), 1)
            lesions.append(rec)
            plaque_masks.append((kind, mask, contrast))
    # Recount after all plaques are in: a later plaque may overwrite part of an earlier one.
    for rec, (kind, mask, _) in zip(lesions, plaque_masks):
        n_vox = int((mask & (label == LABELS[kind])).sum())
        rec["voxels"] = n_vox
        rec["radius_mm_equivalent"] = round(equivalent_radius_mm(n_vox, spacing), 3)

    image = form_ct_image(hu, spacing, rng, cfg.psf_sigma_mm, rng.uniform(*cfg.noise_sd_hu))
    return PhantomCase(image=image, label=label, spacing=tuple(float(s) for s in spacing), lesions=lesions,
                       parent_regions=parent_regions, aux={"lumen": lumen, "vessel_wall": wall})


def lesion_spec(cfg: CCTAPhantomConfig) -> LesionSpec:
    """Plaque classes with the radius ranges (mm) this phantom draws from; parent = vessel wall."""
    def two_bins(lo_hi):
        lo, hi = lo_hi
        mid = round((lo + hi) / 2.0, 3)
        return [(lo, mid), (mid, hi)]

    return LesionSpec(lesions=[
        LesionClass(name=CALCIFIED, label=LABELS[CALCIFIED], parents=[LABELS["vessel_wall"]],
                    radius_mm=two_bins(cfg.calcified_radius_mm), shape="mixed", may_leave_parent=False),
        LesionClass(name=NONCALCIFIED, label=LABELS[NONCALCIFIED], parents=[LABELS["vessel_wall"]],
                    radius_mm=two_bins(cfg.noncalcified_radius_mm), shape="mixed",
                    may_leave_parent=bool(cfg.noncalcified_may_leave_wall)),
    ])


KIND = PhantomKind(
    name="ccta",
    default_dataset_name="PhantomCCTA",
    labels=dict(LABELS),
    presets=PRESETS,
    generate=generate_case,
    lesion_spec=lesion_spec,
    class_fractions=lambda c: {CALCIFIED: c.calcified_fraction, NONCALCIFIED: c.noncalcified_fraction},
    healthy_fraction=lambda c: c.healthy_fraction,
    description="Procedural coronary CTA phantom: vessel wall, calcified and (rare) non-calcified plaques. "
                "Lumen is contrast-filled but unlabelled.",
)
