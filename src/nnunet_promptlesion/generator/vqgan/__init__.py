"""VQGAN autoencoder (3D, or 2D for nnU-Net's 2D configurations): encoder/decoder (MONAI blocks), EMA vector quantizer, discriminators, losses.

Public API used by the diffusion module::

    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, PRESETS, load_vqgan
    model, meta = load_vqgan("vqgan.pt", expect_preset="paper")
    z = model.encode_latent(x)      # x (B,1,D,H,W) in [-1,1] -> (B,8,D/4,H/4,W/4) in [-1,1]
    x_hat = model.decode_latent(z)  # -> (B,1,D,H,W) in [-1,1]
    # a 2D model (config.spatial_dims == 2, meta["spatial_dims"] == 2) takes (B,1,H,W) slices instead
"""
from .config import DEFAULT_PRESET, PRESETS, VQGANConfig, check_preset_dims, preset_spatial_dims
from .model import VQGAN, check_meta, check_spatial_dims, load_vqgan, meta_spatial_dims, save_vqgan, weights_id
from .quantizer import EMAVectorQuantizer

__all__ = ["PRESETS", "DEFAULT_PRESET", "check_preset_dims", "preset_spatial_dims", "check_spatial_dims",
           "meta_spatial_dims", "VQGANConfig", "VQGAN", "EMAVectorQuantizer", "load_vqgan", "save_vqgan", "check_meta", "weights_id"]
