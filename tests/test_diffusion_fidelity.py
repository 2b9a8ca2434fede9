"""Generator fidelity: healthy context without the lesion, CFG null token, MaskTransformer channels,
feature-driven PromptGenBlocks, step-invariant conditioning, checkpoint format, fused attention (CUDA)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_numerics import pass_tol

from nnunet_promptlesion.generator.diffusion.config import DiffusionConfig
from nnunet_promptlesion.generator.diffusion.inpaint import encode_inputs
from nnunet_promptlesion.generator.diffusion.prompts import MaskPrompt, PromptGenBlock
from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
from nnunet_promptlesion.generator.diffusion.unet import AttentionBlock, PromptLesionUNet

torch.set_num_threads(1)

CUDA = torch.cuda.is_available()


def _tiny_vqgan():
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    return VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))).eval()


def _tiny_model(prompt_type="onehot", num_classes=2, **kw):
    torch.manual_seed(0)
    cfg = DiffusionConfig.tiny(num_classes=num_classes, prompt_type=prompt_type, channels=(16, 32, 32), **kw)
    m = PromptLesionUNet(cfg).eval()
    for mod in m.modules():  # zero-initialised output convs would hide the conditioning in an untrained model
        if isinstance(mod, torch.nn.Conv3d):
            torch.nn.init.normal_(mod.weight, std=0.05)
    return m


def _lesion_batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(n, 1, 24, 24, 24, generator=g) * 2 - 1
    mask = torch.zeros_like(img)
    mask[:, :, 8:15, 9:16, 10:14] = 1
    parent = torch.zeros_like(img)
    parent[:, :, 4:20, 4:20, 4:20] = 1
    return img, mask, parent


def test_healthy_context_does_not_depend_on_voxels_under_the_mask():
    vq = _tiny_vqgan()
    img, mask, parent = _lesion_batch(2)
    other = torch.where(mask > 0.5, torch.rand(img.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1, img)
    a = encode_inputs(vq, img, mask, parent)
    b = encode_inputs(vq, other, mask, parent)
    assert torch.equal(a["context"], b["context"])
    assert torch.equal(a["region"], b["region"]) and a["parent"].shape == a["region"].shape
    # the encoder does see those voxels: the full latent changes, also in cells outside the latent region,
    # which is exactly the leak a context built as (1 - region) * E(image) would have
    assert not torch.equal(a["z"], b["z"])
    keep = (1 - a["region"]).expand_as(a["z"]) > 0.5
    assert (a["z"][keep] - b["z"][keep]).abs().max() > 1e-4


class _Recorder(torch.nn.Module):
    """Wraps the denoiser and records what the training loss feeds it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, z_t, t, z_healthy, region, prompt_ids, parent=None):
        self.calls.append({"z_healthy": z_healthy.detach().clone(), "ids": prompt_ids.clone(), "parent": parent})
        return self.model(z_t, t, z_healthy, region, prompt_ids, parent)


def test_training_loss_feeds_masked_context_and_null_token():
    from nnunet_promptlesion.generator.diffusion.train import diffusion_loss

    vq = _tiny_vqgan()
    model = _tiny_model("mask")
    cfg = model.config
    sched = NoiseSchedule.from_config(cfg)
    rec = _Recorder(model)
    img, mask, parent = _lesion_batch(3)
    batch = {"image": img, "mask": mask, "parent": parent, "prompt": torch.tensor([0, 1, 2])}
    other = dict(batch, image=torch.where(mask > 0.5, -img, img))  # another lesion under the same mask
    for b in (batch, other):
        diffusion_loss(rec, vq, sched, cfg, b, "cpu", torch.Generator().manual_seed(1), prompt_dropout=0.0)
    assert torch.equal(rec.calls[0]["z_healthy"], rec.calls[1]["z_healthy"])
    assert rec.calls[0]["ids"].tolist() == [0, 1, 2] and rec.calls[0]["parent"] is not None
    # prompt dropout goes to the null token, never to "healthy" (id 0 only ever sees healthy crops)
    diffusion_loss(rec, vq, sched, cfg, batch, "cpu", torch.Generator().manual_seed(1), prompt_dropout=1.0)
    assert rec.calls[-1]["ids"].tolist() == [cfg.null_id] * 3 and cfg.null_id == 3
    loss, logs = diffusion_loss(rec, vq, sched, cfg, batch, "cpu", torch.Generator().manual_seed(1))
    loss.backward()  # differentiable through prepare + forward_prepared
    assert model.prompt_encoder.transformer.shape_embed.weight.grad is not None


