"""Configuration of the PromptLesion latent diffusion model (denoiser, prompts, schedule, training).

Two named presets:

``paper``
    For 96^3 patches at ~1 mm encoded by the paper VQGAN into 8 x 24^3 latents: a three-level 3D UNet
    (24^3, 12^3, 6^3 latent voxels = 1/4, 1/8, 1/16 of the image grid), channels (64, 128, 256), two
    ResNet blocks per level, self-attention at 12^3, 6^3 and in the middle block, prompts injected at all
    three decoder levels.
``tiny``
    For tests and CPU demos: 8 x (6..8)^3 latents (24^3..32^3 image patches with the tiny VQGAN),
    channels (32, 64, 64), attention only at the coarsest level.
``tiny2d``, ``cpu2d``, ``gpu2d``
    The same UNet with 2D convolutions (``spatial_dims`` 2) for nnU-Net's 2D configurations, paired with the
    VQGAN presets of the same name: 8 x 8^2 latents of 32 x 32 slices (tiny2d: channels (16, 32, 32); cpu2d:
    (32, 64, 64), the tiny widths; a training step of batch 16 ~0.3 s on one thread of a loaded 2-core CPU) and 8 x 24^2 latents
    of 96 x 96 slices (gpu2d: the paper's widths). MaskTransformer over the latent slice (8^2 / 24^2 grid).

Prompt ids: 0 = "healthy" (an identity prompt trained only on healthy targets), 1..K = the lesion classes
(``num_classes`` = K), and ``null_id`` = K + 1, the classifier-free-guidance null token that prompt dropout
substitutes. The null token never names a class: a healthy crop keeps id 0 and is never dropped to it.
Class names live in the checkpoint metadata (:class:`PromptVocabulary`), the config only holds K.

The MaskTransformer (``prompt_type="mask"``) reads the multi-class segmentation mask of the crop on the
latent grid, channels :func:`mask_prompt_channels`: the parent structure (organ / vessel wall, including the
lesion), the region to generate, and one channel per lesion class (the region, in the prompt's class channel;
all zero for the healthy prompt). Its FF width is the paper's 256 by default: 221,760 parameters with two
lesion classes (+64 per further class), of which 65,600 in the 8^3 patch embedding of the two shape channels
and 149,952 in the three blocks; ``mt_ff=128`` is the smaller option (172,224). The paper's "about 136k" fits
neither FF 256 nor a two-channel patch embedding (three FF-256 blocks alone hold 150k).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...lesions.attributes import ATTRIBUTES

PROMPT_TYPES = ("onehot", "mask")
HEALTHY = "healthy"
#: Version of the checkpoint layout this code writes and reads. 2: separate CFG null token, MaskTransformer
#: over parent + region + class channels, feature-driven PromptGenBlocks, masked-image healthy context.
FORMAT_VERSION = 2


def mask_prompt_channels(class_names) -> list[str]:
    """Names of the MaskTransformer input channels, in order: parent, region, one per lesion class."""
    return ["parent", "region", *[f"class:{n}" for n in class_names]]


@dataclass
class DiffusionConfig:
    """Architecture, noise schedule and loss settings.

    Sizes of the latent grid are in latent voxels (image voxels / VQGAN downsampling factor, 4).
    """

    preset: str = "tiny"
    spatial_dims: int = 3  # 3: latents (B, C, D, H, W); 2: latents of 2D slices (B, C, H, W)
    latent_channels: int = 8
    num_classes: int = 1
    # UNet mask input: 1 channel (lesion region) or, with per_class_mask, 1 + num_classes channels
    # (the region plus one channel per class, the class channels zero for the healthy/null prompt).
    per_class_mask: bool = False
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, True)
    mid_attention: bool = True
    head_channels: int = 32
    norm_groups: int = 8
    dropout: float = 0.0
    # prompts
    prompt_type: str = "onehot"
    prompt_dim: int = 64
    prompt_levels: tuple[int, ...] = (0, 1, 2)  # decoder levels (0 = finest latent grid) that receive the prompt
    prompt_components: int = 5
    prompt_channels: int = 16
    prompt_base_size: int = 4
    # Also add a projection of the prompt vector to the time embedding (every ResBlock sees it). Not in the
    # paper, whose prompt reaches the UNet only through the PromptGenBlocks' softmax mixture of shared
    # components (a 4-degree-of-freedom bottleneck per level, renormalised by GroupNorm): measured on the tiny
    # model that route alone moved eps by only 0.2-4 % between prompts. Costs prompt_dim x 4*channels[0].
    prompt_to_temb: bool = True
    # MaskTransformer (prompt_type "mask"): class mask resampled to mt_grid^3 latent voxels, mt_patch^3 patches
    mt_grid: int = 24
    mt_patch: int = 8
    mt_depth: int = 3
    mt_width: int = 64
    mt_heads: int = 4
    mt_ff: int = 256  # the paper's FF width; 128 is the smaller option
    # noise schedule
    timesteps: int = 400
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    # iDDPM scaling of the betas by 1000/T, so a short linear schedule still ends near alpha_bar = 0
    scale_betas_to_1000: bool = True
    # loss
    lesion_loss_weight: float = 1.0  # extra MSE weight inside the (latent) lesion region: w = 1 + this * m
    prompt_dropout: float = 0.1      # probability of replacing a prompt by the CFG null token (null_id)
    # attribute prompts (lesions.attributes): names in model order and bins per attribute; empty = none (the model,
    # its weights and checkpoints are then exactly those without the feature). Index 0 of each is the null value.
    attributes: tuple[str, ...] = ()
    attribute_bins: int = 3
    attribute_dropout: float = 0.3   # per attribute, probability of replacing its bin by null (on top of prompt_dropout)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.prompt_levels = tuple(int(p) for p in self.prompt_levels)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.prompt_type not in PROMPT_TYPES:
            raise ValueError(f"prompt_type must be one of {PROMPT_TYPES}, got '{self.prompt_type}'")
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels needs one entry per UNet level (len(channels))")
        if any(not 0 <= p < len(self.channels) for p in self.prompt_levels):
            raise ValueError(f"prompt_levels {self.prompt_levels} must index the {len(self.channels)} UNet levels")
        if self.num_classes < 1:
            raise ValueError("num_classes must be >= 1 (lesion classes, the healthy prompt is added on top)")
        if self.mt_grid % self.mt_patch:
            raise ValueError("mt_grid must be a multiple of mt_patch")
        self.attributes = tuple(str(a) for a in self.attributes)
        if self.attributes:
            if any(a not in ATTRIBUTES for a in self.attributes) or len(set(self.attributes)) != len(self.attributes):
                raise ValueError(f"attributes must be distinct names out of {list(ATTRIBUTES)}, got {list(self.attributes)}")
            if int(self.attribute_bins) < 2:
                raise ValueError(f"attribute_bins must be >= 2, got {self.attribute_bins}")
        if not 0.0 <= float(self.attribute_dropout) <= 1.0:
            raise ValueError(f"attribute_dropout must lie in [0, 1], got {self.attribute_dropout}")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"every channel count {self.channels} must be divisible by norm_groups={self.norm_groups}")

    @property
    def vocab_size(self) -> int:
        """Number of prompt ids: healthy (0), one per lesion class (1..K) and the CFG null token (K + 1)."""
        return self.num_classes + 2

    @property
    def null_id(self) -> int:
        """Prompt id of the classifier-free-guidance null token (never a class, never "healthy")."""
        return self.num_classes + 1

    @property
    def mt_channels(self) -> int:
        """MaskTransformer input channels: parent, region, one per lesion class."""
        return 2 + self.num_classes

    @property
    def mask_channels(self) -> int:
        return 1 + (self.num_classes if self.per_class_mask else 0)

    @property
    def in_channels(self) -> int:
        """Denoiser input: noisy latent + healthy latent (1-m)*z + mask channels."""
        return 2 * self.latent_channels + self.mask_channels

    @classmethod
    def paper(cls, num_classes: int = 2, prompt_type: str = "onehot", **kw) -> "DiffusionConfig":
        base = dict(preset="paper", num_classes=num_classes, prompt_type=prompt_type, channels=(64, 128, 256),
                    num_res_blocks=2, attention_levels=(False, True, True), head_channels=64, norm_groups=32,
                    prompt_channels=32, prompt_base_size=6, mt_grid=24, mt_patch=8)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, num_classes: int = 2, prompt_type: str = "onehot", **kw) -> "DiffusionConfig":
        base = dict(preset="tiny", num_classes=num_classes, prompt_type=prompt_type, channels=(32, 64, 64),
                    num_res_blocks=1, attention_levels=(False, False, True), head_channels=32, norm_groups=8,
                    prompt_channels=8, prompt_base_size=4, mt_grid=8, mt_patch=4)
        base.update(kw)
        return cls(**base)


    @classmethod
    def tiny2d(cls, num_classes: int = 2, prompt_type: str = "onehot", **kw) -> "DiffusionConfig":
        base = dict(preset="tiny2d", spatial_dims=2, num_classes=num_classes, prompt_type=prompt_type,
                    channels=(16, 32, 32), num_res_blocks=1, attention_levels=(False, False, True), head_channels=16,
                    norm_groups=8, prompt_channels=8, prompt_base_size=4, mt_grid=8, mt_patch=4)
        base.update(kw)
        return cls(**base)

    @classmethod
    def cpu2d(cls, num_classes: int = 2, prompt_type: str = "onehot", **kw) -> "DiffusionConfig":
        base = dict(preset="cpu2d", spatial_dims=2, num_classes=num_classes, prompt_type=prompt_type,
                    channels=(32, 64, 64), num_res_blocks=1, attention_levels=(False, True, True), head_channels=32,
                    norm_groups=8, prompt_channels=8, prompt_base_size=4, mt_grid=8, mt_patch=4)
        base.update(kw)
        return cls(**base)

    @classmethod
    def gpu2d(cls, num_classes: int = 2, prompt_type: str = "onehot", **kw) -> "DiffusionConfig":
        base = dict(preset="gpu2d", spatial_dims=2, num_classes=num_classes, prompt_type=prompt_type,
                    channels=(64, 128, 256), num_res_blocks=2, attention_levels=(False, True, True), head_channels=64,
                    norm_groups=32, prompt_channels=32, prompt_base_size=6, mt_grid=24, mt_patch=8)
        base.update(kw)
        return cls(**base)


PRESETS = {"paper": DiffusionConfig.paper, "tiny": DiffusionConfig.tiny, "tiny2d": DiffusionConfig.tiny2d,
           "cpu2d": DiffusionConfig.cpu2d, "gpu2d": DiffusionConfig.gpu2d}


#: Training defaults per preset: (crops per step and process, Adam learning rate). The 2D CPU recipe was chosen by
#: measurement (BENCHMARKS.md "Generator recipe"): on the demo's scarce fold, lr 1e-3 at batch 16 brought the
#: calcified plaques' mean HU in 4000 steps where 1e-4 had not moved it (66 vs 820 HU real); the 3D presets keep
#: the paper's settings.
TRAINING_DEFAULTS = {"paper": (4, 1e-4), "tiny": (4, 1e-4), "tiny2d": (16, 1e-3), "cpu2d": (16, 1e-3),
                     "gpu2d": (16, 1e-4)}


def make_config(preset: str, **kw) -> DiffusionConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown diffusion preset '{preset}'; choose one of {sorted(PRESETS)}")
    return PRESETS[preset](**kw)


@dataclass
class PromptVocabulary:
    """Prompt names and the segmentation labels they write (healthy has label 0)."""

    names: list[str] = field(default_factory=lambda: [HEALTHY])
    labels: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        self.labels = [int(l) for l in self.labels]
        if not self.names or self.names[0] != HEALTHY:
            raise ValueError(f"prompt vocabulary must start with '{HEALTHY}', got {self.names}")
        if len(self.names) != len(self.labels) or len(set(self.names)) != len(self.names):
            raise ValueError(f"prompt vocabulary needs unique names and one label per name: {self.names} {self.labels}")

    @classmethod
    def from_lesion_spec(cls, spec) -> "PromptVocabulary":
        return cls(names=[HEALTHY] + [l.prompt for l in spec.lesions], labels=[0] + [l.label for l in spec.lesions])

    def id_of(self, name_or_label: str | int) -> int:
        """Prompt id for a name ("healthy", a class/prompt name) or a lesion label (int or digit string)."""
        if isinstance(name_or_label, str) and name_or_label in self.names:
            return self.names.index(name_or_label)
        try:
            lab = int(name_or_label)
        except (TypeError, ValueError):
            lab = None
        if lab is not None and lab in self.labels:
            return self.labels.index(lab)
        raise KeyError(f"unknown prompt '{name_or_label}'; this checkpoint knows {self.names} (labels {self.labels})")

    def as_dict(self) -> dict:
        return {"names": list(self.names), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptVocabulary":
        return cls(names=list(d["names"]), labels=list(d["labels"]))
