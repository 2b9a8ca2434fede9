"""Batched reverse-diffusion samplers: DDPM ancestral (all T steps), DDIM (any step count, eta) and two
few-step multistep ODE solvers from diffusers (DPM-Solver++ 2M, UniPC).

A sampler only needs an ``eps_fn(z_t, t) -> eps`` with ``z_t`` (B, C, D, H, W) and ``t`` a (B,) long
tensor, so the same code runs the trained denoiser (:func:`guided_eps_fn`, classifier-free guidance),
and oracle predictors in the tests. Optional latent inpainting (``known`` + ``keep``): after every step
the region where ``keep`` is 1 is replaced by the known latent noised to that step (exactly the known
latent after the last step), so only the region ``keep == 0`` is generated.

Everything per step runs on the latents' device as whole-batch tensor operations; random numbers come
from the caller's ``torch.Generator`` (on that device) so results are reproducible. ``generator`` may also
be a sequence of generators, one per batch row: every row then draws its noise from its own stream, so a
row rendered alone with its generator seeded the same gets the same noise as inside any batch.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from .sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, SOLVERS  # noqa: F401 (re-exported)
from .schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def randn_rows(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...); with a sequence of B generators row i comes from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {shape[0]} rows: pass one per row (or one in all)")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in gens])


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    return randn_rows(x.shape, generator, x.device, x.dtype)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """Descending, evenly spaced timesteps in [0, T-1] (always containing T-1 and 0)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM step count must lie in [1, {T}], got {steps}")
    if steps == 1:
        return [T - 1]
    ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().unique().tolist()
    return sorted(ts, reverse=True)


def _keep_known(z: torch.Tensor, t_prev: int, schedule: NoiseSchedule, known: torch.Tensor | None,
                keep: torch.Tensor | None, generator) -> torch.Tensor:
    if known is None:
        return z
    if t_prev < 0:
        ref = known
    else:
        tt = torch.full((z.shape[0],), t_prev, device=z.device, dtype=torch.long)
        ref = schedule.q_sample(known, tt, _randn_like(known, generator))
    return torch.where(keep > 0.5, ref, z)


def _clip_x0(z: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor, clip: float | None):
    """x0 prediction (optionally clipped to [-clip, clip]) and the eps consistent with it."""
    x0 = (z - (1.0 - abar).sqrt() * eps) / abar.sqrt()
    if clip is None or clip <= 0:
        return x0, eps
    x0 = x0.clamp(-clip, clip)
    return x0, (z - abar.sqrt() * x0) / (1.0 - abar).sqrt()


