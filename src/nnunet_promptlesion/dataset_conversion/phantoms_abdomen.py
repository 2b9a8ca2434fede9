"""Miniature abdominal CT phantom: liver, kidneys, pancreas and their tumours.

Labels: 0 background, 1 liver, 2 kidney (both kidneys), 3 pancreas, 4 liver_tumor, 5 kidney_tumor,
6 pancreas_tumor. Tumour labels overwrite their organ.

Default preset: 64 x 64 x 48 voxels (X, Y, Z) at (2.5, 2.5, 3.0) mm (160 x 160 x 144 mm field of
view). The anatomy is scaled down (body ~140 x 105 mm instead of ~330 x 250 mm) so that whole organs
fit this small grid, while tumour radii are in true millimetres, so "early" (equivalent radius
<= 10 mm) and "late" (> 10 mm) keep their clinical meaning. Array axes follow RAS: +x = patient's
right (liver side), +y = anterior, +z = superior.

Image content (HU before blur and noise, portal-venous-like): air -1000 outside the body,
subcutaneous and visceral fat -110..-90, abdominal-wall and paraspinal muscle 45-55, bowel loops
20-40 with gas pockets, vertebral body (cancellous 200-300, cortex 600-800, discs ~80), aorta 150-200,
IVC 110-140, spleen (unlabelled) 100-120, liver 55-70 with brighter portal/hepatic vein branches,
kidneys with cortex 150-180 and medulla 100-130, pancreas 60-100. Tumours: liver hypodense by
20-60 HU; pancreas hypodense by 20-50 HU (85 %) or slightly hyperdense; kidney hypodense by 40-90 HU
or hyperdense by 20-50 HU (50/50) and allowed to grow out of the kidney (exophytic). Late tumours get a
darker necrotic centre. Then a Gaussian PSF (partial volume) and correlated noise of 10-18 HU SD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..lesions.spec import EARLY_RADIUS_MM, LesionClass, LesionSpec
from ..lesions.components import equivalent_radius_mm
from .phantom_base import (
    PhantomCase,
    PhantomKind,
    deformed_ellipsoid,
    distance_to_curve,
    form_ct_image,
    largest_component,
    random_rotation,
    semi_axes_for_radius,
    smooth_curve,
    smooth_noise,
    voxel_grid_mm,
)

LABELS = {"background": 0, "liver": 1, "kidney": 2, "pancreas": 3, "liver_tumor": 4, "kidney_tumor": 5,
          "pancreas_tumor": 6}
TUMOUR_PARENT = {"liver_tumor": "liver", "kidney_tumor": "kidney", "pancreas_tumor": "pancreas"}


@dataclass(frozen=True)
class AbdomenPhantomConfig:
    """Geometry and intensity parameters of the abdomen phantom (lengths in mm, intensities in HU).

    shape: (X, Y, Z) voxels; spacing: (x, y, z) mm.
    *_fraction: fraction of cases containing that tumour class (stratified per split);
    healthy_fraction: tumour-free cases. *_count: (min, max) tumours of a class in a case that has it.
    late_probability: chance that a tumour is drawn "late" (radius in (10 mm, *_late_max_mm]) rather
        than "early" (radius in [early_min_mm, 10 mm]).
    """

    shape: tuple[int, int, int] = (64, 64, 48)
    spacing: tuple[float, float, float] = (2.5, 2.5, 3.0)
    body_semi_axes_fraction: tuple[tuple[float, float], tuple[float, float]] = ((0.40, 0.46), (0.31, 0.36))
    liver_hu: tuple[float, float] = (55.0, 70.0)
    kidney_cortex_hu: tuple[float, float] = (150.0, 180.0)
    kidney_medulla_hu: tuple[float, float] = (100.0, 130.0)
    pancreas_hu: tuple[float, float] = (60.0, 100.0)
    pancreas_radius_mm: tuple[float, float] = (8.0, 11.0)
    liver_tumor_fraction: float = 0.5
    kidney_tumor_fraction: float = 0.3
    pancreas_tumor_fraction: float = 0.12
    healthy_fraction: float = 0.25
    liver_tumor_count: tuple[int, int] = (1, 3)
    kidney_tumor_count: tuple[int, int] = (1, 2)
    pancreas_tumor_count: tuple[int, int] = (1, 1)
    late_probability: float = 0.45
    early_min_mm: float = 3.0
    liver_late_max_mm: float = 18.0
    kidney_late_max_mm: float = 15.0
    pancreas_late_max_mm: float = 13.0
    liver_tumor_delta_hu: tuple[float, float] = (-60.0, -20.0)
    pancreas_tumor_delta_hu: tuple[float, float] = (-50.0, -20.0)
    pancreas_hyperdense_probability: float = 0.15
    kidney_tumor_hypo_delta_hu: tuple[float, float] = (-90.0, -40.0)
    kidney_tumor_hyper_delta_hu: tuple[float, float] = (20.0, 50.0)
    psf_sigma_mm: tuple[float, float, float] = (1.0, 1.0, 1.2)
    noise_sd_hu: tuple[float, float] = (10.0, 18.0)


PRESETS = {
    "default": AbdomenPhantomConfig(),
    # Finer in-plane grid, same field of view; slower to train.
    "large": AbdomenPhantomConfig(shape=(96, 96, 64), spacing=(1.67, 1.67, 2.25)),
}


def _late_max(cfg: AbdomenPhantomConfig, cls: str) -> float:
    return {"liver_tumor": cfg.liver_late_max_mm, "kidney_tumor": cfg.kidney_late_max_mm,
            "pancreas_tumor": cfg.pancreas_late_max_mm}[cls]


def _count(cfg: AbdomenPhantomConfig, cls: str) -> tuple[int, int]:
    return {"liver_tumor": cfg.liver_tumor_count, "kidney_tumor": cfg.kidney_tumor_count,
            "pancreas_tumor": cfg.pancreas_tumor_count}[cls]


class _Body:
    """Maps body-normalised coordinates (u: -1..1 right-left scaled, v: posterior-anterior, w: 0..1 feet-head) to mm."""

    def __init__(self, cfg: AbdomenPhantomConfig, rng: np.random.Generator):
        ext = np.asarray(cfg.shape, float) * np.asarray(cfg.spacing, float)
        (ax0, ax1), (ay0, ay1) = cfg.body_semi_axes_fraction
        self.ext = ext
        self.c = np.array([ext[0] / 2 + rng.normal(0, 2.0), ext[1] / 2 + rng.normal(0, 2.0)])
        self.a = np.array([rng.uniform(ax0, ax1) * ext[0], rng.uniform(ay0, ay1) * ext[1]])

    def mm(self, u: float, v: float, w: float) -> np.ndarray:
        return np.array([self.c[0] + u * self.a[0], self.c[1] + v * self.a[1], w * self.ext[2]])


def _organ(cfg, body: _Body, grid_shape, spacing, rng, uvw, semi_axes_mm, jitter=0.06, roughness=0.12, tilt=0.25):
    centre = body.mm(*(np.asarray(uvw) + rng.normal(0, jitter, 3) * np.array([1, 1, 0.5])))
    axes = np.asarray(semi_axes_mm) * rng.uniform(0.9, 1.1, 3)
    # A small random tilt around the organ's canonical orientation.
    rot = np.eye(3) + tilt * (random_rotation(rng) - np.eye(3))
    rot, _ = np.linalg.qr(rot)
    return deformed_ellipsoid(grid_shape, spacing, centre, axes, rot, rng, roughness=roughness, smoothness=0.6)


def _tumour_centre(organ: np.ndarray, r_mm: float, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A voxel (mm) of the organ eroded by min(r, 4 mm), in the middle 30-70 % of the organ's z-extent."""
    depth = ndimage.distance_transform_edt(organ, sampling=spacing)
    cand = depth >= min(r_mm, 4.0)
    zs = np.flatnonzero(organ.any(axis=(0, 1)))
    if zs.size:
        z0, z1 = zs[0] + 0.3 * (zs[-1] - zs[0]), zs[0] + 0.7 * (zs[-1] - zs[0])
        zmask = np.zeros(organ.shape[2], bool)
        zmask[int(np.floor(z0)):int(np.ceil(z1)) + 1] = True
        if (cand & zmask[None, None, :]).any():
            cand &= zmask[None, None, :]
    if not cand.any():
        cand = depth >= depth.max() * 0.5 if depth.max() > 0 else organ
    idx = np.argwhere(cand)
    if idx.size == 0:
        return None
    return idx[int(rng.integers(len(idx)))] * spacing


