"""VQGAN model, quantizer, checkpoint and intensity-space tests (fast, CPU)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from nnunet_promptlesion.generator.intensity import IntensitySpace
from nnunet_promptlesion.generator.vqgan import PRESETS, VQGAN, EMAVectorQuantizer, VQGANConfig, load_vqgan, save_vqgan
from nnunet_promptlesion.generator.vqgan.perceptual import VGG16Features, build_perceptual
from nnunet_promptlesion.utils.checkpoint import CheckpointError

torch.set_num_threads(1)


def test_paper_preset_shapes_and_latent_interface():
    cfg = PRESETS["paper"]
    assert (cfg.latent_dim, cfg.codebook_size, cfg.patch_size, cfg.downsample_factor) == (8, 16384, (96, 96, 96), 4)
    assert cfg.latent_shape == (8, 24, 24, 24)
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    n = model.num_parameters()
    assert n["codebook"] == 16384 * 8 and n["encoder"] > 1e5 and n["decoder"] > 1e5
    with torch.no_grad():
        z = model.encode(torch.zeros(1, 1, 96, 96, 96))
    assert tuple(z.shape) == (1, 8, 24, 24, 24)


def test_tiny_latent_roundtrip_matches_reconstruct():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.tiny()).eval()
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    z = model.encode_latent(x)
    assert z.shape == (2, 8, 8, 8, 8)
    lo, hi = model.latent_range()
    raw = model.encode(x)
    # normalise and back: about eight fp32 roundings of values up to max(|raw|, |lo|, |hi|)
    f32 = torch.finfo(torch.float32).eps
    scale = max(float(raw.detach().abs().max()), abs(lo), abs(hi))
    torch.testing.assert_close((z + 1) / 2 * (hi - lo) + lo, raw, rtol=0, atol=8 * f32 * scale)
    # every code maps into [-1, 1]: the normalisation range is the codebook's own range (rounding is monotone:
    # the extreme codes map to -1 and 1 exactly, the others between them)
    codes = (model.quantizer.embed - lo) / (hi - lo) * 2 - 1
    assert codes.min() >= -1 and codes.max() <= 1
    y = model.decode_latent(z)
    assert y.shape == x.shape and y.abs().max() <= 1
    # both snap to the same codes and decode them in one identical call: bit-identical
    torch.testing.assert_close(y, model.reconstruct(x), rtol=0, atol=0)


def test_chunked_search_equals_brute_force():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(num_codes=1000, dim=8, chunk_size=97)  # chunk boundaries that do not divide N
    flat = torch.randn(5003, 8)
    got = q.nearest_codes(flat)
    same_formula = ((flat * flat).sum(1, keepdim=True) - 2 * flat @ q.embed.t() + (q.embed ** 2).sum(1)[None]).argmin(1)
    assert torch.equal(got, same_formula)
    d64 = torch.cdist(flat.double(), q.embed.double())
    best = d64.min(1).values
    # the fp32 search may pick a code whose squared distance exceeds the float64 minimum by its own rounding:
    # ||x||^2 - 2 x.e + ||e||^2 in fp32 errs by a few eps * (|x| + |e|)^2
    sq = d64 ** 2
    bound = 4 * torch.finfo(torch.float32).eps * (flat.double().norm(dim=1) + q.embed.double().norm(dim=1).max()) ** 2
    assert (sq.gather(1, got[:, None])[:, 0] - best ** 2 <= bound).all()
    assert (got == d64.argmin(1)).float().mean() > 0.999  # differences only at numerical ties
    # memory bound: search with a chunk of 1 gives the same answer
    assert torch.equal(q.nearest_codes(flat[:300], chunk_size=1), got[:300])


def test_nearest_code_search_is_fp32_under_bf16_autocast():
    """Issue 16: under CPU bf16 autocast the search gave another code for 2-5 % of latents (16384 x 8 codebook).

    2000 latents per codebook: the old bf16 search fails this with ~40-90 mismatches per codebook."""
    g = torch.Generator().manual_seed(0)
    for codebook in (None, torch.randn(16384, 8, generator=g)):  # the default init and an N(0, 1) codebook
        q = EMAVectorQuantizer(num_codes=16384, dim=8)
        if codebook is not None:
            q.embed.copy_(codebook)
        flat = torch.randn(2000, 8, generator=g) * (q.embed.std() * 1.5) + 0.5 * q.embed.std()
        ref = q.nearest_codes(flat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = q.snap(flat.T.reshape(1, 8, 2000, 1, 1)).reshape(8, -1).T  # snap = nearest_codes + lookup
        # the same fp32 computation in both cases: equal code for code, not "nearly"
        assert torch.equal(got, q.embed[ref])


def test_dead_code_restart_codes_are_used_afterwards():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(num_codes=64, dim=4, restart_every=1, dead_code_threshold=1.0)
    q.train()
    with torch.no_grad():  # all codes but two far away from the data: 62 dead codes
        q.embed.fill_(50.0)
        q.embed[:2] = torch.tensor([[0.0] * 4, [0.1] * 4])
        q.embed_avg.copy_(q.embed)
        q.cluster_size.zero_()
    z = torch.randn(2, 4, 6, 6, 6)
    before = q(z)[2]
    assert before["restarted"] > 50
    restarted = q.last_restarted.clone()
    q.eval()
    _, _, after = q(z)
    used = torch.unique(after["indices"])
    assert restarted[used].sum() >= 40, "restarted codes must be chosen by the nearest-code search afterwards"
    assert after["usage"] > 0.6 and after["perplexity"] > 30


def test_quantizer_straight_through_and_commitment():
    q = EMAVectorQuantizer(num_codes=16, dim=4).eval()
    z = torch.randn(1, 4, 3, 3, 3, requires_grad=True)
    out, commit, _ = q(z)
    out.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: exactly the identity gradient
    assert commit > 0 and commit.requires_grad


def _ckpt(tmp_path, cfg, space, name="v.pt"):
    torch.manual_seed(0)
    m = VQGAN(cfg)
    p = tmp_path / name
    save_vqgan(m, p, (1.0, 1.0, 1.0), space, 7, {"type": "test"})
    return m, p


def test_load_vqgan_roundtrip_and_refusals(tmp_path):
    space = IntensitySpace.hu_window(-175, 250)
    m, p = _ckpt(tmp_path, VQGANConfig.tiny(), space)
    model, meta = load_vqgan(p, expect_preset="tiny", expect_intensity=IntensitySpace.hu_window(-175, 250))
    assert not model.training
    assert meta["kind"] == "vqgan" and meta["step"] == 7 and meta["spacing"] == [1.0, 1.0, 1.0]
    assert meta["checkpoint_id"].startswith("sha256:") and meta["intensity"] == space.as_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    with pytest.raises(CheckpointError, match="preset 'tiny'.*'paper' was requested"):
        load_vqgan(p, expect_preset="paper")
    with pytest.raises(CheckpointError, match="intensity space"):
        load_vqgan(p, expect_intensity=IntensitySpace.hu_window(-1000, 1000))
    nn_space = IntensitySpace(kind="nnunet_ct", mean=60, std=90, percentile_00_5=-200, percentile_99_5=400)
    with pytest.raises(CheckpointError, match="nnU-Net CTNormalization"):
        load_vqgan(p, expect_intensity=nn_space)
    with pytest.raises(CheckpointError, match="spacing"):
        load_vqgan(p, expect_spacing=(0.8, 0.8, 2.5))


def test_loading_never_unpickles_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"meta": {"kind": "vqgan"}, "x": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_vqgan(bad)
    assert not marker.exists()
    other = tmp_path / "other.pt"
    torch.save({"meta": {"kind": "diffusion"}, "model": {}}, other)
    with pytest.raises(CheckpointError, match="not a VQGAN"):
        load_vqgan(other)


def test_intensity_space_mappings():
    s = IntensitySpace(kind="nnunet_ct", mean=50.0, std=100.0, percentile_00_5=-900.0, percentile_99_5=1500.0)
    hu = np.array([-1200.0, -900.0, 0.0, 300.0, 1500.0, 3000.0])
    y = s.hu_to_model(hu)
    assert y.min() == -1 and y.max() == 1
    f64 = np.finfo(np.float64).eps  # a few float64 operations on values up to 3000 HU
    np.testing.assert_allclose(s.model_to_hu(y), np.clip(hu, -900, 1500), rtol=0, atol=8 * f64 * 3000)
    z = s.from_hu(hu)  # nnU-Net CTNormalization
    np.testing.assert_allclose(z, (np.clip(hu, -900, 1500) - 50) / 100, rtol=0, atol=8 * f64 * 30)
    assert IntensitySpace.from_dict(s.as_dict()) == s
    assert s != IntensitySpace.hu_window()
    w = IntensitySpace.hu_window(-175, 250)
    np.testing.assert_allclose(w.hu_to_model(np.array([-175.0, 37.5, 250.0])), [-1, 0, 1], rtol=0, atol=8 * f64 * 250)
    plans = {"configurations": {"3d_fullres": {"normalization_schemes": ["ZScoreNormalization"]}},
             "foreground_intensity_properties_per_channel": {"0": {"mean": 0, "std": 1, "percentile_00_5": -1, "percentile_99_5": 1}}}
    with pytest.raises(ValueError, match="CTNormalization"):
        IntensitySpace.from_nnunet_plans(plans)


def test_perceptual_weight_free_default_and_local_vgg_weights(tmp_path):
    default = build_perceptual(None)
    assert "weight-free" in default.description
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    idx = torch.tensor([[3, 4, 5], [8, 9, 10]])
    assert default(x, x, idx) == 0 < 1e-3 < default(x, -x, idx)  # the same computation on both sides: exactly 0
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vgg = VGG16Features()
    wfile = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in vgg.state_dict().items() if k.startswith("features.")}, str(wfile))
    lp = build_perceptual(wfile)
    assert "vgg16" in lp.description and str(wfile) in lp.description
    assert lp(x, x, idx) == 0 < 1e-3 < lp(x, -x, idx)
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="torchvision"):
        build_perceptual(bad)
