"""Finding what a prediction folder is evaluated with: its label folder, ``dataset.json`` and the lesion spec.

Shared by the evaluation (:mod:`.evaluate`) and the softmax gauge (:mod:`.transfer`), which read the same folders.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..lesions.spec import LesionSpec, find_lesion_spec


def find_dataset_json(gt_dir: Path, pred_dir: Path) -> Path | None:
    """dataset.json next to the label folder (nnUNet_raw/DatasetX/labelsTs -> DatasetX/dataset.json), else the
    copy nnUNetv2_predict writes into its output folder."""
    for c in (gt_dir.parent / "dataset.json", gt_dir / "dataset.json", pred_dir / "dataset.json"):
        if c.is_file():
            return c
    return None


def resolve_folders(pred_dir, gt_dir, dataset_json, spec, error=ValueError):
    """(pred_dir, gt_dir, dataset_json dict or None, LesionSpec or None): both folders must exist (else
    ``error``); dataset_json / spec given as dicts/objects, paths, or "auto" (found next to the folders: dataset.json
    by :func:`find_dataset_json`, lesion_spec.json in the label folder's parent, then in the label folder; None when
    there is none)."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise error(f"{what} folder {d} does not exist")
    if isinstance(dataset_json, str) and dataset_json == "auto":
        dj_path = find_dataset_json(gt_dir, pred_dir)
        dataset_json = json.loads(dj_path.read_text()) if dj_path else None
    elif isinstance(dataset_json, (str, os.PathLike)):
        dataset_json = json.loads(Path(dataset_json).read_text())
    if isinstance(spec, str) and spec == "auto":
        sp = find_lesion_spec([gt_dir.parent, gt_dir])
        spec = LesionSpec.load(sp) if sp else None
    elif isinstance(spec, (str, os.PathLike)):
        spec = LesionSpec.load(spec)
    return pred_dir, gt_dir, dataset_json, spec
