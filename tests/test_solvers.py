"""The few-step solvers (diffusers' DPM-Solver++ 2M and UniPC on our noise schedule) solve the right ODE.

With Gaussian data x0 ~ N(mu, sd^2) the optimal denoiser is known in closed form and the probability-flow ODE maps
z_T to x0 = mu + sd * (z_T - sqrt(abar_T) mu) / sqrt(abar_T sd^2 + 1 - abar_T). A solver that is wired to our
betas with the wrong timestep convention, or misses a factor, does not converge to that map.
"""
from __future__ import annotations

import pytest
import torch

from nnunet_promptlesion.generator.diffusion.samplers import SAMPLERS, sample
from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule

MU, SD = 0.3, 0.5


def _oracle(s: NoiseSchedule):
    def eps_fn(z, t):
        ab = s.alpha_bar[t].reshape(-1, *([1] * (z.ndim - 1)))
        return (1 - ab).sqrt() * (z - ab.sqrt() * MU) / (ab * SD**2 + 1 - ab)
    return eps_fn


def _exact(s: NoiseSchedule, z_T: torch.Tensor) -> torch.Tensor:
    ab = s._f64["alpha_bar"][-1]
    return MU + SD * (z_T.double() - ab.sqrt() * MU) / (ab * SD**2 + 1 - ab).sqrt()


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_solver_converges_to_the_probability_flow_map_faster_than_ddim(solver):
    s = NoiseSchedule(400)
    z_T = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = _exact(s, z_T)

    def err(name, steps):
        return float((sample(_oracle(s), s, z_T, name, steps).double() - exact).abs().mean())

    # discretisation error, not round-off, dominates at these step counts (float32 round-off ~1e-6 here):
    # a second-order solver gains ~(50/20)^2 = 6x from 20 to 50 steps, DDIM (first order) ~2.5x
    e20, e50 = err(solver, 20), err(solver, 50)
    assert e50 < e20 / 4
    assert e50 < err("ddim", 50) / 4
    assert e50 < 5e-3


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_solver_inpainting_keeps_the_known_latent_and_is_deterministic(solver):
    s = NoiseSchedule(400)
    z_T = torch.randn(2, 3, 6, 6, 6, generator=torch.Generator().manual_seed(1))
    known = torch.randn(2, 3, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(2, 1, 6, 6, 6)
    keep[..., :3] = 1
    a = sample(_oracle(s), s, z_T, solver, 10, generator=torch.Generator().manual_seed(3), known=known, keep=keep)
    b = sample(_oracle(s), s, z_T, solver, 10, generator=torch.Generator().manual_seed(3), known=known, keep=keep)
    assert torch.equal(a, b)
    assert torch.equal(a[..., :3], known[..., :3])
    assert torch.isfinite(a).all()


def test_solver_refuses_bad_step_counts_and_names():
    s = NoiseSchedule(400)
    z = torch.zeros(1, 1, 2, 2)
    assert "dpmpp" in SAMPLERS and "unipc" in SAMPLERS
    with pytest.raises(ValueError, match="step count"):
        sample(_oracle(s), s, z, "dpmpp", 400)
    with pytest.raises(ValueError, match="step count"):
        sample(_oracle(s), s, z, "unipc", -1)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(_oracle(s), s, z, "heun", 10)
