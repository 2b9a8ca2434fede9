"""Generator numerics (issue 16): encoder reach and the train/sample context, per-request seeds, batch
padding for the compiled sampler, guidance refusal, healthy crops, no per-step host syncs; and our DDPM/DDIM
against MONAI's schedulers (issue 17 item 7).

Float tolerances here and in the other numerics tests come from :func:`pass_tol` / :func:`eps`: the dtype's
machine epsilon times the magnitudes and the reduction lengths involved, never a value that happened to pass.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnunet_promptlesion.generator.diffusion.config import DiffusionConfig
from nnunet_promptlesion.generator.diffusion.inpaint import dilate, encode_inputs, generate_latents, latent_region
from nnunet_promptlesion.generator.diffusion.samplers import (batch_bucket, ddim_sample, ddim_timesteps, ddpm_sample,
                                                                guided_eps_fn, randn_rows)
from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet
from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

torch.set_num_threads(1)
CUDA = torch.cuda.is_available()


# ---- tolerance helpers (imported by the other numerics tests) -------------------------------------------
def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float32: 1.19e-7, float64: 2.2e-16, bfloat16: 7.8e-3)."""
    return torch.finfo(dtype).eps


def max_fan_in(model: torch.nn.Module) -> int:
    """Longest reduction of one output element in any conv / linear layer (in_channels x kernel volume)."""
    return max(m.weight[0].numel() for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)))


def pass_tol(model: torch.nn.Module, *outputs: torch.Tensor) -> float:
    """Bound on the difference of one forward pass computed two ways (batched vs unbatched, another BLAS or
    thread count): eps(dtype) * sqrt(longest reduction) * the largest output magnitude. The sqrt is the
    statistical growth of rounding over a reordered sum of that length (Higham & Mary 2019)."""
    y = max(float(o.abs().max()) for o in outputs)
    return eps(outputs[0].dtype) * math.sqrt(max_fan_in(model)) * y


def tiny_denoiser(seed=0, dtype=torch.float32, **kw) -> PromptLesionUNet:
    torch.manual_seed(seed)
    cfg = DiffusionConfig.tiny(num_classes=2, channels=(16, 32, 32), **kw)
    m = PromptLesionUNet(cfg).eval()
    for mod in m.modules():  # zero-initialised output convs would hide the conditioning in an untrained model
        if isinstance(mod, torch.nn.Conv3d):
            torch.nn.init.normal_(mod.weight, std=0.05)
    return m.to(dtype)


