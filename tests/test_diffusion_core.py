"""PromptLesion diffusion core: schedule, samplers (oracle recovery), guidance, prompts, UNet, inpainting."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_numerics import eps, pass_tol

from nnunet_promptlesion.generator.diffusion.config import DiffusionConfig, PromptVocabulary
from nnunet_promptlesion.generator.diffusion.inpaint import blend, blend_weights, dilate, gaussian_blur3d, inpaint_lesions, latent_region
from nnunet_promptlesion.generator.diffusion.prompts import MaskTransformer, PromptGenBlock
from nnunet_promptlesion.generator.diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample, guided_eps_fn
from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
from nnunet_promptlesion.generator.diffusion.unet import PromptInjection, PromptLesionUNet, count_parameters

torch.set_num_threads(1)  # robust under CPU contention (other test runs in parallel)


def test_alpha_bar_T_is_near_zero():
    s = NoiseSchedule(400)
    assert s.T == 400
    assert float(s.alpha_bar[-1]) < 1e-3
    assert float(s.alpha_bar[0]) > 0.999
    assert torch.all(s.betas[1:] > s.betas[:-1])  # linear, increasing
    # without the 1000/T scaling the linear schedule ends far from pure noise (DESIGN.md: 0.0175)
    unscaled = NoiseSchedule(400, scale_betas_to_1000=False)
    # 0.0175 is quoted to three significant digits: half a unit of the last digit
    assert float(unscaled.alpha_bar[-1]) == pytest.approx(0.0175, abs=5e-5)


def _oracle(schedule, z0):
    def eps_fn(z_t, t):
        ab = schedule.alpha_bar[t].reshape(-1, 1, 1, 1, 1)
        return (z_t - ab.sqrt() * z0) / (1 - ab).sqrt()
    return eps_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim0", "ddim_eta"])
def test_oracle_noise_predictor_recovers_clean_latent(sampler):
    s = NoiseSchedule(400)
    g = torch.Generator().manual_seed(0)
    z0 = torch.rand(3, 8, 4, 4, 4, generator=g) * 2 - 1
    zT = torch.randn(z0.shape, generator=g)
    if sampler == "ddpm":
        out = ddpm_sample(_oracle(s, z0), s, zT, generator=g)
    elif sampler == "ddim0":
        out = ddim_sample(_oracle(s, z0), s, zT, steps=50, eta=0.0, generator=g)
    else:
        out = ddim_sample(_oracle(s, z0), s, zT, steps=20, eta=1.0, generator=g)
    # with the exact oracle every step's x0 prediction is z0 again, so rounding does not accumulate; the last
    # step recovers eps from z_t - sqrt(abar) z0 over sqrt(1 - abar_0) (~0.016, 1 - abar_0 cancels in fp32):
    # an fp32 rounding of |z| is divided by sqrt(1 - abar_0) and multiplied back by at most 1
    tol = torch.finfo(torch.float32).eps * float(torch.maximum(zT.abs().max(), z0.abs().max())) / float((1 - s.alpha_bar[0]).sqrt())
    assert (out - z0).abs().max() <= tol
    # a wrong predictor does not: the test can fail
    wrong = ddim_sample(lambda z, t: torch.zeros_like(z), s, zT, steps=20)
    assert (wrong - z0).abs().max() > 0.1
    # clipping the x0 prediction to the latent range keeps the oracle exact and bounds a bad predictor
    clipped = ddim_sample(_oracle(s, z0), s, zT, steps=10, clip_x0=1.0)
    assert (clipped - z0).abs().max() <= tol
    bad = ddim_sample(lambda z, t: torch.full_like(z, 0.5), s, zT, steps=10, clip_x0=1.0)
    assert bad.abs().max() <= 1.0 + 2 * torch.finfo(torch.float32).eps  # clamp to 1, then one fp32 rounding


def test_ddim_timesteps():
    ts = ddim_timesteps(400, 50)
    assert len(ts) == 50 and ts[0] == 399 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert ddim_timesteps(400, 400) == list(range(399, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(400, 0)


def test_inpainting_sampler_keeps_known_latent_outside_region():
    s = NoiseSchedule(400)
    g = torch.Generator().manual_seed(1)
    known = torch.rand(2, 8, 4, 4, 4, generator=g) * 2 - 1
    keep = torch.ones(2, 1, 4, 4, 4)
    keep[:, :, 1:3, 1:3, 1:3] = 0
    # an uninformative predictor: the region is whatever, outside must be exactly the known latent
    out = ddim_sample(lambda z, t: torch.zeros_like(z), s, torch.randn(known.shape, generator=g), steps=10,
                      generator=g, known=known, keep=keep)
    k = keep.expand_as(known) > 0.5
    assert torch.equal(out[k], known[k])
    assert not torch.allclose(out[~k], known[~k])


def _tiny_model(prompt_type="onehot", num_classes=2, seed=0, randomize_out=True, **kw):
    torch.manual_seed(seed)
    kw.setdefault("channels", (16, 32, 32))  # the tiny preset's structure at CPU-test width
    cfg = DiffusionConfig.tiny(num_classes=num_classes, prompt_type=prompt_type, **kw)
    m = PromptLesionUNet(cfg).eval()
    if randomize_out:  # zero-initialised output convs would hide the conditioning in an untrained model
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv3d):
                torch.nn.init.normal_(mod.weight, std=0.05)
    return m


def test_guidance_scale_one_equals_conditional_prediction():
    m = _tiny_model()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 8, 6, 6, 6, generator=g)
    zh = torch.randn(2, 8, 6, 6, 6, generator=g)
    region = torch.zeros(2, 1, 6, 6, 6)
    region[:, :, 2:4, 2:4, 2:4] = 1
    ids = torch.tensor([1, 2])
    t = torch.tensor([10, 300])
    null_ids = torch.full_like(ids, m.config.null_id)
    with torch.no_grad():
        cond = m(z, t, zh, region, ids)
        null = m(z, t, zh, region, null_ids)
        healthy = m(z, t, zh, region, torch.zeros_like(ids))
        batched_1 = guided_eps_fn(m, zh, region, ids, 1.0, always_batch_null=True)(z, t)
        batched_null = guided_eps_fn(m, zh, region, null_ids, 1.0, always_batch_null=True)(z, t)
        fast_1 = guided_eps_fn(m, zh, region, ids, 1.0)(z, t)
        g3 = guided_eps_fn(m, zh, region, ids, 3.0)(z, t)
    # guidance 1 runs the plain conditional pass: the same computation, equal to the last bit
    torch.testing.assert_close(fast_1, cond, rtol=0, atol=0)
    # the doubled (cond + null) batch of guidance != 1 equals the plain passes up to batched-vs-single rounding
    tol = pass_tol(m, cond, null)
    torch.testing.assert_close(batched_1, cond, rtol=0, atol=tol)
    torch.testing.assert_close(batched_null, null, rtol=0, atol=tol)
    # guidance 3 == null + 3 (cond - null) on the model's predictions at the batch shape guidance runs: only the
    # combination's own rounding (three operations on values up to |null| + 3 |cond - null|) separates them
    ref = batched_null + 3.0 * (batched_1 - batched_null)
    torch.testing.assert_close(g3, ref, rtol=0, atol=3 * eps(g3.dtype) * float((batched_null.abs() + 3 * (batched_1 - batched_null).abs()).max()))
    # ... and the plain single passes: their two independent rounding errors enter 3x and 2x (quadrature sum)
    torch.testing.assert_close(g3, null + 3.0 * (cond - null), rtol=0, atol=math.hypot(3, 2) * tol)
    assert (g3 - cond).abs().max() > 1e-4
    # the guidance null token is its own prompt, not "healthy"
    assert m.config.null_id == 3 and (null - healthy).abs().max() > 1e-4


def test_mask_transformer_parameter_count_and_tokens():
    # paper settings: 24^3, 8^3 patches, 3 blocks, width 64, 4 heads, FF 256 (the documented counts)
    for k in (1, 2, 3):
        mt = MaskTransformer(num_classes=k)
        assert count_parameters(mt) == 221_760 + 64 * (k - 2)
        assert count_parameters(MaskTransformer(num_classes=k, ff=128)) == 172_224 + 64 * (k - 2)
        assert mt.num_tokens == 27
    out = MaskTransformer(2)(torch.rand(3, 4, 24, 24, 24))  # parent, region, 2 classes
    assert out.shape == (3, 64)
    with pytest.raises(ValueError, match="channels"):
        MaskTransformer(2)(torch.rand(3, 2, 24, 24, 24))  # the old region + class input


@pytest.mark.parametrize("prompt_type", ["onehot", "mask"])
def test_prompt_injected_at_exactly_three_decoder_levels(prompt_type):
    m = _tiny_model(prompt_type)
    sizes = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[2:])))
             for mod in m.modules() if isinstance(mod, PromptInjection)]
    with torch.no_grad():
        m(torch.randn(2, 8, 8, 8, 8), torch.tensor([0, 5]), torch.randn(2, 8, 8, 8, 8), torch.ones(2, 1, 8, 8, 8),
          torch.tensor([1, 2]))
    for h in hooks:
        h.remove()
    assert len(hooks) == 3
    assert sorted(sizes) == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]


def test_paper_preset_shapes_and_parameter_count():
    cfg = DiffusionConfig.paper(num_classes=2, prompt_type="mask", per_class_mask=True)
    m = PromptLesionUNet(cfg).eval()
    assert cfg.in_channels == 8 + 8 + 3 and cfg.mt_ff == 256 and cfg.vocab_size == 4
    sizes = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[2:])))
             for mod in m.modules() if isinstance(mod, PromptInjection)]
    with torch.no_grad():
        out = m(torch.randn(1, 8, 24, 24, 24), torch.tensor([399]), torch.randn(1, 8, 24, 24, 24),
                torch.zeros(1, 1, 24, 24, 24), torch.tensor([2]))
    for h in hooks:
        h.remove()
    assert out.shape == (1, 8, 24, 24, 24)
    assert sorted(sizes) == [(6, 6, 6), (12, 12, 12), (24, 24, 24)]  # 1/16, 1/8, 1/4 of a 96^3 patch
    n = count_parameters(m)
    gen = sum(count_parameters(mod) for mod in m.modules() if isinstance(mod, PromptGenBlock))
    assert 5e6 < n < 5e7
    assert gen < 500_000  # the prompt tensors stay light (public code: ~479M parameters here)


def test_different_prompts_give_different_outputs_from_same_noise():
    m = _tiny_model("onehot", num_classes=2)
    s = NoiseSchedule(400)
    region = torch.zeros(1, 1, 6, 6, 6)
    region[..., 2:5, 2:5, 2:5] = 1
    known = torch.rand(1, 8, 6, 6, 6) * 2 - 1
    outs = []
    for pid in (0, 1, 2):
        g = torch.Generator().manual_seed(7)
        eps = guided_eps_fn(m, (1 - region) * known, region, torch.tensor([pid]), 1.0)
        outs.append(ddim_sample(eps, s, torch.randn(known.shape, generator=g), steps=5, generator=g,
                                known=known, keep=1 - region))
    for i in range(3):
        for j in range(i + 1, 3):
            assert (outs[i] - outs[j]).abs().max() > 1e-3
    g = torch.Generator().manual_seed(7)
    eps = guided_eps_fn(m, (1 - region) * known, region, torch.tensor([1]), 1.0)
    again = ddim_sample(eps, s, torch.randn(known.shape, generator=g), steps=5, generator=g, known=known, keep=1 - region)
    torch.testing.assert_close(again, outs[1], rtol=0, atol=0)  # same computation, same noise: bit-identical


def _kernel_l1(sigma: float) -> float:
    """L1 distance between our Gaussian kernel (radius ceil(3 sigma)) and scipy's (radius int(4 sigma + 0.5))."""
    if sigma <= 0:
        return 0.0
    r_ours, r_scipy = max(int(math.ceil(3 * sigma)), 1), int(4 * sigma + 0.5)
    x = np.arange(-max(r_ours, r_scipy), max(r_ours, r_scipy) + 1)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    ours, scipy_k = np.where(np.abs(x) <= r_ours, k, 0), np.where(np.abs(x) <= r_scipy, k, 0)
    return float(np.abs(ours / ours.sum() - scipy_k / scipy_k.sum()).sum())