def generate_case(cfg: AbdomenPhantomConfig, classes: set, rng: np.random.Generator) -> PhantomCase:
    """One abdomen phantom case containing the tumour classes named in ``classes`` (empty = healthy)."""
    shape = tuple(cfg.shape)
    spacing = np.asarray(cfg.spacing, float)
    grid = voxel_grid_mm(shape, spacing)
    body = _Body(cfg, rng)
    x, y, z = grid[..., 0], grid[..., 1], grid[..., 2]

    # --- body wall: skin/subcutaneous fat, muscle, visceral cavity
    wobble = 0.03 * smooth_noise(shape, 6.0, rng)
    rho = np.sqrt(((x - body.c[0]) / body.a[0]) ** 2 + ((y - body.c[1]) / body.a[1]) ** 2) + wobble
    fat_t = rng.uniform(6.0, 12.0) / body.a.mean()
    muscle_t = rng.uniform(4.0, 7.0) / body.a.mean()
    inside = rho <= 1.0
    cavity = rho <= 1.0 - fat_t - muscle_t
    fat_hu = rng.uniform(-110.0, -90.0)
    hu = np.full(shape, -1000.0, np.float32) + 5.0 * smooth_noise(shape, 2.0, rng)
    hu = np.where(inside, fat_hu + 8.0 * smooth_noise(shape, 1.5, rng), hu)
    hu = np.where(inside & ~cavity & (rho > 1.0 - fat_t - muscle_t) & (rho <= 1.0 - fat_t),
                  rng.uniform(45.0, 55.0), hu)
    # Bowel loops (soft tissue with gas pockets) in visceral fat.
    bowel = cavity & (smooth_noise(shape, 2.5, rng) > rng.uniform(0.0, 0.5))
    hu = np.where(bowel, rng.uniform(20.0, 40.0) + 6.0 * smooth_noise(shape, 1.0, rng), hu)
    gas = bowel & (smooth_noise(shape, 1.2, rng) > 1.8)
    hu = np.where(gas, -950.0, hu)

    # --- spine, paraspinal muscles, great vessels (unlabelled anatomy)
    sc = body.mm(0.0, -0.62, 0.0)[:2]
    r_vb = 0.22 * body.a[1]
    d_vb = np.sqrt((x - sc[0]) ** 2 + (y - sc[1]) ** 2)
    vert = (d_vb <= r_vb) & inside
    disc_period = rng.uniform(22.0, 28.0)
    disc = (np.mod(z + rng.uniform(0, disc_period), disc_period) < 5.0) & vert
    canal = (np.sqrt((x - sc[0]) ** 2 + (y - (sc[1] - r_vb - 5.0)) ** 2) <= 4.5) & inside
    para = ((np.abs(x - sc[0]) > 5.0) & (np.abs(x - sc[0]) < 0.45 * body.a[0]) & (y < sc[1] + 0.3 * r_vb)
            & (y > body.c[1] - body.a[1] * 0.97) & cavity)
    hu = np.where(para, rng.uniform(45.0, 55.0) + 4.0 * smooth_noise(shape, 1.0, rng), hu)
    hu = np.where(vert, rng.uniform(200.0, 300.0) + 20.0 * smooth_noise(shape, 1.0, rng), hu)
    hu = np.where(vert & (d_vb > r_vb - 2.5), rng.uniform(600.0, 800.0), hu)
    hu = np.where(disc, 80.0, hu)
    hu = np.where(canal, 15.0, hu)
    spine = vert | canal
    ac = body.mm(-0.15, -0.30, 0.0)[:2]
    aorta = (np.sqrt((x - ac[0]) ** 2 + (y - ac[1]) ** 2) <= rng.uniform(6.0, 8.0)) & cavity
    ic = body.mm(0.18, -0.28, 0.0)[:2]
    ivc = (np.sqrt((x - ic[0]) ** 2 + ((y - ic[1]) * 1.4) ** 2) <= rng.uniform(6.0, 8.0)) & cavity
    hu = np.where(aorta, rng.uniform(150.0, 200.0), hu)
    hu = np.where(ivc, rng.uniform(110.0, 140.0), hu)
    blocked = spine | aorta | ivc | para | ~cavity

    # --- organs (semi-axes in mm scale with the body)
    A, B, H = body.a[0], body.a[1], body.ext[2]
    liver = _organ(cfg, body, shape, spacing, rng, (0.40, 0.12, 0.68), (0.50 * A, 0.80 * B, 0.30 * H)) & ~blocked
    spleen = _organ(cfg, body, shape, spacing, rng, (-0.62, -0.25, 0.72), (0.16 * A, 0.30 * B, 0.14 * H)) & ~blocked & ~liver
    kidneys = np.zeros(shape, bool)
    medulla = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        kc = (side * 0.40, -0.45, 0.42 + (0.0 if side < 0 else -0.04))
        k = _organ(cfg, body, shape, spacing, rng, kc, (0.16 * A, 0.22 * B, 0.17 * H), jitter=0.03, roughness=0.08)
        k &= ~blocked & ~liver & ~spleen
        depth = ndimage.distance_transform_edt(k, sampling=spacing)
        kidneys |= k
        medulla |= depth > rng.uniform(4.0, 6.0)
    # Pancreas: a lobulated tube from the tail (near the spleen) to the head (near the duodenum).
    ctrl = np.stack([body.mm(-0.55, -0.22, 0.56), body.mm(-0.25, -0.05, 0.53), body.mm(0.02, 0.02, 0.50),
                     body.mm(0.22, -0.12, 0.46)]) + rng.normal(0, 3.0, (4, 3))
    pts = smooth_curve(ctrl, 0.3 * spacing.min())
    r_p = np.linspace(0.65, 1.0, len(pts)) * rng.uniform(*cfg.pancreas_radius_mm)
    dist, idx = distance_to_curve(pts, grid, cfg.pancreas_radius_mm[1] * 1.6)
    r_vox = np.concatenate([r_p, [0.0]])[idx] * (1.0 + 0.15 * smooth_noise(shape, 1.5, rng))
    pancreas = (dist <= r_vox) & ~blocked & ~liver & ~spleen & ~kidneys

    liver_hu = rng.uniform(*cfg.liver_hu)
    hu = np.where(liver, liver_hu + 5.0 * smooth_noise(shape, 2.0, rng), hu)
    # Portal/hepatic vein branches: brighter tubes inside the liver (still labelled liver).
    lc = body.mm(0.40, 0.12, 0.68)
    for _ in range(int(rng.integers(2, 4))):
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        ctrl_v = np.stack([lc + direction * s + rng.normal(0, 2.0, 3) for s in (-30.0, -10.0, 10.0, 30.0)])
        d_v, _ = distance_to_curve(smooth_curve(ctrl_v, 0.3 * spacing.min()), grid, 6.0)
        hu = np.where(liver & (d_v <= rng.uniform(2.0, 3.5)), liver_hu + rng.uniform(40.0, 70.0), hu)
    hu = np.where(spleen, rng.uniform(100.0, 120.0) + 5.0 * smooth_noise(shape, 2.0, rng), hu)
    cortex_hu = rng.uniform(*cfg.kidney_cortex_hu)
    hu = np.where(kidneys, cortex_hu + 6.0 * smooth_noise(shape, 1.0, rng), hu)
    hu = np.where(kidneys & medulla, rng.uniform(*cfg.kidney_medulla_hu), hu)
    pancreas_hu = rng.uniform(*cfg.pancreas_hu)
    hu = np.where(pancreas, pancreas_hu + 8.0 * smooth_noise(shape, 0.8, rng), hu)

    label = np.zeros(shape, np.uint8)
    label[liver] = LABELS["liver"]
    label[kidneys] = LABELS["kidney"]
    label[pancreas] = LABELS["pancreas"]
    organs = {"liver": liver, "kidney": kidneys, "pancreas": pancreas}
    organ_hu = {"liver": liver_hu, "kidney": cortex_hu, "pancreas": pancreas_hu}
    # Exophytic kidney tumours may push into soft tissue of the cavity, but not into bone, vessels or other organs.
    exo_region = kidneys | (cavity & ~blocked & ~liver & ~spleen & ~pancreas)

    lesions: list[dict] = []
    parent_regions: dict[int, np.ndarray] = {}
    masks: list[tuple[str, np.ndarray]] = []
    for cls in ("liver_tumor", "kidney_tumor", "pancreas_tumor"):
        if cls not in classes:
            continue
        organ = organs[TUMOUR_PARENT[cls]]
        if not organ.any():
            continue
        lo, hi = _count(cfg, cls)
        for _ in range(int(rng.integers(lo, hi + 1))):
            late = rng.random() < cfg.late_probability
            r_eq = rng.uniform(EARLY_RADIUS_MM, _late_max(cfg, cls)) if late else rng.uniform(cfg.early_min_mm, EARLY_RADIUS_MM)
            centre = _tumour_centre(organ, r_eq, spacing, rng)
            if centre is None:
                continue
            region = exo_region if cls == "kidney_tumor" else organ
            mask = deformed_ellipsoid(shape, spacing, centre, semi_axes_for_radius(r_eq, rng, anisotropy=0.2),
                                      random_rotation(rng), rng, roughness=0.25, smoothness=0.4) & region
            mask = largest_component(mask)
            if not mask.any():
                continue
            if cls == "liver_tumor":
                delta = rng.uniform(*cfg.liver_tumor_delta_hu)
            elif cls == "pancreas_tumor":
                delta = (rng.uniform(10.0, 25.0) if rng.random() < cfg.pancreas_hyperdense_probability
                         else rng.uniform(*cfg.pancreas_tumor_delta_hu))
            else:
                delta = (rng.uniform(*cfg.kidney_tumor_hyper_delta_hu) if rng.random() < 0.5
                         else rng.uniform(*cfg.kidney_tumor_hypo_delta_hu))
            value = organ_hu[TUMOUR_PARENT[cls]] + delta + rng.uniform(5.0, 10.0) * smooth_noise(shape, 1.0, rng)
            if late:
                # Necrotic centre: darker with depth inside the tumour.
                depth = ndimage.distance_transform_edt(mask, sampling=spacing)
                value = value - rng.uniform(10.0, 25.0) * depth / max(float(depth.max()), 1e-6)
            hu = np.where(mask, value, hu)
            lab = LABELS[cls]
            label[mask] = lab
            parent_regions[lab] = region
            masks.append((cls, mask))
            lesions.append({
                "class": cls, "label": lab, "stage": "late" if late else "early",
                "center_vox": [round(float(c), 2) for c in centre / spacing],
                "radius_mm_drawn": round(float(r_eq), 3), "hu_delta": round(float(delta), 1),
            })
    for rec, (cls, mask) in zip(lesions, masks):
        n_vox = int((mask & (label == LABELS[cls])).sum())
        rec["voxels"] = n_vox
        rec["radius_mm_equivalent"] = round(equivalent_radius_mm(n_vox, spacing), 3)

    image = form_ct_image(hu, spacing, rng, cfg.psf_sigma_mm, rng.uniform(*cfg.noise_sd_hu))
    return PhantomCase(image=image, label=label, spacing=tuple(float(s) for s in spacing), lesions=lesions,
                       parent_regions=parent_regions, aux={**organs, "body": inside})


