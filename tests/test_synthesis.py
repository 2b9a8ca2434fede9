"""Mask drawing, blending and rule-based synthesis on small synthetic arrays (no nnU-Net needed); at the end, a
synthetic sample's birth through the loader on the session's preprocessed phantom."""
import numpy as np
from scipy import ndimage
import pytest
from scipy import stats as sps

from nnunet_promptlesion.lesions.blending import blend, blend_margin, dilate
from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpec, LesionSpecError
from nnunet_promptlesion.lesions.masks import (MaskBank, MaskSampler, elastic_ellipsoid, equivalent_radius_mm,
                                                 random_flip_rotate)
from nnunet_promptlesion.lesions.intensity_stats import LesionIntensityStats, measure_lesions
from nnunet_promptlesion.placement.index import class_probabilities
from nnunet_promptlesion.synthesis.rule_based import RuleBasedSynthesizer


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

    synth = RuleBasedSynthesizer({2: st}, blend_sigma_voxels=(0.5, 1.5))
    carrier_img = rng.normal(0, 0.1, size=(1, 40, 40, 40)).astype(np.float32)
    parent = _tube_parent((40, 40, 40))
    carrier_img[0][parent] += 1.0
    mask = MaskSampler((1.0, 1.0, 1.0)).sample(lesion, parent, rng, (slice(10, 30),) * 3)
    image = synth.paint(carrier_img, mask, parent, lesion, rng)
    assert mask.any() and not (mask & ~parent).any()
    outside = ~dilate(mask, blend_margin(1.5))
    assert np.array_equal(image[0][outside], carrier_img[0][outside])
    # the painted lesion reproduces the real contrast to the surrounding wall
    core = mask & ~dilate(~mask, 1) if (mask & ~dilate(~mask, 1)).any() else mask
    assert image[0][core].mean() - carrier_img[0][parent & ~mask].mean() > 1.0


