"""The PromptLesion denoiser: a compact 3D UNet on VQGAN latents (2D with ``config.spatial_dims`` 2).

Input channels are concatenated: noisy latent z_t (8), healthy context latent (8; the VQGAN latent of
the image with the region blanked, zero inside the region, see :func:`~.inpaint.healthy_context`) and the
lesion mask on the latent grid (1, or 1 + one per class). The UNet has ``len(channels)`` levels (paper: 24^3,
12^3, 6^3 latent voxels); every level holds ``num_res_blocks`` time-conditioned ResNet blocks, optionally
followed by self-attention (``torch.nn.functional.scaled_dot_product_attention``, so 24^3 = 13,824 tokens
fit in memory on a GPU). A middle block (ResNet, attention, ResNet) sits at the coarsest level.

Decoder level l, coarsest first (one skip per level)::

    h = upsample(h) to the size of skip_l                     (not at the coarsest level)
    if l in prompt_levels:                                     PromptInjection
        h = conv1x1(Res_t(Res_t(cat(h, PromptGenBlock_l(p)))))
    h = Res_t(cat(h, skip_l)) [+ attention] ...

so the prompt enters at exactly ``len(prompt_levels)`` (three) decoder resolutions, before the skip merge.
A compact own UNet keeps that injection point explicit; MONAI's DiffusionModelUNet would need its
up-block internals overridden for it.

One definition serves 2D and 3D: every conv comes from :mod:`~nnunet_promptlesion.generator.nd` for
``config.spatial_dims``, so a 2D model (latents (B, C, H, W) of 2D VQGAN slices) has the same blocks, prompt
injection points and sampling path with 3x3 instead of 3x3x3 kernels.

Sampling calls the denoiser hundreds of times with the same conditioning. :meth:`PromptLesionUNet.prepare`
computes everything that does not depend on the step once (prompt encoder, the PromptGenBlocks' prompt
logits and resized/convolved components, and the input conv's response to the constant channels: the conv
is linear, so conv_in(cat(z_t, c)) = conv_in[z_t part](z_t) + conv_in[c part](c) + bias), and
:meth:`PromptLesionUNet.forward_prepared` runs one step from it. ``forward`` = prepare + forward_prepared.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import nd
from .config import DiffusionConfig
from .prompts import AttributeEmbedding, MaskPrompt, OneHotPrompt, PromptGenBlock, class_mask_from_prompt


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of (possibly fractional) timesteps t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv x2 with an additive time embedding; 1x1x1 conv on the shortcut if channels change."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, dropout: float = 0.0, spatial_dims: int = 3):
        super().__init__()
        conv = nd.conv(spatial_dims)
        self.spatial_dims = spatial_dims
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = conv(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(conv(cout, cout, 3, padding=1))
        self.skip = conv(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb)).reshape(*h.shape[:2], *(1,) * self.spatial_dims)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _groups(c: int, groups: int) -> int:
    while c % groups:
        groups -= 1
    return groups


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels of a feature map (scaled_dot_product_attention).

    q, k and v are views of one Linear output laid out (B, N, 3, heads, d), so each reaches SDPA as
    (B, heads, N, d) with a unit-stride last dimension: the layout the fused flash / memory-efficient
    CUDA kernels require (a strided last dimension silently falls back to the math kernel).
    """

    def __init__(self, channels: int, head_channels: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def qkv_views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c = x.shape[:2]
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.qkv(tokens).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *sp = x.shape
        q, k, v = self.qkv_views(x)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)  # (B, N, C)
        return x + self.proj(a).transpose(1, 2).reshape(b, c, *sp)


class PromptInjection(nn.Module):
    """cat(features, prompt tensor) -> two time-conditioned ResNet blocks -> 1x1x1 conv."""

    def __init__(self, channels: int, prompt_dim: int, prompt_channels: int, temb_dim: int, groups: int,
                 n_components: int, base_size: int, spatial_dims: int = 3):
        super().__init__()
        self.gen = PromptGenBlock(prompt_dim, channels, prompt_channels, n_components, base_size, spatial_dims)
        self.res1 = ResBlock(channels + prompt_channels, channels, temb_dim, groups, spatial_dims=spatial_dims)
        self.res2 = ResBlock(channels, channels, temb_dim, groups, spatial_dims=spatial_dims)
        self.out = nd.conv(spatial_dims)(channels, channels, 1)

    def forward(self, h: torch.Tensor, prompt_logits: torch.Tensor, basis: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        p = self.gen.mix(h, prompt_logits, basis)
        h = self.res1(torch.cat([h, p.to(h.dtype)], 1), temb)
        return self.out(self.res2(h, temb))


def level_sizes(size, levels: int) -> list[tuple[int, ...]]:
    """Spatial size of every UNet level for a latent grid ``size`` (stride-2 convs: ceil halving)."""
    sizes = [tuple(int(s) for s in size)]
    for _ in range(levels - 1):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))
    return sizes


