"""promptlesion_demo's pieces that do not need a training: the plan edit, the statistics and the report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnunet_promptlesion.cli import demo


def _eval(dices_by_case: dict[str, dict[str, float | None]], detected: dict[str, tuple[int, int, int]]) -> dict:
    """A minimal evaluate_folders()-shaped dict: per case {class: Dice or None (class absent)}."""
    classes = sorted({c for d in dices_by_case.values() for c in d})
    cases = []
    for case, per in dices_by_case.items():
        metrics = {}
        for c in classes:
            v = per.get(c)
            metrics[c] = {"Dice": float("nan") if v is None else v, "n_ref": 0 if v is None else 10}
        cases.append({"case": case, "metrics": metrics})
    summary = {}
    for c in classes:
        vals = [per[c] for per in dices_by_case.values() if per.get(c) is not None]
        s = {"Dice": float(np.mean(vals)) if vals else None}
        if c in detected:
            s["detected"], s["lesions"], s["false_positives"] = detected[c]
        summary[c] = s
    return {"cases": cases, "summary": summary}


def test_format_table_aligns_columns():
    text = demo.format_table(["arm", "Dice", "detected"], [["nnU-Net, real only", "0.0", "1/10"],
                                                          ["PromptLesion rule-based 1:1", "55.5", "10/10"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # every line (header, rule, rows) has the same width
    header, rule = lines[0], lines[1]
    # Columns are separated by at least two spaces and never run together.
    assert "arm" in header and "  Dice" in header and "  detected" in header
    assert set(rule.strip()) <= {"-", " "}
    # Right-aligned numeric columns end at the same position.
    assert lines[2].rstrip().endswith("1/10") and lines[3].rstrip().endswith("10/10")


def test_paired_tests_values_and_degenerate_cases():
    a = [0.1, 0.2, 0.3, 0.4, 0.5]
    b = [0.3, 0.5, 0.4, 0.8, 0.6]
    t = demo.paired_tests(a, b)
    from scipy import stats

    assert t["n"] == 5
    assert t["mean_diff"] == pytest.approx(np.mean(np.subtract(b, a)))
    assert t["t_p"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    assert t["wilcoxon_p"] == pytest.approx(stats.wilcoxon(np.subtract(b, a)).pvalue)
    same = demo.paired_tests([0.0, 0.0], [0.0, 0.0])
    assert same["t_p"] == 1.0 and same["wilcoxon_p"] == 1.0
    empty = demo.paired_tests([], [])
    assert empty["n"] == 0 and math.isnan(empty["t_p"])


def test_build_report_pairs_cases_and_counts_misses_as_zero():
    ref = [_eval({"a": {"calc": 0.5, "soft": 0.0, "wall": 0.9}, "b": {"calc": 0.7, "soft": None, "wall": 0.8}},
                 {"calc": (2, 2, 1), "soft": (0, 1, 0)})]
    arm = [_eval({"a": {"calc": 0.4, "soft": 0.6, "wall": 0.9}, "b": {"calc": 0.6, "soft": None, "wall": 0.8}},
                 {"calc": (2, 2, 0), "soft": (1, 1, 3)})]
    # A miss on a case that holds the class is 0 in the paired test, even if the evaluator reports NaN.
    arm[0]["cases"][0]["metrics"]["calc"]["Dice"] = float("nan")
    rep = demo.build_report({"real": ref, "syn": arm}, ["calc", "soft"], ["wall"], "real")
    calc = rep["classes"]["calc"]["tests"]["syn"]
    assert calc["n"] == 2 and calc["mean_diff"] == pytest.approx(((0.0 - 0.5) + (0.6 - 0.7)) / 2)
    soft = rep["classes"]["soft"]["tests"]["syn"]
    assert soft["n"] == 1 and soft["mean_diff"] == pytest.approx(0.6)  # case b holds no soft plaque: not paired
    row = rep["classes"]["soft"]["arms"]["syn"]
    assert (row["detected"], row["lesions"], row["false_positives"]) == (1, 1, 3)
    assert row["fp_per_case"] == pytest.approx(1.5)
    assert "tests" not in rep["classes"]["wall"]
    text = demo.format_report(rep, n_test=2, n_repeats=1, budget="1 x 1", class_notes={"soft": "rare"})
    assert "soft  (rare)" in text and "1/1 (100%)" in text and "paired t-test p =" in text


def test_add_demo_configuration_inherits_and_is_idempotent(tmp_path):
    plans = {"configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 48, 48], "batch_size": 2,
        "median_image_size_in_voxels": [40.0, 48.0, 48.0],
        "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {"n_stages": 5, "features_per_stage":
                         [32, 64, 128, 256, 320], "strides": [[1, 1, 1]] * 5}, "_kw_requires_import": []}}}}
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(plans))
    cfg = demo.add_demo_configuration(f)
    saved = json.loads(f.read_text())
    assert saved["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]  # parent untouched
    d = saved["configurations"][demo.DEMO_CONFIGURATION]
    assert d == cfg and d["inherits_from"] == "3d_fullres" and d["patch_size"] == [32, 32, 32]
    kw = d["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 4 == len(kw["strides"]) == len(kw["features_per_stage"])
    assert kw["strides"][0] == [1, 1, 1] and kw["strides"][1:] == [[2, 2, 2]] * 3
    mtime = f.stat().st_mtime_ns
    demo.add_demo_configuration(f)
    assert f.stat().st_mtime_ns == mtime  # unchanged plans are not rewritten


def test_plot_report_writes_png(tmp_path):
    ref = [_eval({"a": {"calc": 0.5, "soft": 0.0, "wall": 0.9}}, {"calc": (1, 1, 0), "soft": (0, 1, 0)})] * 2
    rep = demo.build_report({"real": ref, "syn": ref}, ["calc", "soft"], ["wall"], "real")
    demo.plot_report(rep, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_trainers_skip_self_validation_only_for_fold_all():
    from nnunet_promptlesion.trainers.variants import (PromptLesionTrainer_demo, _NoSelfValidationMixin,
                                                       nnUNetTrainer_promptlesionDemo)

    class Parent:
        def perform_actual_validation(self, save_probabilities=False):
            self.validated = True

    class T(_NoSelfValidationMixin, Parent):
        validated = False

        def __init__(self, fold):
            self.fold = fold

        def print_to_log_file(self, *args, **kwargs):
            pass

    t = T("all")
    t.perform_actual_validation()
    assert not t.validated
    t = T(0)
    t.perform_actual_validation()
    assert t.validated
    for cls in (nnUNetTrainer_promptlesionDemo, PromptLesionTrainer_demo):
        assert cls.__mro__[1] is _NoSelfValidationMixin