def test_lesion_intensity_is_measured_inside_the_blurred_rim():
    """A bright sphere (radius 3.2 voxels, +4 over its parent) seen through a scanner blur (sigma 0.8 voxels):
    its rim mixes lesion and wall. The measured contrast and texture describe the lesion's body, which the
    painter then blends in with its own soft edge; with the rim they would paint a darker, noisier lesion
    (contrast 69 % of the centre's, texture std 18 % of it)."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    parent = np.hypot(yy - 20, xx - 20) < 8
    seg = parent.astype(np.int16)
    sphere = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 3.2 ** 2
    seg[sphere] = 2
    img = ndimage.gaussian_filter(np.where(parent, 1.0, 0.0) + np.where(sphere, 4.0, 0.0), 0.8)
    img = (img + rng.normal(0, 0.05, shape))[None].astype(np.float32)
    lesion = LesionClass(name="calc", label=2, parents=[1], radius_mm=[(2.0, 3.0)], shape="ellipsoid")
    st = LesionIntensityStats()
    measure_lesions(img, seg, lesion, st)
    centre = float(img[0, 20, 20, 20]) - 1.0
    assert st.n == 1 and st.contrast[0][0] >= 0.8 * centre, (st.contrast, centre)
    assert st.texture_std[0][0] <= 0.1 * centre, (st.texture_std, centre)
    # a lesion without an interior (a 2 x 2 x 2 block) is measured whole
    seg2 = parent.astype(np.int16)
    seg2[19:21, 19:21, 19:21] = 2
    st2 = LesionIntensityStats()
    measure_lesions(img, seg2, lesion, st2)
    assert st2.n == 1 and np.isfinite(st2.texture_std[0][0])


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


# ------------------------------------------------------------------------------------------- issue 10
def test_large_lesion_mask_memory_is_bounded():
    """A 64 mm lesion at 0.8 mm spacing (a ~260^3 grid) is drawn in float32 slabs: well under 200 MB."""
    import tracemalloc

    rng = np.random.default_rng(5)
    tracemalloc.start()
    try:
        m = elastic_ellipsoid(64.0, (0.8, 0.8, 0.8), rng, elastic=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB"
    assert abs(equivalent_radius_mm(m.sum(), (0.8, 0.8, 0.8)) - 64.0) < 6.4


def test_two_d_masks_follow_in_plane_spacing():
    rng = np.random.default_rng(6)
    spacing = (1.0, 0.5)
    masks = [elastic_ellipsoid(4.0, spacing, rng, elastic=False) for _ in range(20)]
    assert all(m.ndim == 2 for m in masks)
    area = np.mean([m.sum() * np.prod(spacing) for m in masks])
    assert abs(area - np.pi * 16) < 0.15 * np.pi * 16  # the equivalent disc of radius 4 mm
    ext = np.mean([[np.ptp(np.nonzero(m)[i]) + 1 for i in range(2)] for m in masks], axis=0)
    assert ext[1] > 1.5 * ext[0]  # the 0.5 mm axis spans about twice the voxels
    lesion = LesionClass(name="t", label=2, parents=[1], radius_mm=[(2.0, 3.0)], shape="ellipsoid")
    parent = np.zeros((40, 40), bool)
    parent[10:30, 10:30] = True
    out = MaskSampler(spacing).sample_with_centre(lesion, parent, rng, (slice(15, 25), slice(15, 25)))
    assert out is not None and out[0].shape == (40, 40) and not (out[0] & ~parent).any()
    assert 15 <= out[1][0] < 25 and 15 <= out[1][1] < 25


def test_masks_never_leave_the_allowed_region_even_when_leaving_the_parent():
    """may_leave_parent lesions may cover background, never another label or nnU-Net's -1 padding."""
    from nnunet_promptlesion.placement.placer import Placer

    rng = np.random.default_rng(7)
    seg = np.zeros((40, 40, 40), np.int16)
    seg[12:28, 12:28, 12:28] = 1           # parent organ
    seg[12:28, 12:28, 24:28] = 5           # another structure inside the box
    seg[:, :, :6] = -1                     # padding
    exo = LesionClass(name="exo", label=2, parents=[1], radius_mm=[(9.0, 10.0)], shape="ellipsoid",
                      may_leave_parent=True)
    allowed = Placer.allowed_region(seg, exo)
    sampler = MaskSampler((1.0, 1.0, 1.0))
    left = 0
    for _ in range(10):
        m, _ = sampler.sample_with_centre(exo, seg == 1, rng, (slice(14, 26),) * 3, allowed=allowed)
        assert not (m & np.isin(seg, [5, -1])).any()
        left += int((m & (seg == 0)).sum())
    assert left > 0  # it did leave the parent


def test_intensity_prior_gives_hu_contrast_in_z_units():
    from nnunet_promptlesion.synthesis.rule_based import IntensityPrior, ct_window_z

    lesion = LesionClass(name="liver_tumor", label=3, parents=[1], radius_mm=[(4.0, 5.0)], shape="ellipsoid",
                         contrast_hu=[-60, -40], texture_hu=[0.0, 0.0])
    props = [{"mean": 100.0, "std": 50.0, "percentile_00_5": -100.0, "percentile_99_5": 300.0}]
    prior = IntensityPrior.from_hu(lesion, props)
    np.testing.assert_allclose(prior.contrast, [[-1.2, -0.8]])
    rng = np.random.default_rng(8)
    parent = np.zeros((32, 32, 32), bool)
    parent[4:28, 4:28, 4:28] = True
    img = np.where(parent, 0.5, -2.0).astype(np.float32)[None]  # liver at 125 HU in z units
    synth = RuleBasedSynthesizer({}, blend_sigma_voxels=(0.0, 0.0), priors={3: prior}, window=ct_window_z(props))
    mask = MaskSampler((1.0, 1.0, 1.0)).sample(lesion, parent, rng, (slice(12, 20),) * 3)
    image = synth.paint(img, mask, parent, lesion, rng)
    drop_hu = (image[0][mask].mean() - 0.5) * 50.0
    assert -60.5 <= drop_hu <= -39.5
    # without real statistics and without a prior there is nothing to paint with
    assert not RuleBasedSynthesizer({}).can_paint(3)
    with pytest.raises(LesionSpecError, match="contrast_hu"):
        LesionClass(name="x", label=3, parents=[1], contrast_hu=[-20, -60])
    # specs without priors keep their old JSON form
    assert "contrast_hu" not in LesionSpec([LesionClass("a", 2, [1])]).to_dict()["lesions"][0]