def test_mask_prompt_reads_parent_region_and_class_and_has_a_null_vector():
    torch.manual_seed(0)
    mp = MaskPrompt(2, grid=8, patch=4).eval()
    region = torch.zeros(2, 1, 8, 8, 8)
    region[:, :, 3:5, 3:5, 3:5] = 1
    organ_a = torch.zeros_like(region)
    organ_a[:, :, 1:7, 1:7, 1:7] = 1
    organ_b = torch.zeros_like(region)
    organ_b[:, :, 2:8, 0:5, 3:6] = 1
    ids = torch.tensor([1, 2])
    with torch.no_grad():
        pa, pb = mp(ids, region, organ_a), mp(ids, region, organ_b)
        healthy = mp(torch.tensor([0, 0]), region, organ_a)
        null = mp(torch.tensor([3, 3]), region, organ_a)
        null_b = mp(torch.tensor([3, 3]), 1 - region, organ_b)
    assert (pa - pb).abs().max() > 1e-4          # the parent channel reaches the prompt
    assert (pa[0] - pa[1]).abs().max() > 1e-4    # the class channel does too
    assert (pa - healthy).abs().max() > 1e-4
    assert torch.equal(null, null_b) and torch.equal(null[0], mp.null)  # null: one learned vector
    cm = mp.class_mask(ids, region, organ_a)
    assert cm.shape[1] == 4 and torch.equal(cm[0, 2], region[0, 0]) and not cm[0, 3].any() and not cm[1, 2].any()


def test_prompt_gen_block_weights_come_from_features_and_prompt():
    torch.manual_seed(0)
    gen = PromptGenBlock(prompt_dim=8, feature_channels=6, channels=4, n_components=5, base_size=3).eval()
    torch.nn.init.normal_(gen.from_features.weight, std=1.0)
    h1, h2 = torch.randn(1, 6, 5, 5, 5), torch.randn(1, 6, 5, 5, 5) + 1.0
    p1, p2 = torch.randn(1, 8), torch.randn(1, 8)
    with torch.no_grad():
        assert (gen(h1, p1) - gen(h2, p1)).abs().max() > 1e-4  # same prompt, other features: other mix
        assert (gen(h1, p1) - gen(h1, p2)).abs().max() > 1e-4
        # precomputed basis == conv(resize(sum_i w_i component_i)), the PromptIR formulation
        w = torch.softmax(gen.from_features(h1.mean((2, 3, 4))) + gen.from_prompt(p1), -1)
        direct = gen.conv(F.interpolate(torch.einsum("bn,ncdhw->bcdhw", w, gen.components), size=(5, 5, 5),
                                        mode="trilinear", align_corners=False))
        # conv of the mixed components vs the mix of precomputed per-component convs: reordered sums
        torch.testing.assert_close(gen.mix(h1, gen.prompt_logits(p1), gen.basis((5, 5, 5))), direct,
                                   rtol=0, atol=pass_tol(gen, direct))
    small = sum(p.numel() for p in PromptGenBlock(64, 256, 32, 5, 6).parameters())
    assert small < 70_000  # a paper-preset level stays light


def test_step_invariant_conditioning_gives_the_plain_forward():
    m = _tiny_model("mask", per_class_mask=True)
    g = torch.Generator().manual_seed(0)
    z, zh = torch.randn(2, 8, 6, 6, 6, generator=g), torch.randn(2, 8, 6, 6, 6, generator=g)
    region = torch.zeros(2, 1, 6, 6, 6)
    region[:, :, 1:4, 2:5, 2:4] = 1
    ids, t = torch.tensor([1, 0]), torch.tensor([5, 250])
    with torch.no_grad():
        cond = m.prepare(zh, region, ids, region)
        # the split input conv equals the conv over the concatenated channels
        h_ref = m.conv_in(torch.cat([z, zh, m.mask_input(region, ids)], 1))
        h_split = F.conv3d(z, m.conv_in.weight[:, :8], None, padding=1) + cond["const_in"]
        torch.testing.assert_close(h_split, h_ref, rtol=0, atol=2 * pass_tol(m.conv_in, h_ref))  # two sums added
        a = m.forward_prepared(z, t, cond)
        b = m.forward_prepared(z, t + 100, cond)  # the same conditioning serves every step
    assert (a - b).abs().max() > 1e-5


