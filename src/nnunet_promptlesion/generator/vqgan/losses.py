"""VQGAN losses: L1, commitment, slice perceptual, 3D + 2D adversarial (MONAI PatchAdversarialLoss) and
discriminator feature matching.

Generator: ``l1_weight * |x - x_hat| + commitment + perceptual_weight * P`` and, from ``disc_start`` on,
``gan3d_weight * G3 + gan2d_weight * G2 + feature_matching_weight * FM`` where FM is the mean L1 distance
between the discriminators' intermediate features of real and reconstructed inputs (real detached).
Discriminator (from ``disc_start``): the adversarial loss on real vs detached reconstructions for both
discriminators, hinge or least squares (``VQGANConfig.adversarial_criterion``). A 2D model has no volume
discriminator: its G3 / D3 terms are absent (not logged) and the 2D discriminator sees the whole slice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn

from .config import VQGANConfig
from .perceptual import SlicePerceptualLoss


def feature_matching(real_feats: list[torch.Tensor], fake_feats: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.l1_loss(f, r.detach()) for r, f in zip(real_feats, fake_feats)]).mean()


class VQGANLoss(nn.Module):
    def __init__(self, cfg: VQGANConfig, perceptual: SlicePerceptualLoss):
        super().__init__()
        self.cfg = cfg
        self.perceptual = perceptual
        self.adv = PatchAdversarialLoss(criterion=cfg.adversarial_criterion, reduction="mean")

    def adversarial_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start

    def generator(self, x, recon, commitment, discs, slice_idx, step: int) -> tuple[torch.Tensor, dict]:
        """Total generator loss and a dict of float components. ``discs``: the (unwrapped) discriminators."""
        c = self.cfg
        l1 = F.l1_loss(recon.float(), x.float())
        total = c.l1_weight * l1 + commitment
        logs = {"l1": float(l1.detach()), "commitment": float(commitment.detach())}
        if c.perceptual_weight > 0:
            p = self.perceptual(x, recon, slice_idx)
            total = total + c.perceptual_weight * p
            logs["perceptual"] = float(p.detach())
        if self.adversarial_active(step):
            with torch.no_grad():
                real = discs(x, slice_idx)
            fake = discs(recon, slice_idx)
            g2 = torch.stack([self.adv(f[0], target_is_real=True, for_discriminator=False) for f in fake["2d"]]).mean()
            fm2 = torch.stack([feature_matching(r[1], f[1]) for r, f in zip(real["2d"], fake["2d"])]).mean()
            if fake["3d"] is not None:
                g3 = self.adv(fake["3d"][0], target_is_real=True, for_discriminator=False)
                fm = feature_matching(real["3d"][1], fake["3d"][1]) + fm2
                total = total + c.gan3d_weight * g3 + c.gan2d_weight * g2 + c.feature_matching_weight * fm
                logs["g_adv3d"] = float(g3.detach())
            else:
                fm = fm2
                total = total + c.gan2d_weight * g2 + c.feature_matching_weight * fm
            logs.update(g_adv2d=float(g2.detach()), feature_matching=float(fm.detach()))
        logs["g_total"] = float(total.detach())
        return total, logs

    def discriminator(self, x, recon, discs, slice_idx) -> tuple[torch.Tensor, dict]:
        real = discs(x, slice_idx)
        fake = discs(recon.detach(), slice_idx)
        d2 = torch.stack([
            0.5 * (self.adv(r[0], target_is_real=True, for_discriminator=True)
                   + self.adv(f[0], target_is_real=False, for_discriminator=True))
            for r, f in zip(real["2d"], fake["2d"])]).mean()
        total = self.cfg.gan2d_weight * d2
        logs = {"d_2d": float(d2.detach())}
        if real["3d"] is not None:
            d3 = 0.5 * (self.adv(real["3d"][0], target_is_real=True, for_discriminator=True)
                        + self.adv(fake["3d"][0], target_is_real=False, for_discriminator=True))
            total = self.cfg.gan3d_weight * d3 + total
            logs["d_3d"] = float(d3.detach())
        logs["d_total"] = float(total.detach())
        return total, logs
