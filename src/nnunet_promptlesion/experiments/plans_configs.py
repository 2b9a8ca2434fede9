"""Extra nnU-Net configurations added to a plans file the nnU-Net way (``"inherits_from"``).

nnU-Net resolves a configuration that ``"inherits_from"`` another by taking the parent's entries and
overriding the ones listed (nnunetv2.utilities.plans_handling.plans_handler, recursively). Two uses here:

* :func:`add_coarse_configuration`: a 3-D configuration at a coarser spacing with its **own** preprocessed data
  (its own ``data_identifier``), filled by nnU-Net's ``nnUNetv2_preprocess -c NAME``. Why: real CT at 1 mm
  in-plane is ~4x more voxels per patch than a CPU can train in minutes; coarsening the in-plane grid is what a
  user would do by hand, and nnU-Net's own preprocessor does the resampling.
* :func:`add_2d_configuration`: a 2-D configuration that trains slices of a 3-D configuration's preprocessed data
  (same ``data_identifier``, so nothing is preprocessed twice), with a small patch and network for a CPU.

Both are idempotent: the plans file is rewritten (atomically) only when the wanted entry differs.
Spacing and patch lists follow nnU-Net's axis order (z, y, x for 3-D; y, x for 2-D), in mm and voxels.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

from ..utils.atomic import write_json_atomic


class PlansConfigError(ValueError):
    """A configuration cannot be added as asked; the message names the plans file and the entry."""


def _resolved(plans: dict, name: str) -> dict:
    """The configuration ``name`` with its inheritance chain applied (what nnU-Net's PlansManager sees)."""
    confs = plans["configurations"]
    if name not in confs:
        raise PlansConfigError(f"configuration '{name}' is not in the plans (has {sorted(confs)})")
    c = confs[name]
    parent = c.get("inherits_from")
    out = _resolved(plans, parent) if parent else {}
    out.update({k: v for k, v in c.items() if k != "inherits_from"})
    return out


def _write_if_changed(plans_file: Path, plans: dict, name: str, wanted: dict) -> dict:
    if plans["configurations"].get(name) != wanted:
        plans["configurations"][name] = wanted
        write_json_atomic(plans, plans_file)
    return wanted


def _strides(patch: Sequence[int], n_stages: int) -> list[list[int]]:
    """Stride 2 per stage along an axis while it stays divisible and >= 4 voxels; full resolution first."""
    return [[1] * len(patch)] + [[2 if p % 2 ** (k + 1) == 0 and p // 2 ** (k + 1) >= 4 else 1 for p in patch]
                                 for k in range(n_stages - 1)]


def add_coarse_configuration(plans_file: Path, name: str, base: str = "3d_fullres",
                             spacing_factor: Sequence[float] = (1.0, 2.0, 2.0),
                             patch_size: Sequence[int] | None = None) -> dict:
    """Add 3-D configuration ``name`` = ``base`` resampled to ``spacing * spacing_factor`` (idempotent).

    The new configuration gets its own data identifier (``<plans>_<name>``), so run
    ``nnUNetv2_preprocess -d ID -c NAME -plans_name <plans>`` afterwards to fill it. ``median_image_size_in_voxels``
    is scaled with the spacing (nnU-Net uses it to cap patch sizes); the patch is ``patch_size`` or the base's
    scaled down, capped at the median image size. The network is the base's (strides recomputed for the patch).
    """
    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text())
    b = _resolved(plans, base)
    if len(b["spacing"]) != 3 or len(spacing_factor) != 3:
        raise PlansConfigError(f"{plans_file}: a coarse configuration needs a 3-D base and 3 spacing factors "
                               f"(base '{base}' spacing {b['spacing']}, factors {list(spacing_factor)})")
    if any(f <= 0 for f in spacing_factor):
        raise PlansConfigError(f"{plans_file}: spacing factors must be > 0, got {list(spacing_factor)}")
    spacing = [float(s) * float(f) for s, f in zip(b["spacing"], spacing_factor)]
    median = [max(1, int(round(m / f))) for m, f in zip(b["median_image_size_in_voxels"], spacing_factor)]
    if patch_size is None:
        patch_size = [int(p / f) for p, f in zip(b["patch_size"], spacing_factor)]
    ps = [int(min(p, m)) for p, m in zip(patch_size, median)]
    arch = copy.deepcopy(b["architecture"])
    arch["arch_kwargs"]["strides"] = _strides(ps, int(arch["arch_kwargs"]["n_stages"]))
    wanted = {"inherits_from": base, "data_identifier": f"{plans.get('plans_name', plans_file.stem)}_{name}",
              "spacing": spacing, "median_image_size_in_voxels": median, "patch_size": ps, "architecture": arch}
    return _write_if_changed(plans_file, plans, name, wanted)


def add_2d_configuration(plans_file: Path, name: str, base: str = "3d_fullres", batch_size: int = 8,
                         features: Sequence[int] = (16, 32, 64, 128), patch_size: Sequence[int] = (32, 32)) -> dict:
    """Add a 2-D configuration ``name`` that trains slices of ``base``'s preprocessed data (idempotent).

    It "inherits_from" ``base`` (same data_identifier, so no second preprocessing) and overrides what makes
    nnU-Net train slice-wise: a 2-D in-plane patch (``patch_size`` voxels (y, x), capped at the slice size),
    2-D convolutions and instance norms, batch Dice, in-plane spacing; ``features`` per stage (one stage each).
    """
    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text())
    b = _resolved(plans, base)
    if len(b["spacing"]) != 3:
        raise PlansConfigError(f"{plans_file}: a 2-D configuration needs a 3-D base ('{base}' has spacing {b['spacing']})")
    slice_size = [int(s) for s in (b.get("median_image_size_in_voxels") or b["patch_size"])[1:]]
    n = len(features)
    # A patch capped at the slice size is rounded down to a multiple of 2^(stages-1), so every stage still halves
    # both axes (a 94-voxel axis would stop downsampling after one stage); nnU-Net pads smaller slices.
    step = 2 ** (n - 1)
    ps = [int(p) if int(p) <= s else max(step, s // step * step) for p, s in zip(patch_size, slice_size)]
    arch = copy.deepcopy(b["architecture"])
    arch["arch_kwargs"].update(n_stages=n, features_per_stage=list(features), kernel_sizes=[[3, 3]] * n,
                               strides=_strides(ps, n), n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1),
                               conv_op="torch.nn.modules.conv.Conv2d",
                               norm_op="torch.nn.modules.instancenorm.InstanceNorm2d")
    wanted = {"inherits_from": base, "patch_size": ps, "batch_size": int(batch_size), "batch_dice": True,
              "spacing": list(b["spacing"])[1:], "median_image_size_in_voxels": slice_size, "architecture": arch}
    return _write_if_changed(plans_file, plans, name, wanted)
