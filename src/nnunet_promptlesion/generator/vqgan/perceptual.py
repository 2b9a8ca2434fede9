"""Perceptual term over 2D slices of the three planes; nothing is ever downloaded.

Two interchangeable 2D networks (:func:`build_perceptual` picks one and says which in ``description``):

``vgg16`` (with ``--perceptual-weights FILE``)
    An LPIPS-style distance on VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; channel-normalised,
    squared differences, equal layer weights). FILE is a local ``.pth``/``.pt`` state_dict (loaded with
    ``weights_only=True``) or ``.safetensors`` file in torchvision's ``vgg16().features`` layout: keys
    ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}`` (the ``features.`` prefix is optional;
    torchvision's full ``vgg16-397923af.pth`` works, the classifier keys are ignored).
``structure`` (default, weight-free substitute)
    ``(1 - SSIM)`` at two scales (full and 2x average-pooled; Gaussian window sigma 1.5 px) plus the L1
    difference of finite-difference image gradients. It rewards the same edge/texture fidelity that
    LPIPS is used for in DiffTumor, without learned weights; the discriminators' feature-matching term
    adds the learned-feature part.

:class:`SlicePerceptualLoss` applies the network to one random slice per sample along each axis (the same
slices the 2D discriminator sees) and averages over the three planes; a 2D model's (B, 1, H, W) patch is its
own single plane. Inputs are in [-1, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .discriminator import take_slices

VGG16_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
               (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision indexing


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features`` (indices 0..29) with the same parameter names."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for c in VGG16_CONVS:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1.0) * 0.5).repeat(1, 3, 1, 1)  # [-1, 1] grey -> [0, 1] RGB
        x = (x - self.mean) / self.std
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                feats.append(x)
        return feats


class VGGPerceptual2D(nn.Module):
    def __init__(self, weights_file: str | os.PathLike):
        super().__init__()
        self.net = VGG16Features()
        sd = load_weight_file(weights_file)
        sd = {k: v for k, v in sd.items() if k.startswith("features.") or k.split(".")[0].isdigit()}
        sd = {(k if k.startswith("features.") else f"features.{k}"): v for k, v in sd.items()}
        missing, unexpected = self.net.load_state_dict(sd, strict=False)
        missing = [m for m in missing if m not in ("mean", "std")]
        if missing or unexpected:
            raise ValueError(
                f"{weights_file} is not a VGG16 state_dict in torchvision's vgg16().features layout "
                f"(missing {missing[:4]}..., unexpected {unexpected[:4]}...). See docs/vqgan.md.")
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # the feature network stays frozen in eval mode
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.net(a), self.net(b)
        loss = a.new_zeros(())
        for x, y in zip(fa, fb):
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            loss = loss + ((x - y) ** 2).sum(1).mean()
        return loss


def _gaussian_window(sigma: float = 1.5, size: int = 11, device=None, dtype=None) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim2d(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of (N, 1, H, W) images (Gaussian window, 'valid' borders shrunk to the image size)."""
    size = int(min(11, a.shape[-1], a.shape[-2]))
    size = size if size % 2 else size - 1
    w = _gaussian_window(sigma, size, a.device, a.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a ** 2
    sbb = F.conv2d(b * b, w) - mu_b ** 2
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean()


class StructurePerceptual2D(nn.Module):
    """Weight-free substitute: two-scale (1 - SSIM) + L1 of image gradients."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # SSIM's luminance term assumes non-negative intensities: near 0 (soft tissue in [-1, 1]) it is
        # ill-conditioned and fights the L1 term, so compare in [0, 1]
        a, b = (a.float() + 1) * 0.5, (b.float() + 1) * 0.5
        loss = (1 - ssim2d(a, b, 1.0)) + (1 - ssim2d(F.avg_pool2d(a, 2), F.avg_pool2d(b, 2), 1.0))
        for dim in (-1, -2):
            loss = loss + (torch.diff(a, dim=dim) - torch.diff(b, dim=dim)).abs().mean()
        return loss


class SlicePerceptualLoss(nn.Module):
    def __init__(self, net2d: nn.Module, description: str):
        super().__init__()
        self.net2d = net2d
        self.description = description

    def forward(self, x: torch.Tensor, recon: torch.Tensor, slice_idx: torch.Tensor) -> torch.Tensor:
        losses = [self.net2d(r, s) for s, r in zip(take_slices(x, slice_idx), take_slices(recon, slice_idx))]
        return torch.stack(losses).mean()


def load_weight_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights file {path} does not exist")
    if path.suffix == ".safetensors":

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    return sd


def build_perceptual(weights_file: str | os.PathLike | None = None) -> SlicePerceptualLoss:
    if weights_file:
        return SlicePerceptualLoss(VGGPerceptual2D(weights_file),
                                   f"vgg16 LPIPS-style features from local weights {Path(weights_file).resolve()}")
    return SlicePerceptualLoss(StructurePerceptual2D(),
                               "weight-free substitute: two-scale slice SSIM + gradient L1 (no --perceptual-weights given)")
