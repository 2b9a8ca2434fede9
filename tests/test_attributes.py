"""Attribute prompts (issue 29, item 1): lesion attributes measured on the training lesions (equivalent radius,
contrast to the parent), quantile bins with a null value per attribute, the denoiser's attribute embedding with
dropout and classifier-free guidance, and attribute mixes requested per class by the lesion spec / trainer
settings, honoured by the mask sampler (radius) and recorded by the cache builder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY2D_PRETRAIN, phantom_copy_2d
from nnunet_promptlesion.generator.diffusion.config import PromptVocabulary, make_config
from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet
from nnunet_promptlesion.lesions.components import equivalent_radius_mm, label_components
from nnunet_promptlesion.lesions.attributes import (AttributeBins, AttributeRequestError, check_mix,
                                                     check_mix_against_bins, draw_bins,
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
    assert m["radius"] == pytest.approx(equivalent_radius_mm(int(lesion.sum()), spacing))
    assert m["contrast"] == pytest.approx(0.3, abs=1e-6)   # lesion 0.4 against the parent's 0.1, not the outside
    # disc-equivalent radius in 2D: an area of pi r^2 gives r
    assert equivalent_radius_mm(round(math.pi * 25 / 0.25), (0.5, 0.5)) == pytest.approx(5.0, rel=1e-3)
    comp, rows = measure_components(image, seg, 2, [1], spacing)
    assert len(rows) == 1 and comp[10, 20, 20] == 1 and rows[0]["radius"] == pytest.approx(m["radius"])
    # 2D: every slice's cross-section is a lesion of its own, measured with the in-plane spacing
    comp2, rows2 = measure_components(image, seg, 2, [1], spacing[1:], slices=True)
    assert len(rows2) == len({z for z in range(20) if lesion[z].any()})
    assert comp2[10, 20, 20] > 0 and rows2[comp2[10, 20, 20] - 1]["radius"] == pytest.approx(
        equivalent_radius_mm(int(lesion[10].sum()), spacing[1:]))


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
            radii.append(equivalent_radius_mm(int(m.sum()), spacing))
        assert all(lo <= r <= hi for r in radii), (b, lo, hi, radii)
        assert [bins.to_bin("t", "radius", r) for r in radii] == [b] * 25


# ---------------------------------------------------------------------------------------------- the nnU-Net side
CONFIG = "2d_demo"


@pytest.fixture(scope="module")
def gen_attr(ccta_dataset, tmp_path_factory):
    """A private copy of the session CCTA phantom with a 2d_demo configuration and a tiny2d generator pair whose
    diffusion model has radius and contrast prompts (promptlesion_pretrain --attributes, 2 training steps each)."""
    import contextlib
    import io

    from nnunet_promptlesion.cli.pretrain import main as pretrain

    did = ccta_dataset[1]
    work = tmp_path_factory.mktemp("attr2d")
    name, env = phantom_copy_2d(ccta_dataset, work, CONFIG, batch_size=2)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("PROMPTLESION_SETTINGS", raising=False)
        rc = pretrain(["-d", str(did), "-c", CONFIG, "-f", "0", *TINY2D_PRETRAIN, "--attributes", "radius,contrast"])
    assert rc == 0, out.getvalue()[-3000:]
    res = work / "results" / name
    return {"did": did, "name": name, "env": env, "pre": work / "preprocessed" / name, "work": work,
            "diffusion": res / f"promptlesion_diffusion__tiny2d__{CONFIG}__fold0__attr_radius_contrast"
                         / "checkpoint_final.pt"}


def _build(g, out: Path, *extra, settings: dict | None = None, per_class: int = 8):
    import contextlib
    import io
    import json

    from nnunet_promptlesion.cli.build_cache import main

    buf_out, buf_err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        for k, v in g["env"].items():
            mp.setenv(k, v)
        mp.delenv("PROMPTLESION_SETTINGS", raising=False)
        if settings is not None:
            f = out.parent / f"{out.name}_settings.json"
            f.write_text(json.dumps(settings))
            mp.setenv("PROMPTLESION_SETTINGS", str(f))
        rc = main(["-d", str(g["did"]), "-c", CONFIG, "-f", "0", "--diffusion", str(g["diffusion"]), "--per-class",
                   str(per_class), "--steps", "2", "--batch", "8", "--shard-size", "8", "--device", "cpu",
                   "--num-threads", "1", "--no-progress", "-o", str(out), *extra])
    return rc, buf_out.getvalue(), buf_err.getvalue()


def test_checkpoint_records_training_bins_of_its_lesions(gen_attr):
    from nnunet_promptlesion.generator.diffusion.checkpoint import attribute_bins_of, load_diffusion

    model, meta = load_diffusion(gen_attr["diffusion"])
    assert model.config.attributes == ("radius", "contrast") and model.attribute_embed is not None
    bins = attribute_bins_of(meta)
    assert bins.names == ("radius", "contrast") and bins.n_bins == 3
    for cls in ("calcified_plaque", "noncalcified_plaque"):
        r = bins.edges[cls]["radius"]
        assert len(r) == 4 and 0 < r[0] <= r[1] <= r[2] <= r[3] and bins.counts[cls] > 3
    # the phantom's calcified plaques are brighter than the vessel wall around them
    assert bins.edges["calcified_plaque"]["contrast"][1] > 0
    # the sample PNGs add, per class, one inpainting per bin of each attribute
    pngs = sorted(p.name for p in (gen_attr["diffusion"].parent / "samples").glob("*_attributes.png"))
    assert pngs == ["step00000002_01_calcified_plaque_attributes.png",
                    "step00000002_02_noncalcified_plaque_attributes.png"]


def test_cache_build_with_a_settings_mix_records_requested_bins_and_masks_follow_them(gen_attr, tmp_path):
    """The trainer's settings request an attribute mix; the cache builder reads it, draws each lesion's bins from
    it, draws masks in the requested radius bin and records the bins per lesion in the cache metadata."""
    import json

    from nnunet_promptlesion.generator.diffusion.checkpoint import attribute_bins_of, load_diffusion
    from nnunet_promptlesion.synthesis.cache import LesionCache

    bins = attribute_bins_of(load_diffusion(gen_attr["diffusion"])[1])
    mix = {"calcified_plaque": {"radius": [0.8, 0.2, 0.0], "contrast": [0.0, 0.0, 1.0]},
           "noncalcified_plaque": {"radius": [0.0, 0.0, 1.0]}}
    settings = {"synthesizer": "diffusion_cache", "cache": str(tmp_path / "c"), "attribute_mix": mix}
    rc, out, err = _build(gen_attr, tmp_path / "c", settings=settings, per_class=10)
    assert rc == 0, err[-3000:]
    cache = LesionCache(tmp_path / "c")
    m = cache.manifest
    assert m["build"]["attribute_mix"] == mix and m["attributes"]["mix"] == mix
    assert m["attributes"]["names"] == ["radius", "contrast"] and m["attributes"]["n_bins"] == 3
    snippet = json.loads(out.strip().splitlines()[-1])
    assert snippet["attribute_mix"] == mix   # the settings snippet names the mix the cache holds
    requested = {int(k): tuple(v) for k, v in m["attributes"]["requested"].items()}
    items = np.load(tmp_path / "c" / "packed" / "item.npy")
    labels = np.load(tmp_path / "c" / "packed" / "label.npy")
    assert len(items) >= 12 and set(requested) >= set(items.tolist())
    plans = json.loads((gen_attr["pre"] / "nnUNetPlans.json").read_text())
    spacing = plans["configurations"][CONFIG]["spacing"]
    spec = json.loads((gen_attr["pre"].parent.parent / "raw" / gen_attr["name"] / "lesion_spec.json").read_text())
    lab = {e["label"]: e["name"] for e in spec["lesions"]}
    seen = {n: [] for n in lab.values()}
    for row, (item, label) in enumerate(zip(items.tolist(), labels.tolist())):
        cls = lab[label]
        req = requested[item]
        k = int(np.flatnonzero(np.asarray(cache._rows[label]) == row)[0])
        s = cache.get(label, k)
        r = equivalent_radius_mm(int(s.mask.sum()), spacing)
        lo, hi = bins.range_of(cls, "radius", req[0])
        assert lo - 1e-6 <= r <= hi + 1e-6, (cls, req, r, lo, hi)   # the mask lies in the requested radius bin
        seen[cls].append(req)
    cal = np.array(seen["calcified_plaque"])
    assert set(cal[:, 0]) <= {1, 2} and (cal[:, 1] == 3).all()
    non = np.array(seen["noncalcified_plaque"])
    assert (non[:, 0] == 3).all() and (non[:, 1] == 0).all()   # contrast not requested: null


def test_mixes_the_checkpoint_cannot_honour_are_refused(gen_attr, tmp_path):
    rc, _, err = _build(gen_attr, tmp_path / "a", "--attribute-mix",
                        '{"calcified_plaque": {"radius": [0.5, 0.5]}}', per_class=1)
    assert rc == 2 and "2 probabilities but" in err and "3 bins" in err
    rc, _, err = _build(gen_attr, tmp_path / "b", "--attribute-mix", '{"calcifed": {"radius": [0.5, 0.25, 0.25]}}',
                        per_class=1)
    assert rc == 2 and "unknown lesion class 'calcifed'" in err
    rc, _, err = _build(gen_attr, tmp_path / "c", "--attribute-mix", '{"calcified_plaque": {"radius": [0.5, 0.2, 0.2]}}',
                        per_class=1)
    assert rc == 2 and "sum to 1" in err


def test_attribute_benchmark_runs_and_reports_requested_vs_measured(gen_attr, tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_attributes", Path(__file__).parents[1] / "benchmarks" /
                                                  "bench_attributes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "attr.json"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in gen_attr["env"].items():
            mp.setenv(k, v)
        rc = bench.main(["-d", str(gen_attr["did"]), "-c", CONFIG, "-f", "0", "--diffusion", str(gen_attr["diffusion"]),
                         "--per-combo", "2", "--steps", "2", "--classes", "calcified_plaque", "-o", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    s = res["summary"]["calcified_plaque"]
    assert set(s) == {"radius", "contrast"} and len(res["combos"]) == 10   # 3 x 3 bins + the null row
    conf = np.array(s["radius"]["confusion"])
    assert conf.shape == (3, 4) and conf.sum() == s["radius"]["n"] >= 12
    # radius follows by construction: the mask is drawn in the bin and measured the same way
    assert s["radius"]["diagonal"] == 1.0 and s["radius"]["spearman_rho"] > 0.8
    assert s["contrast"]["null_measured_bins"] is not None and len(res["lesions"]) > 12
    printed = capsys.readouterr().out
    assert "calcified_plaque / radius" in printed and "requested \\ measured" in printed


def test_synthesize_one_ct_with_attribute_bins(gen_attr, tmp_path):
    import contextlib
    import io
    import json

    import nibabel as nib

    from nnunet_promptlesion.cli.synthesize import main as synthesize
    from nnunet_promptlesion.generator.diffusion.checkpoint import attribute_bins_of, load_diffusion

    raw = gen_attr["work"] / "raw" / gen_attr["name"]
    ct = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    lab = raw / "labelsTr" / ct.name.replace("_0000", "")
    common = ["-i", str(ct), "--parent-mask", str(lab), "--parent-label", "1", "--prompt", "calcified_plaque",
              "--diffusion", str(gen_attr["diffusion"]), "--device", "cpu", "--steps", "2", "--count", "2"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert synthesize([*common, "--attributes", "radius=3,contrast=1", "-o", str(tmp_path / "a")]) == 0, \
            err.getvalue()
        assert synthesize([*common, "--attributes", "radius=4", "-o", str(tmp_path / "b")]) == 2
        assert synthesize([*common, "--attributes", "shape=1", "-o", str(tmp_path / "b")]) == 2
    assert "NAME=BIN" in err.getvalue()
    rec = json.loads(next((tmp_path / "a").glob("*_synthesis.json")).read_text())
    assert rec["attributes"] == {"radius": 3, "contrast": 1}
    bins = attribute_bins_of(load_diffusion(gen_attr["diffusion"])[1])
    lo, hi = bins.range_of("calcified_plaque", "radius", 3)
    # the generated masks lie in the requested radius bin (one axial slice each: a disc-equivalent radius)
    lesions = np.asarray(nib.load(str(next((tmp_path / "a").glob("*_lesions.nii.gz")))).dataobj)
    spacing = nib.load(str(ct)).header.get_zooms()[:2]
    radii = []
    for z in sorted({int(k) for k in np.nonzero(lesions)[2]}):
        comp, n = label_components(lesions[:, :, z] > 0)
        radii += [equivalent_radius_mm(int((comp == i).sum()), spacing) for i in range(1, n + 1)]
    assert radii and all(lo - 1e-6 <= r <= hi + 1e-6 for r in radii), (radii, lo, hi)


def _source(g, settings: dict, tmp_path, monkeypatch):
    """The settings' sample source built for the 2d_demo trainer (PromptLesionConfigError when refused)."""
    from nnunet_promptlesion.synthesis.sources import SourceContext, build_source
    from test_synthesis_2d import _trainer

    t = _trainer(g, CONFIG, settings, tmp_path, monkeypatch)
    t.promptlesion_setup()
    cm = t.configuration_manager
    ctx = SourceContext(settings=t.promptlesion_settings, spec=t.promptlesion_spec, index=None,
                        spacing=tuple(cm.spacing), patch_size=tuple(cm.patch_size),
                        initial_patch_size=tuple(cm.patch_size), intensity=t._intensity_properties(), trainer=t,
                        log=lambda msg: None)
    return build_source(t.promptlesion_settings.synthesizer, ctx)


