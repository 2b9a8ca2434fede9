"""DDPM noise schedule (linear betas, epsilon prediction).

With T = 400 and the DDPM betas 1e-4..2e-2 the schedule ends at alpha_bar_T = 0.0175: sampling from
pure noise would then start from a distribution the model never saw. The betas are therefore scaled
by 1000 / T (improved DDPM): at T = 400 they run 2.5e-4..5e-2 and alpha_bar_T is ~4e-5.
All tensors are float32, indexed by the timestep t in [0, T-1] (t = 0 the least noisy).
"""
from __future__ import annotations

import torch

from .config import DiffusionConfig


class NoiseSchedule:
    """betas, alphas, alpha_bar and DDPM posterior coefficients for ``T`` steps."""

    def __init__(self, timesteps: int = 400, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 scale_betas_to_1000: bool = True, device: torch.device | str = "cpu"):
        if timesteps < 2:
            raise ValueError("the noise schedule needs at least 2 timesteps")
        self.T = int(timesteps)
        scale = 1000.0 / self.T if scale_betas_to_1000 else 1.0
        b0, b1 = beta_start * scale, beta_end * scale
        if not 0 < b0 < b1 < 1:
            raise ValueError(f"scaled betas must satisfy 0 < start < end < 1, got {b0}, {b1}")
        betas = torch.linspace(b0, b1, self.T, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self._f64 = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": abar,
            "alpha_bar_prev": abar_prev,
            # q(z_{t-1} | z_t, z_0) variance; the first entry is 0 (no noise at the last reverse step)
            "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
        }
        self.to(device)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, device="cpu") -> "NoiseSchedule":
        return cls(cfg.timesteps, cfg.beta_start, cfg.beta_end, cfg.scale_betas_to_1000, device)

    def to(self, device) -> "NoiseSchedule":
        self.device = torch.device(device)
        for k, v in self._f64.items():
            setattr(self, k, v.to(device=self.device, dtype=torch.float32))
        return self

    def as_dict(self) -> dict:
        return {"timesteps": self.T, "alpha_bar_T": float(self._f64["alpha_bar"][-1]),
                "beta_first": float(self._f64["betas"][0]), "beta_last": float(self._f64["betas"][-1])}

    @staticmethod
    def _bcast(v: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return v[t].reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise; ``t`` is a (B,) long tensor."""
        ab = self._bcast(self.alpha_bar, t, z0.ndim)
        return ab.sqrt() * z0 + (1.0 - ab).sqrt() * noise

    def predict_x0(self, zt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self._bcast(self.alpha_bar, t, zt.ndim)
        return (zt - (1.0 - ab).sqrt() * eps) / ab.sqrt()

    def sample_timesteps(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.T, (n,), device=device, generator=generator)