def test_blur_and_dilation_match_scipy_blending():
    from nnunet_promptlesion.lesions import blending as npb

    rng = np.random.default_rng(0)
    mask = np.zeros((2, 20, 20, 20), bool)
    mask[0, 8:12, 7:13, 9:11] = True
    mask[1, 3:6, 3:6, 3:6] = True
    sig = [1.5, 0.0]
    g, support = blend_weights(torch.from_numpy(mask[:, None]).float(), torch.tensor(sig))
    for b in range(2):
        g_np, sup_np = npb.blend_weights(mask[b], sig[b])
        np.testing.assert_array_equal(support[b, 0].numpy(), sup_np)
        # scipy truncates its kernel at int(4 sigma + 0.5) voxels, ours at ceil(3 sigma): each normalised 1-D kernel
        # differs by their L1 distance, a separable 3-D blur of a [0, 1] mask by at most 3x that (+ fp32 rounding)
        tol = 3 * _kernel_l1(sig[b]) + 16 * np.finfo(np.float32).eps
        np.testing.assert_allclose(g[b, 0].numpy(), g_np, rtol=0, atol=tol)
    x = torch.from_numpy(rng.random((1, 1, 9, 9, 9)).astype(np.float32))
    assert torch.equal(gaussian_blur3d(x, 0.0), x)
    d = dilate(torch.from_numpy(mask[:1, None]), 2)
    assert int(d.sum()) == (4 + 4) * (6 + 4) * (2 + 4)