def test_online_source_draws_each_lesion_from_the_settings_mix(gen_attr, tmp_path, monkeypatch):
    from nnunet_promptlesion.generator.diffusion.checkpoint import attribute_bins_of, load_diffusion
    from nnunet_promptlesion.utils.errors import PromptLesionConfigError

    bins = attribute_bins_of(load_diffusion(gen_attr["diffusion"])[1])
    base = {"synthesizer": "diffusion_online", "diffusion": str(gen_attr["diffusion"]), "ring_slots_per_class": 1}
    src = _source(gen_attr, {**base, "attribute_mix": {"noncalcified_plaque": {"contrast": [0.5, 0.5, 0.0],
                                                                               "radius": [0.0, 1.0, 0.0]}}},
                  tmp_path, monkeypatch)
    try:
        rng = np.random.default_rng(0)
        names = [l.name for l in src.spec.lesions]
        ci = names.index("noncalcified_plaque")
        opts = [src.placement_options(ci, rng) for _ in range(400)]
        attrs = np.array([o["attributes"] for o in opts])
        assert (attrs[:, 0] == 2).all() and set(attrs[:, 1]) == {1, 2} and 0.4 < (attrs[:, 1] == 1).mean() < 0.6
        assert all(o["radius_range_mm"] == bins.range_of("noncalcified_plaque", "radius", 2) for o in opts)
        # a class without a mix: null attributes, no radius bound
        assert src.placement_options(names.index("calcified_plaque"), rng) == {"radius_range_mm": None,
                                                                                 "attributes": (0, 0)}
    finally:
        src.close()
    with pytest.raises(PromptLesionConfigError, match="2 probabilities but"):
        _source(gen_attr, {**base, "attribute_mix": {"calcified_plaque": {"radius": [0.5, 0.5]}}}, tmp_path,
                monkeypatch).close()


