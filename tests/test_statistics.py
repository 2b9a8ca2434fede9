"""evaluation.statistics: case-paired tests, bootstrap intervals and "gap closed", checked against hand values."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_promptlesion.evaluation.statistics import (NO_HEADROOM, compare_arms, format_comparison_text, format_table,
                                                        gap_closed, mean_sd, paired_tests)

# Values are sums/means of a handful of float64 numbers of magnitude <= 1: a few ulps of error at most.
TOL = 64 * np.finfo(np.float64).eps


def _results(dice: dict[str, float | None], det: dict[str, tuple[int, int]] | None = None, cls: str = "lesion",
             n_ref: dict[str, int] | None = None) -> dict:
    """An evaluate_folders()-shaped dict for one repeat: per case Dice (None: undefined) and (detected, lesions)."""
    cases = []
    for c, v in dice.items():
        m = {"Dice": v, "n_ref": (n_ref or {}).get(c, 10)}
        if det is not None:
            m["detected"], m["lesions"] = det[c]
        cases.append({"case": c, "metrics": {cls: m}})
    vals = [v for v in dice.values() if v is not None]
    summary = {"Dice": float(np.mean(vals)) if vals else None, "NSD": None, "fp_per_case": 0.0, "lesion_dice": None,
               "sensitivity": (sum(d for d, _ in det.values()) / sum(n for _, n in det.values())) if det else None}
    return {"classes": [{"name": cls}], "cases": cases, "summary": {cls: summary}}


def test_cases_are_the_unit_repeats_are_averaged_first():
    from scipy import stats

    ev = {"base": {0: _results({"a": 0.2, "b": 0.4, "c": 0.1}), 1: _results({"a": 0.4, "b": 0.4, "c": 0.3})},
          "arm": {0: _results({"a": 0.5, "b": 0.6, "c": 0.4}), 1: _results({"a": 0.5, "b": 0.8, "c": 0.5})}}
    t = compare_arms(ev, reference="base")["table"]["lesion"]["arm"]["test"]
    # case means: base a .3 b .4 c .2, arm a .5 b .7 c .45 -> differences .2 .3 .25: n = 3 cases, not 6 pairs
    assert t["n"] == 3
    assert t["mean_diff"] == pytest.approx(0.25, abs=TOL)
    # t = mean / (sd / sqrt(n)) = .25 / (.05 / sqrt 3) = 5 sqrt 3; with 2 degrees of freedom the two-sided
    # p-value has the closed form 1 - t / sqrt(2 + t^2)
    assert t["t"] == pytest.approx(5 * np.sqrt(3), rel=1e-9)
    assert t["p_ttest"] == pytest.approx(1 - 5 * np.sqrt(3) / np.sqrt(77), rel=1e-9)
    # Wilcoxon, 3 positive differences without ties: exact two-sided p = 2 / 2^3
    assert t["p_wilcoxon"] == pytest.approx(0.25, abs=TOL)
    assert t["p_ttest"] == pytest.approx(stats.ttest_rel([.5, .7, .45], [.3, .4, .2]).pvalue, rel=1e-9)
    assert t["repeats"] == {"arm": 2, "base": 2}
    lo, hi = t["ci"]
    assert lo <= 0.25 <= hi and 0.0 < lo   # every resampled difference is positive here


def test_bootstrap_resamples_whole_trainings():
    # arm: one training scores .9 on every case, the other .1; reference .5 everywhere. The case means are all
    # .5 (difference 0), but which trainings one gets matters: drawing repeat 0 twice gives +.4, repeat 1 twice
    # -.4, each with probability 1/4, so the 95 % interval is exactly [-.4, +.4] (not shrunk by the 4 cases).
    cases = {c: 0.9 for c in "abcd"}
    ev = {"ref": {0: _results({c: 0.5 for c in "abcd"}), 1: _results({c: 0.5 for c in "abcd"})},
          "arm": {0: _results(cases), 1: _results({c: 0.1 for c in "abcd"})}}
    t = compare_arms(ev, reference="ref")["table"]["lesion"]["arm"]["test"]
    assert t["mean_diff"] == pytest.approx(0.0, abs=TOL) and t["n"] == 4
    assert t["ci"] == [pytest.approx(-0.4, abs=TOL), pytest.approx(0.4, abs=TOL)]
    assert t["p_ttest"] is None and t["p_wilcoxon"] is None      # every case-level difference is 0


def test_gap_closed_dice_and_sensitivity_with_intervals():
    det0 = {"a": (0, 2), "b": (0, 2)}
    ev = {"base": {0: _results({"a": 0.2, "b": 0.2}, det0), 1: _results({"a": 0.2, "b": 0.2}, det0)},
          "syn": {0: _results({"a": 0.4, "b": 0.4}, {"a": (1, 2), "b": (1, 2)}),
                  1: _results({"a": 0.4, "b": 0.4}, {"a": (1, 2), "b": (0, 2)})},
          "ceil": {0: _results({"a": 0.6, "b": 0.6}, {"a": (2, 2), "b": (2, 2)}),
                   1: _results({"a": 0.6, "b": 0.6}, {"a": (2, 2), "b": (2, 2)})}}
    comp = compare_arms(ev, reference="base", ceiling="ceil")
    row = comp["table"]["lesion"]["syn"]
    g = row["gap_closed"]["Dice"]
    # (.4 - .2) / (.6 - .2) with no variation anywhere: the interval collapses on the value
    assert g["value"] == pytest.approx(0.5, abs=TOL) and g["headroom"] == pytest.approx(0.4, abs=TOL)
    assert g["ci"] == [pytest.approx(0.5, abs=TOL), pytest.approx(0.5, abs=TOL)]
    # sensitivity: detections averaged over repeats (a: 1, b: .5) over 4 lesions = .375; baseline 0, ceiling 1
    assert row["case_level"]["sensitivity"] == pytest.approx(0.375, abs=TOL)
    s = row["gap_closed"]["sensitivity"]
    assert s["value"] == pytest.approx(0.375, abs=TOL) and s["ci"][0] <= 0.375 <= s["ci"][1]
    assert row["test"]["sensitivity_diff"] == pytest.approx(0.375, abs=TOL)
    assert comp["table"]["lesion"]["base"]["gap_closed"] is None and comp["table"]["lesion"]["ceil"]["gap_closed"] is None
    text = format_comparison_text(comp)
    assert "50% [50, 50]" in text and "1.5/4 (38%)" in text
    lines = text.splitlines()
    # arms in the order baseline, arms, ceiling
    assert [l.split()[0] for l in lines if l.strip().split(" ")[0] in ("base", "syn", "ceil")] == ["base", "syn", "ceil"]


def test_no_ceiling_headroom_is_said_not_divided():
    assert gap_closed(0.3, 0.2, 0.2) is None and gap_closed(0.3, 0.2, 0.1) is None
    assert gap_closed(0.3, 0.2, 0.4) == pytest.approx(0.5, abs=TOL)
    flat = {0: _results({"a": 0.0, "b": 0.0}, {"a": (0, 1), "b": (0, 1)})}
    ev = {"base": flat, "syn": {0: _results({"a": 0.1, "b": 0.0}, {"a": (1, 1), "b": (0, 1)})}, "ceil": flat}
    comp = compare_arms(ev, reference="base", ceiling="ceil")
    g = comp["table"]["lesion"]["syn"]["gap_closed"]
    assert g["Dice"]["value"] is None and g["Dice"]["note"] == NO_HEADROOM and g["Dice"]["ci"] is None
    assert g["sensitivity"]["value"] is None
    text = format_comparison_text(comp)
    assert "no headroom" in text and NO_HEADROOM in text


def test_uncertain_headroom_withholds_the_interval():
    # the ceiling beats the baseline on average, but one of its two trainings does not: many replicates have
    # no headroom, so the ratio's interval would be meaningless
    ev = {"base": {0: _results({"a": 0.3, "b": 0.3}), 1: _results({"a": 0.3, "b": 0.3})},
          "syn": {0: _results({"a": 0.35, "b": 0.35}), 1: _results({"a": 0.35, "b": 0.35})},
          "ceil": {0: _results({"a": 0.7, "b": 0.7}), 1: _results({"a": 0.1, "b": 0.1})}}
    g = compare_arms(ev, reference="base", ceiling="ceil")["table"]["lesion"]["syn"]["gap_closed"]["Dice"]
    assert g["value"] == pytest.approx(0.05 / 0.1, rel=1e-9) and g["ci"] is None and "withheld" in g["note"]


def test_with_class_pairs_only_cases_holding_the_class_and_counts_misses_as_zero():
    ev = {"base": {0: _results({"a": 0.5, "b": None, "c": 0.0}, n_ref={"c": 0})},
          "arm": {0: _results({"a": 0.7, "b": 0.4, "c": 0.0}, n_ref={"c": 0})}}
    t = compare_arms(ev, reference="base", paired_cases="with_class")["table"]["lesion"]["arm"]["test"]
    # a: .7 - .5; b holds the class and the baseline missed it (None -> 0): .4; c has no lesion: left out
    assert t["n"] == 2 and t["mean_diff"] == pytest.approx(0.3, abs=TOL)
    t2 = compare_arms(ev, reference="base")["table"]["lesion"]["arm"]["test"]
    # "defined": b is undefined in the baseline -> dropped; c (0 vs 0) is kept
    assert t2["n"] == 2 and t2["mean_diff"] == pytest.approx(0.1, abs=TOL)


def test_mismatched_cases_and_bad_arms_are_refused():
    ev = {"a": {0: _results({"x": 0.1})}, "b": {0: _results({"y": 0.1})}}
    with pytest.raises(ValueError, match="other test cases"):
        compare_arms(ev, reference="a")
    ok = {"a": {0: _results({"x": 0.1})}, "b": {0: _results({"x": 0.2})}}
    with pytest.raises(ValueError, match="needs a reference"):
        compare_arms(ok, ceiling="b")
    with pytest.raises(ValueError, match="has no evaluation"):
        compare_arms(ok, reference="nope")


def test_paired_tests_and_mean_sd_edge_cases():
    same = paired_tests([0.5, 0.6], [0.5, 0.6])
    assert same["n"] == 2 and same["p_ttest"] is None and same["p_wilcoxon"] is None
    assert paired_tests([0.5], [0.4])["p_ttest"] is None
    assert paired_tests([0.5, None], [0.4, 0.3])["n"] == 1
    assert mean_sd([0.2, None, 0.4]) == (pytest.approx(0.3), pytest.approx(np.std([0.2, 0.4], ddof=1)), 2)
    assert mean_sd([None]) == (None, None, 0)


def test_format_table_aligns_columns():
    text = format_table(["arm", "Dice", "detected"], [["real only", "0.0", "1/10"], ["rule-based 1:1", "55.5", "10/10"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].endswith(" 1/10") and lines[3].endswith("10/10") and set(lines[1].strip()) <= {"-", " "}


def test_a_collapsed_ceiling_training_is_named_in_the_report():
    # one ceiling training learnt the class (.8), the other did not (0): the mean (.4) alone would hide it
    ev = {"base": {0: _results({"a": 0.1, "b": 0.1}), 1: _results({"a": 0.1, "b": 0.1})},
          "syn": {0: _results({"a": 0.6, "b": 0.6}), 1: _results({"a": 0.6, "b": 0.6})},
          "ceil": {0: _results({"a": 0.8, "b": 0.8}), 1: _results({"a": 0.0, "b": 0.0})}}
    text = format_comparison_text(compare_arms(ev, reference="base", ceiling="ceil"))
    assert "ceiling: 1 of 2 trainings did not learn the class (Dice < 5 %)" in text
    ev["ceil"][1] = _results({"a": 0.7, "b": 0.7})
    assert "did not learn the class" not in format_comparison_text(compare_arms(ev, reference="base", ceiling="ceil"))
    # no ceiling training learnt it: there is no "other" training to rest on, and no headroom over the baseline
    ev["ceil"] = {0: _results({"a": 0.0, "b": 0.0}), 1: _results({"a": 0.01, "b": 0.01})}
    text = format_comparison_text(compare_arms(ev, reference="base", ceiling="ceil"))
    assert "no ceiling headroom" in text and "did not learn" not in text and "learnt the class" not in text
    # ... or it beat a baseline at 0 but stayed under 5 %: said in its own words
    ev["base"] = {0: _results({"a": 0.0, "b": 0.0}), 1: _results({"a": 0.0, "b": 0.0})}
    text = format_comparison_text(compare_arms(ev, reference="base", ceiling="ceil"))
    assert "ceiling: none of its 2 trainings learnt the class (Dice < 5 %)" in text and "rest on" not in text


def _with_secondary(res: dict, per_case: dict[str, dict], cls: str = "lesion") -> dict:
    """``res`` (from _results) with IoU / HD95_mm etc. per case and their repeat means in the summary."""
    from nnunet_promptlesion.evaluation.statistics import SECONDARY

    for rec in res["cases"]:
        rec["metrics"][cls].update(per_case[rec["case"]])
    for m in SECONDARY:
        vals = [rec["metrics"][cls].get(m) for rec in res["cases"]]
        vals = [v for v in vals if v is not None]
        res["summary"][cls][m] = float(np.mean(vals)) if vals else None
    return res


def test_further_metrics_are_paired_by_case_and_undefined_cases_drop_out():
    """HD95 (mm) and IoU per case: repeats averaged per case, NaN (None) left out of the means and of the pairs,
    as for Dice; under "with_class" a missed case is IoU 0 but its HD95 stays undefined."""
    def rep(hd: dict, iou: dict, n_ref=None):
        dice = {c: (None if iou[c] is None else 2 * iou[c] / (1 + iou[c])) for c in iou}
        return _with_secondary(_results(dice, n_ref=n_ref), {c: {"HD95_mm": hd[c], "IoU": iou[c]} for c in hd})

    # case c: the baseline's prediction is empty (a miss: IoU 0, HD95 undefined); d: no reference lesion at all
    base = {0: rep({"a": 4.0, "b": 6.0, "c": None, "d": None}, {"a": 0.5, "b": 0.4, "c": 0.0, "d": None}, {"d": 0}),
            1: rep({"a": 6.0, "b": 6.0, "c": None, "d": None}, {"a": 0.7, "b": 0.4, "c": 0.0, "d": None}, {"d": 0})}
    arm = {0: rep({"a": 2.0, "b": 3.0, "c": 1.0, "d": None}, {"a": 0.8, "b": 0.6, "c": 0.9, "d": None}, {"d": 0}),
           1: rep({"a": 2.0, "b": None, "c": 1.0, "d": None}, {"a": 0.8, "b": 0.6, "c": 0.9, "d": None}, {"d": 0})}
    comp = compare_arms({"base": base, "arm": arm}, reference="base", n_boot=50)
    row = comp["table"]["lesion"]["arm"]
    hd = row["secondary"]["HD95_mm"]
    # case means: base a 5, b 6, c undefined; arm a 2, b 3 (one repeat undefined), c 1 -> pairs a, b
    assert hd["case_mean"] == pytest.approx(2.0, abs=TOL) and hd["n_cases"] == 3
    assert hd["test"]["n"] == 2 and hd["test"]["mean_diff"] == pytest.approx(-3.0, abs=TOL)
    assert comp["table"]["lesion"]["base"]["secondary"]["HD95_mm"]["test"] is None
    # repeat level: per-repeat class means over the defined cases, then mean ± sd over repeats
    assert row["HD95_mm"]["mean"] == pytest.approx((2.0 + 1.5) / 2, abs=TOL) and row["HD95_mm"]["n"] == 2
    iou = row["secondary"]["IoU"]
    assert iou["test"]["n"] == 3 and iou["test"]["mean_diff"] == pytest.approx((0.2 + 0.2 + 0.9) / 3, abs=TOL)
    wc = compare_arms({"base": base, "arm": arm}, reference="base", paired_cases="with_class", n_boot=50)
    sec = wc["table"]["lesion"]["arm"]["secondary"]
    assert sec["IoU"]["test"]["n"] == 3 and sec["HD95_mm"]["test"]["n"] == 2   # d left out; c's HD95 undefined
    text = format_comparison_text(comp)
    assert "lesion: voxel overlap and surface distances" in text and "HD95 mm" in text and "-3.00 (" in text
    lines = text.splitlines()
    table = lines[lines.index("  lesion: voxel overlap and surface distances") + 1:]
    # baseline: IoU repeat means .3 and .367 (%), no precision / recall in these records, HD95 repeat means 5 and 6 mm
    assert table[2].split() == ["base", "baseline", "33.3", "±", "4.7", "n/a", "n/a", "5.50", "±", "0.71", "n/a"]
    # evaluations without the further metrics (written before them): no second table, nothing undefined shown
    old = compare_arms({"base": {0: _results({"a": 0.2})}, "arm": {0: _results({"a": 0.4})}}, reference="base")
    assert old["table"]["lesion"]["arm"]["HD95_mm"]["mean"] is None
    assert "surface distances" not in format_comparison_text(old)
