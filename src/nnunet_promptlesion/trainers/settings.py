"""PromptLesionTrainer settings: a JSON file with documented defaults.

Looked up, first match wins:
  1. the file named by the environment variable ``PROMPTLESION_SETTINGS``;
  2. ``$nnUNet_preprocessed/DatasetXXX/promptlesion_settings.json``;
  3. the defaults below.
Unknown keys are an error (a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

SETTINGS_FILENAME = "promptlesion_settings.json"
SETTINGS_ENV = "PROMPTLESION_SETTINGS"


class SettingsError(ValueError):
    pass


@dataclass
class PromptLesionSettings:
    #: fraction of every training batch that is synthetic (0.5 = 1:1; odd batches round the synthetic half down)
    synthetic_fraction: float = 0.5
    #: "inverse_frequency" (1 / number of real lesions of the class in the training cases), "uniform",
    #: or a dict {lesion name or label: weight}
    class_weights: Union[str, dict] = "inverse_frequency"
    #: "rule_based" (statistics from the real lesions); the diffusion synthesizer plugs in here later
    synthesizer: str = "rule_based"
    #: side of the carrier's central region, as a fraction of the patch size, that must hold no real lesion;
    #: synthetic lesions are centred inside it
    centre_fraction: float = 0.5
    #: Gaussian blending sigma range in voxels
    blend_sigma_voxels: list = field(default_factory=lambda: [0.5, 1.5])
    #: at most this many training cases are scanned at start-up for lesion statistics, masks and carriers
    max_scan_cases: int = 1000
    #: path to a lesion spec; default: lesion_spec.json in nnUNet_preprocessed/DatasetXXX, else nnUNet_raw/DatasetXXX
    lesion_spec: Union[str, None] = None

    def __post_init__(self):
        if not 0.0 <= float(self.synthetic_fraction) <= 1.0:
            raise SettingsError(f"synthetic_fraction must lie in [0, 1], got {self.synthetic_fraction}")
        if isinstance(self.class_weights, str) and self.class_weights not in ("inverse_frequency", "uniform"):
            raise SettingsError("class_weights must be 'inverse_frequency', 'uniform' or a {class: weight} dict, "
                                f"got '{self.class_weights}'")
        if self.synthesizer not in ("rule_based",):
            raise SettingsError(f"unknown synthesizer '{self.synthesizer}' (available: rule_based)")
        if not 0.0 < float(self.centre_fraction) <= 1.0:
            raise SettingsError(f"centre_fraction must lie in (0, 1], got {self.centre_fraction}")
        lo, hi = self.blend_sigma_voxels
        if not 0 <= lo <= hi:
            raise SettingsError(f"blend_sigma_voxels must be [lo, hi] with 0 <= lo <= hi, got {self.blend_sigma_voxels}")

    def n_synthetic(self, batch_size: int) -> int:
        """Synthetic samples per batch: the synthetic share rounded down."""
        return int(batch_size * float(self.synthetic_fraction) + 1e-9)

    @classmethod
    def from_dict(cls, d: dict, source: str) -> "PromptLesionSettings":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SettingsError(f"{source}: unknown settings {sorted(unknown)}; known settings: {sorted(known)}")
        try:
            return cls(**d)
        except SettingsError as e:
            raise SettingsError(f"{source}: {e}") from e


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
