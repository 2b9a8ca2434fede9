"""PromptLesion diffusion checkpoints: metadata, safe loading, and the frozen-VQGAN pairing.

A checkpoint is a ``weights_only`` dict with ``meta`` and the weights (``model``; training checkpoints
also hold ``ema``, optimizer, scheduler, step and RNG). ``meta`` keys:

``kind`` "promptlesion_diffusion"; ``preset``; ``config`` (:class:`DiffusionConfig` dict); ``vocabulary``
(prompt names and labels, id 0 = healthy); ``prompt_type`` ("onehot" / "mask"); ``schedule`` (T, betas,
alpha_bar_T); ``vqgan`` (checkpoint_id, preset, path, downsample factor, latent_dim); ``spacing`` (mm, array
axis order) and ``intensity`` (IntensitySpace dict) copied from the VQGAN; ``spatial_dims`` (2 for a model of
2D slices, 3 for 3D patches; a checkpoint without it is 3D); ``patch_size`` (image voxels);
``lesion_spec``; ``source``; ``step``; ``checkpoint_id`` (sha256 of the sampling weights, EMA if present);
``format_version`` (:data:`~.config.FORMAT_VERSION`); ``null_prompt_id`` (the classifier-free-guidance null
token, K + 1); ``mask_prompt_channels`` (names of the MaskTransformer input channels: parent, region, one per
class; recorded for every prompt type); ``attribute_bins`` (attribute prompts: the
:class:`~nnunet_promptlesion.lesions.attributes.AttributeBins` of the training lesions as a dict; None or absent for a
model without attributes). Checkpoints written before format 2 (healthy prompt doubling as the
null prompt, MaskTransformer over the lesion region only, lesion-leaking healthy context) are refused.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ... import __version__
from ...lesions.attributes import AttributeBins
from ...utils.checkpoint import CheckpointError, config_from_dict, config_to_dict, load_checkpoint
from ..vqgan import load_vqgan
from ..vqgan.model import check_spatial_dims, meta_spatial_dims
from ..vqgan.model import weights_id as _wid
from .config import FORMAT_VERSION, DiffusionConfig, PromptVocabulary, mask_prompt_channels
from .schedule import NoiseSchedule
from .unet import PromptLesionUNet

KIND = "promptlesion_diffusion"


def weights_id(state_dict: dict) -> str:
    return _wid(state_dict)


def build_meta(cfg: DiffusionConfig, vocab: PromptVocabulary, vqgan_meta: dict, vqgan_path: str | os.PathLike,
               patch_size, step: int, source: dict, sampling_state: dict, lesion_spec: dict | None = None,
               extra: dict | None = None) -> dict:
    vcfg = vqgan_meta.get("config", {})
    meta = {
        "kind": KIND,
        "preset": cfg.preset,
        "config": config_to_dict(cfg),
        "vocabulary": vocab.as_dict(),
        "prompt_type": cfg.prompt_type,
        "schedule": NoiseSchedule.from_config(cfg).as_dict(),
        "vqgan": {"checkpoint_id": vqgan_meta.get("checkpoint_id"), "preset": vqgan_meta.get("preset"),
                  "path": str(Path(vqgan_path).resolve()), "latent_dim": vcfg.get("latent_dim"),
                  "channels": vcfg.get("channels")},
        "spatial_dims": int(cfg.spatial_dims),
        "spacing": list(vqgan_meta.get("spacing", [])),
        "intensity": vqgan_meta.get("intensity"),
        "patch_size": [int(p) for p in patch_size],
        "lesion_spec": lesion_spec,
        "source": source,
        "step": int(step),
        "checkpoint_id": weights_id(sampling_state),
        "format_version": FORMAT_VERSION,
        "null_prompt_id": cfg.null_id,
        "mask_prompt_channels": mask_prompt_channels(vocab.names[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "package_version": __version__,
    }
    if extra:
        meta.update(extra)
    return meta


def check_vqgan_pairing(meta: dict, vqgan_meta: dict, path, vqgan_path) -> None:
    """Refuse a VQGAN other than the one the diffusion model was trained on (its latents would differ)."""
    if meta_spatial_dims(meta) != meta_spatial_dims(vqgan_meta):
        raise CheckpointError(f"{path} is a {meta_spatial_dims(meta)}D diffusion model but VQGAN {vqgan_path} is "
                              f"{meta_spatial_dims(vqgan_meta)}D; pair generators of one dimensionality")
    want = meta.get("vqgan", {}).get("checkpoint_id")
    have = vqgan_meta.get("checkpoint_id")
    if want != have:
        raise CheckpointError(
            f"{path} was trained on the latents of VQGAN {want} ({meta.get('vqgan', {}).get('path')}), but "
            f"{vqgan_path} holds VQGAN {have}. Pass the VQGAN checkpoint the diffusion model was trained with.")


def check_format(meta: dict, path) -> None:
    """Refuse checkpoints of an older layout with a message that says what changed and what to do."""
    version = meta.get("format_version", 1)
    if version != FORMAT_VERSION or "null_prompt_id" not in meta or "mask_prompt_channels" not in meta:
        raise CheckpointError(
            f"{path} is a diffusion checkpoint of format {version}; this nnunet_promptlesion reads format "
            f"{FORMAT_VERSION} only (separate classifier-free-guidance null token, MaskTransformer over parent + "
            "region + class channels, feature-driven PromptGenBlocks, healthy context encoded from the masked "
            "image). Its weights were trained for other inputs and would be misread: retrain it with "
            "promptlesion_train_diffusion (the VQGAN checkpoint stays valid).")
    cfg = meta.get("config", {})
    if meta["null_prompt_id"] != cfg.get("num_classes", -2) + 1:
        raise CheckpointError(f"{path}: null_prompt_id {meta['null_prompt_id']} does not match the stored config")


def attribute_bins_of(meta: dict):
    """The checkpoint's :class:`~nnunet_promptlesion.lesions.attributes.AttributeBins`, or None (no attribute prompts)."""
    d = meta.get("attribute_bins")
    return None if not d else AttributeBins.from_dict(d)


