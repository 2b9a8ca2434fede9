"""VQGAN configuration: architecture, quantizer and loss settings, with named presets.

The whole dataclass is stored in every checkpoint (``meta['config']``), so a checkpoint rebuilds
exactly the network it was trained with; the preset name is checked on load.

Defaults follow DiffTumor's VQGAN (the base of PromptLesion's code): 16 base channels, two stride-2
stages (16 -> 32 -> 64, 4x downsampling), latent dimension 8, EMA codebook (decay 0.99) with restart of
unused codes, commitment 0.25; loss weights L1 x4, perceptual x4, 2D GAN x1, 3D GAN x1, feature matching
x4, hinge loss, discriminators from step 10k; Adam lr 3e-4, betas (0.5, 0.9), gradient clip 1.0, batch 4.
The PromptLesion paper uses 96^3 patches at ~1 mm and 16384 codes of dimension 8.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass
class VQGANConfig:
    preset: str = "paper"
    in_channels: int = 1
    latent_dim: int = 8
    codebook_size: int = 16384
    channels: tuple[int, ...] = (16, 32, 64)        # per level; len(channels) - 1 stride-2 stages
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    norm_num_groups: int = 8
    bottleneck_attention: bool = False              # MONAI non-local attention at the latent resolution
    patch_size: tuple[int, int, int] = (96, 96, 96)  # voxels, array axis order
    # quantizer
    ema_decay: float = 0.99
    commitment_weight: float = 0.25
    dead_code_threshold: float = 1.0    # EMA assignment count below which a code counts as dead
    restart_every: int = 10             # steps between dead-code restarts (0 = never)
    quantizer_chunk: int = 2048         # tokens per nearest-code search chunk (memory = chunk x codes)
    # discriminators (MONAI PatchDiscriminator, 3D on the patch and 2D on slices of the three planes)
    disc_channels: int = 64
    disc_layers: int = 3
    disc2d_channels: int = 64
    disc2d_layers: int = 3
    # losses
    l1_weight: float = 4.0
    perceptual_weight: float = 4.0
    gan3d_weight: float = 1.0
    gan2d_weight: float = 1.0
    feature_matching_weight: float = 4.0
    adversarial_criterion: str = "hinge"   # "hinge" or "least_squares"
    disc_start: int = 10000                # step at which adversarial and feature-matching terms start
    # optimisation
    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    batch_size: int = 4

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("paper", "tiny")

    def __post_init__(self):
        if len(self.channels) != len(self.num_res_blocks):
            raise ValueError("channels and num_res_blocks need one entry per level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every entry of channels {self.channels} must be divisible by norm_num_groups={self.norm_num_groups}")
        f = self.downsample_factor
        if any(p % f for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by the downsampling factor {f}")
        if self.adversarial_criterion not in ("hinge", "least_squares"):
            raise ValueError(f"adversarial_criterion must be 'hinge' or 'least_squares', got '{self.adversarial_criterion}'")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def encoder_reach(self) -> int:
        """How many latent cells away a changed input voxel can change the encoder output (per axis, cube).

        Walks the convolutions of MONAI's AutoencoderKL ``Encoder`` from the output back to the input: conv_out
        (3^3), per level ``num_res_blocks`` residual blocks of two 3^3 convs, between levels a stride-2 3^3 conv
        after a one-voxel pad on the high side, conv_in (3^3). A latent cell c then reads input voxels
        [f c + lo, f c + hi]; a voxel in cell c' reaches cells up to max(floor((f - 1 - lo) / f), floor(hi / f))
        away. Tiny and paper presets (three levels, one block each): lo = -19, hi = +25 voxels, 6 cells.
        GroupNorm statistics span the whole patch; that weak global coupling is not counted here.
        Raises ValueError with bottleneck attention (every cell reads every voxel).
        """
        if self.bottleneck_attention:
            raise ValueError("with bottleneck_attention the encoder's receptive field is the whole patch: no latent "
                             "region can be dilated to keep the context lesion-free; use a VQGAN without it")
        lo, hi = -1, 1  # conv_out
        for level in reversed(range(len(self.channels))):
            lo, hi = lo - 2 * self.num_res_blocks[level], hi + 2 * self.num_res_blocks[level]
            if level > 0:  # stride-2 downsampling from the level below: output j reads inputs 2j .. 2j + 2
                lo, hi = 2 * lo, 2 * hi + 2
        lo, hi = lo - 1, hi + 1  # conv_in
        f = self.downsample_factor
        return max((f - 1 - lo) // f, hi // f)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(latent_dim, D/f, H/f, W/f) for one ``patch_size`` input."""
        f = self.downsample_factor
        return (self.latent_dim, *(p // f for p in self.patch_size))

    @classmethod
    def paper(cls, **overrides) -> "VQGANConfig":
        return cls(**{"preset": "paper", **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "VQGANConfig":
        """CPU-sized model for tests and demos: 32^3 patches, 256 codes, small discriminators."""
        base = dict(preset="tiny", channels=(8, 16, 32), num_res_blocks=(1, 1, 1), norm_num_groups=8,
                    codebook_size=256, patch_size=(32, 32, 32), disc_channels=8, disc_layers=2,
                    disc2d_channels=8, disc2d_layers=2, disc_start=200, batch_size=2, restart_every=5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQGANConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset '{name}'; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# preset name -> default config (use ``VQGANConfig.from_preset(name, **overrides)`` for a modified copy)
PRESETS: dict[str, VQGANConfig] = {"paper": VQGANConfig.paper(), "tiny": VQGANConfig.tiny()}
