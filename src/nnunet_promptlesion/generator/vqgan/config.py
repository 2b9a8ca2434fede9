"""VQGAN configuration: architecture, quantizer and loss settings, with named presets.

The whole dataclass is stored in every checkpoint (``meta['config']``), so a checkpoint rebuilds
exactly the network it was trained with; the preset name is checked on load.

Defaults follow DiffTumor's VQGAN (the base of PromptLesion's code): 16 base channels, two stride-2
stages (16 -> 32 -> 64, 4x downsampling), latent dimension 8, EMA codebook (decay 0.99) with restart of
unused codes, commitment 0.25; loss weights L1 x4, perceptual x4, 2D GAN x1, 3D GAN x1, feature matching
x4, hinge loss, discriminators from step 10k; Adam lr 3e-4, betas (0.5, 0.9), gradient clip 1.0, batch 4.
The PromptLesion paper uses 96^3 patches at ~1 mm and 16384 codes of dimension 8.

Dimensionality follows ``patch_size``: three entries build a 3D model ((B, 1, D, H, W) patches), two a 2D model
((B, 1, H, W) slices, for nnU-Net's 2D configurations); :attr:`VQGANConfig.spatial_dims`. The 2D presets
(``tiny2d``, ``cpu2d``, ``gpu2d``) are the same architecture with 2D convolutions.
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
    patch_size: tuple[int, ...] = (96, 96, 96)  # voxels, array axis order; 2 entries (y, x) = a 2D model
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

    PRESET_NAMES: ClassVar[tuple[str, ...]] = ("paper", "tiny", "tiny2d", "cpu2d", "gpu2d")

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) not in (2, 3):
            raise ValueError(f"patch_size {self.patch_size} needs 3 entries (3D model) or 2 (2D model)")
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
    def spatial_dims(self) -> int:
        """2 for a model of 2D slices, 3 for 3D patches (the length of ``patch_size``)."""
        return len(self.patch_size)

    @property
    def encoder_reach(self) -> int:
        """How many latent cells away a changed input voxel can change the encoder output (per axis, cube;
        the same per axis for a 2D model).

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
    def latent_shape(self) -> tuple[int, ...]:
        """(latent_dim, D/f, H/f, W/f) for one ``patch_size`` input ((latent_dim, H/f, W/f) in 2D)."""
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
    def tiny2d(cls, **overrides) -> "VQGANConfig":
        """2D model for tests: 32 x 32 slices -> 8 x 8 latents, the tiny preset's widths."""
        base = dict(preset="tiny2d", channels=(8, 16, 32), num_res_blocks=(1, 1, 1), norm_num_groups=8,
                    codebook_size=256, patch_size=(32, 32), disc_channels=8, disc_layers=2,
                    disc2d_channels=8, disc2d_layers=2, disc_start=200, batch_size=4, restart_every=5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def cpu2d(cls, **overrides) -> "VQGANConfig":
        """2D model sized for a CPU: 32 x 32 slices (the demo's 2d_demo patch) -> 8 x 8 latents, DiffTumor's
        widths (16, 32, 64), 1024 codes; a step of batch 16 (both discriminator updates included) took 0.35 s on
        one thread of a loaded 2-core CPU."""
        base = dict(preset="cpu2d", channels=(16, 32, 64), num_res_blocks=(1, 1, 1), norm_num_groups=8,
                    codebook_size=1024, patch_size=(32, 32), disc_channels=16, disc_layers=2,
                    disc2d_channels=16, disc2d_layers=2, disc_start=1000, batch_size=16, restart_every=10)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def gpu2d(cls, **overrides) -> "VQGANConfig":
        """2D model sized for a GPU: 96 x 96 slices -> 8 x 24 x 24 latents (the paper's latent grid in plane),
        widths (32, 64, 128), 8192 codes, batch 32."""
        base = dict(preset="gpu2d", channels=(32, 64, 128), num_res_blocks=(2, 2, 2), norm_num_groups=16,
                    codebook_size=8192, patch_size=(96, 96), disc_channels=64, disc_layers=3,
                    disc2d_channels=64, disc2d_layers=3, disc_start=10000, batch_size=32)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQGANConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown VQGAN preset '{name}'; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# preset name -> default config (use ``VQGANConfig.from_preset(name, **overrides)`` for a modified copy)
PRESETS: dict[str, VQGANConfig] = {"paper": VQGANConfig.paper(), "tiny": VQGANConfig.tiny(),
                                   "tiny2d": VQGANConfig.tiny2d(), "cpu2d": VQGANConfig.cpu2d(),
                                   "gpu2d": VQGANConfig.gpu2d()}
#: preset picked when none is given, per spatial_dims of the nnU-Net configuration
DEFAULT_PRESET = {3: "paper", 2: "cpu2d"}


def preset_spatial_dims(name: str) -> int:
    """2 or 3: the dimensionality of a named preset (VQGAN and diffusion presets share names)."""
    if name not in PRESETS:
        raise ValueError(f"unknown VQGAN preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name].spatial_dims


def check_preset_dims(name: str, spatial_dims: int, what: str) -> None:
    """Refuse a preset of the other dimensionality than the data (``what`` names the data), naming both."""
    have = preset_spatial_dims(name)
    if have != int(spatial_dims):
        fits = sorted(n for n in PRESETS if PRESETS[n].spatial_dims == int(spatial_dims))
        raise ValueError(f"preset '{name}' is {have}D but {what} is {spatial_dims}D; use a {spatial_dims}D preset "
                         f"({', '.join(fits)}; default {DEFAULT_PRESET[int(spatial_dims)]})")