def ddpm_sample(eps_fn: EpsFn, schedule: NoiseSchedule, z_T: torch.Tensor, generator: "torch.Generator | Sequence[torch.Generator] | None" = None,
                known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """DDPM ancestral sampling through all T steps, starting from ``z_T`` (B, C, D, H, W).

    ``clip_x0``: clip the predicted clean latent to [-clip_x0, clip_x0] at every step (None = off). The
    latents are normalised to [-1, 1] by the codebook range and snapped to the codebook at decode, so 1.0
    only removes excursions an imperfect model would amplify by 1/sqrt(alpha_bar_t) (~165 at t = T-1).
    """
    z = z_T
    b = z.shape[0]
    it = range(schedule.T - 1, -1, -1)
    if progress:
        it = tqdm(it, desc="DDPM", leave=False)
    for t in it:
        tt = torch.full((b,), t, device=z.device, dtype=torch.long)
        eps = eps_fn(z, tt).to(z.dtype)
        beta, alpha, abar = schedule.betas[t], schedule.alphas[t], schedule.alpha_bar[t]
        if clip_x0:
            _, eps = _clip_x0(z, eps, abar, clip_x0)
        mean = (z - beta / (1.0 - abar).sqrt() * eps) / alpha.sqrt()
        if t > 0:
            z = mean + schedule.posterior_variance[t].sqrt() * _randn_like(z, generator)
        else:
            z = mean
        z = _keep_known(z, t - 1, schedule, known, keep, generator)
    return z


def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, z_T: torch.Tensor, steps: int = 50, eta: float = 0.0,
                generator: "torch.Generator | Sequence[torch.Generator] | None" = None, known: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """DDIM sampling with ``steps`` model evaluations; ``eta`` = 0 deterministic, 1 DDPM-like noise.

    ``clip_x0`` as in :func:`ddpm_sample`.
    """
    z = z_T
    b = z.shape[0]
    ts = ddim_timesteps(schedule.T, steps)
    pairs = list(zip(ts, ts[1:] + [-1]))
    if progress:
        pairs = tqdm(pairs, desc=f"DDIM{steps}", leave=False)
    one = torch.ones((), device=z.device)
    for t, t_prev in pairs:
        tt = torch.full((b,), t, device=z.device, dtype=torch.long)
        eps = eps_fn(z, tt).to(z.dtype)
        abar = schedule.alpha_bar[t]
        abar_prev = schedule.alpha_bar[t_prev] if t_prev >= 0 else one
        x0, eps = _clip_x0(z, eps, abar, clip_x0)
        sigma = eta * ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)).clamp(min=0).sqrt()
        z = abar_prev.sqrt() * x0 + (1.0 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            z = z + sigma * _randn_like(z, generator)
        z = _keep_known(z, t_prev, schedule, known, keep, generator)
    return z


def _solver_scheduler(name: str, schedule: NoiseSchedule, steps: int):
    """A diffusers multistep scheduler configured with this schedule's betas, its timesteps set for ``steps``."""
    # diffusers costs 1-3 s to import: only pay it when a few-step solver is asked for
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    # at steps == T diffusers' last interval ends at sigma 0 twice and returns NaN
    if not 1 <= steps < schedule.T:
        raise ValueError(f"{name} step count must lie in [1, {schedule.T - 1}], got {steps}")
    common = dict(num_train_timesteps=schedule.T, trained_betas=schedule._f64["betas"].numpy(),
                  prediction_type="epsilon", timestep_spacing="linspace", final_sigmas_type="zero",
                  solver_order=2, lower_order_final=True)
    if name == "dpmpp":
        s = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++")
    elif name == "unipc":
        s = UniPCMultistepScheduler(**common, predict_x0=True)
    else:
        raise ValueError(f"unknown solver '{name}', choose one of {SOLVERS}")
    s.set_timesteps(steps)
    return s


def solver_sample(eps_fn: EpsFn, schedule: NoiseSchedule, z_T: torch.Tensor, solver: str = "dpmpp", steps: int = 20,
                  generator: "torch.Generator | Sequence[torch.Generator] | None" = None,
                  known: torch.Tensor | None = None, keep: torch.Tensor | None = None, progress: bool = False,
                  clip_x0: float | None = None) -> torch.Tensor:
    """``steps`` denoiser evaluations of a multistep probability-flow ODE solver, from ``z_T`` (B, C, *spatial).

    Only the solver's update is diffusers' (used as a library, configured with this package's betas so that a
    timestep means what the denoiser was trained on); guidance, inpainting and per-row noise stay ours.
    Deterministic after ``z_T``: ``generator`` only noises ``known``. ``known``/``keep``/``clip_x0`` as in
    :func:`ddim_sample`.
    """
    sched = _solver_scheduler(solver, schedule, steps)
    ts = [int(t) for t in sched.timesteps]
    pairs = list(zip(ts, ts[1:] + [-1]))
    if progress:
        pairs = tqdm(pairs, desc=f"{solver}{steps}", leave=False)
    z = z_T
    b = z.shape[0]
    for t, t_next in pairs:
        tt = torch.full((b,), t, device=z.device, dtype=torch.long)
        eps = eps_fn(z, tt).to(z.dtype)
        if clip_x0:
            _, eps = _clip_x0(z, eps, schedule.alpha_bar[t], clip_x0)
        z = sched.step(eps, t, z).prev_sample.to(z.dtype)
        z = _keep_known(z, t_next, schedule, known, keep, generator)
    return z


def sample(eps_fn: EpsFn, schedule: NoiseSchedule, z_T: torch.Tensor, sampler: str = "ddim", steps: int | None = None,
           eta: float = 0.0, generator: "torch.Generator | Sequence[torch.Generator] | None" = None, known: torch.Tensor | None = None,
           keep: torch.Tensor | None = None, progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """Dispatch to :func:`ddpm_sample` (``steps`` must be None or T), :func:`ddim_sample` or :func:`solver_sample`."""
    if sampler == "ddpm":
        if steps not in (None, schedule.T):
            raise ValueError(f"DDPM runs all {schedule.T} steps; use --sampler ddim for {steps} steps")
        return ddpm_sample(eps_fn, schedule, z_T, generator, known, keep, progress, clip_x0)
    if sampler == "ddim":
        return ddim_sample(eps_fn, schedule, z_T, steps or 50, eta, generator, known, keep, progress, clip_x0)
    if sampler in SOLVERS:
        return solver_sample(eps_fn, schedule, z_T, sampler, steps or 20, generator, known, keep, progress, clip_x0)
    raise ValueError(f"unknown sampler '{sampler}', choose one of {SAMPLERS}")


def cfg_combine(eps_cond: torch.Tensor, eps_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_null + scale * (eps_cond - eps_null); scale 1 is the conditional prediction."""
    return eps_null + scale * (eps_cond - eps_null)


def batch_bucket(n: int) -> int:
    """Smallest power of two >= ``n``: the batch sizes a compiled denoiser is traced for."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    return 1 << (int(n) - 1).bit_length()


def _pad_rows(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``x`` (B, ...) followed by ``n - B`` copies of its first row (real inputs: no NaN/inf from padding)."""
    if x is None or x.shape[0] == n:
        return x
    return torch.cat([x, x[:1].expand(n - x.shape[0], *x.shape[1:])])


def check_guidance(model: torch.nn.Module, guidance_scale: float, null_prompt: int | None = None) -> None:
    """Refuse classifier-free guidance with a null token the model never trained (prompt dropout 0)."""
    cfg = getattr(model, "config", None)
    if guidance_scale == 1.0 or cfg is None or null_prompt not in (None, cfg.null_id):
        return
    if float(getattr(cfg, "prompt_dropout", 0.0)) <= 0.0:
        raise ValueError(
            f"guidance {guidance_scale} needs the model's null token, but this model was trained without prompt "
            f"dropout (prompt_dropout = {cfg.prompt_dropout}), so its null token is untrained and the guided "
            "prediction would be noise. Sample with guidance 1.0, or train with prompt dropout > 0 "
            "(e.g. --prompt-dropout 0.1) to use guidance.")


def guided_eps_fn(model: torch.nn.Module, z_healthy: torch.Tensor, region: torch.Tensor, prompt_ids: torch.Tensor,
                  guidance_scale: float = 1.0, null_prompt: int | None = None, autocast=None,
                  always_batch_null: bool = False, parent: torch.Tensor | None = None,
                  compile: bool | str = False, pad_batch: bool | None = None,
                  attributes: torch.Tensor | None = None) -> EpsFn:
    """An ``eps_fn`` for the denoiser with fixed conditioning and classifier-free guidance.

    The step-invariant conditioning (prompt encoder, PromptGenBlock bases, constant input channels) is
    computed here, once, with :meth:`PromptLesionUNet.prepare`; each call runs one
    :meth:`~PromptLesionUNet.forward_prepared`. With ``guidance_scale`` == 1 only the conditional pass runs
    (identical to the conditional prediction); otherwise conditional and null prompts run as one doubled
    batch per step. ``null_prompt`` defaults to the model's CFG null token (``config.null_id``), never the
    healthy prompt. ``compile`` (True, or a torch.compile mode such as "reduce-overhead" for CUDA graphs) uses
    :func:`compiled_step` (torch.compile of the fixed-shape step, eager fallback when compilation fails).

    ``pad_batch`` (default: on when compiling) pads the batch to :func:`batch_bucket` rows (copies of row 0,
    results dropped), so a compiled step sees a few batch sizes (1, 2, 4, 8, ...) instead of one graph per
    batch size a producer happens to send. Rows do not interact in the denoiser, so the real rows' outputs
    equal the unpadded ones up to rounding.

    ``attributes`` (B, A) long: attribute bins of a model with attribute prompts (0 = null; None = all null). The
    unconditional pass of CFG uses the null prompt *and* null attributes, so guidance pushes towards the class and
    the requested bins together.

    Raises ValueError for ``guidance_scale`` != 1 with a model trained without prompt dropout (its null
    token never trained), see :func:`check_guidance`.
    """
    check_guidance(model, guidance_scale, null_prompt)
    if null_prompt is None:
        null_prompt = model.config.null_id
    use_null = always_batch_null or guidance_scale != 1.0
    ctx = autocast if autocast is not None else contextlib.nullcontext
    b = prompt_ids.shape[0]
    n = batch_bucket(b) if (compile if pad_batch is None else pad_batch) else b
    if attributes is not None:
        attributes = attributes.to(prompt_ids.device).long()
    z_healthy, region, prompt_ids, parent, attributes = (_pad_rows(x, n) for x in
                                                         (z_healthy, region, prompt_ids, parent, attributes))
    # only models with attribute prompts take the keyword (stand-in models in tests and older callers do not)
    akw = (lambda a: {}) if attributes is None else (lambda a: {"attributes": a})
    with ctx(), torch.no_grad():
        if use_null:
            null = torch.full_like(prompt_ids, null_prompt)
            two = (lambda x: None if x is None else torch.cat([x, x]))
            both = None if attributes is None else torch.cat([attributes, torch.zeros_like(attributes)])
            cond = model.prepare(two(z_healthy), two(region), torch.cat([prompt_ids, null]), two(parent), **akw(both))
        else:
            cond = model.prepare(z_healthy, region, prompt_ids, parent, **akw(attributes))
    step = compiled_step(model, compile if isinstance(compile, str) else None) if compile else model.forward_prepared

    def eps_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z_t, t = _pad_rows(z_t, n), _pad_rows(t, n)
        with ctx():
            if not use_null:
                return step(z_t, t, cond).float()[:b]
            out = step(torch.cat([z_t, z_t]), torch.cat([t, t]), cond).float()
        c, u = out.chunk(2)
        return cfg_combine(c[:b], u[:b], guidance_scale)

    return eps_fn


def compiled_step(model: torch.nn.Module, mode: str | None = None) -> Callable:
    """``model.forward_prepared`` through ``torch.compile`` (cached on the model per mode), falling back to eager.

    ``mode`` is torch.compile's: None (default inductor, static shapes: one graph per batch / latent shape) or
    "reduce-overhead" (adds CUDA graphs: the whole step replays as one graph, no per-kernel launch cost; the
    fast path for small batches on a GPU). The first call compiles (tens of seconds), so it pays off for long
    runs (DDPM-400, a training-time producer); a failure at any call to the compiled function (no compiler,
    unsupported op) is reported once as a warning and the eager step is used from then on.
    """

    cache = model.__dict__.setdefault("_promptlesion_compiled", {})
    fn = cache.get(mode)
    if fn is None:
        try:
            fn = torch.compile(model.forward_prepared, dynamic=False, mode=mode)
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            warnings.warn(f"torch.compile unavailable ({e}); using the eager denoiser", RuntimeWarning)
            fn = model.forward_prepared
        cache[mode] = fn
    eager = model.forward_prepared
    state = {"ok": fn is not eager}

    def step(z_t, t, cond):
        if state["ok"]:
            try:
                return fn(z_t, t, cond)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"compiled denoiser failed ({type(e).__name__}: {e}); falling back to eager", RuntimeWarning)
                state["ok"] = False
                cache[mode] = eager
        return eager(z_t, t, cond)

    return step
