"""The VQGAN's discriminators (MONAI PatchDiscriminator, which returns its intermediate features).

3D model: ``disc3d`` sees whole patches (B, 1, D, H, W); ``disc2d`` sees one random slice per sample along
each of the three axes (axial, coronal, sagittal in array axis order), chosen by :func:`random_slice_indices`
and shared between the real and the reconstructed volume.
2D model: the patch is itself a slice (B, 1, H, W), so ``disc2d`` sees the whole patch (the one "plane") and
there is no volume discriminator (``disc3d`` is None, its loss terms are absent): a second 2D discriminator
on the same image would only duplicate the first.
"""
from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from .config import VQGANConfig


def random_slice_indices(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3) slice index per sample and axis for a (B, C, D, H, W) volume (uses the torch RNG); (B, 0) for a
    (B, C, H, W) slice, which draws no random numbers."""
    b = x.shape[0]
    if x.ndim == 4:
        return torch.zeros((b, 0), dtype=torch.long)
    return torch.stack([torch.randint(0, x.shape[2 + a], (b,), generator=generator) for a in range(3)], dim=1)


def take_slices(x: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
    """Slices of (B, C, D, H, W) at ``idx`` (B, 3): a list of three (B, C, ., .) tensors, one per axis; a
    (B, C, H, W) input is its own single plane: ``[x]``."""
    if x.ndim == 4:
        return [x]
    b = torch.arange(x.shape[0], device=x.device)
    idx = idx.to(x.device)
    return [x[b, :, idx[:, 0]], x[b, :, :, idx[:, 1]], x[b, :, :, :, idx[:, 2]]]


class VQGANDiscriminators(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.disc3d = PatchDiscriminator(spatial_dims=3, channels=cfg.disc_channels, in_channels=cfg.in_channels,
                                         num_layers_d=cfg.disc_layers, norm="BATCH") if cfg.spatial_dims == 3 else None
        self.disc2d = PatchDiscriminator(spatial_dims=2, channels=cfg.disc2d_channels, in_channels=cfg.in_channels,
                                         num_layers_d=cfg.disc2d_layers, norm="BATCH")

    def forward(self, x: torch.Tensor, slice_idx: torch.Tensor) -> dict:
        """Logits and intermediate features: {"3d": (logits, [features]) or None for a 2D model,
        "2d": [(logits, [features]) per plane]}."""
        res = {"3d": None, "2d": []}
        if self.disc3d is not None:
            out3 = self.disc3d(x)
            res["3d"] = (out3[-1], out3[:-1])
        for s in take_slices(x, slice_idx):
            o = self.disc2d(s)
            res["2d"].append((o[-1], o[:-1]))
        return res
