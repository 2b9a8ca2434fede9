"""Latent inpainting of lesions into real images, and image-space blending, batched on the device.

:func:`inpaint_lesions` is the entry point used by the single-CT command and the nnU-Net synthesizer::

    out = inpaint_lesions(vqgan, model, image, lesion_mask, prompt_ids, steps=50, sampler="ddim",
                          guidance=1.0, generator=torch.Generator(device).manual_seed(0),
                          parent_mask=organ)

``image`` (B, 1, D, H, W) in the VQGAN's model intensity space [-1, 1] (D, H, W divisible by the VQGAN
downsampling factor 4), ``lesion_mask`` (B, 1, D, H, W) binary, ``prompt_ids`` (B,) long (0 = healthy,
1..K lesion classes, see :class:`~.config.PromptVocabulary`), ``parent_mask`` (B, 1, D, H, W) binary organ /
vessel-wall mask (used by MaskTransformer-prompt models; None = the lesion mask itself). Steps:

1. encode (:func:`encode_inputs`, the same function the training uses): z = vqgan.encode_latent(image);
   the healthy context z_ctx = (1 - m) * encode_latent(image with the mask voxels set to ``MASK_FILL``),
   which depends on no voxel under the mask; lesion region on the latent grid m = max-pool of the mask (a
   latent voxel belongs to the region if any of its 4^3 image voxels does), the parent likewise;
2. start from the healthy context noised to step T-1, and run the reverse process with the known latent z
   kept outside the *generated region* at every step (noised to that step). The generated region is m
   dilated by the VQGAN encoder's reach (``VQGANConfig.encoder_reach`` latent cells, 6 for the presets):
   in training the cells that close to a lesion hold the lesion image's latent, which the encoder's
   receptive field has contaminated with the lesion, and the model learns from that; a healthy carrier's
   latent there would be another context than the one trained on. Beyond the reach both are the same
   function of the same lesion-free voxels (up to GroupNorm statistics), so sampling keeps the carrier's
   latent only there and generates the rest;
3. decode with the codebook snap (vqgan.decode_latent);
4. blend: out = (1 - g) image + g decoded, g = the mask Gaussian-blurred with sigma (voxels, per sample)
   and held at 1 inside the mask, forced to exactly 0 outside the mask dilated by ``blend_margin(sigma)`` voxels (the same rule as
   :mod:`nnunet_promptlesion.lesions.blending`), so those voxels are returned bit-identical.

VQGAN encode/decode run in chunks of ``vae_chunk`` samples, so large batches fit; the denoiser runs in its
own dtype (bf16 weights on CUDA when loaded with ``load_generator_pair(..., dtype="auto")``).

2D generators (VQGAN and denoiser with ``spatial_dims`` 2) take (B, 1, H, W) slices everywhere a (B, 1, D, H, W)
patch is written here; pooling, dilation and blur follow the tensors' number of spatial axes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ...lesions.blending import blend_margin
from .. import nd
from .samplers import guided_eps_fn, randn_rows, sample
from .schedule import NoiseSchedule

#: Model-space value written into the masked voxels before the healthy context is encoded (DiffTumor: the
#: volume times (1 - mask), i.e. 0 in [-1, 1]). Training and inference must use the same value.
MASK_FILL = 0.0


def latent_region(mask: torch.Tensor, factor: int, size: Sequence[int] | None = None) -> torch.Tensor:
    """Binary (B, 1, d, h, w) latent-grid region of an image mask (B, 1, D, H, W): any voxel of a cell set
    (2D: (B, 1, H, W) -> (B, 1, h, w))."""
    m = nd.max_pool_fn(nd.spatial_dims_of(mask))((mask > 0.5).float(), kernel_size=factor, stride=factor, ceil_mode=True)
    if size is not None and tuple(m.shape[2:]) != tuple(size):
        m = m[(slice(None), slice(None), *[slice(0, s) for s in size])]
    return m


def dilate(mask: torch.Tensor, radius: torch.Tensor | int) -> torch.Tensor:
    """Cube dilation of a binary (B, 1, D, H, W) mask by ``radius`` voxels, one radius per sample allowed.

    Runs as repeated 3^3 max-pools over the batch (a loop over the radius, not over samples); a (B, 1, H, W)
    mask is dilated in plane (3^2 squares).
    """
    b = mask.shape[0]
    pool = nd.max_pool_fn(nd.spatial_dims_of(mask))
    d = (mask > 0.5).to(torch.float32)
    if isinstance(radius, int):  # one radius for all: no per-sample selection, no host sync for its maximum
        for _ in range(radius):
            d = pool(d, 3, stride=1, padding=1)
        return d > 0.5
    radius = torch.as_tensor(radius, device=mask.device).long().reshape(-1).expand(b)
    out = d.clone()
    for i in range(1, int(radius.max().item()) + 1):
        d = pool(d, 3, stride=1, padding=1)
        sel = (radius == i).reshape(b, *(1,) * (mask.ndim - 1))
        out = torch.where(sel, d, out)
    return out > 0.5


def gaussian_blur3d(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, D, H, W) with a per-sample sigma (voxels); zero padding, sigma 0 = copy.

    A (B, 1, H, W) input is blurred in plane (the 2D generators' slices)."""
    b = x.shape[0]
    sd = nd.spatial_dims_of(x)
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
    r = max(int(math.ceil(3.0 * float(sigma.max().item()))), 1)
    offs = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    s = sigma.clamp(min=1e-6)[:, None]
    k = torch.exp(-0.5 * (offs[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (offs == 0).float()[None].expand(b, -1)
    k = torch.where(sigma[:, None] > 1e-3, k, delta).to(x.dtype)  # (B, 2r+1)
    y = x.reshape(1, b, *x.shape[2:])
    conv = nd.conv_fn(sd)
    for axis in range(sd):
        shape = [b, 1] + [1] * sd
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0] * sd
        pad[2 * (sd - 1 - axis)] = pad[2 * (sd - 1 - axis) + 1] = r
        y = conv(F.pad(y, pad), k.reshape(shape), groups=b)
    return y.reshape(x.shape)


def blend_weights(mask: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, support): blend weight in [0, 1] and the bool region (dilated mask) outside which g == 0 exactly."""
    b = mask.shape[0]
    sigma = torch.as_tensor(sigma, device=mask.device, dtype=torch.float32).reshape(-1).expand(b)
    margin = torch.tensor([blend_margin(float(s)) for s in sigma.tolist()], device=mask.device)
    support = dilate(mask, margin)
    m = (mask > 0.5).float()
    # held at 1 inside the mask (as lesions.blending): blurring alone would halve thin lesions' contrast
    g = torch.maximum(gaussian_blur3d(m, sigma).clamp(0.0, 1.0), m)
    return torch.where(support, g, torch.zeros_like(g)), support


def blend(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """out = (1 - g) original + g generated, bit-identical to ``original`` outside the dilated mask."""
    g, support = blend_weights(mask, sigma)
    g = g.to(original.dtype)
    mixed = (1.0 - g) * original + g * generated.to(original.dtype)
    return torch.where(support, mixed, original)


def _chunked(fn, x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    if not chunk or x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def encode_inputs(vqgan, image: torch.Tensor, lesion_mask: torch.Tensor, parent_mask: torch.Tensor | None = None,
                  autocast=None, chunk: int | None = 8) -> dict[str, torch.Tensor]:
    """Latent-grid model inputs of a batch; used by training and inference alike.

    Returns ``z`` (B, C, d, h, w) the latent of the image, ``context`` (B, C, d, h, w) the healthy context
    (1 - region) * latent(image with the mask voxels set to :data:`MASK_FILL`), ``region`` (B, 1, d, h, w),
    ``generate`` (B, 1, d, h, w) the region dilated by the encoder's reach (the cells a sampler generates;
    outside it ``z`` depends on no voxel under the mask) and ``parent`` (B, 1, d, h, w, or None), binary.
    All float32. The context is a function of the voxels outside the mask only: the encoder's receptive
    field cannot carry a lesion into the kept cells.
    """
    f = int(vqgan.downsample_factor)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    masked = torch.where(lesion_mask > 0.5, torch.full_like(image, MASK_FILL), image)
    with ctx():
        both = _chunked(vqgan.encode_latent, torch.cat([image, masked]), chunk).float()
    z, z_masked = both.chunk(2)
    region = latent_region(lesion_mask, f, z.shape[2:])
    generate = dilate(region, int(vqgan.config.encoder_reach)).float()
    parent = None if parent_mask is None else latent_region(parent_mask, f, z.shape[2:])
    return {"z": z, "context": (1.0 - region) * z_masked, "region": region, "generate": generate, "parent": parent}


@torch.no_grad()
def generate_latents(model: torch.nn.Module, schedule: NoiseSchedule, z_known: torch.Tensor, region: torch.Tensor,
                     prompt_ids: torch.Tensor, sampler: str = "ddim", steps: int | None = 50, eta: float = 0.0,
                     guidance: float = 1.0, generator: "torch.Generator | Sequence[torch.Generator] | None" = None, autocast=None,
                     progress: bool = False, clip_x0: float | None = 1.0, context: torch.Tensor | None = None,
                     parent: torch.Tensor | None = None, null_prompt: int | None = None,
                     compile: bool | str = False, generate: torch.Tensor | None = None,
                     attributes: torch.Tensor | None = None) -> torch.Tensor:
    """Inpaint ``region`` (B, 1, d, h, w) of the latents ``z_known`` (B, C, d, h, w); returns new latents (fp32).

    ``context`` is the healthy context (default (1 - region) * z_known, for callers without an image);
    ``parent`` the latent-grid parent mask for MaskTransformer prompts; ``generate`` the cells to generate
    (``encode_inputs(...)["generate"]``, the region dilated by the encoder's reach; default ``region``): the
    model is conditioned on ``region``, ``z_known`` is kept outside ``generate``. ``generator``: one
    torch.Generator, or one per row (a row's noise is then the same alone as inside any batch). ``attributes``
    (B, A) long: attribute bins for a model with attribute prompts (0 = null, None = all null).
    """
    z_h = (1.0 - region) * z_known if context is None else context
    tT = torch.full((z_known.shape[0],), schedule.T - 1, device=z_known.device, dtype=torch.long)
    noise = randn_rows(z_known.shape, generator, z_known.device, z_known.dtype)
    z_T = schedule.q_sample(z_h, tT, noise)
    eps_fn = guided_eps_fn(model, z_h, region, prompt_ids.to(z_known.device), guidance, null_prompt=null_prompt,
                           autocast=autocast, parent=parent, compile=compile, attributes=attributes)
    keep = 1.0 - (region if generate is None else generate)
    return sample(eps_fn, schedule, z_T, sampler=sampler, steps=steps, eta=eta, generator=generator,
                  known=z_known, keep=keep, progress=progress, clip_x0=clip_x0)


@torch.no_grad()
def inpaint_lesions(vqgan, model: torch.nn.Module, image: torch.Tensor, lesion_mask: torch.Tensor,
                    prompt_ids: torch.Tensor, steps: int | None = 50, sampler: str = "ddim", guidance: float = 1.0,
                    generator: "torch.Generator | Sequence[torch.Generator] | None" = None, eta: float = 0.0,
                    blend_sigma: torch.Tensor | float = 1.0, schedule: NoiseSchedule | None = None,
                    autocast=None, progress: bool = False, return_decoded: bool = False,
                    clip_x0: float | None = 1.0, parent_mask: torch.Tensor | None = None,
                    null_prompt: int | None = None, vae_chunk: int | None = 8, compile: bool | str = False,
                    attributes: torch.Tensor | None = None):
    """Synthesize lesions of class ``prompt_ids`` under ``lesion_mask`` into ``image``; see the module docstring.

    Signature (all tensors on one device; sizes in voxels of the generator grid, axis order of its arrays;
    a 2D generator pair takes (B, 1, H, W) slices wherever (B, 1, D, H, W) is written):

    - ``image`` (B, 1, D, H, W) float, model space [-1, 1]; ``lesion_mask`` (B, 1, D, H, W) {0, 1};
      ``prompt_ids`` (B,) long: 0 healthy, 1..K lesion classes;
    - ``steps``/``sampler``/``eta``: DDIM with ``steps`` evaluations, or "ddpm" (all T steps, ``steps`` None);
    - ``guidance``: classifier-free guidance scale (1 = off, one pass per step; otherwise two, the second
      with ``null_prompt``, default the model's CFG null token ``config.null_id``);
    - ``generator``: torch.Generator on the image's device (reproducible noise), or a sequence of one per
      sample: each sample's noise then depends on its own generator only, so a lesion rendered inside a batch
      is re-rendered alone from its recorded seed (equal up to the batched/unbatched rounding of the denoiser);
    - ``blend_sigma``: float or (B,) tensor, Gaussian sigma of the blend weight in voxels;
    - ``schedule``: defaults to the model config's schedule on the image's device;
    - ``autocast``: a zero-argument context-manager factory for the VQGAN (and an fp32 denoiser), e.g.
      ``lambda: torch.autocast("cuda", torch.bfloat16)``; a denoiser loaded in bf16 needs none;
    - ``clip_x0``: clip the predicted clean latent to the codebook's normalised range [-clip_x0, clip_x0] at
      every step (None = off); decoding snaps to the codebook anyway, so this only stops early-step blow-ups;
    - ``parent_mask`` (B, 1, D, H, W) {0, 1} organ / vessel wall, read by MaskTransformer-prompt models (None:
      the lesion mask stands in for it); ignored by one-hot models;
    - ``vae_chunk``: samples per VQGAN encode/decode call (None = the whole batch at once);
    - ``compile``: run the denoiser step through torch.compile (eager fallback), worth it for long runs;
      "reduce-overhead" adds CUDA graphs;
    - ``attributes``: (B, A) long attribute bins (model order ``model.config.attributes``; 0 = null, 1..n = bins)
      for a model trained with attribute prompts; None = all null. The lesion's extent is the mask: a radius bin
      should match the mask's equivalent radius (the synthesis side draws masks in the requested bin).

    Returns the blended image (B, 1, D, H, W) in model space (the image's dtype), or (image, decoded, latents)
    with ``return_decoded``.
    """
    sd = int(getattr(getattr(model, "config", None), "spatial_dims", 3))
    want = "(B, 1, D, H, W)" if sd == 3 else "(B, 1, H, W)"
    if image.ndim != 2 + sd or image.shape[1] != 1 or lesion_mask.shape != image.shape:
        raise ValueError(f"a {sd}D generator needs image and lesion_mask both {want}; got {tuple(image.shape)} and "
                         f"{tuple(lesion_mask.shape)}")
    if int(getattr(vqgan, "spatial_dims", sd)) != sd:
        raise ValueError(f"the VQGAN is {vqgan.spatial_dims}D but the denoiser is {sd}D")
    if parent_mask is not None and parent_mask.shape != image.shape:
        raise ValueError(f"parent_mask must be {want} like the image; got {tuple(parent_mask.shape)}")
    f = int(vqgan.downsample_factor)
    if any(s % f for s in image.shape[2:]):
        raise ValueError(f"image size {tuple(image.shape[2:])} must be divisible by the VQGAN factor {f}")
    if schedule is None:
        schedule = NoiseSchedule.from_config(model.config, device=image.device)
    enc = encode_inputs(vqgan, image, lesion_mask, parent_mask, autocast, vae_chunk)
    z0 = generate_latents(model, schedule, enc["z"], enc["region"], prompt_ids, sampler, steps, eta, guidance,
                          generator, autocast, progress, clip_x0, context=enc["context"], parent=enc["parent"],
                          null_prompt=null_prompt, compile=compile, generate=enc["generate"], attributes=attributes)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    with ctx():
        decoded = _chunked(vqgan.decode_latent, z0, vae_chunk).float().clamp(-1.0, 1.0)
    out = blend(image, decoded.to(image.dtype), lesion_mask, blend_sigma)
    return (out, decoded, z0) if return_decoded else out
