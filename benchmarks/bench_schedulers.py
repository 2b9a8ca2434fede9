"""Our DDPM/DDIM (generator/diffusion/schedule.py, samplers.py) against MONAI's DDPMScheduler/DDIMScheduler.

Correctness: alpha_bar and whole sampling chains (same eps function, same noise, clip off) against a float64
reference of the textbook updates; whether MONAI's DDIM update targets the timestep it evaluates next.
Speed: wall time per reverse step on a latent batch (B, 8, 24, 24, 24) with a free eps function (the sampler's
own cost, not the denoiser's).

    OMP_NUM_THREADS=1 python benchmarks/bench_schedulers.py [--batch 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from nnunet_promptlesion.generator.diffusion.samplers import ddim_sample, ddim_timesteps, ddpm_sample
from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule

T = 400


def eps_fn(z, t):
    """A smooth, state-dependent stand-in for a denoiser (the oracle would hide timestep mistakes)."""
    return 0.8 * torch.tanh(z) + 0.01 * t.reshape(-1, *([1] * (z.ndim - 1))).to(z.dtype) / T


def monai_schedulers(s: NoiseSchedule):
    b = s._f64["betas"]
    kw = dict(num_train_timesteps=T, schedule="linear_beta", beta_start=float(b[0]), beta_end=float(b[-1]), clip_sample=False)
    return DDPMScheduler(**kw), DDIMScheduler(**kw, set_alpha_to_one=True)


def ref_ddpm(s, zT, noises):
    b, a, ab = (s._f64[k] for k in ("betas", "alphas", "alpha_bar"))
    z = zT.double()
    for i, t in enumerate(range(T - 1, -1, -1)):
        e = eps_fn(z, torch.full((z.shape[0],), t)).double()
        z = (z - b[t] / (1 - ab[t]).sqrt() * e) / a[t].sqrt()
        if t > 0:
            z = z + s._f64["posterior_variance"][t].sqrt() * noises[i].double()
    return z


def ref_ddim(s, zT, ts):
    ab = s._f64["alpha_bar"]
    z = zT.double()
    for t, tp in zip(ts, ts[1:] + [-1]):
        e = eps_fn(z, torch.full((z.shape[0],), t)).double()
        abp = ab[tp] if tp >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = (z - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        z = abp.sqrt() * x0 + (1 - abp).sqrt() * e
    return z


def monai_ddpm(sch, zT, seed):
    g = torch.Generator().manual_seed(seed)
    z = zT
    for t in range(T - 1, -1, -1):
        z, _ = sch.step(eps_fn(z, torch.full((z.shape[0],), t)), t, z, generator=g)
    return z


def monai_ddim(sch, zT, steps):
    sch.set_timesteps(steps)
    z = zT
    for t in sch.timesteps.tolist():
        z, _ = sch.step(eps_fn(z, torch.full((z.shape[0],), t)), t, z, eta=0.0)
    return z


def timed(fn, repeats):
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    s = NoiseSchedule(T)
    ddpm_m, ddim_m = monai_schedulers(s)
    ab64 = s._f64["alpha_bar"]
    rel = lambda x: float(((x.double() - ab64) / ab64).abs().max())
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"alpha_bar max relative error vs float64: ours {rel(s.alpha_bar):.2e}, MONAI {rel(ddpm_m.alphas_cumprod):.2e}")

    g = torch.Generator().manual_seed(0)
    zT = torch.randn(args.batch, 8, 24, 24, 24, generator=g)
    # the same noise stream for both: one randn of the latent shape per step t > 0, in the same order
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(zT.shape, generator=gen) for _ in range(T)]
    ref = ref_ddpm(s, zT, noises)
    ours = ddpm_sample(eps_fn, s, zT, generator=torch.Generator().manual_seed(1))
    theirs = monai_ddpm(ddpm_m, zT, 1)
    print(f"DDPM-{T} chain, max |error| vs float64: ours {float((ours - ref).abs().max()):.2e}, "
          f"MONAI {float((theirs - ref).abs().max()):.2e}")
    for steps in (T, 50):
        ts = ddim_timesteps(T, steps)
        ref = ref_ddim(s, zT, ts)
        ours = ddim_sample(eps_fn, s, zT, steps=steps)
        theirs = monai_ddim(ddim_m, zT, steps)
        print(f"DDIM-{steps} chain, max |error| vs float64 on our timesteps: ours {float((ours - ref).abs().max()):.2e}, "
              f"MONAI {float((theirs - ref).abs().max()):.2e}")
    ddim_m.set_timesteps(50)
    mts = ddim_m.timesteps.tolist()
    wrong = sum(1 for t, nxt in zip(mts, mts[1:]) if t - T // 50 != nxt)
    print(f"DDIM-50: MONAI's update targets t - {T // 50} but evaluates next at another timestep in {wrong} of "
          f"{len(mts) - 1} steps; MONAI timesteps == ours: {mts == ddim_timesteps(T, 50)}")

    n = 50
    t_ours = timed(lambda: ddim_sample(eps_fn, s, zT, steps=n), args.repeats)
    t_monai = timed(lambda: monai_ddim(ddim_m, zT, n), args.repeats)
    print(f"DDIM-{n} wall per step (batch {args.batch}, 8x24^3): ours {1e3 * t_ours / n:.2f} ms, MONAI {1e3 * t_monai / n:.2f} ms")
    t_ours = timed(lambda: ddpm_sample(eps_fn, s, zT, generator=torch.Generator().manual_seed(1)), 1)
    t_monai = timed(lambda: monai_ddpm(ddpm_m, zT, 1), 1)
    print(f"DDPM-{T} wall per step: ours {1e3 * t_ours / T:.2f} ms, MONAI {1e3 * t_monai / T:.2f} ms")


if __name__ == "__main__":
    main()
