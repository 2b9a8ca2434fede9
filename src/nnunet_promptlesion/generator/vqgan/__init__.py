"""3D VQGAN autoencoder: encoder/decoder (MONAI blocks), EMA vector quantizer, discriminators, losses.

Public API used by the diffusion module::

    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, PRESETS, load_vqgan
    model, meta = load_vqgan("vqgan.pt", expect_preset="paper")
    z = model.encode_latent(x)      # x (B,1,D,H,W) in [-1,1] -> (B,8,D/4,H/4,W/4) in [-1,1]
    x_hat = model.decode_latent(z)  # -> (B,1,D,H,W) in [-1,1]
"""
from .config import PRESETS, VQGANConfig
from .model import VQGAN, check_meta, load_vqgan, save_vqgan, weights_id
from .quantizer import EMAVectorQuantizer

__all__ = ["PRESETS", "VQGANConfig", "VQGAN", "EMAVectorQuantizer", "load_vqgan", "save_vqgan", "check_meta", "weights_id"]
