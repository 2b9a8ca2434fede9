"""Attribute prompts (issue 29, item 1): lesion attributes measured on the training lesions (equivalent radius,
contrast to the parent), quantile bins with a null value per attribute, the denoiser's attribute embedding with
dropout and classifier-free guidance, and attribute mixes requested per class by the lesion spec / trainer
settings, honoured by the mask sampler (radius) and recorded by the cache builder."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_promptlesion.generator.diffusion.config import PromptVocabulary, make_config
from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet
from nnunet_promptlesion.lesions.attributes import (AttributeBins, AttributeRequestError, check_mix,
                                                     check_mix_against_bins, draw_bins, equivalent_radius,
                                                     measure_components, measure_lesion, parse_assignment,
                                                     radius_range)

torch.set_num_threads(1)


def _ball(shape, centre, r):
    g = np.indices(shape)
    return sum((g[i] - c) ** 2 for i, c in enumerate(centre)) <= r * r


# ---------------------------------------------------------------------------------------------- measurement, bins
def test_measure_radius_and_contrast_of_known_lesions():
    spacing = (1.0, 0.5, 0.5)
    seg = np.zeros((20, 40, 40), np.int16)
    seg[2:18, 4:36, 4:36] = 1                       # parent
    lesion = _ball(seg.shape, (10, 20, 20), 6) & (seg == 1)
    seg[lesion] = 2
    image = np.where(seg == 1, 0.1, -0.5).astype(np.float32)
    image[lesion] = 0.4
    m = measure_lesion(image, lesion, seg == 1, spacing)
    assert m["radius"] == pytest.approx(equivalent_radius(int(lesion.sum()), spacing))
    assert m["contrast"] == pytest.approx(0.3, abs=1e-6)   # lesion 0.4 against the parent's 0.1, not the outside
    # disc-equivalent radius in 2D: an area of pi r^2 gives r
    assert equivalent_radius(round(math.pi * 25 / 0.25), (0.5, 0.5)) == pytest.approx(5.0, rel=1e-3)
    comp, rows = measure_components(image, seg, 2, [1], spacing)
    assert len(rows) == 1 and comp[10, 20, 20] == 1 and rows[0]["radius"] == pytest.approx(m["radius"])
    # 2D: every slice's cross-section is a lesion of its own, measured with the in-plane spacing
    comp2, rows2 = measure_components(image, seg, 2, [1], spacing[1:], slices=True)
    assert len(rows2) == len({z for z in range(20) if lesion[z].any()})
    assert comp2[10, 20, 20] > 0 and rows2[comp2[10, 20, 20] - 1]["radius"] == pytest.approx(
        equivalent_radius(int(lesion[10].sum()), spacing[1:]))


def test_bins_are_quantiles_of_the_measured_lesions_with_a_null_index():
    radii = np.arange(1.0, 10.0)  # 9 lesions: tertiles at 3.67 and 6.33
    bins = AttributeBins.from_measurements(("radius", "contrast"), 3,
                                           {"a": [{"radius": r, "contrast": -r} for r in radii], "b": []})
    e = bins.edges["a"]["radius"]
    assert e[0] == 1.0 and e[-1] == 9.0 and e[1] == pytest.approx(11 / 3) and e[2] == pytest.approx(19 / 3)
    assert [bins.to_bin("a", "radius", r) for r in (0.5, 2, 4, 7, 30)] == [1, 1, 2, 3, 3]
    assert bins.to_bins("a", {"radius": 8.0, "contrast": -8.0}) == (3, 1)
    assert bins.to_bins("a", {"radius": float("nan"), "contrast": -5.0}) == (0, 2)   # unknown -> null
    assert bins.to_bins("b", {"radius": 2.0, "contrast": 0.0}) == (0, 0)            # class never measured
    assert AttributeBins.from_dict(bins.as_dict()) == bins
    assert bins.range_of("a", "radius", 2) == pytest.approx((11 / 3, 19 / 3))
    with pytest.raises(AttributeRequestError, match="bin 4"):
        bins.range_of("a", "radius", 4)
    assert parse_assignment("radius=1, contrast=3", bins.names, 3) == (1, 3)
    assert parse_assignment("contrast=2", bins.names, 3) == (0, 2)
    with pytest.raises(AttributeRequestError, match="NAME=BIN"):
        parse_assignment("size=1", bins.names, 3)


# ---------------------------------------------------------------------------------------------- the model
def _inputs(b=3, sd=2):
    g = torch.Generator().manual_seed(0)
    s = (8,) * sd
    z = torch.randn(b, 8, *s, generator=g)
    region = torch.zeros(b, 1, *s)
    region[(slice(None), slice(None), *[slice(2, 5)] * sd)] = 1
    return z, torch.randn(b, 8, *s, generator=g), region, torch.tensor([1, 2, 0][:b]), torch.tensor([5, 100, 399][:b])


def _live(model):
    """The output conv starts at zero (every prediction 0): give it weights so that inputs can show."""
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    return model


def test_no_attribute_config_is_the_model_of_before_and_old_checkpoints_load(tmp_path):
    from nnunet_promptlesion.generator.diffusion.checkpoint import build_meta, load_diffusion
    from nnunet_promptlesion.utils.checkpoint import save_checkpoint

    cfg = make_config("tiny2d", num_classes=2)
    torch.manual_seed(3)
    model = _live(PromptLesionUNet(cfg).eval())
    assert model.attribute_embed is None
    assert not any("attribute" in k for k in model.state_dict())
    # a checkpoint written before attribute prompts existed: no attribute keys in its config or metadata
    vq_meta = {"checkpoint_id": "vq", "spacing": [1, 1], "intensity": None, "config": {}, "spatial_dims": 2}
    meta = build_meta(cfg, PromptVocabulary(["healthy", "a", "b"], [0, 1, 2]), vq_meta, tmp_path / "vq.pt", [32, 32],
                      0, {"type": "test"}, model.state_dict())
    for k in ("attributes", "attribute_bins", "attribute_dropout"):
        meta["config"].pop(k)
    meta.pop("attribute_bins", None)
    save_checkpoint({"meta": meta, "model": model.state_dict()}, tmp_path / "old.pt")
    loaded, lmeta = load_diffusion(tmp_path / "old.pt")
    assert loaded.config.attributes == () and loaded.attribute_embed is None
    zt, zh, region, ids, t = _inputs()
    with torch.no_grad():
        ref = model(zt, t, zh, region, ids)
        assert torch.equal(loaded(zt, t, zh, region, ids), ref)
        # all-null attributes are accepted by a model without attributes; real bins are refused
        assert torch.equal(loaded(zt, t, zh, region, ids, attributes=torch.zeros(3, 2, dtype=torch.long)), ref)
        with pytest.raises(ValueError, match="without attribute prompts"):
            loaded(zt, t, zh, region, ids, attributes=torch.ones(3, 2, dtype=torch.long))


@pytest.mark.parametrize("prompt_type", ["onehot", "mask"])
def test_attribute_embedding_null_start_and_effect(prompt_type):
    base = make_config("tiny2d", num_classes=2, prompt_type=prompt_type)
    cfg = make_config("tiny2d", num_classes=2, prompt_type=prompt_type, attributes=("radius", "contrast"),
                      attribute_bins=3)
    torch.manual_seed(3)
    plain = _live(PromptLesionUNet(base).eval())
    model = PromptLesionUNet(cfg).eval()
    # same weights apart from the (zero-initialised) attribute embedding: identical to the plain model at the start
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("attribute_embed.") for k in missing)
    zt, zh, region, ids, t = _inputs()
    bins = torch.tensor([[1, 3], [2, 0], [0, 0]])
    with torch.no_grad():
        ref = plain(zt, t, zh, region, ids)
        assert torch.equal(model(zt, t, zh, region, ids, attributes=bins), ref)
        assert torch.equal(model(zt, t, zh, region, ids), ref)   # None = all null
        for e in model.attribute_embed.embed:
            torch.nn.init.normal_(e.weight)
        a = model(zt, t, zh, region, ids, attributes=bins)
        null = model(zt, t, zh, region, ids)
        # a bin changes the prediction of its row only; an all-null row equals the None call
        assert not torch.allclose(a[:2], null[:2]) and torch.allclose(a[2], null[2], atol=1e-6)
        with pytest.raises(ValueError, match=r"\(B, 2\)"):
            model(zt, t, zh, region, ids, attributes=torch.zeros(3, 1, dtype=torch.long))


def test_attribute_dropout_and_cfg_null_in_the_loss(monkeypatch):
    from nnunet_promptlesion.generator.diffusion import train as train_mod
    from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.from_preset("tiny2d")).eval()
    cfg = make_config("tiny2d", num_classes=2, attributes=("radius", "contrast"), attribute_bins=3,
                      attribute_dropout=0.3, prompt_dropout=0.2)
    model = PromptLesionUNet(cfg)
    seen = []

    def spy(self, z_t, t, z_healthy, region, prompt_ids, parent=None, attributes=None):
        seen.append((prompt_ids.clone(), attributes.clone()))
        return torch.zeros_like(z_t, requires_grad=True)

    monkeypatch.setattr(PromptLesionUNet, "forward", spy)
    n = 400
    x = torch.zeros(n, 1, 32, 32)
    mask = torch.zeros_like(x)
    mask[:, :, 12:18, 12:18] = 1
    batch = {"image": x, "mask": mask, "prompt": torch.ones(n, dtype=torch.long),
             "attributes": torch.tensor([[2, 3]] * n)}
    train_mod.diffusion_loss(model, vq, NoiseSchedule.from_config(cfg), cfg, batch, "cpu",
                             torch.Generator().manual_seed(0))
    ids, attrs = seen[-1]
    dropped = ids == cfg.null_id
    assert 0.1 < dropped.float().mean() < 0.3
    assert (attrs[dropped] == 0).all()          # the CFG null: null class and null attributes together
    kept = attrs[~dropped]
    frac_null = (kept == 0).float().mean(0)     # each attribute alone goes null at ~0.3, independently
    assert ((frac_null > 0.2) & (frac_null < 0.4)).all()
    both = ((kept[:, 0] == 0) & (kept[:, 1] == 0)).float().mean()
    assert abs(float(both) - float(frac_null[0] * frac_null[1])) < 0.06
    assert set(kept[:, 0].tolist()) == {0, 2} and set(kept[:, 1].tolist()) == {0, 3}
    # the fixed evaluation batches (prompt_dropout 0) see the attributes as given
    train_mod.diffusion_loss(model, vq, NoiseSchedule.from_config(cfg), cfg, batch, "cpu",
                             torch.Generator().manual_seed(0), prompt_dropout=0.0)
    assert (seen[-1][1] == torch.tensor([2, 3])).all()


def test_cfg_runs_the_null_class_with_null_attributes():
    from nnunet_promptlesion.generator.diffusion.samplers import guided_eps_fn

    cfg = make_config("tiny2d", num_classes=2, attributes=("radius", "contrast"), attribute_bins=3)
    torch.manual_seed(0)
    model = _live(PromptLesionUNet(cfg).eval())
    for e in model.attribute_embed.embed:
        torch.nn.init.normal_(e.weight)
    zt, zh, region, ids, t = _inputs()
    bins = torch.tensor([[1, 3], [2, 1], [3, 2]])
    calls = []
    orig = model.prepare

    def prepare(*a, **kw):
        calls.append(kw.get("attributes"))
        return orig(*a, **kw)

    model.prepare = prepare
    eps = guided_eps_fn(model, zh, region, ids, guidance_scale=3.0, attributes=bins)(zt, t)
    att = calls[-1]
    assert att.shape == (6, 2) and torch.equal(att[:3], bins) and (att[3:] == 0).all()
    with torch.no_grad():
        c = model(zt, t, zh, region, ids, attributes=bins)
        u = model(zt, t, zh, region, torch.full_like(ids, cfg.null_id))
    assert torch.allclose(eps, u + 3.0 * (c - u), atol=1e-5)


# ---------------------------------------------------------------------------------------------- mixes
def test_mix_validation_refuses_bad_classes_bin_counts_and_sums():
    classes = ["calcified", "noncalcified"]
    mix = check_mix({"calcified": {"radius": [0.6, 0.3, 0.1]}}, "settings", classes)
    assert mix == {"calcified": {"radius": [0.6, 0.3, 0.1]}}
    with pytest.raises(AttributeRequestError, match="unknown lesion class 'calcifed'"):
        check_mix({"calcifed": {"radius": [0.5, 0.5]}}, "settings", classes)
    with pytest.raises(AttributeRequestError, match="sum to 1"):
        check_mix({"calcified": {"radius": [0.6, 0.3, 0.3]}}, "settings", classes)
    with pytest.raises(AttributeRequestError, match="sum to 1"):
        check_mix({"calcified": {"radius": [1.2, -0.2]}}, "settings", classes)
    with pytest.raises(AttributeRequestError, match="unknown attribute 'size'"):
        check_mix({"calcified": {"size": [0.5, 0.5]}}, "settings", classes)
    bins = AttributeBins.from_measurements(("radius",), 3, {"calcified": [{"radius": r} for r in (1, 2, 3)]})
    check_mix_against_bins(mix, bins, "settings")
    with pytest.raises(AttributeRequestError, match="2 probabilities but .* 3 bins"):
        check_mix_against_bins({"calcified": {"radius": [0.5, 0.5]}}, bins, "settings")
    with pytest.raises(AttributeRequestError, match="'contrast' is not one of"):
        check_mix_against_bins({"calcified": {"contrast": [0.2, 0.3, 0.5]}}, bins, "settings")
    with pytest.raises(AttributeRequestError, match="trained without attribute prompts"):
        check_mix_against_bins(mix, None, "settings")
    rng = np.random.default_rng(0)
    drawn = np.array([draw_bins(mix, "calcified", ("radius", "contrast"), rng) for _ in range(3000)])
    assert (drawn[:, 1] == 0).all()   # not requested: null
    freq = np.bincount(drawn[:, 0], minlength=4)[1:] / len(drawn)
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.03)
    assert draw_bins(mix, "noncalcified", ("radius",), rng) == (0,)


@pytest.mark.parametrize("dims", [2, 3])
def test_mask_sampler_draws_masks_in_the_requested_radius_bin(dims):
    from nnunet_promptlesion.lesions.masks import MaskSampler
    from nnunet_promptlesion.lesions.spec import LesionClass

    spacing = (0.8,) * dims if dims == 2 else (1.5, 0.8, 0.8)
    lesion = LesionClass(name="t", label=2, parents=[1], radius_mm=[(1.0, 12.0)], shape="ellipsoid")
    shape = (48,) * dims if dims == 2 else (24, 40, 40)
    parent = np.zeros(shape, bool)
    parent[tuple(slice(2, s - 2) for s in shape)] = True
    bins = AttributeBins.from_measurements(("radius",), 3, {"t": [{"radius": r} for r in np.linspace(1.5, 9.0, 12)]})
    sampler = MaskSampler(spacing)
    rng = np.random.default_rng(0)
    centre = tuple(slice(s // 2 - 2, s // 2 + 3) for s in shape)
    for b in (1, 2, 3):
        lo, hi = radius_range(bins, "t", (b,))
        radii = []
        for _ in range(25):
            m = sampler.sample(lesion, parent, rng, centre, radius_range_mm=(lo, hi))
            assert m is not None
            radii.append(equivalent_radius(int(m.sum()), spacing))
        assert all(lo <= r <= hi for r in radii), (b, lo, hi, radii)
        assert [bins.to_bin("t", "radius", r) for r in radii] == [b] * 25