def test_synthetic_slots_hold_the_global_share_over_ranks():
    from nnunet_promptlesion.trainers.mixing_loader import synthetic_slots_per_rank

    assert synthetic_slots_per_rank([1, 1], 1) == [0, 1]
    assert synthetic_slots_per_rank([2], 1) == [1]
    assert synthetic_slots_per_rank([1, 1, 1, 1], 2) == [0, 1, 0, 1]
    for sizes in ([3, 2], [2, 2, 1], [5], [1] * 7):
        for n in range(sum(sizes) + 1):
            per = synthetic_slots_per_rank(sizes, n)
            assert sum(per) == n and all(0 <= p <= b for p, b in zip(per, sizes))


def test_centre_region_is_symmetric_about_the_carrier_centre():
    from nnunet_promptlesion.placement.index import centre_box, centre_slices

    for p in (7, 8, 64, 65, 1):
        box = centre_box([p], 0.5)
        (sl,) = centre_slices([p], box)
        c = p // 2  # the carrier centre voxel's index in the patch (Placer.carrier_bbox)
        assert c - sl.start == sl.stop - 1 - c == box[0] // 2


def test_loader_places_and_labels_and_the_source_only_renders_what_it_is_handed(ccta_dataset, monkeypatch):
    """One direction: the loader offers a fresh placement (submit), takes a lesion the source rendered ahead of
    time (pick), cuts the carrier around it, hands that Placement to render and writes the label. The source
    never gets the loader; what it pastes lands exactly where the placement says."""
    from nnunet_promptlesion.synthesis.diffusion_render import RenderedLesion
    from nnunet_promptlesion.placement.placement import Placement
    from nnunet_promptlesion.synthesis.sources import SampleSource
    from test_trainer import make_loader, make_trainer

    _, _, env = ccta_dataset
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    trainer = make_trainer(env)
    loader, ds = make_loader(trainer)
    spec = loader.index.spec
    ci = 0
    lesion = spec.lesions[ci]
    ident, centres = loader.index.carrier_pool(lesion)[0]
    c = np.asarray(centres[0], int)
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    rendered = RenderedLesion(case=ident, label=lesion.label, seed=5, box_lo=c - 2, mask=mask,
                              support=np.ones((5, 5, 5), bool), values=1000.0 + np.arange(125, dtype=np.float32),
                              centre=c)
    calls = []

    class AheadSource(SampleSource):
        name = "ahead"

        def wants_placement(self, class_idx):
            calls.append(("wants", class_idx))
            return True

        def submit(self, placement, rng):
            calls.append(("submit", placement))

        def pick(self, class_idx, rng):
            calls.append(("pick", class_idx))
            return rendered

        def render(self, placement, data, seg):
            calls.append(("render", placement))
            placement.rendered.paste(data, [b[0] for b in placement.bbox])
            return data

    loader.source = AheadSource()
    sample = loader.synthesize(ci, np.random.default_rng(0))
    assert [k for k, _ in calls] == ["wants", "submit", "pick", "render"]
    fresh, placed = calls[1][1], calls[3][1]
    assert isinstance(fresh, Placement) and fresh.rendered is None and fresh.label == lesion.label
    assert placed is sample.placement and placed.rendered is rendered and sample.case == ident
    # the lesion centre lies in the patch's central region, and the placement's mask is the rendered one
    assert all(sl.start <= v < sl.stop for sl, v in zip(loader.placer.centre_region, placed.centre))
    lo = np.array([b[0] for b in placed.bbox])
    expect = np.zeros(placed.patch_shape, bool)
    expect[tuple(slice(a, a + 5) for a in c - 2 - lo)] = mask
    assert np.array_equal(placed.mask(), expect)
    # data: the carrier crop, with the rendered values exactly at the support voxels; label under mask & allowed
    data, seg = loader.placer.load_crop(ident, placed.bbox)
    box = tuple(slice(a, a + 5) for a in c - 2 - lo)
    sup = np.zeros(placed.patch_shape, bool)
    sup[box] = True
    np.testing.assert_array_equal(sample.data[0][box].ravel(), rendered.values)
    np.testing.assert_array_equal(sample.data[:, ~sup], data[:, ~sup])
    allowed = loader.placer.allowed_region(seg[0], lesion)
    assert (sample.seg[0][expect & allowed] == lesion.label).all() and (expect & allowed).any()
    np.testing.assert_array_equal(sample.seg[0][~(expect & allowed)], seg[0][~(expect & allowed)])



