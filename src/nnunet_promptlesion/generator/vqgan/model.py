"""The VQGAN autoencoder (MONAI AutoencoderKL encoder/decoder blocks + our EMA quantizer), 3D or 2D.

Axis order everywhere: tensors are (B, C, D, H, W) where (D, H, W) is the patch's array axis order
(the nnU-Net preprocessed array order or the NIfTI array order); a 2D model (``config.spatial_dims == 2``,
two-entry ``patch_size``) takes (B, C, H, W) slices, (H, W) the in-plane axes of that order. Intensities
are in model space [-1, 1] (see :mod:`nnunet_promptlesion.generator.intensity`).

Latent interface for the diffusion model (DiffTumor convention):
``encode_latent(x)`` returns the *pre-quantization* encoder output, min-max normalised to [-1, 1] by
the codebook's value range (a fixed range once training is over); ``decode_latent(z)`` undoes the
normalisation, snaps every vector to its nearest code (chunked search) and decodes.
"""
from __future__ import annotations

import os
import time

import torch
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from torch import nn

from ... import __version__
from ...utils.checkpoint import CheckpointError, config_from_dict, config_to_dict, load_checkpoint, save_checkpoint
from ...utils.checkpoint import weights_id as _weights_id
from ..intensity import IntensitySpace
from .config import PRESETS, VQGANConfig
from .quantizer import EMAVectorQuantizer

KIND = "vqgan"


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        n = len(config.channels)
        common = dict(spatial_dims=config.spatial_dims, channels=config.channels, num_res_blocks=config.num_res_blocks,
                      norm_num_groups=config.norm_num_groups, norm_eps=1e-6, attention_levels=(False,) * n,
                      with_nonlocal_attn=config.bottleneck_attention, include_fc=False,
                      use_flash_attention=config.bottleneck_attention)
        self.encoder = Encoder(in_channels=config.in_channels, out_channels=config.latent_dim, **common)
        self.decoder = Decoder(in_channels=config.latent_dim, out_channels=config.in_channels, **common)
        self.quantizer = EMAVectorQuantizer(
            config.codebook_size, config.latent_dim, decay=config.ema_decay,
            commitment_weight=config.commitment_weight, dead_code_threshold=config.dead_code_threshold,
            restart_every=config.restart_every, chunk_size=config.quantizer_chunk)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [-1, 1] -> pre-quantization latent (B, latent_dim, D/f, H/f, W/f); 2D: (B, 1, H, W)."""
        f = self.downsample_factor
        if x.ndim != 2 + self.spatial_dims:
            raise ValueError(f"a {self.spatial_dims}D VQGAN takes (B, C{', D' if self.spatial_dims == 3 else ''}, H, W) "
                             f"inputs, got shape {tuple(x.shape)}")
        if any(s % f for s in x.shape[2:]):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} must be divisible by {f}")
        return self.encoder(x)

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        return self.decoder(zq)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Reconstruction (B, 1, D, H, W), commitment loss and quantizer info (see EMAVectorQuantizer)."""
        z = self.encode(x)
        zq, commit, info = self.quantizer(z)
        return self.decode(zq.to(z.dtype)), commit, info

    # ---- latent interface for the diffusion model -------------------------------------------------
    def latent_range(self) -> tuple[float, float]:
        return self.quantizer.value_range()

    def _latent_range_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the same range as device tensors: reading it as floats would sync the host at every encode
        e = self.quantizer.embed
        return e.min().float(), e.max().float()

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latent normalised to [-1, 1] by the codebook range; (B, latent_dim, D/4, H/4, W/4)."""
        lo, hi = self._latent_range_t()
        z = self.encode(x).float()
        return (z - lo) / (hi - lo) * 2.0 - 1.0

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_latent`: de-normalise, snap to the nearest codes, decode; output clamped to [-1, 1]."""
        lo, hi = self._latent_range_t()
        z = (z.float() + 1.0) * 0.5 * (hi - lo) + lo
        zq = self.quantizer.snap(z)
        return self.decode(zq).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        return self.decode(self.quantizer.snap(z.float()).to(z.dtype)).clamp(-1.0, 1.0)

    def num_parameters(self) -> dict[str, int]:
        return {"encoder": sum(p.numel() for p in self.encoder.parameters()),
                "decoder": sum(p.numel() for p in self.decoder.parameters()),
                "codebook": self.quantizer.embed.numel()}


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def weights_id(state_dict: dict) -> str:
    """sha256 over the model tensors (names, shapes, bytes): identifies a set of weights (the id load_checkpoint
    verifies, so there is one implementation of it)."""
    return _weights_id(state_dict)


def build_meta(model: VQGAN, spacing, intensity: IntensitySpace, step: int, source: dict, extra: dict | None = None) -> dict:
    sd = model.state_dict()
    meta = {
        "kind": KIND,
        "preset": model.config.preset,
        "config": config_to_dict(model.config),
        "spatial_dims": int(model.config.spatial_dims),
        "spacing": [float(s) for s in spacing],
        "intensity": intensity.as_dict(),
        "step": int(step),
        "source": source,
        "checkpoint_id": weights_id(sd),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "package_version": __version__,
    }
    if extra:
        meta.update(extra)
    return meta