def test_blend_outside_dilated_mask_bit_identical():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 16, 16, 16, generator=g) * 2 - 1
    gen = torch.rand(2, 1, 16, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros_like(img)
    mask[0, 0, 5:9, 5:9, 5:9] = 1
    mask[1, 0, 2:4, 10:13, 6:8] = 1
    sigma = torch.tensor([2.0, 0.7])
    out = blend(img, gen, mask, sigma)
    _, support = blend_weights(mask, sigma)
    assert torch.equal(out[~support], img[~support])
    assert not torch.equal(out[mask > 0], img[mask > 0])


def test_inpaint_lesions_with_vqgan():
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.tiny()).eval()
    m = _tiny_model("mask", num_classes=2, per_class_mask=True)
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 1, 32, 32, 32, generator=g) * 2 - 1
    mask = torch.zeros_like(img)
    mask[0, 0, 12:20, 12:18, 14:20] = 1
    mask[1, 0, 4:8, 20:26, 10:14] = 1
    out, dec, z = inpaint_lesions(vq, m, img, mask, torch.tensor([1, 2]), steps=4, sampler="ddim",
                                  generator=g, blend_sigma=torch.tensor([1.0, 2.0]), return_decoded=True)
    assert out.shape == img.shape and z.shape == (2, 8, 8, 8, 8)
    _, support = blend_weights(mask, torch.tensor([1.0, 2.0]))
    assert torch.equal(out[~support], img[~support])
    assert (out[mask > 0] - img[mask > 0]).abs().max() > 1e-3
    region = latent_region(mask, 4, (8, 8, 8))
    assert int(region[0].sum()) == 2 * 2 * 2  # 12:20 x 12:18 x 14:20 -> cells 3-4 x 3-4 x 3-4
    with pytest.raises(ValueError):
        inpaint_lesions(vq, m, img[..., :30], mask[..., :30], torch.tensor([1, 2]), steps=2)


def test_prompt_vocabulary():
    v = PromptVocabulary(names=["healthy", "tumor", "cyst"], labels=[0, 3, 4])
    assert v.id_of("cyst") == 2 and v.id_of(3) == 1 and v.id_of("4") == 2 and v.id_of("healthy") == 0
    with pytest.raises(KeyError, match="knows"):
        v.id_of("plaque")
    with pytest.raises(ValueError):
        PromptVocabulary(names=["tumor"], labels=[3])
