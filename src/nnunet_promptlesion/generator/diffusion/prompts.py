"""Prompt encoders and the PromptGenBlock.

Prompts enter the denoiser as a vector of ``prompt_dim`` (64) values, produced either by

* :class:`OneHotPrompt`: a learned embedding of the prompt id (0 = healthy, 1..K = lesion class, K + 1 = the
  classifier-free-guidance null token), i.e. a linear layer on the one-hot vector; or
* :class:`MaskPrompt`: the implicit prompt of PromptLesion, a small ViT (:class:`MaskTransformer`) over the
  multi-class segmentation mask of the crop on the latent grid: the parent structure (organ / vessel wall,
  lesion included), the region to generate, and one channel per lesion class (the region in the prompt's
  class channel; all zero for the healthy prompt). The null token is a learned vector instead.

:class:`PromptGenBlock` turns that vector into a spatial prompt tensor at a decoder resolution, PromptIR
style: ``n`` learned prompt components (C_p x b^3), mixed by softmax weights predicted from the decoder
features (global average pool -> Linear) plus the prompt vector (Linear), trilinearly resized to the feature
map, then a 3x3x3 conv. Interpolation and conv are linear and the weights sum to 1, so the resized and
convolved components (the "basis") do not depend on the step: :meth:`PromptGenBlock.basis` is computed once per
sampling run and each step only mixes it. A few ten thousand parameters per level, where the public code's
Linear(64 -> 5*C*16^3) costs hundreds of millions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import nd


def class_mask_from_prompt(region: torch.Tensor, prompt_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, K, ...) class mask: the region (B, 1, ...) in channel ``id - 1`` for ids 1..K; all zero for the
    healthy prompt (0) and the null token (K + 1)."""
    ids = prompt_ids.long()
    onehot = F.one_hot(ids.clamp(0, num_classes + 1), num_classes + 2)[:, 1:num_classes + 1].to(region.dtype)
    return region * onehot.reshape(*onehot.shape, *([1] * (region.ndim - 2)))


class OneHotPrompt(nn.Module):
    """Prompt id (B,) -> prompt vector (B, dim); ids 0..K+1 (healthy, classes, null token)."""

    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)

    def forward(self, prompt_ids: torch.Tensor, region: torch.Tensor | None = None,
                parent: torch.Tensor | None = None) -> torch.Tensor:
        return self.embed(prompt_ids.long())


class AttributeEmbedding(nn.Module):
    """Attribute bins (B, A) long -> their share of the prompt vector (B, dim): the sum over attributes of a learned
    embedding of the bin index (0 = null, 1..n = bins). Zero-initialised, so a model starts out exactly as one
    without attributes and learns what each bin adds."""

    def __init__(self, n_attributes: int, n_bins: int, dim: int = 64):
        super().__init__()
        self.n_attributes, self.n_bins = int(n_attributes), int(n_bins)
        self.embed = nn.ModuleList([nn.Embedding(self.n_bins + 1, dim) for _ in range(self.n_attributes)])
        for e in self.embed:
            nn.init.zeros_(e.weight)

    def forward(self, attributes: torch.Tensor | None, batch: int, device, dtype) -> torch.Tensor:
        if attributes is None:
            attributes = torch.zeros((batch, self.n_attributes), dtype=torch.long, device=device)
        if attributes.shape != (batch, self.n_attributes):
            raise ValueError(f"attributes must be (B, {self.n_attributes}) = ({batch}, {self.n_attributes}) bin "
                             f"indices, got {tuple(attributes.shape)}")
        a = attributes.long().clamp(0, self.n_bins)
        return sum(e(a[:, i]) for i, e in enumerate(self.embed)).to(dtype)


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
        # (B, N, 3, heads, d) -> three (B, heads, N, d) views whose last dim has stride 1 (fused SDPA kernels)
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.ff(self.norm2(x))