# ---- encoder reach: the latent region is dilated so training and sampling see one context ---------------
def _conv_only_encoder(cfg: VQGANConfig) -> torch.nn.Module:
    """The VQGAN encoder with its convolutions only: GroupNorm -> identity, positive weights, zero biases, so an
    output is non-zero exactly where a (positive) input voxel reaches it."""
    enc = VQGAN(cfg).encoder.double().eval()
    for name, mod in list(enc.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(mod, cname, torch.nn.Identity())
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(p.abs() + 0.01) if p.ndim > 1 else p.zero_()
    return enc


@pytest.mark.parametrize("overrides", [{}, {"num_res_blocks": (2, 1, 1)}, {"channels": (8, 16), "num_res_blocks": (1, 2)}])
def test_encoder_reach_matches_a_probe_of_the_encoder(overrides):
    cfg = VQGANConfig.tiny(**overrides)
    f, reach = cfg.downsample_factor, cfg.encoder_reach
    enc = _conv_only_encoder(cfg)
    n = 2 * (reach + 3) + 1  # latent cells along the probed axis: room for the reach on both sides of cell c
    c = n // 2
    # a one-cell-thick slab: the convolutions treat the three axes alike, so the reach along the first axis is
    # the reach (zero padding across the slab only removes paths, never the straight ones along the axis)
    x = torch.zeros(f, 1, n * f, f, f, dtype=torch.float64)
    for k in range(f):  # one probe per voxel position inside the centre cell
        x[k, 0, c * f + k, k, k] = 1.0
    with torch.no_grad():
        hit = enc(x).abs().amax((1, 3, 4)) > 0  # (f, n): latent cells along the axis each voxel reaches
    idx = torch.nonzero(hit)[:, 1]
    assert int((idx - c).abs().max()) == reach


def _healthy_and_lesion_images(n_lat=20, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    healthy = torch.rand(1, 1, n_lat * f, n_lat * f, n_lat * f, generator=g) * 2 - 1
    mask = torch.zeros_like(healthy)
    mask[..., 22:30, 24:31, 23:29] = 1  # a lesion of ~2 latent cells near one side of the patch
    lesion = torch.where(mask > 0.5, torch.rand(healthy.shape, generator=g) * 2 - 1, healthy)
    return healthy, lesion, mask


def test_training_and_sampling_see_the_same_latent_context():
    """Training sees the latent of the lesion image, sampling the carrier's (healthy) latent: they must be the same
    wherever the sampler keeps the carrier, i.e. outside ``generate``. With GroupNorm's global statistics set
    aside (identity norms), the two latents are equal there to the last bit, and differ in the ring between the
    latent region and ``generate`` (so keeping the carrier outside the undilated region gave another context)."""
    cfg = VQGANConfig.tiny()
    vq = VQGAN(cfg).eval()
    for name, mod in list(vq.encoder.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(mod, cname, torch.nn.Identity())
    healthy, lesion, mask = _healthy_and_lesion_images()
    with torch.no_grad():
        train = encode_inputs(vq, lesion, mask)
        sample = encode_inputs(vq, healthy, mask)
    gen = train["generate"].expand_as(train["z"]) > 0.5
    assert torch.equal(train["generate"], sample["generate"])
    assert torch.equal(train["z"][~gen], sample["z"][~gen])  # same context outside the generated cells
    assert torch.equal(train["generate"], dilate(train["region"], cfg.encoder_reach).float())
    assert (~gen).any()  # the test patch leaves cells beyond the reach
    ring = (gen & ~(train["region"].expand_as(train["z"]) > 0.5))
    # the lesion reaches cells well beyond the region: the undilated keep mask would mix contexts
    diff = (train["z"] - sample["z"]).abs()
    assert float(diff[ring].max()) > 1e-3
    far = dilate(train["region"], cfg.encoder_reach - 1).expand_as(diff) > 0.5
    assert float(diff[gen & ~far].max()) > 0  # even the outermost ring of the reach is reached


def test_sampler_keeps_the_carrier_only_outside_the_dilated_region():
    vq = VQGAN(VQGANConfig.tiny()).eval()
    healthy, _, mask = _healthy_and_lesion_images(n_lat=16)
    m = tiny_denoiser()
    with torch.no_grad():
        enc = encode_inputs(vq, healthy, mask)
        z0 = generate_latents(m, NoiseSchedule(400), enc["z"], enc["region"], torch.tensor([1]), steps=2,
                              generator=torch.Generator().manual_seed(0), context=enc["context"],
                              generate=enc["generate"])
    gen = enc["generate"].expand_as(z0) > 0.5
    assert torch.equal(z0[~gen], enc["z"][~gen])
    assert not torch.allclose(z0[gen], enc["z"][gen])  # the ring is generated, not copied


# ---- a lesion's recorded seed reproduces it --------------------------------------------------------------
def test_per_row_generators_draw_the_same_noise_alone_and_in_a_batch():
    seeds = [11, 22, 33]
    batch = randn_rows((3, 2, 4), [torch.Generator().manual_seed(s) for s in seeds], "cpu")
    for i, s in enumerate(seeds):
        assert torch.equal(batch[i:i + 1], randn_rows((1, 2, 4), torch.Generator().manual_seed(s), "cpu"))
    with pytest.raises(ValueError, match="one per row"):
        randn_rows((3, 2), [torch.Generator()], "cpu")


def test_recorded_seed_reproduces_a_lesion_rendered_inside_a_batch():
    """Re-rendering one request alone from its recorded seed gives the lesion it got inside a batch.

    In float64 the batched and the single denoiser pass differ only by rounding, bounded per pass by
    :func:`pass_tol`; a DDIM step multiplies an eps error by at most |sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar)
    / abar)| + 1 (the clip only shrinks it), so the bound below is pass_tol x the product of those factors over the
    steps. The old scheme (one generator for the batch, seeded from the first request) misses it by O(1)."""
    m = tiny_denoiser(dtype=torch.float64)
    s = NoiseSchedule(400)
    g = torch.Generator().manual_seed(5)
    z = torch.rand(3, 8, 6, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    region = torch.zeros(3, 1, 6, 6, 6, dtype=torch.float64)
    region[:, :, 1:4, 2:5, 2:4] = 1
    ids, seeds, steps = torch.tensor([1, 2, 1]), [101, 202, 303], 3
    kw = dict(steps=steps, clip_x0=1.0)
    with torch.no_grad():
        batched = generate_latents(m, s, z, region, ids, generator=[torch.Generator().manual_seed(q) for q in seeds], **kw)
        alone = generate_latents(m, s, z[1:2], region[1:2], ids[1:2], generator=torch.Generator().manual_seed(seeds[1]), **kw)
        old = generate_latents(m, s, z, region, ids, generator=torch.Generator().manual_seed(seeds[0]), **kw)
        eps_b = m(z, torch.full((3,), 399), (1 - region) * z, region, ids)
    gain = 1.0
    ts = ddim_timesteps(400, steps)
    for t, tp in zip(ts, ts[1:] + [-1]):
        ab, abp = float(s.alpha_bar[t]), (float(s.alpha_bar[tp]) if tp >= 0 else 1.0)
        gain *= abs(math.sqrt(1 - abp) - math.sqrt(abp * (1 - ab) / ab)) + 1.0
    tol = pass_tol(m, eps_b) * gain
    assert tol < 1e-6  # the bound is tight enough to tell reproduction from a different noise draw
    torch.testing.assert_close(alone[0], batched[1], rtol=0, atol=tol)
    assert float((old[1] - batched[1]).abs().max()) > 1e-2  # batch RNG: row 1's lesion depends on row 0's seed


# ---- compiled sampler: bounded set of batch shapes -------------------------------------------------------
def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_padding_to_a_bucket_gives_the_unpadded_rows(guidance):
    m = tiny_denoiser()
    g = torch.Generator().manual_seed(0)
    z, zh = torch.randn(3, 8, 6, 6, 6, generator=g), torch.randn(3, 8, 6, 6, 6, generator=g)
    region = torch.zeros(3, 1, 6, 6, 6)
    region[:, :, 2:4, 1:4, 2:5] = 1
    ids, t = torch.tensor([1, 2, 0]), torch.tensor([10, 200, 399])
    with torch.no_grad():
        plain = guided_eps_fn(m, zh, region, ids, guidance, pad_batch=False)(z, t)
        padded = guided_eps_fn(m, zh, region, ids, guidance, pad_batch=True)(z, t)
        cond = guided_eps_fn(m, zh, region, ids, 1.0, pad_batch=False)(z, t)
    assert padded.shape == plain.shape
    # guidance combines two passes: null + g (cond - null) -> each pass's rounding enters |g| + |g - 1| times
    k = abs(guidance) + abs(guidance - 1.0)
    torch.testing.assert_close(padded, plain, rtol=0, atol=k * pass_tol(m, plain, cond))


# ---- guidance without a trained null token --------------------------------------------------------------
def test_guidance_refused_for_a_model_trained_without_prompt_dropout():
    m = tiny_denoiser(prompt_dropout=0.0)
    zh, region = torch.zeros(1, 8, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="prompt dropout"):
        guided_eps_fn(m, zh, region, torch.tensor([1]), 2.0)
    with pytest.raises(ValueError, match="guidance 1.0"):
        generate_latents(m, NoiseSchedule(400), zh, region, torch.tensor([1]), steps=2, guidance=3.0)
    guided_eps_fn(m, zh, region, torch.tensor([1]), 1.0)  # no guidance: fine
    guided_eps_fn(tiny_denoiser(prompt_dropout=0.1), zh, region, torch.tensor([1]), 2.0)  # trained null token


# ---- healthy crops never hold a lesion ------------------------------------------------------------------
def _nifti_cases(folder, lesion_everywhere: bool):
    import nibabel as nib

    img_dir, lab_dir = folder / "images", folder / "labels"
    img_dir.mkdir(parents=True)
    lab_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.normal(40, 20, (40, 40, 40)).astype(np.float32)
        lab = np.zeros((40, 40, 40), np.int16)
        lab[4:36, 4:36, 4:36] = 1  # organ
        if lesion_everywhere:
            lab[::6, ::6, ::6] = 2  # lesion voxels on a 6-voxel lattice: every 16^3 crop holds some
        else:
            lab[18:22, 18:22, 18:22] = 2
        nib.save(nib.Nifti1Image(img, np.eye(4)), img_dir / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), lab_dir / f"case{i}.nii.gz")
    return img_dir, lab_dir


@pytest.mark.parametrize("lesion_everywhere", [True, False])
def test_healthy_crops_never_hold_a_lesion(tmp_path, lesion_everywhere):
    from nnunet_promptlesion.generator.data import NiftiPatchSource
    from nnunet_promptlesion.generator.diffusion.config import PromptVocabulary
    from nnunet_promptlesion.generator.diffusion.data import LesionCropSampler, NoHealthyCropError
    from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpec

    class Recording(NiftiPatchSource):  # the real source, remembering the random crops it handed out
        seen: list = []

        def random_patch(self, *a, **k):
            p = super().random_patch(*a, **k)
            self.seen.append(p)
            return p

    img_dir, lab_dir = _nifti_cases(tmp_path, lesion_everywhere)
    src = Recording(img_dir, label_folder=lab_dir)
    spec = LesionSpec([LesionClass("tumour", 2, [1], radius_mm=[(2.0, 3.0)])])
    sampler = LesionCropSampler(src, spec, PromptVocabulary.from_lesion_spec(spec), (16, 16, 16),
                                healthy_fraction=0.5, max_tries=5)
    rng = np.random.default_rng(0)
    crops = [sampler.sample(rng) for _ in range(30)]
    healthy = [c for c in crops if c.prompt == 0]
    for c in healthy:  # the crop handed out as healthy holds no lesion label
        (p,) = [p for p in src.seen if np.array_equal(p.image, c.image)][:1]
        assert not (p.seg == 2).any()
    if lesion_everywhere:
        assert not healthy and sampler.healthy_refused > 0  # refused and counted, never a lesion called healthy
        with pytest.raises(NoHealthyCropError, match="lesion-free"):
            sampler.healthy_crop(rng)
    else:
        assert healthy and sampler.healthy_refused == 0


# ---- our DDPM / DDIM against MONAI's schedulers (issue 17 item 7: keep ours only where a test shows why) ----
def _smooth_eps(z, t):  # a state-dependent stand-in for a denoiser (an oracle would hide timestep mistakes)
    return 0.8 * torch.tanh(z) + 0.01 * t.reshape(-1, 1, 1, 1, 1).to(z.dtype) / 400


def _monai(s: NoiseSchedule):
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    b = s._f64["betas"]
    kw = dict(num_train_timesteps=s.T, schedule="linear_beta", beta_start=float(b[0]), beta_end=float(b[-1]),
              clip_sample=False)
    return DDPMScheduler(**kw), DDIMScheduler(**kw, set_alpha_to_one=True)


def test_schedules_agree_with_monai_and_monai_ddim_targets_the_wrong_timestep():
    s = NoiseSchedule(400)
    ddpm_m, ddim_m = _monai(s)
    # the same linear (1000/T-scaled) schedule: MONAI's float32 cumprod drifts by up to T roundings
    ab64 = s._f64["alpha_bar"]
    assert float(((ddpm_m.alphas_cumprod.double() - ab64) / ab64).abs().max()) <= s.T * eps(torch.float32)
    assert float(((s.alpha_bar.double() - ab64) / ab64).abs().max()) <= eps(torch.float32)  # ours: one rounding
    # MONAI's DDIM uses prev = t - T // steps, but evaluates the model next at the following entry of its own
    # linspace(T - 1, 0, steps) list: the update aims at one noise level and the model is told another
    ddim_m.set_timesteps(50)
    mts = ddim_m.timesteps.tolist()
    assert mts == ddim_timesteps(400, 50)  # the same timesteps as ours ...
    assert any(t - 400 // 50 != nxt for t, nxt in zip(mts, mts[1:]))  # ... but inconsistent updates


def test_our_fp32_ddpm_chain_is_closer_to_float64_than_monais():
    """DDPM-400 with the same eps function and noise stream: MONAI forms x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)
    first (x165 at t = T-1 in fp32), ours the eps form of the same posterior mean."""
    s = NoiseSchedule(400)
    ddpm_m, _ = _monai(s)
    g = torch.Generator().manual_seed(0)
    zT = torch.randn(1, 8, 6, 6, 6, generator=g)
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(zT.shape, generator=gen) for _ in range(s.T)]
    b, a, ab, pv = (s._f64[k] for k in ("betas", "alphas", "alpha_bar", "posterior_variance"))
    ref = zT.double()
    for i, t in enumerate(range(s.T - 1, -1, -1)):  # float64 reference of the textbook update
        e = _smooth_eps(ref, torch.full((1,), t)).double()
        ref = (ref - b[t] / (1 - ab[t]).sqrt() * e) / a[t].sqrt() + (pv[t].sqrt() * noises[i].double() if t > 0 else 0)
    ours = ddpm_sample(_smooth_eps, s, zT, generator=torch.Generator().manual_seed(1))
    theirs, gm = zT, torch.Generator().manual_seed(1)
    for t in range(s.T - 1, -1, -1):
        theirs, _ = ddpm_m.step(_smooth_eps(theirs, torch.full((1,), t)), t, theirs, generator=gm)
    err_ours, err_monai = float((ours - ref).abs().max()), float((theirs - ref).abs().max())
    assert err_ours < err_monai


# ---- no per-step host synchronisation in diffusion training ----------------------------------------------
def _loss_inputs(device):
    vq = VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))).eval().to(device)
    m = tiny_denoiser().to(device).train()
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(2, 1, 24, 24, 24, generator=g) * 2 - 1).to(device)
    mask = torch.zeros_like(image)
    mask[0, :, 8:14, 9:15, 10:13] = 1  # the second sample has no lesion: its masked mean is 0 / 0
    batch = {"image": image, "mask": mask, "parent": mask.clone(), "prompt": torch.tensor([1, 0], device=device)}
    return vq, m, batch