def test_cache_source_refuses_a_cache_built_with_another_mix(gen_attr, tmp_path, monkeypatch):
    from nnunet_promptlesion.utils.errors import PromptLesionConfigError

    mix = {"calcified_plaque": {"radius": [1.0, 0.0, 0.0]}}
    rc, _, err = _build(gen_attr, tmp_path / "c", "--attribute-mix", json.dumps(mix), per_class=1)
    assert rc == 0, err[-2000:]
    base = {"synthesizer": "diffusion_cache", "cache": str(tmp_path / "c")}
    _source(gen_attr, {**base, "attribute_mix": mix}, tmp_path, monkeypatch).close()
    _source(gen_attr, base, tmp_path, monkeypatch).close()   # no mix named: the cache's stands
    with pytest.raises(PromptLesionConfigError, match="was built with"):
        _source(gen_attr, {**base, "attribute_mix": {"calcified_plaque": {"radius": [0.0, 1.0, 0.0]}}}, tmp_path,
                monkeypatch).close()


def test_renderer_passes_each_requests_bins_to_the_model(gen_attr, monkeypatch):
    from nnunet_promptlesion.generator.diffusion import inpaint
    from nnunet_promptlesion.lesions.masks import MaskSampler
    from nnunet_promptlesion.synthesis.cache_build import RunContext, place_lesion
    from nnunet_promptlesion.synthesis.diffusion_render import AttributeRequests, DiffusionRenderer

    for k, v in gen_attr["env"].items():
        monkeypatch.setenv(k, v)
    ctx = RunContext(str(gen_attr["did"]), CONFIG, "0", "nnUNetPlans")
    renderer = DiffusionRenderer(gen_attr["diffusion"], ctx.grid, ctx.spec, ctx.reader, device="cpu", steps=1)
    index = ctx.build_index(0.5, 1000, progress=False)
    placer = ctx.placer(index, MaskSampler(ctx.cm.spacing, bank=index.bank), renderer.mapping.footprint())
    reqs = AttributeRequests(ctx.spec, renderer.attribute_bins,
                             {"calcified_plaque": {"radius": [0.0, 0.0, 1.0], "contrast": [1.0, 0.0, 0.0]}}, "test")
    label = ctx.spec.by_name("calcified_plaque").label
    batch = [r for r in (place_lesion(placer, label, np.random.default_rng(s), s, 1.0, reqs) for s in range(6)) if r]
    batch.append(place_lesion(placer, label, np.random.default_rng(99), 99, 1.0))  # no request: null attributes
    assert len(batch) >= 3 and all(r.attributes == (3, 1) for r in batch[:-1]) and batch[-1].attributes is None
    seen = {}
    real = inpaint.inpaint_lesions

    def spy(*a, **kw):
        seen["attributes"] = kw.get("attributes")
        return real(*a, **kw)

    monkeypatch.setattr(inpaint, "inpaint_lesions", spy)
    out = renderer.render(batch)
    ok = [r is not None for r in out]
    assert any(ok)
    got = seen["attributes"].tolist()
    assert got == [[3, 1] if r.attributes else [0, 0] for r, k in zip(batch, ok) if k]