def lesion_spec(cfg: AbdomenPhantomConfig) -> LesionSpec:
    """Tumour classes with early (<= 10 mm) and late (> 10 mm) radius ranges as generated; parent = organ."""
    w = [1.0 - cfg.late_probability, cfg.late_probability]

    def lc(cls, may_leave):
        return LesionClass(name=cls, label=LABELS[cls], parents=[LABELS[TUMOUR_PARENT[cls]]],
                           radius_mm=[(cfg.early_min_mm, EARLY_RADIUS_MM), (EARLY_RADIUS_MM, _late_max(cfg, cls))],
                           radius_weights=w, shape="mixed", may_leave_parent=may_leave)

    return LesionSpec(lesions=[lc("liver_tumor", False), lc("kidney_tumor", True), lc("pancreas_tumor", False)])


KIND = PhantomKind(
    name="abdomen",
    default_dataset_name="PhantomAbdomen",
    labels=dict(LABELS),
    presets=PRESETS,
    generate=generate_case,
    lesion_spec=lesion_spec,
    class_fractions=lambda c: {"liver_tumor": c.liver_tumor_fraction, "kidney_tumor": c.kidney_tumor_fraction,
                               "pancreas_tumor": c.pancreas_tumor_fraction},
    healthy_fraction=lambda c: c.healthy_fraction,
    description="Procedural miniature abdominal CT phantom: liver, kidneys, pancreas with early/late tumours "
                "(liver common, pancreas rare) and healthy cases.",
)
