"""Mask drawing, blending and rule-based synthesis on small synthetic arrays (no nnU-Net needed)."""
import numpy as np
import pytest
from scipy import stats as sps

from nnunet_promptlesion.synthesis.blending import blend, blend_margin, dilate
from nnunet_promptlesion.synthesis.lesion_spec import LesionClass, LesionSpec, LesionSpecError
from nnunet_promptlesion.synthesis.masks import (MaskBank, MaskSampler, elastic_ellipsoid, equivalent_radius_mm,
                                                 random_flip_rotate)
from nnunet_promptlesion.synthesis.rule_based import LesionIntensityStats, RuleBasedSynthesizer, measure_lesions
from nnunet_promptlesion.trainers.lesion_index import class_probabilities


def _tube_parent(shape=(40, 40, 40), r_out=6, r_in=3):
    """A straight vessel wall along axis 0: a hollow cylinder (bool, X, Y, Z)."""
    _, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    d = np.hypot(y - shape[1] / 2, z - shape[2] / 2)
    return (d <= r_out) & (d > r_in)


def test_ellipsoid_size_follows_radius_in_mm_on_anisotropic_grid():
    rng = np.random.default_rng(0)
    spacing = (2.0, 1.0, 0.5)
    radii = [equivalent_radius_mm(elastic_ellipsoid(6.0, spacing, rng, elastic=False).sum(), spacing) for _ in range(20)]
    assert abs(np.mean(radii) - 6.0) < 0.6
    m = elastic_ellipsoid(6.0, spacing, rng, elastic=False)
    # extents in voxels scale inversely with spacing: the 0.5 mm axis spans ~4x the voxels of the 2 mm axis
    ext = [np.ptp(np.nonzero(m)[i]) + 1 for i in range(3)]
    assert ext[2] > 2.5 * ext[0]


def test_sampled_masks_lie_inside_parent_and_centre_region():
    rng = np.random.default_rng(1)
    parent = _tube_parent()
    lesion = LesionClass(name="plaque", label=2, parents=[1], radius_mm=[(2.0, 4.0)], shape="ellipsoid")
    sampler = MaskSampler((1.0, 1.0, 1.0))
    region = (slice(10, 30),) * 3
    for _ in range(20):
        m = sampler.sample(lesion, parent, rng, region)
        assert m is not None and m.any()
        assert not (m & ~parent).any()
    exo = LesionClass(name="exo", label=3, parents=[1], radius_mm=[(8.0, 9.0)], shape="ellipsoid", may_leave_parent=True)
    assert any((sampler.sample(exo, parent, rng, region) & ~parent).any() for _ in range(5))


def test_bank_masks_are_used_and_keep_their_voxel_count():
    rng = np.random.default_rng(2)
    real = np.zeros((5, 7, 3), bool)
    real[1:4, 1:6, 1] = True
    bank = MaskBank(masks={2: [real]}, spacing=(1.0, 1.0, 1.0))
    out = random_flip_rotate(real, bank.spacing, rng)
    assert out.sum() == real.sum()
    lesion = LesionClass(name="p", label=2, parents=[1], shape="bank")
    parent = np.ones((30, 30, 30), bool)
    m = MaskSampler((1.0, 1.0, 1.0), bank=bank).sample(lesion, parent, rng, (slice(10, 20),) * 3)
    assert m.sum() == real.sum()


@pytest.mark.parametrize("sigma", [0.0, 0.8, 2.0])
def test_blend_leaves_voxels_outside_dilated_mask_bit_identical(sigma):
    rng = np.random.default_rng(3)
    orig = rng.normal(size=(1, 32, 32, 32)).astype(np.float32)
    mask = np.zeros((32, 32, 32), bool)
    mask[12:18, 14:19, 10:20] = True
    out = blend(orig, np.full_like(orig, 9.0), mask, sigma)
    outside = ~dilate(mask, blend_margin(sigma))
    assert np.array_equal(out[0][outside], orig[0][outside])
    assert np.all(out[0][mask] > orig[0][mask].min())  # the lesion did change the inside
    assert np.abs(out[0][mask] - 9.0).mean() < np.abs(orig[0][mask] - 9.0).mean()


def _case_with_lesions(rng, contrast=2.0):
    parent = _tube_parent((40, 40, 40))
    seg = parent.astype(np.int16)
    img = rng.normal(0, 0.1, size=(1, 40, 40, 40)).astype(np.float32)
    img[0][parent] += 1.0
    for x0 in (8, 26):
        les = np.zeros_like(parent)
        les[x0:x0 + 4, 24:27, 18:22] = True
        les &= parent
        seg[les] = 2
        img[0][les] += contrast
    return img, seg


def test_rule_based_statistics_come_from_real_lesions_and_outside_is_unchanged():
    rng = np.random.default_rng(4)
    img, seg = _case_with_lesions(rng, contrast=2.0)
    lesion = LesionClass(name="calc", label=2, parents=[1], radius_mm=[(2.0, 3.0)], shape="ellipsoid")
    st = LesionIntensityStats()
    comps = measure_lesions(img, seg, lesion, st)
    assert st.n == 2 and len(comps) == 2
    assert abs(np.median(np.asarray(st.contrast)) - 2.0) < 0.2

    synth = RuleBasedSynthesizer(MaskSampler((1.0, 1.0, 1.0)), {2: st}, blend_sigma_voxels=(0.5, 1.5))
    carrier_img = rng.normal(0, 0.1, size=(1, 40, 40, 40)).astype(np.float32)
    parent = _tube_parent((40, 40, 40))
    carrier_img[0][parent] += 1.0
    res = synth.synthesize(carrier_img, parent, lesion, rng, (slice(10, 30),) * 3)
    assert res.mask.any() and not (res.mask & ~parent).any()
    outside = ~dilate(res.mask, blend_margin(1.5))
    assert np.array_equal(res.image[0][outside], carrier_img[0][outside])
    # the painted lesion reproduces the real contrast to the surrounding wall
    core = res.mask & ~dilate(~res.mask, 1) if (res.mask & ~dilate(~res.mask, 1)).any() else res.mask
    assert res.image[0][core].mean() - carrier_img[0][parent & ~res.mask].mean() > 1.0


def test_class_probabilities_inverse_frequency_uniform_custom():
    spec = LesionSpec([LesionClass("a", 2, [1]), LesionClass("b", 3, [1])])
    p = class_probabilities(spec, {2: 30, 3: 10}, "inverse_frequency")
    np.testing.assert_allclose(p, [0.25, 0.75])
    np.testing.assert_allclose(class_probabilities(spec, {2: 30, 3: 10}, "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(class_probabilities(spec, {}, {"a": 1, "3": 3}), [0.25, 0.75])
    with pytest.raises(ValueError, match="unknown classes"):
        class_probabilities(spec, {}, {"a": 1, "b": 1, "zzz": 2})


def test_lesion_spec_validation_names_the_problem(tmp_path):
    spec = LesionSpec([LesionClass("a", 2, [1])])
    with pytest.raises(LesionSpecError, match="names label 2"):
        spec.validate_against_dataset({"labels": {"background": 0, "wall": 1}})
    with pytest.raises(LesionSpecError, match="own parent"):
        LesionClass("x", 1, [1])
    p = tmp_path / "lesion_spec.json"
    p.write_text('{"lesions": [{"name": "a", "label": 2, "parents": [1], "colour": "red"}]}')
    with pytest.raises(LesionSpecError, match="unknown keys"):
        LesionSpec.load(p)
    spec.save(p)
    assert LesionSpec.load(p).to_dict() == spec.to_dict()
