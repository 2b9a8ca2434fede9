"""Per-class Dice of predicted segmentations, via nnU-Net's own evaluator.

``compute_metrics_on_folder`` (nnunetv2.evaluation.evaluate_predictions) matches files by name and
writes summary.json; we read its per-class mean Dice. nnU-Net counts a class that is absent from
both reference and prediction of a case as NaN and leaves it out of the mean.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO


def per_class_dice(reference_folder: str | Path, prediction_folder: str | Path, labels: dict[str, int],
                   output_file: str | Path, file_ending: str = ".nii.gz", num_processes: int = 1) -> dict[str, float]:
    """{class name: mean Dice over cases} for every non-background label in ``labels``."""
    named = {k: int(v) for k, v in labels.items() if k != "background"}
    compute_metrics_on_folder(str(reference_folder), str(prediction_folder), str(output_file), SimpleITKIO(),
                              file_ending, list(named.values()), None, num_processes)
    summary = json.loads(Path(output_file).read_text())
    return {name: float(summary["mean"][str(v)]["Dice"]) for name, v in named.items()}


def format_dice_table(results: dict[str, dict[str, float]], classes: list[str]) -> str:
    """A text table: one row per class (+ mean of the listed classes), one column per method."""
    methods = list(results)
    width = max(len(c) for c in classes + ["mean"]) + 2
    lines = ["class".ljust(width) + "".join(m.rjust(24) for m in methods)]
    for c in classes:
        lines.append(c.ljust(width) + "".join(_fmt(results[m].get(c)).rjust(24) for m in methods))
    means = []
    for m in methods:
        vals = [results[m][c] for c in classes if results[m].get(c) is not None and not math.isnan(results[m][c])]
        means.append(sum(vals) / len(vals) if vals else float("nan"))
    lines.append("mean".ljust(width) + "".join(_fmt(v).rjust(24) for v in means))
    return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"