class PromptLesionUNet(nn.Module):
    """Epsilon predictor f(z_t, t, z_healthy, region, prompt_ids, parent).

    forward(z_t (B, 8, D, H, W), t (B,) timesteps, z_healthy (B, 8, D, H, W) healthy context, region
    (B, 1, D, H, W) in [0, 1] on the latent grid, prompt_ids (B,) long (0 healthy, 1..K classes, K + 1 null
    token), parent (B, 1, D, H, W) or None, used by the MaskTransformer prompt only) -> predicted noise
    (B, 8, D, H, W). Any latent grid size works: skips are matched by interpolation, so odd sizes
    (6^3 -> 3^3 -> 2^3) are fine. With ``config.spatial_dims`` 2 every tensor is (B, C, H, W) instead.
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = cfg = config
        sd = self.spatial_dims = cfg.spatial_dims
        conv = nd.conv(sd)
        self._conv_fn = nd.conv_fn(sd)
        ch = cfg.channels
        g = cfg.norm_groups
        temb_dim = 4 * ch[0]
        self.temb = nn.Sequential(nn.Linear(ch[0], temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        if cfg.prompt_type == "onehot":
            self.prompt_encoder: nn.Module = OneHotPrompt(cfg.vocab_size, cfg.prompt_dim)
        else:
            self.prompt_encoder = MaskPrompt(cfg.num_classes, out_dim=cfg.prompt_dim, grid=cfg.mt_grid, patch=cfg.mt_patch,
                                             width=cfg.mt_width, depth=cfg.mt_depth, heads=cfg.mt_heads, ff=cfg.mt_ff,
                                             spatial_dims=sd)
        # attribute prompts add to the prompt vector; without attributes no module exists (old state dicts load as before)
        self.attribute_embed = (AttributeEmbedding(len(cfg.attributes), cfg.attribute_bins, cfg.prompt_dim)
                                if cfg.attributes else None)
        self.prompt_temb = nn.Linear(cfg.prompt_dim, temb_dim) if cfg.prompt_to_temb else None
        self.conv_in = conv(cfg.in_channels, ch[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cprev = ch[0]
        for lvl, c in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cprev, c, temb_dim, g, cfg.dropout, sd))
                if cfg.attention_levels[lvl]:
                    blocks.append(AttentionBlock(c, cfg.head_channels, g))
                cprev = c
            self.down.append(blocks)
            self.downsample.append(conv(c, c, 3, stride=2, padding=1) if lvl < len(ch) - 1 else nn.Identity())

        cm = ch[-1]
        self.mid1 = ResBlock(cm, cm, temb_dim, g, cfg.dropout, sd)
        self.mid_attn = AttentionBlock(cm, cfg.head_channels, g) if cfg.mid_attention else nn.Identity()
        self.mid2 = ResBlock(cm, cm, temb_dim, g, cfg.dropout, sd)

        self.inject = nn.ModuleDict()
        self.up = nn.ModuleList([nn.Module() for _ in ch])  # indexed by level
        self.upsample = nn.ModuleList([nn.Identity() for _ in ch])
        cur = cm
        for lvl in reversed(range(len(ch))):
            c = ch[lvl]
            if lvl < len(ch) - 1:
                self.upsample[lvl] = conv(cur, c, 3, padding=1)
                cur = c
            if lvl in cfg.prompt_levels:
                self.inject[str(lvl)] = PromptInjection(cur, cfg.prompt_dim, cfg.prompt_channels, temb_dim, g,
                                                        cfg.prompt_components, cfg.prompt_base_size, sd)
            blocks = nn.ModuleList()
            cin = cur + c
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cin, c, temb_dim, g, cfg.dropout, sd))
                if cfg.attention_levels[lvl]:
                    blocks.append(AttentionBlock(c, cfg.head_channels, g))
                cin = c
            self.up[lvl] = blocks
            cur = c
        self.norm_out = nn.GroupNorm(_groups(ch[0], g), ch[0])
        self.conv_out = _zero(conv(ch[0], cfg.latent_channels, 3, padding=1))

    def mask_input(self, region: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        if not self.config.per_class_mask:
            return region
        return torch.cat([region, class_mask_from_prompt(region, prompt_ids, self.config.num_classes)], 1)

    def encode_prompt(self, prompt_ids: torch.Tensor, region: torch.Tensor, parent: torch.Tensor | None = None,
                      attributes: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt vector (B, prompt_dim): the class prompt encoder's output plus, for a model with attribute prompts,
        the attribute embeddings of ``attributes`` (B, A) bin indices (None = all null)."""
        p = self.prompt_encoder(prompt_ids, region, parent)
        if self.attribute_embed is not None:
            p = p + self.attribute_embed(attributes, p.shape[0], p.device, p.dtype)
        elif attributes is not None and bool((attributes != 0).any()):
            raise ValueError("this diffusion model was trained without attribute prompts; pass attributes=None")
        return p

    @staticmethod
    def _run(blocks: nn.ModuleList, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for b in blocks:
            h = b(h, temb) if isinstance(b, ResBlock) else b(h)
        return h

    def prepare(self, z_healthy: torch.Tensor, region: torch.Tensor, prompt_ids: torch.Tensor,
                parent: torch.Tensor | None = None, attributes: torch.Tensor | None = None) -> dict:
        """Step-invariant conditioning for :meth:`forward_prepared` (tensors in the model's dtype).

        Keys: ``const_in`` (B, C0, D, H, W) input-conv response to [z_healthy, mask channels] incl. bias;
        ``logits_<l>`` (B, n) and ``basis_<l>`` (n, C_p, *size_l) for every prompt level l; ``temb_prompt``
        (B, 4 C0) the prompt's share of the time embedding (``prompt_to_temb``).
        """
        dtype = self.conv_in.weight.dtype
        region = region.to(dtype)
        c = self.config.latent_channels
        const = torch.cat([z_healthy.to(dtype), self.mask_input(region, prompt_ids)], 1)
        cond = {"const_in": self._conv_fn(const, self.conv_in.weight[:, c:], self.conv_in.bias, padding=1)}
        prompt = self.encode_prompt(prompt_ids, region, None if parent is None else parent.to(dtype), attributes)
        sizes = level_sizes(z_healthy.shape[2:], len(self.config.channels))
        if self.prompt_temb is not None:
            cond["temb_prompt"] = self.prompt_temb(prompt)
        for key, inj in self.inject.items():
            cond[f"logits_{key}"] = inj.gen.prompt_logits(prompt)
            cond[f"basis_{key}"] = inj.gen.basis(sizes[int(key)])
        return cond

    def forward_prepared(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One denoiser evaluation from :meth:`prepare`'s conditioning (same batch size, or a multiple of
        it is not allowed: repeat the conditioning instead)."""
        dtype = self.conv_in.weight.dtype
        c = self.config.latent_channels
        temb = self.temb(timestep_embedding(t, self.config.channels[0]).to(dtype))
        if "temb_prompt" in cond:
            temb = temb + cond["temb_prompt"]
        h = self._conv_fn(z_t.to(dtype), self.conv_in.weight[:, :c], None, padding=1) + cond["const_in"]
        skips = []
        for lvl, blocks in enumerate(self.down):
            h = self._run(blocks, h, temb)
            skips.append(h)
            h = self.downsample[lvl](h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for lvl in reversed(range(len(self.down))):
            skip = skips[lvl]
            if lvl < len(self.down) - 1:
                h = self.upsample[lvl](F.interpolate(h, size=tuple(skip.shape[2:]), mode="nearest"))
            key = str(lvl)
            if key in self.inject:
                h = self.inject[key](h, cond[f"logits_{key}"], cond[f"basis_{key}"], temb)
            h = self._run(self.up[lvl], torch.cat([h, skip], 1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, z_healthy: torch.Tensor, region: torch.Tensor,
                prompt_ids: torch.Tensor, parent: torch.Tensor | None = None,
                attributes: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_prepared(z_t, t, self.prepare(z_healthy, region, prompt_ids, parent, attributes))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(model: PromptLesionUNet) -> dict[str, int]:
    """Parameter counts of the denoiser's parts (total, prompt encoder incl. its time-embedding projection,
    prompt injection, UNet body)."""
    total = count_parameters(model)
    prompt = count_parameters(model.prompt_encoder) + (count_parameters(model.prompt_temb) if model.prompt_temb is not None else 0)
    if model.attribute_embed is not None:
        prompt += count_parameters(model.attribute_embed)
    inject = count_parameters(model.inject)
    gen = sum(count_parameters(m.gen) for m in model.inject.values())
    return {"total": total, "prompt_encoder": prompt, "prompt_injection": inject, "prompt_gen_blocks": gen,
            "unet_body": total - prompt - inject}
