"""PromptLesionTrainer settings: a JSON file with documented defaults.

Looked up, first match wins:
  1. the file named by the environment variable ``PROMPTLESION_SETTINGS``;
  2. ``$nnUNet_preprocessed/DatasetXXX/promptlesion_settings.json``;
  3. the defaults below.
Unknown keys are an error (a typo must not silently fall back to a default). Every value is checked by
type and range against the field annotations and metadata below (:mod:`nnunet_promptlesion.utils.schema`),
so an error names the file, the key, the expected type and the value; booleans are ``true``/``false`` only.
Sample sources (:mod:`nnunet_promptlesion.synthesis.sources`) may register extra keys with defaults; those
land in ``settings.extra`` and must have their default's JSON type (a null default: a string or null).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..lesions.attributes import AttributeRequestError, check_mix
from ..synthesis.sources import available_sources, registered_settings
from ..utils.env_names import ENV_SETTINGS as SETTINGS_ENV
from ..utils.schema import bounds, check_value, choices, validate

SETTINGS_FILENAME = "promptlesion_settings.json"


class SettingsError(ValueError):
    pass


@dataclass
class PromptLesionSettings:
    #: fraction of every training batch that is synthetic (0.5 = 1:1; odd batches round the synthetic half down)
    synthetic_fraction: float = field(default=0.5, metadata=bounds(0.0, 1.0))
    #: "inverse_frequency" (1 / number of real lesions of the class in the training cases), "uniform",
    #: or a dict {lesion name or label: weight}
    class_weights: Union[str, dict[str, float]] = field(
        default="inverse_frequency", metadata=bounds(0.0, None, **choices("inverse_frequency", "uniform")))
    #: the sample source: "rule_based" (statistics from the real lesions, or the spec's intensity priors);
    #: further sources register themselves in nnunet_promptlesion.synthesis.sources
    synthesizer: str = "rule_based"
    #: side of the carrier's central region, as a fraction of the patch size, that must hold no real lesion;
    #: synthetic lesions are centred inside it
    centre_fraction: float = field(default=0.5, metadata=bounds(0.0, 1.0, lo_open=True))
    #: Gaussian blending sigma range in voxels
    blend_sigma_voxels: list[float] = field(default_factory=lambda: [0.5, 1.5], metadata=bounds(0.0, None))
    #: at most this many training cases are scanned at start-up for lesion statistics, masks and carriers
    max_scan_cases: int = field(default=1000, metadata=bounds(1))
    #: path to a lesion spec; default: lesion_spec.json in nnUNet_preprocessed/DatasetXXX, else nnUNet_raw/DatasetXXX
    lesion_spec: Union[str, None] = None
    #: stop training once nnU-Net's EMA pseudo-Dice has not improved for this many epochs (the paper: 25);
    #: null = off. Read by trainers.early_stopping (also by the plain baseline nnUNetTrainer_earlyStopping)
    early_stopping_patience: Union[int, None] = field(default=None, metadata=bounds(1))
    #: carrier patches tried per synthetic sample before the draw counts as failed
    placement_tries: int = field(default=20, metadata=bounds(1))
    #: failed draws per synthetic slot before the slot is filled with a real sample (counted, logged per epoch)
    draw_tries: int = field(default=2, metadata=bounds(1))
    #: cache the start-up scan next to the preprocessed data (promptlesion_index/), keyed by a fingerprint
    index_cache: bool = True
    #: attribute prompts (diffusion synthesizers, a checkpoint trained with --attributes): per lesion class
    #: (name or prompt) the probability of each bin of an attribute, e.g. {"calcified": {"radius": [0.6, 0.3, 0.1]}};
    #: attributes not named are unconditioned. Overrides the lesion spec's per-class "attribute_mix". The online
    #: source draws them per lesion; a cache must have been built with the same mix (promptlesion_build_cache reads
    #: this setting)
    attribute_mix: Union[dict[str, dict[str, list[float]]], None] = None
    #: extra keys registered by sample sources (filled by from_dict; not a key of the JSON file itself)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.early_stopping_patience is not None and (isinstance(self.early_stopping_patience, bool) or
                not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 1):
            raise SettingsError(f"early_stopping_patience must be a positive integer or null, got {self.early_stopping_patience!r}")
        if not 0.0 <= float(self.synthetic_fraction) <= 1.0:
            raise SettingsError(f"synthetic_fraction must lie in [0, 1], got {self.synthetic_fraction}")
        if isinstance(self.class_weights, str) and self.class_weights not in ("inverse_frequency", "uniform"):
            raise SettingsError("class_weights must be 'inverse_frequency', 'uniform' or a {class: weight} dict, "
                                f"got '{self.class_weights}'")
        if self.synthesizer not in available_sources():
            raise SettingsError(f"unknown synthesizer '{self.synthesizer}' (available: {available_sources()})")
        extras = registered_settings()
        unknown = set(self.extra) - set(extras)
        if unknown:
            raise SettingsError(f"unknown settings {sorted(unknown)}")
        self.extra = {k: self.extra.get(k, default) for k, (_, default) in extras.items()}
        if int(self.placement_tries) < 1 or int(self.draw_tries) < 1:
            raise SettingsError("placement_tries and draw_tries must be >= 1")
        if not 0.0 < float(self.centre_fraction) <= 1.0:
            raise SettingsError(f"centre_fraction must lie in (0, 1], got {self.centre_fraction}")
        if self.attribute_mix is not None:
            if self.synthesizer == "rule_based":
                raise SettingsError("attribute_mix asks for attribute prompts, which only the diffusion synthesizers "
                                    "(diffusion_cache, diffusion_online) have; drop it or change 'synthesizer'")
            try:
                self.attribute_mix = check_mix(self.attribute_mix, "attribute_mix")
            except AttributeRequestError as e:
                raise SettingsError(str(e)) from None
        if not isinstance(self.blend_sigma_voxels, (list, tuple)) or len(self.blend_sigma_voxels) != 2:
            raise SettingsError(f"blend_sigma_voxels must be [lo, hi] with 0 <= lo <= hi, got {self.blend_sigma_voxels}")
        lo, hi = self.blend_sigma_voxels
        if not 0 <= lo <= hi:
            raise SettingsError(f"blend_sigma_voxels must be [lo, hi] with 0 <= lo <= hi, got {self.blend_sigma_voxels}")

    def to_json_dict(self) -> dict:
        """The settings as one flat dict (extra keys merged in), for the training log."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**d, **self.extra}

    def n_synthetic(self, batch_size: int) -> int:
        """Synthetic samples per batch: the synthetic share rounded down."""
        return int(batch_size * float(self.synthetic_fraction) + 1e-9)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "PromptLesionSettings":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extras = registered_settings()
        if not isinstance(d, dict):
            raise SettingsError(f"{source}: the settings must be a JSON object {{\"key\": value, ...}}, got "
                                f"{type(d).__name__} {json.dumps(d)[:80]}")
        unknown = set(d) - known - set(extras)
        if unknown:
            raise SettingsError(f"{source}: unknown settings {sorted(unknown)}; known settings: "
                                f"{sorted(known | set(extras))}")
        # types and ranges first: the checks in __post_init__ may then rely on them (no float("half") there)
        typed = validate(cls, {k: v for k, v in d.items() if k in known}, source, skip=("extra",), error=SettingsError)
        extra = {}
        for k, v in d.items():
            if k in extras:
                try:
                    extra[k] = check_value(v, _json_type_of(extras[k][1], k), k, source)
                except ValueError as e:
                    raise SettingsError(str(e)) from None
        try:
            return cls(**typed, extra=extra)
        except SettingsError as e:
            raise SettingsError(f"{source}: {e}") from e


#: extra settings whose JSON type is wider than their default's: a fold is "0" or 0 alike (nnU-Net's -f)
_EXTRA_TYPES = {"quality_fold": Union[str, int]}


def _json_type_of(default: Any, key: str = "") -> Any:
    """The annotation a registered extra setting is checked against: its default's JSON type."""
    if key in _EXTRA_TYPES:
        return _EXTRA_TYPES[key]
    if default is None:
        return Union[str, None]    # the extras without a default are paths and device names
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return int if isinstance(default, int) else float
    return type(default) if isinstance(default, (str, list, dict)) else Any


def load_settings(preprocessed_dataset_folder: str | os.PathLike) -> tuple[PromptLesionSettings, str]:
    """(settings, where they came from) following the lookup order in the module docstring."""
    env = os.environ.get(SETTINGS_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise SettingsError(f"{SETTINGS_ENV}={env} does not point to a file")
    else:
        path = Path(preprocessed_dataset_folder) / SETTINGS_FILENAME
        if not path.is_file():
            return PromptLesionSettings(), "defaults"
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SettingsError(f"{path} is not valid JSON: {e}") from e
    return PromptLesionSettings.from_dict(d, str(path)), str(path)