def resolve_dtype(dtype, device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 elsewhere; a torch.dtype or its name ("bfloat16", "float32")."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_diffusion(path: str | os.PathLike, map_location: str | torch.device = "cpu", use_ema: bool = True,
                   expect_vqgan_id: str | None = None, dtype: str | torch.dtype = "float32",
                   expect_spatial_dims: int | None = None) -> tuple[PromptLesionUNet, dict]:
    """Load a diffusion checkpoint safely (``weights_only=True``) -> (eval-mode denoiser, meta).

    ``use_ema`` picks the EMA weights when the file holds them (training checkpoints). With
    ``expect_vqgan_id`` a checkpoint trained on another VQGAN is refused. ``dtype`` ("auto" = bf16 on
    CUDA, fp32 elsewhere) casts the weights once, for inference without autocast. Checkpoints of an older
    format are refused (:func:`check_format`). ``expect_spatial_dims`` (2 or 3) refuses a model of the other
    dimensionality, naming both; ``meta["spatial_dims"]`` is filled in (3 for checkpoints without the field).
    """
    state = load_checkpoint(path, map_location=map_location, kind=KIND)
    meta = dict(state["meta"])
    check_format(meta, path)
    check_spatial_dims(meta, path, expect_spatial_dims, "diffusion model")
    meta["spatial_dims"] = meta_spatial_dims(meta)
    cfg = config_from_dict(DiffusionConfig, meta["config"])
    if cfg.spatial_dims != meta["spatial_dims"]:
        raise CheckpointError(f"{path}: meta says {meta['spatial_dims']}D but the stored config is {cfg.spatial_dims}D")
    if expect_vqgan_id is not None and meta.get("vqgan", {}).get("checkpoint_id") != expect_vqgan_id:
        raise CheckpointError(f"{path} was trained with VQGAN {meta.get('vqgan', {}).get('checkpoint_id')}, "
                              f"not {expect_vqgan_id}")
    model = PromptLesionUNet(cfg)
    weights = state["ema"] if use_ema and "ema" in state else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored diffusion config: {e}") from e
    model.to(device=map_location, dtype=resolve_dtype(dtype, map_location)).eval().requires_grad_(False)
    meta["weights"] = "ema" if weights is state.get("ema") else "model"
    return model, meta


def load_generator_pair(diffusion_path: str | os.PathLike, vqgan_path: str | os.PathLike | None = None,
                        map_location: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
                        expect_spatial_dims: int | None = None):
    """(vqgan, vqgan_meta, model, meta, vocabulary): a diffusion checkpoint and its VQGAN, identity checked.

    ``vqgan_path`` defaults to the path stored in the diffusion checkpoint. ``dtype`` is the denoiser's
    weight dtype ("auto": bf16 on CUDA, fp32 on CPU; cast once here, so sampling needs no autocast for it);
    the VQGAN stays fp32 (its codebook snap needs it; run it under autocast on CUDA). ``meta`` holds
    ``null_prompt_id`` and ``mask_prompt_channels`` besides the keys listed in the module docstring.
    ``expect_spatial_dims`` (2 for a 2D nnU-Net configuration, 3 for a 3D one) refuses a pair of the other
    dimensionality with a CheckpointError naming both.
    """
    model, meta = load_diffusion(diffusion_path, map_location, dtype=dtype, expect_spatial_dims=expect_spatial_dims)
    if vqgan_path is None:
        vqgan_path = meta.get("vqgan", {}).get("path")
        if not vqgan_path or not Path(vqgan_path).is_file():
            raise CheckpointError(f"{diffusion_path} names VQGAN checkpoint {vqgan_path}, which does not exist here; "
                                  "pass --vqgan with the VQGAN checkpoint it was trained with")
    vqgan, vqgan_meta = load_vqgan(vqgan_path, map_location=map_location, expect_spatial_dims=expect_spatial_dims)
    check_vqgan_pairing(meta, vqgan_meta, diffusion_path, vqgan_path)
    vqgan.requires_grad_(False)
    return vqgan, vqgan_meta, model, meta, PromptVocabulary.from_dict(meta["vocabulary"])
