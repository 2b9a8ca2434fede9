"""Tumour staging: early (equivalent radius <= 10 mm) vs late, measured in mm at anisotropic spacing."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_promptlesion.dataset_conversion.core import LabelScheme, LesionDef
from nnunet_promptlesion.dataset_conversion.kits import kits_label_scheme
from nnunet_promptlesion.dataset_conversion.staging import component_radii_mm, radius_ranges, stage_components
from nnunet_promptlesion.lesions.masks import equivalent_radius_mm

# (z, y, x) spacing in mm: thick CT slices, fine in-plane
SPACING_ZYX = (3.0, 0.7, 0.7)


def _sphere_scene():
    """Organ (1) with tumour spheres (2) of known radius; returns seg, [(centre voxel, radius mm)]."""
    shape = (40, 120, 200)
    seg = np.ones(shape, np.int16)
    spheres = [((20, 30, 30), 4.0), ((20, 30, 80), 8.5), ((20, 30, 140), 11.5), ((20, 85, 50), 15.0),
               ((20, 90, 150), 9.0)]
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    for (cz, cy, cx), r in spheres:
        d2 = ((zz - cz) * SPACING_ZYX[0]) ** 2 + ((yy - cy) * SPACING_ZYX[1]) ** 2 + ((xx - cx) * SPACING_ZYX[2]) ** 2
        seg[d2 <= r * r] = 2
    return seg, spheres


def test_equivalent_radius_of_a_known_volume():
    # 4/3 pi 10^3 mm^3 at 0.5 x 0.5 x 2 mm voxels (0.5 mm^3) is a 10 mm sphere
    n = 4.0 / 3.0 * np.pi * 1000 / 0.5
    assert equivalent_radius_mm(n, (0.5, 0.5, 2.0)) == pytest.approx(10.0)
    # the staging path passes one count per component: 8x the volume is twice the radius
    radii = equivalent_radius_mm(np.array([n, 8 * n]), (0.5, 0.5, 2.0))
    np.testing.assert_allclose(radii, [10.0, 20.0])


def test_staging_assigns_early_and_late_on_anisotropic_spheres():
    seg, spheres = _sphere_scene()
    radii = sorted(component_radii_mm(seg, 2, SPACING_ZYX))
    # voxelised spheres at 3 mm slices: equivalent radius within 8 % of the true radius
    np.testing.assert_allclose(radii, sorted(r for _, r in spheres), rtol=0.08)
    early, late = stage_components(seg, value=2, late_value=3, spacing=SPACING_ZYX)
    assert len(early) == 3 and len(late) == 2
    for centre, r in spheres:
        assert seg[centre] == (2 if r <= 10.0 else 3), r
    assert set(np.unique(seg).tolist()) == {1, 2, 3}
    # the voxel-count radius, not the voxel extent, decides: in voxels the 9 mm sphere is 25 voxels
    # wide in-plane (> 20), a stager counting voxels as mm would call it late
    assert seg[20, 90, 150] == 2


def test_staging_threshold_uses_spacing():
    seg = np.zeros((9, 9, 9), np.int16)
    seg[:, :, :] = 0
    seg[1:8, 1:8, 1:8] = 2  # 343 voxels
    at_1mm = seg.copy()
    stage_components(at_1mm, 2, 3, (1.0, 1.0, 1.0))  # r = 4.3 mm -> early
    at_3mm = seg.copy()
    stage_components(at_3mm, 2, 3, (3.0, 3.0, 3.0))  # r = 13 mm -> late
    assert (at_1mm == 2).sum() == 343 and (at_3mm == 3).sum() == 343


def test_diagonal_touching_voxels_are_one_lesion():
    seg = np.zeros((5, 5, 5), np.int16)
    seg[1, 1, 1] = seg[2, 2, 2] = seg[3, 3, 3] = 2
    assert len(component_radii_mm(seg, 2, (1, 1, 1))) == 1


def test_radius_ranges_respect_stage_bands():
    assert max(r[1] for r in radius_ranges([8.0, 9.9], "early")) <= 10.0
    assert min(r[0] for r in radius_ranges([10.5, 30.0], "late")) >= 10.0
    assert radius_ranges([], "late") == [(12.0, 20.0), (24.0, 64.0)]


def test_staged_plain_scheme_appends_late_labels_consecutively():
    scheme = LabelScheme({0: 0, 1: 1, 2: 2, 3: 3}, {"background": 0, "kidney": 1, "kidney_tumor": 2, "kidney_cyst": 3},
                         [LesionDef("kidney_tumor", 2, [1], True, True), LesionDef("kidney_cyst", 3, [1], True, False)])
    staged, pairs = scheme.staged()
    assert staged.labels == {"background": 0, "kidney": 1, "kidney_tumor_early": 2, "kidney_tumor_late": 4,
                             "kidney_cyst": 3}
    assert pairs == [(2, 4)]
    assert [(l.name, l.value, l.stage) for l in staged.lesions] == [
        ("kidney_tumor_early", 2, "early"), ("kidney_tumor_late", 4, "late"), ("kidney_cyst", 3, None)]


def test_staged_region_scheme_extends_regions():
    staged, pairs = kits_label_scheme("kits23", region_labels=True).staged()
    assert staged.labels == {"background": 0, "kidney": [1, 2, 3, 4], "kidney_masses": [2, 3, 4],
                             "kidney_tumor_early": 2, "kidney_tumor_late": 4}
    assert staged.regions_class_order == [1, 3, 2, 4] and pairs == [(2, 4)]