def test_diffusion_loss_logs_stay_device_tensors_and_read_back_once():
    from nnunet_promptlesion.generator.diffusion.train import diffusion_loss
    from nnunet_promptlesion.generator.train_utils import host_values

    vq, m, batch = _loss_inputs("cpu")
    s = NoiseSchedule.from_config(m.config)
    loss, logs = diffusion_loss(m, vq, s, m.config, batch, "cpu", torch.Generator().manual_seed(0))
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in logs.values())
    vals = host_values({**logs, "step": 3})
    assert vals["step"] == 3 and all(isinstance(vals[k], float) for k in logs)
    assert vals["loss"] == float(loss.detach()) and math.isfinite(vals["mse_lesion"]) and math.isfinite(vals["mse_background"])


@pytest.mark.skipif(not CUDA, reason="host-sync check needs CUDA")
def test_diffusion_training_step_has_no_host_sync_on_cuda():
    from nnunet_promptlesion.generator.diffusion.train import diffusion_loss

    vq, m, batch = _loss_inputs("cuda")
    s = NoiseSchedule.from_config(m.config, "cuda")
    opt = torch.optim.Adam(m.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator("cuda").manual_seed(0)

    def step():
        loss, logs = diffusion_loss(m, vq, s, m.config, batch, "cuda", g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return logs

    step()  # warm-up (lazy initialisations may sync once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        logs = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logs["loss"])