def test_placer_on_an_in_memory_case_keeps_lesions_in_the_allowed_region_and_labels_only_there():
    """The Placer's data seam: the rule the loader uses, on an in-memory volume (single-CT synthesis's path)."""
    from nnunet_promptlesion.lesions.masks import MaskBank
    from nnunet_promptlesion.lesions.spec import LesionSpec
    from nnunet_promptlesion.placement.index import LesionIndex
    from nnunet_promptlesion.placement.placer import ArrayCases, Placer

    seg = np.zeros((1, 40, 40, 40), np.int16)
    seg[0, 8:32, 8:32, 8:32] = 1           # parent
    seg[0, 8:32, 8:32, 26:32] = 7          # another structure
    data = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    exo = LesionClass(name="exo", label=2, parents=[1], radius_mm=[(6.0, 8.0)], shape="ellipsoid",
                      may_leave_parent=True)
    index = LesionIndex(spec=LesionSpec([exo]), counts={}, stats={}, bank=MaskBank.empty((1.0, 1.0, 1.0)),
                        carriers={1: [("vol", np.array([[20, 20, 20]], np.uint16))]})
    placer = Placer(ArrayCases({"vol": (data, seg)}), index, MaskSampler((1.0, 1.0, 1.0)), (32, 32, 32), (9, 9, 9),
                    tries=3)
    rng = np.random.default_rng(1)
    for _ in range(5):
        placement, d, s = placer.place(0, rng)
        assert placement.case == "vol" and placement.bbox == [[4, 36]] * 3
        np.testing.assert_array_equal(d, data[:, 4:36, 4:36, 4:36])
        assert all(sl.start <= c < sl.stop for sl, c in zip(placer.centre_region, placement.centre))
        m = placement.mask()
        assert m.any() and not (m & np.isin(s[0], [7, -1])).any()
        labelled = placer.write_label(s, placement)
        assert ((labelled[0] == 2) == m).all() and (labelled[0][~m] == s[0][~m]).all()
    # a carrier whose central region holds no parent voxel: every try fails and is counted
    placer.pools[0] = [("vol", np.array([[2, 2, 2]], np.uint16))]
    assert placer.place(0, rng) is None
    assert placer.take_stats() == {"placement_retries": 3, "placement_failures": 1} and not placer.stats


def test_a_source_that_only_renders_has_the_hooks_the_trainer_calls():
    # The trainer calls raise_if_failed / pause and reads baseline_iterations on every source, without probing:
    # a source that renders in the worker (the rule-based one, or a user's) gets hooks that do nothing and no
    # no-rendering baseline.
    from nnunet_promptlesion.synthesis.rule_based import RuleBasedSource
    from nnunet_promptlesion.synthesis.sources import SampleSource

    class PaintOnly(SampleSource):
        def render(self, placement, data, seg):
            return data

    for source in (PaintOnly(), RuleBasedSource(RuleBasedSynthesizer({}), LesionSpec([LesionClass("a", 2, [1])]))):
        assert source.raise_if_failed() is None and source.pause(True) is None and source.pause(False) is None
        assert source.baseline_iterations == 0
