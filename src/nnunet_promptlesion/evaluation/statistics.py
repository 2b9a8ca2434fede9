"""Comparing experiment arms: mean ± sd over repeats and paired tests against a reference arm.

Input: ``{arm: {repeat: results}}`` where ``results`` is the dict of :func:`.evaluate.evaluate_folders`
(or evaluation.json read back with :func:`.evaluate.load_results`). Every repeat of every arm must have
evaluated the same test cases.

    from nnunet_promptlesion.evaluation.statistics import compare_arms, format_comparison_markdown, plot_comparison
    table = compare_arms({"real_only": {0: r0, 1: r1}, "rule_based": {0: s0, 1: s1}}, reference="real_only")
    print(format_comparison_markdown(table))
    plot_comparison(table, "dice_by_arm.png")

Per class and arm: the repeat-level summaries (Dice, NSD, lesion sensitivity, FP per case, lesion-wise Dice)
as mean ± sd over repeats (sd with ddof=1; None for one repeat). Against the reference arm: per-case Dice
paired by (repeat index, case) and pooled over repeats, tested with scipy's paired t-test (``ttest_rel``)
and Wilcoxon signed-rank test (``wilcoxon``, two-sided). Pairs where either Dice is undefined (class absent
from reference and prediction) are dropped. p is None when a test is undefined (fewer than 2 pairs, or all
differences zero).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path

METRICS = ("Dice", "NSD", "sensitivity", "fp_per_case", "lesion_dice")


def mean_sd(values) -> tuple[float | None, float | None, int]:
    """(mean, sd with ddof=1, n) of the finite entries; None where undefined."""
    v = np.asarray([np.nan if x is None else float(x) for x in values], float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def paired_tests(x, y) -> dict:
    """Paired comparison of x (arm) and y (reference), same length; pairs with a None/NaN are dropped.

    Returns {n, mean_diff (x - y), t, p_ttest, p_wilcoxon}.
    """
    from scipy import stats

    a = np.asarray([np.nan if v is None else float(v) for v in x], float)
    b = np.asarray([np.nan if v is None else float(v) for v in y], float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out = {"n": int(a.size), "mean_diff": float((a - b).mean()) if a.size else None, "t": None,
           "p_ttest": None, "p_wilcoxon": None}
    d = a - b
    if a.size < 2 or np.all(d == 0):
        return out
    if np.std(d) > 0:
        t = stats.ttest_rel(a, b)
        out["t"], out["p_ttest"] = _finite(t.statistic), _finite(t.pvalue)
    try:
        out["p_wilcoxon"] = _finite(stats.wilcoxon(a, b).pvalue)
    except ValueError:
        pass
    return out


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _case_dice(results: dict, cls: str) -> dict[str, float | None]:
    return {r["case"]: r["metrics"][cls]["Dice"] for r in results["cases"]}


def _cases_with_class(results: dict, cls: str) -> set[str]:
    return {r["case"] for r in results["cases"] if r["metrics"][cls].get("n_ref", 1) > 0}


def compare_arms(evaluations: dict[str, dict[int, dict]], reference: str | None = None,
                 paired_cases: str = "defined") -> dict:
    """The comparison table (JSON-ready dict) of ``{arm: {repeat: results}}``; see the module docstring.

    paired_cases: "defined" (every case where both Dice values are defined, nnU-Net's convention: a false
    positive in a case without the class counts as Dice 0) or "with_class" (only cases whose ground truth
    holds the class, the per-class protocol of lesion papers).

    Returns {reference, arms, classes, repeats: {arm: [repeat ids]}, table: {class: {arm: {<metric>: {mean, sd, n},
    per_repeat: {metric: [values]}, test: paired_tests(...) or None}}}}.
    """
    if paired_cases not in ("defined", "with_class"):
        raise ValueError(f"paired_cases must be 'defined' or 'with_class', got '{paired_cases}'")
    arms = list(evaluations)
    if not arms:
        raise ValueError("no evaluated arm to compare")
    if reference is not None and reference not in evaluations:
        raise ValueError(f"reference arm '{reference}' has no evaluation (arms: {arms})")
    first = next(iter(next(iter(evaluations.values())).values()))
    classes = [c["name"] for c in first["classes"]]
    cases = sorted(r["case"] for r in first["cases"])
    for arm, reps in evaluations.items():
        for rep, res in reps.items():
            got = sorted(r["case"] for r in res["cases"])
            if got != cases:
                raise ValueError(f"arm '{arm}' repeat {rep} evaluated other test cases than the rest "
                                 f"({len(got)} vs {len(cases)}); the paired tests need the same cases")
    table = {}
    for cls in classes:
        table[cls] = {}
        for arm in arms:
            reps = evaluations[arm]
            per_repeat = {m: [reps[r]["summary"][cls].get(m) for r in sorted(reps)] for m in METRICS}
            row = {m: dict(zip(("mean", "sd", "n"), mean_sd(per_repeat[m]))) for m in METRICS}
            row["per_repeat"] = per_repeat
            row["test"] = None
            if reference is not None and arm != reference:
                common = sorted(set(reps) & set(evaluations[reference]))
                x, y = [], []
                for r in common:
                    da, db = _case_dice(reps[r], cls), _case_dice(evaluations[reference][r], cls)
                    keep = _cases_with_class(evaluations[reference][r], cls) if paired_cases == "with_class" else cases
                    for case in cases:
                        if case not in keep:
                            continue
                        x.append(da[case])
                        y.append(db[case])
                row["test"] = {**paired_tests(x, y), "repeats": common}
            table[cls][arm] = row
    return {"reference": reference, "paired_cases": paired_cases, "arms": arms, "classes": classes, "cases": len(cases),
            "repeats": {a: sorted(evaluations[a]) for a in arms}, "table": table}


def _ms(m: dict, pct: bool = True) -> str:
    if m["mean"] is None:
        return "n/a"
    f = 100.0 if pct else 1.0
    digits = 1 if pct else 2
    return f"{f * m['mean']:.{digits}f}" + (f" ± {f * m['sd']:.{digits}f}" if m["sd"] is not None else "")


def _p(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}"


def format_comparison_markdown(comp: dict, title: str | None = None) -> str:
    """One markdown table per class: arms as rows, mean ± sd over repeats, paired tests vs the reference."""
    out = []
    if title:
        out += [f"## {title}", ""]
    ref = comp["reference"]
    out.append(f"{comp['cases']} test cases; mean ± sd over repeats (repeats per arm: "
               + ", ".join(f"{a} {len(r)}" for a, r in comp["repeats"].items()) + "). Dice, NSD, sensitivity and "
               "lesion Dice in %." + (f" Paired tests of per-case Dice against '{ref}', cases pooled over repeats"
                                      + (" (cases whose ground truth holds the class)."
                                         if comp.get("paired_cases") == "with_class" else ".") if ref else ""))
    for cls in comp["classes"]:
        out += ["", f"### {cls}", "",
                "| arm | Dice | NSD | lesion sensitivity | FP / case | lesion Dice | Δ Dice | pairs | p (t-test) | p (Wilcoxon) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arm in comp["arms"]:
            row = comp["table"][cls][arm]
            t = row["test"]
            if arm == ref:
                tests = ["reference", "", "", ""]
            elif t is None:
                tests = ["", "", "", ""]
            else:
                diff = "n/a" if t["mean_diff"] is None else f"{100 * t['mean_diff']:+.1f}"
                tests = [diff, str(t["n"]), _p(t["p_ttest"]), _p(t["p_wilcoxon"])]
            out.append("| " + " | ".join([arm, _ms(row["Dice"]), _ms(row["NSD"]), _ms(row["sensitivity"]),
                                          _ms(row["fp_per_case"], pct=False), _ms(row["lesion_dice"])] + tests) + " |")
    return "\n".join(out) + "\n"


def plot_comparison(comp: dict, path: str | os.PathLike, metric: str = "Dice", title: str | None = None) -> None:
    """Grouped bars (class x arm) of ``metric``: mean over repeats, sd as error bar, one dot per repeat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, arms = comp["classes"], comp["arms"]
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(classes) * max(1, len(arms)) * 0.5 + 2), 3.8))
    cmap = plt.get_cmap("tab10")
    for k, arm in enumerate(arms):
        xs = np.arange(len(classes)) + (k - (len(arms) - 1) / 2) * width
        means = [comp["table"][c][arm][metric]["mean"] for c in classes]
        sds = [comp["table"][c][arm][metric]["sd"] for c in classes]
        ax.bar(xs, [0 if m is None else m for m in means], width * 0.9, yerr=[0 if s is None else s for s in sds],
               color=cmap(k % 10), alpha=0.8, label=arm, capsize=2)
        for x, c in zip(xs, classes):
            vals = [v for v in comp["table"][c][arm]["per_repeat"][metric] if v is not None]
            ax.scatter(np.full(len(vals), x), vals, s=9, color="k", zorder=3)
    ax.set_xticks(np.arange(len(classes)), classes, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (bars: mean over repeats, dots: repeats)", fontsize=8)
    if metric in ("Dice", "NSD", "sensitivity", "lesion_dice"):
        ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(3, len(arms)))
    ax.set_title(title or f"{metric} per class and arm", fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
