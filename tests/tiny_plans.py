"""A cheap nnU-Net plans file for CPU tests: same preprocessed data, a small patch and network.

Used with ``-p nnUNetPlans_tiny`` (nnU-Net's own plans-identifier mechanism): the configuration keeps its
data_identifier, so the data preprocessed for nnUNetPlans is reused as is.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

TINY_PLANS = "nnUNetPlans_tiny"


def write_tiny_plans(preprocessed_dataset_dir: str | Path, patch_size=(24, 32, 32), configuration="3d_fullres") -> str:
    """Write nnUNetPlans_tiny.json next to nnUNetPlans.json; returns the plans identifier.

    patch_size in nnU-Net's axis order (z, y, x for SimpleITK data); three resolution stages of 8/16/32 features
    with one convolution each (a few thousand parameters instead of millions).
    """
    d = Path(preprocessed_dataset_dir)
    plans = json.loads((d / "nnUNetPlans.json").read_text())
    tiny = copy.deepcopy(plans)
    tiny["plans_name"] = TINY_PLANS
    cfg = tiny["configurations"][configuration]
    cfg["patch_size"] = list(patch_size)
    cfg["batch_size"] = 2
    kw = cfg["architecture"]["arch_kwargs"]
    kw.update(n_stages=3, features_per_stage=[8, 16, 32], kernel_sizes=[[3, 3, 3]] * 3,
              strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    # keep only the configuration we use: the others still describe the full-size networks
    tiny["configurations"] = {configuration: cfg}
    # Atomic and only when different: xdist workers share the session's preprocessed phantoms, and one worker's
    # training may be reading this file while another worker's test writes the same content.
    target, text = d / f"{TINY_PLANS}.json", json.dumps(tiny, indent=1)
    if not target.is_file() or target.read_text() != text:
        tmp = d / f".{TINY_PLANS}.json.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, target)
    return TINY_PLANS