class MaskTransformer(nn.Module):
    """Implicit prompt from the multi-class segmentation mask.

    Input (B, 2 + K, D, H, W) in [0, 1] on the latent grid (any size; resampled to ``grid``^3 latent voxels),
    channels: parent structure, region to generate, one per lesion class; with ``spatial_dims`` 2 a latent
    slice (B, 2 + K, H, W) resampled to ``grid``^2. Patch embedding ``patch``^3 with
    stride ``patch`` (24^3 -> 27 tokens; 24^2 -> 9 in 2D), ``depth`` pre-norm blocks of ``width`` with ``heads`` heads and a
    ``ff`` hidden MLP, learned positions, global average pool, LayerNorm + Linear -> ``out_dim``.

    The patch embedding is a Conv3d over the two shape channels (parent, region) plus a per-patch class
    embedding (Linear on the class fractions of each patch), so the parameter count does not grow by
    ``width * patch^3`` per lesion class, and the class identity still reaches every token.
    """

    def __init__(self, num_classes: int, grid: int = 24, patch: int = 8, width: int = 64, depth: int = 3,
                 heads: int = 4, ff: int = 256, out_dim: int = 64, spatial_dims: int = 3):
        super().__init__()
        if grid % patch:
            raise ValueError("grid must be a multiple of patch")
        self.grid, self.patch, self.num_classes = grid, patch, num_classes
        self.spatial_dims = nd.check_dims(spatial_dims)
        self.num_tokens = (grid // patch) ** self.spatial_dims
        self.shape_embed = nd.conv(spatial_dims)(2, width, patch, stride=patch)
        self.class_embed = nn.Linear(num_classes, width)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList([_Block(width, heads, ff) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        g = self.grid
        if mask.shape[1] != 2 + self.num_classes:
            raise ValueError(f"MaskTransformer expects {2 + self.num_classes} channels (parent, region, classes), "
                             f"got {mask.shape[1]}")
        dtype = self.shape_embed.weight.dtype
        sd = self.spatial_dims
        mask = mask.float()  # resampling and pooling of a tiny mask in fp32 (CPU has no bf16 avg_pool3d)
        if tuple(mask.shape[2:]) != (g,) * sd:
            mask = F.interpolate(mask, size=(g,) * sd, mode=nd.linear_mode(sd), align_corners=False)
        frac = nd.avg_pool_fn(sd)(mask[:, 2:], self.patch).flatten(2).transpose(1, 2).to(dtype)  # (B, N, K)
        tok = self.shape_embed(mask[:, :2].to(dtype)).flatten(2).transpose(1, 2)  # (B, N, width)
        x = tok + self.class_embed(frac) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x.mean(1)))


class MaskPrompt(nn.Module):
    """Prompt id + region (+ parent) -> MaskTransformer prompt vector; the null token -> a learned vector.

    ``parent`` (B, 1, d, h, w) on the latent grid: the parent structure; None uses the region itself (the
    smallest parent consistent with the mask). The region is always added to the parent, as in training,
    where the lesion voxels belong to the organ they grow in.
    """

    def __init__(self, num_classes: int, out_dim: int = 64, **mt_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.null_id = num_classes + 1
        self.transformer = MaskTransformer(num_classes, out_dim=out_dim, **mt_kwargs)
        self.null = nn.Parameter(torch.zeros(out_dim))
        nn.init.normal_(self.null, std=0.02)

    def class_mask(self, prompt_ids: torch.Tensor, region: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
        """(B, 2 + K, ...) MaskTransformer input: parent (with the region), region, class channels."""
        parent = region if parent is None else torch.maximum(parent.to(region.dtype), region)
        return torch.cat([parent, region, class_mask_from_prompt(region, prompt_ids, self.num_classes)], 1)

    def forward(self, prompt_ids: torch.Tensor, region: torch.Tensor, parent: torch.Tensor | None = None) -> torch.Tensor:
        out = self.transformer(self.class_mask(prompt_ids, region, parent))
        is_null = (prompt_ids.long() == self.null_id)[:, None]
        return torch.where(is_null, self.null.to(out.dtype).expand_as(out), out)


class PromptGenBlock(nn.Module):
    """Decoder features + prompt vector -> spatial prompt tensor (B, channels, *size).

    ``basis(size)`` (step-invariant, (n, channels, *size)) = conv3x3(resize(component_i)) for every component
    (``spatial_dims`` 2: b^2 components, 3x3 conv, bilinear resize);
    ``forward(h, prompt, basis)`` mixes it with softmax(Linear(GAP(h)) + Linear(prompt)) (B, n). Equal to
    conv(resize(sum_i w_i component_i)) because both maps are linear and the weights sum to 1.
    """

    def __init__(self, prompt_dim: int, feature_channels: int, channels: int, n_components: int = 5, base_size: int = 4,
                 spatial_dims: int = 3):
        super().__init__()
        self.spatial_dims = nd.check_dims(spatial_dims)
        self.components = nn.Parameter(torch.randn(n_components, channels, *(base_size,) * self.spatial_dims)
                                       / math.sqrt(channels))
        self.from_features = nn.Linear(feature_channels, n_components)
        self.from_prompt = nn.Linear(prompt_dim, n_components)
        self.conv = nd.conv(spatial_dims)(channels, channels, 3, padding=1)

    def basis(self, size: tuple[int, ...]) -> torch.Tensor:
        p = F.interpolate(self.components, size=tuple(int(s) for s in size), mode=nd.linear_mode(self.spatial_dims),
                          align_corners=False)
        return self.conv(p)

    def prompt_logits(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.from_prompt(prompt)

    def mix(self, h: torch.Tensor, prompt_logits: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        w = torch.softmax((self.from_features(h.mean(dim=tuple(range(2, h.ndim)))) + prompt_logits).float(), dim=-1)
        n = basis.shape[0]
        return (w.to(basis.dtype) @ basis.reshape(n, -1)).reshape(h.shape[0], *basis.shape[1:])

    def forward(self, h: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        return self.mix(h, self.prompt_logits(prompt), self.basis(tuple(h.shape[2:])))
