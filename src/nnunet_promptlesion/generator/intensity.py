"""How raw CT intensities map to the generators' model space [-1, 1].

Two kinds of :class:`IntensitySpace`:

``nnunet_ct``
    The input is nnU-Net's CTNormalization output ``z = (clip(HU, p00_5, p99_5) - mean) / std`` with the
    foreground statistics from ``plans['foreground_intensity_properties_per_channel']['0']``. The model
    value is ``z`` mapped linearly from the clip window ``[(p00_5 - mean)/std, (p99_5 - mean)/std]`` to
    [-1, 1]. ``to_hu`` / ``from_hu`` convert z-scores to Hounsfield units and back (exact inside the window).
``hu_window``
    The input is in HU; ``[lo, hi]`` is clipped and mapped linearly to [-1, 1] (DiffTumor: [-175, 250]).

``to_model(x)`` takes values in the space's native unit (z-score for ``nnunet_ct``, HU for ``hu_window``);
``from_model(y)`` returns that native unit. ``to_hu`` / ``from_hu`` convert native <-> HU. All methods
work on numpy arrays and torch tensors of any shape. Two spaces compare equal (``==`` or
:meth:`same_as`) when kind and parameters agree to 1e-4 relative; a checkpoint from another space is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("nnunet_ct", "hu_window")


@dataclasses.dataclass(frozen=True)
class IntensitySpace:
    kind: str
    # nnunet_ct: foreground statistics in HU
    mean: float = 0.0
    std: float = 1.0
    percentile_00_5: float = -1024.0
    percentile_99_5: float = 3071.0
    # hu_window: window in HU
    lo: float = -175.0
    hi: float = 250.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"intensity space kind must be one of {KINDS}, got '{self.kind}'")
        if self.kind == "nnunet_ct":
            if not self.std > 0:
                raise ValueError(f"nnunet_ct intensity space needs std > 0, got {self.std}")
            if not self.percentile_99_5 > self.percentile_00_5:
                raise ValueError("nnunet_ct intensity space needs percentile_99_5 > percentile_00_5")
        elif not self.hi > self.lo:
            raise ValueError(f"hu_window needs hi > lo, got [{self.lo}, {self.hi}]")

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def hu_window(cls, lo: float = -175.0, hi: float = 250.0) -> "IntensitySpace":
        return cls(kind="hu_window", lo=float(lo), hi=float(hi))

    @classmethod
    def from_nnunet_plans(cls, plans: dict | str | Path, configuration: str = "3d_fullres", channel: int = 0) -> "IntensitySpace":
        """Build from an nnU-Net plans dict or plans JSON file; refuses non-CT normalisation."""
        src = str(plans) if not isinstance(plans, dict) else "plans"
        if not isinstance(plans, dict):
            plans = json.loads(Path(plans).read_text())
        cfgs = plans.get("configurations", {})
        if configuration not in cfgs:
            raise ValueError(f"{src}: configuration '{configuration}' not in plans (have {sorted(cfgs)})")
        cfg = cfgs[configuration]
        # configurations may inherit from another one
        while "normalization_schemes" not in cfg and "inherits_from" in cfg:
            cfg = {**cfgs[cfg["inherits_from"]], **{k: v for k, v in cfg.items() if k != "inherits_from"}}
        schemes = cfg.get("normalization_schemes", [])
        if channel >= len(schemes) or schemes[channel] != "CTNormalization":
            raise ValueError(
                f"{src}: channel {channel} uses {schemes[channel] if channel < len(schemes) else 'no'} normalisation, "
                "but the generators need CTNormalization. Name the channel 'CT' in dataset.json "
                "(channel_names {\"0\": \"CT\"}) and re-run nnUNetv2_plan_and_preprocess.")
        props = plans["foreground_intensity_properties_per_channel"][str(channel)]
        return cls(kind="nnunet_ct", mean=float(props["mean"]), std=float(props["std"]),
                   percentile_00_5=float(props["percentile_00_5"]), percentile_99_5=float(props["percentile_99_5"]))

    # ---- mapping ------------------------------------------------------------------------------
    def native_window(self) -> tuple[float, float]:
        """The clip window in the native unit (z-score for nnunet_ct, HU for hu_window)."""
        if self.kind == "nnunet_ct":
            return ((self.percentile_00_5 - self.mean) / self.std, (self.percentile_99_5 - self.mean) / self.std)
        return (self.lo, self.hi)

    def hu_range(self) -> tuple[float, float]:
        """The HU values that map to -1 and +1."""
        if self.kind == "nnunet_ct":
            return (self.percentile_00_5, self.percentile_99_5)
        return (self.lo, self.hi)

    def to_model(self, x):
        lo, hi = self.native_window()
        y = (x - lo) / (hi - lo) * 2.0 - 1.0
        return _clip(y, -1.0, 1.0)

    def from_model(self, y):
        lo, hi = self.native_window()
        return (_clip(y, -1.0, 1.0) + 1.0) * 0.5 * (hi - lo) + lo

    def to_hu(self, x):
        """Native unit -> HU."""
        return x * self.std + self.mean if self.kind == "nnunet_ct" else x

    def from_hu(self, hu):
        """HU -> native unit (for nnunet_ct exactly nnU-Net's CTNormalization, including the clip)."""
        if self.kind == "nnunet_ct":
            return (_clip(hu, self.percentile_00_5, self.percentile_99_5) - self.mean) / self.std
        return hu

    def model_to_hu(self, y):
        return self.to_hu(self.from_model(y))

    def hu_to_model(self, hu):
        return self.to_model(self.from_hu(hu))

    # ---- persistence / comparison ---------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        if self.kind == "nnunet_ct":
            return {"kind": self.kind, "mean": self.mean, "std": self.std,
                    "percentile_00_5": self.percentile_00_5, "percentile_99_5": self.percentile_99_5}
        return {"kind": self.kind, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, d: dict) -> "IntensitySpace":
        d = dict(d)
        kind = d.pop("kind", None)
        if kind is None:
            raise ValueError(f"intensity space dict has no 'kind': {d}")
        return cls(kind=kind, **{k: float(v) for k, v in d.items()})

    def same_as(self, other: "IntensitySpace", rel_tol: float = 1e-4) -> bool:
        if not isinstance(other, IntensitySpace) or other.kind != self.kind:
            return False
        a, b = self.as_dict(), other.as_dict()
        return all(math.isclose(a[k], b[k], rel_tol=rel_tol, abs_tol=1e-6) for k in a if k != "kind")

    def __eq__(self, other) -> bool:  # tolerant equality: stats survive JSON/float32 round trips
        return self.same_as(other)

    def __hash__(self) -> int:
        return hash(self.kind)

    def describe(self) -> str:
        if self.kind == "nnunet_ct":
            return (f"nnU-Net CTNormalization (mean {self.mean:.1f} HU, std {self.std:.1f} HU, "
                    f"window [{self.percentile_00_5:.1f}, {self.percentile_99_5:.1f}] HU) -> [-1, 1]")
        return f"HU window [{self.lo:g}, {self.hi:g}] -> [-1, 1]"


def _clip(x, lo, hi):
    if isinstance(x, np.ndarray):
        return np.clip(x, lo, hi)
    if hasattr(x, "clamp"):
        return x.clamp(lo, hi)
    return min(max(x, lo), hi)