def test_attention_qkv_reach_sdpa_with_unit_stride():
    blk = AttentionBlock(64, 32, 8)
    q, k, v = blk.qkv_views(torch.randn(2, 64, 4, 4, 4))
    assert q.shape == (2, 2, 64, 32) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1


@pytest.mark.skipif(not CUDA, reason="fused SDPA kernels need CUDA")
def test_attention_runs_on_a_fused_sdpa_kernel_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    blk = AttentionBlock(256, 64, 32).cuda().to(torch.bfloat16)
    x = torch.randn(4, 256, 12, 12, 12, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        y = blk(x)  # raises if no fused kernel accepts the inputs
    assert torch.isfinite(y.float()).all()


@pytest.mark.skipif(not CUDA, reason="host-sync check needs CUDA")
def test_sampling_loop_has_no_host_sync_on_cuda():
    from nnunet_promptlesion.generator.diffusion.samplers import ddim_sample, guided_eps_fn

    m = _tiny_model().cuda().to(torch.bfloat16)
    s = NoiseSchedule.from_config(m.config, "cuda")
    known = torch.rand(2, 8, 6, 6, 6, device="cuda") * 2 - 1
    keep = torch.ones(2, 1, 6, 6, 6, device="cuda")
    keep[..., 2:4, 2:4, 2:4] = 0
    eps = guided_eps_fn(m, known * keep, 1 - keep, torch.tensor([1, 2], device="cuda"), 2.0)
    g = torch.Generator("cuda").manual_seed(0)
    z = torch.randn(known.shape, device="cuda", generator=g)
    ddim_sample(eps, s, z, steps=2, generator=g, known=known, keep=keep)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ddim_sample(eps, s, z, steps=5, eta=1.0, generator=g, known=known, keep=keep, clip_x0=1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


def test_compiled_step_falls_back_to_eager(monkeypatch):
    from nnunet_promptlesion.generator.diffusion.samplers import guided_eps_fn

    m = _tiny_model()
    zh = torch.randn(1, 8, 6, 6, 6)
    region = torch.zeros(1, 1, 6, 6, 6)
    region[..., 2:4, 2:4, 2:4] = 1

    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    z, t = torch.randn(1, 8, 6, 6, 6), torch.tensor([7])
    with pytest.warns(RuntimeWarning, match="falling back to eager"):
        out = guided_eps_fn(m, zh, region, torch.tensor([1]), compile=True)(z, t)
    with torch.no_grad():
        ref = m(z, t, zh, region, torch.tensor([1]))
        # prepare + forward_prepared splits the input conv in two (const part precomputed): reordered sums
        torch.testing.assert_close(out, ref, rtol=0, atol=2 * pass_tol(m, ref))


def test_old_diffusion_checkpoints_are_refused(tmp_path):
    from nnunet_promptlesion.generator.diffusion.checkpoint import load_diffusion
    from nnunet_promptlesion.utils.checkpoint import CheckpointError, config_to_dict, save_checkpoint

    m = _tiny_model()
    cfg = config_to_dict(m.config)
    old = {"kind": "promptlesion_diffusion", "config": {**cfg, "latent_size": [8, 8, 8]}, "vocabulary": {}}
    save_checkpoint({"meta": old, "model": m.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 1.*retrain"):
        load_diffusion(tmp_path / "old.pt")


def test_bf16_denoiser_inpaints_with_weights_cast_once():
    from nnunet_promptlesion.generator.diffusion.checkpoint import resolve_dtype
    from nnunet_promptlesion.generator.diffusion.inpaint import blend_weights, inpaint_lesions

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    vq = _tiny_vqgan()
    m = _tiny_model("mask").to(torch.bfloat16)
    img, mask, parent = _lesion_batch(2)
    out = inpaint_lesions(vq, m, img, mask, torch.tensor([1, 2]), steps=2, guidance=2.0, parent_mask=parent,
                          generator=torch.Generator().manual_seed(0), vae_chunk=1)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    _, support = blend_weights(mask, 1.0)
    assert torch.equal(out[~support], img[~support]) and (out[mask > 0] - img[mask > 0]).abs().max() > 1e-3
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())  # no per-call re-cast of the weights
