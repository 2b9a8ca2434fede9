"""Prompt encoders and the PromptGenBlock.

Prompts enter the denoiser as a vector of ``prompt_dim`` (64) values, produced either by

* :class:`OneHotPrompt`: a learned embedding of the prompt id (0 = healthy, k = lesion class k), i.e.
  a linear layer on the one-hot class vector; or
* :class:`MaskTransformer`: the implicit prompt of PromptLesion, a small ViT over the multi-channel class
  mask (B, K, D, H, W) on the latent grid (channel k-1 holds the lesion region when the prompt is class k,
  all zero for the healthy/null prompt).

:class:`PromptGenBlock` turns that vector into a spatial prompt tensor at a decoder resolution, PromptIR
style: ``n`` learned prompt components (C_p x b^3) mixed by softmax weights predicted from the vector,
trilinearly resized to the feature map, then a 3x3x3 conv. This costs a few ten thousand parameters per
level, where a Linear(64 -> 5*C*16^3) would cost hundreds of millions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def class_mask_from_prompt(region: torch.Tensor, prompt_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K, ...) class mask: the region (B, 1, ...) in channel ``id - 1``, zeros for id 0 (healthy)."""
    onehot = F.one_hot(prompt_ids.long(), num_classes + 1)[:, 1:].to(region.dtype)  # (B, K)
    return region * onehot.reshape(*onehot.shape, *([1] * (region.ndim - 2)))


class OneHotPrompt(nn.Module):
    """Prompt id (B,) -> prompt vector (B, dim); id 0 is the healthy / null prompt."""

    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)

    def forward(self, prompt_ids: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(prompt_ids.long())


class _Block(nn.Module):
    """Pre-norm transformer block using scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.ff(self.norm2(x))


class MaskTransformer(nn.Module):
    """Implicit prompt from a multi-channel class mask.

    Input (B, K, D, H, W) in [0, 1] on the latent grid (any size; resampled to ``grid``^3 latent voxels).
    Patch embedding ``patch``^3 with stride ``patch`` (24^3 -> 27 tokens), ``depth`` pre-norm blocks of
    ``width`` with ``heads`` heads and a ``ff`` hidden MLP, learned positions, global average pool,
    LayerNorm + Linear -> ``out_dim``.

    The patch embedding is split into a class-agnostic shape embedding (Conv3d(1, width, patch, patch) on
    the union of the channels) plus a per-patch class embedding (Linear on the class fractions of each
    patch). The parameter count therefore does not grow by 32k per class, and the class identity still
    reaches every token.
    """

    def __init__(self, num_classes: int, grid: int = 24, patch: int = 8, width: int = 64, depth: int = 3,
                 heads: int = 4, ff: int = 128, out_dim: int = 64):
        super().__init__()
        if grid % patch:
            raise ValueError("grid must be a multiple of patch")
        self.grid, self.patch = grid, patch
        self.num_tokens = (grid // patch) ** 3
        self.shape_embed = nn.Conv3d(1, width, patch, stride=patch)
        self.class_embed = nn.Linear(num_classes, width)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([_Block(width, heads, ff) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, class_mask: torch.Tensor) -> torch.Tensor:
        g = self.grid
        if tuple(class_mask.shape[2:]) != (g, g, g):
            class_mask = F.interpolate(class_mask, size=(g, g, g), mode="trilinear", align_corners=False)
        union = class_mask.sum(1, keepdim=True).clamp(max=1.0)
        tok = self.shape_embed(union).flatten(2).transpose(1, 2)  # (B, N, width)
        frac = F.avg_pool3d(class_mask, self.patch).flatten(2).transpose(1, 2)  # (B, N, K)
        x = tok + self.class_embed(frac) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x.mean(1)))


class MaskPrompt(nn.Module):
    """Prompt id + lesion region -> MaskTransformer prompt vector (the class mask is built here)."""

    def __init__(self, num_classes: int, **mt_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.transformer = MaskTransformer(num_classes, **mt_kwargs)

    def forward(self, prompt_ids: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return self.transformer(class_mask_from_prompt(region, prompt_ids, self.num_classes))


class PromptGenBlock(nn.Module):
    """Prompt vector (B, prompt_dim) -> spatial prompt tensor (B, channels, *size)."""

    def __init__(self, prompt_dim: int, channels: int, n_components: int = 5, base_size: int = 4):
        super().__init__()
        self.components = nn.Parameter(torch.randn(n_components, channels, base_size, base_size, base_size)
                                       / math.sqrt(channels))
        self.weights = nn.Linear(prompt_dim, n_components)
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, prompt: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        w = torch.softmax(self.weights(prompt), dim=-1)  # (B, n)
        p = torch.einsum("bn,ncdhw->bcdhw", w, self.components)
        p = F.interpolate(p, size=tuple(size), mode="trilinear", align_corners=False)
        return self.conv(p)