def save_vqgan(model: VQGAN, path: str | os.PathLike, spacing, intensity: IntensitySpace, step: int, source: dict,
               extra_state: dict | None = None, extra_meta: dict | None = None) -> dict:
    """Atomic checkpoint with ``meta`` and ``model``; ``extra_state`` (optimizers, discriminators...) is merged in."""
    meta = build_meta(model, spacing, intensity, step, source, extra_meta)
    state = {"meta": meta, "model": model.state_dict()}
    if extra_state:
        state.update(extra_state)
    save_checkpoint(state, path)
    return meta


def meta_spatial_dims(meta: dict) -> int:
    """The checkpoint's spatial dims; checkpoints written before 2D models existed hold none and are 3D."""
    return int(meta.get("spatial_dims", 3))


def check_spatial_dims(meta: dict, path, expect_spatial_dims: int | None, what: str = "generator") -> None:
    """Refuse a checkpoint of the other dimensionality (2D slices vs 3D patches) than the caller needs."""
    if expect_spatial_dims is None:
        return
    have = meta_spatial_dims(meta)
    if have != int(expect_spatial_dims):
        raise CheckpointError(
            f"{path} is a {have}D {what} (trained on {'2D slices' if have == 2 else '3D patches'}), but a "
            f"{int(expect_spatial_dims)}D one is needed here (a {int(expect_spatial_dims)}D nnU-Net configuration). "
            f"Train the {what} on a {int(expect_spatial_dims)}D configuration "
            f"({'e.g. -c 2d_demo' if int(expect_spatial_dims) == 2 else 'e.g. -c 3d_fullres'}) or use a "
            f"{have}D configuration.")


def check_meta(meta: dict, path, expect_preset: str | None = None, expect_intensity: IntensitySpace | None = None,
               expect_spacing=None, spacing_tol: float = 1e-3, expect_spatial_dims: int | None = None) -> None:
    """Refuse a VQGAN checkpoint whose preset, dimensionality, intensity space or spacing differs from what the
    caller needs (``expect_spatial_dims`` 2 or 3; checkpoints without the field are 3D)."""
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path} is a '{meta.get('kind')}' checkpoint, not a VQGAN checkpoint")
    check_spatial_dims(meta, path, expect_spatial_dims, "VQGAN")
    if expect_preset is not None and meta.get("preset") != expect_preset:
        raise CheckpointError(
            f"{path} was trained with VQGAN preset '{meta.get('preset')}', but preset '{expect_preset}' was requested. "
            f"Use --preset {meta.get('preset')} or train a new VQGAN with preset '{expect_preset}'.")
    if expect_intensity is not None:
        have = IntensitySpace.from_dict(meta["intensity"])
        if not have.same_as(expect_intensity):
            raise CheckpointError(
                f"{path} was trained in intensity space [{have.describe()}], but the data here uses "
                f"[{expect_intensity.describe()}]. A generator only works in the intensity space it was trained in: "
                "train a VQGAN on this data (or pass the matching --hu-window).")
    if expect_spacing is not None:
        have_sp = [float(s) for s in meta.get("spacing", [])]
        if len(have_sp) != len(expect_spacing) or any(abs(a - b) > spacing_tol for a, b in zip(have_sp, expect_spacing)):
            raise CheckpointError(f"{path} was trained at spacing {have_sp} mm, but spacing {list(expect_spacing)} mm is needed")


def load_vqgan(path: str | os.PathLike, map_location: str | torch.device = "cpu", expect_preset: str | None = None,
               expect_intensity: IntensitySpace | None = None, expect_spacing=None,
               expect_spatial_dims: int | None = None) -> tuple[VQGAN, dict]:
    """Load a VQGAN checkpoint safely (``weights_only=True``) -> (eval-mode model, meta).

    ``meta`` keys: kind, preset, config, spatial_dims (2 or 3; filled in as 3 for checkpoints written before the
    field existed), spacing (mm, array axis order; 2 entries for a 2D model), intensity (IntensitySpace dict),
    step, source, checkpoint_id (sha256 of the weights), created, package_version (+ training extras).
    Raises :class:`~nnunet_promptlesion.utils.checkpoint.CheckpointError` for another kind, preset,
    dimensionality, intensity space or spacing than expected, or for a file that is not a safe checkpoint.
    """
    state = load_checkpoint(path, map_location=map_location)
    meta = state["meta"]
    check_meta(meta, path, expect_preset, expect_intensity, expect_spacing, expect_spatial_dims=expect_spatial_dims)
    cfg = config_from_dict(VQGANConfig, meta["config"])
    if cfg.spatial_dims != meta_spatial_dims(meta):
        raise CheckpointError(f"{path}: meta says {meta_spatial_dims(meta)}D but the stored config has patch size "
                              f"{cfg.patch_size} ({cfg.spatial_dims}D)")
    if cfg.preset not in PRESETS:
        raise CheckpointError(f"{path}: unknown VQGAN preset '{cfg.preset}'")
    model = VQGAN(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored VQGAN config: {e}") from e
    model.to(map_location).eval()
    meta = dict(meta)
    meta["spatial_dims"] = meta_spatial_dims(meta)
    return model, meta
