"""Comparing experiment arms without overstating: case-paired tests, bootstrap intervals and "gap closed".

Input: ``{arm: {repeat: results}}`` where ``results`` is the dict of :func:`.evaluate.evaluate_folders`
(or evaluation.json read back with :func:`.evaluate.load_results`). Every repeat of every arm must have
evaluated the same test cases.

    from nnunet_promptlesion.evaluation.statistics import compare_arms, format_comparison_text, plot_comparison
    comp = compare_arms({"scarce": {0: r0, 1: r1}, "rule_based": {...}, "ceiling": {...}},
                        reference="scarce", ceiling="ceiling")
    print(format_comparison_text(comp))

What is computed, per class and arm:

* Repeat-level summaries (Dice, NSD, lesion sensitivity, FP per case, lesion-wise Dice; voxel IoU / precision /
  recall, HD95 and ASSD in mm) as mean ± sd over repeats (sd with ddof=1; None for one repeat): how much an arm
  varies from one training to the next.
* **The unit of the tests is the test case.** Repeats of an arm are independent trainings, and repeat r of
  one arm has nothing in common with repeat r of another, so (case, repeat) pairs are not independent
  observations: pooling them multiplies n by the number of repeats and overstates significance. Each case's
  Dice is averaged over the arm's repeats (where defined), then arm and reference are paired by case
  (n = cases) for scipy's paired t-test (``ttest_rel``) and Wilcoxon signed-rank test (two-sided).
* A 95 % bootstrap interval for every difference, resampling test cases and, independently, each arm's
  repeats as whole trainings (a training's luck is shared by all cases it predicts, so repeats are resampled
  as units, not within a case): the interval reflects both the test-set and the training-to-training
  variation. Percentile intervals, ``n_boot`` replicates, a fixed seed (the same numbers on every run).
* "Gap closed" = (arm - baseline) / (ceiling - baseline) for the case-level Dice and the lesion-wise
  sensitivity, with a bootstrap interval (the same cases drawn for the three arms in a replicate). Undefined
  when the ceiling does not beat the baseline ("no ceiling headroom": at this budget even abundant real
  lesions do not teach the class, so no synthesizer can show an effect); its interval is withheld when more
  than 2.5 % of the replicates have no headroom (the headroom itself is not established).

Case-level Dice of an arm = mean over the compared cases of the case's Dice averaged over repeats.
``paired_cases="defined"``: every case where both arms have a defined Dice (nnU-Net's convention: a false
positive in a case without the class counts 0, absent from both is undefined); ``"with_class"``: only cases
whose ground truth holds the class (lesion papers' per-class protocol; a miss counts 0).
Lesion-wise sensitivity = detected / ground-truth lesions pooled over the cases, detections averaged over
repeats.

The further per-case metrics (IoU, voxel precision / recall, HD95, ASSD) get the same case-level treatment
(each case averaged over the arm's repeats where defined, cases undefined in either arm dropped from the pairs)
and the paired t-test / Wilcoxon test against the reference, without bootstrap; under ``"with_class"`` an
undefined IoU of a case holding the class counts 0, as Dice does, while the others stay undefined (see
:func:`case_matrix`). Evaluations written before these metrics existed give None (n/a) for them.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path

#: the evaluation's further per-case metrics (evaluate.CASE_METRICS), reported in a second table per class: voxel
#: overlap as fractions (higher is better), surface distances in mm (lower is better)
SECONDARY = ("IoU", "voxel_precision", "voxel_recall", "HD95_mm", "ASSD_mm")
METRICS = ("Dice", "NSD", "sensitivity", "fp_per_case", "lesion_dice") + SECONDARY
#: metrics whose undefined value in a case holding the class is a miss, counted 0 under paired_cases="with_class"
MISS_IS_ZERO = ("Dice", "IoU")
N_BOOT = 2000
CONFIDENCE = 0.95
NO_HEADROOM = "no ceiling headroom: the ceiling does not beat the baseline, so at this budget the class cannot be learnt"
#: a ceiling training below this Dice of a class did not learn it (a collapsed run, not a weak one)
CEILING_MISS_DICE = 0.05


def mean_sd(values) -> tuple[float | None, float | None, int]:
    """(mean, sd with ddof=1, n) of the finite entries; None where undefined."""
    v = np.asarray([np.nan if x is None else float(x) for x in values], float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def paired_tests(x, y) -> dict:
    """Paired comparison of x (arm) and y (reference), one value per test case; pairs with a None/NaN are dropped.

    Returns {n, mean_diff (x - y), t, p_ttest, p_wilcoxon}; p is None when a test is undefined (fewer than
    2 pairs, or every difference zero).
    """
    # deferred: scipy.stats costs ~0.5 s CPU at import (measured here); the runner's report imports this module on
    # every summary, paired tests need it only once two arms have repeats
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


# ---------------------------------------------------------------------------------------------- case tables
def case_matrix(reps: dict[int, dict], cls: str, cases: list[str], paired_cases: str = "defined",
                metric: str = "Dice") -> np.ndarray:
    """``metric`` (default Dice) per (case, repeat) of one arm: array (n_cases, n_repeats), NaN where undefined
    (or absent from an evaluation written before the metric existed).

    With ``paired_cases="with_class"`` cases without the class in the ground truth are NaN (left out), and for
    Dice and IoU a case holding the class never is undefined (a missing prediction is 0). The other metrics
    stay undefined where they are (voxel precision without a prediction, HD95/ASSD unless both masks hold
    the class): such a case drops out of the pairs, as an undefined Dice does under ``"defined"``.
    """
    m = np.full((len(cases), len(reps)), np.nan)
    for j, r in enumerate(sorted(reps)):
        by_case = {rec["case"]: rec["metrics"][cls] for rec in reps[r]["cases"]}
        for i, c in enumerate(cases):
            rec = by_case[c]
            v = rec.get(metric)
            v = np.nan if v is None else float(v)
            if paired_cases == "with_class":
                if rec.get("n_ref", 1) <= 0:
                    v = np.nan
                elif metric in MISS_IS_ZERO and not np.isfinite(v):
                    v = 0.0
            m[i, j] = v
    return m


def detection_matrix(reps: dict[int, dict], cls: str, cases: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """(detected per (case, repeat), ground-truth lesions per case) of a lesion class; None if not counted."""
    det = np.zeros((len(cases), len(reps)))
    les = np.zeros(len(cases))
    for j, r in enumerate(sorted(reps)):
        by_case = {rec["case"]: rec["metrics"][cls] for rec in reps[r]["cases"]}
        for i, c in enumerate(cases):
            rec = by_case[c]
            if rec.get("lesions") is None or rec.get("detected") is None:
                return None
            det[i, j] = rec["detected"]
            les[i] = rec["lesions"]
    return det, les


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    with np.errstate(all="ignore"), _quiet():
        return np.nanmean(a, axis=axis)


class _quiet:
    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *a):
        self._w.__exit__(*a)


def _draws(rng: np.random.Generator, n_boot: int, n_cases: int, n_reps: dict[str, int]):
    """Bootstrap indices: cases (n_boot, n_cases) shared by all arms, repeats (n_boot, R_arm) per arm."""
    cases = rng.integers(0, n_cases, size=(n_boot, n_cases))
    reps = {a: rng.integers(0, r, size=(n_boot, r)) for a, r in n_reps.items()}
    return cases, reps


def _boot_dice(m: np.ndarray, cases: np.ndarray, reps: np.ndarray) -> np.ndarray:
    """Case-level Dice of one arm in each replicate: (n_boot, n_cases) case means over the drawn repeats."""
    sub = m[cases[:, :, None], reps[:, None, :]]          # (n_boot, n_cases, R)
    return _nanmean(sub, axis=2)


def _boot_sens(det: np.ndarray, les: np.ndarray, cases: np.ndarray, reps: np.ndarray) -> np.ndarray:
    """Pooled sensitivity of one arm per replicate: sum of repeat-averaged detections / sum of lesions."""
    d = det[cases[:, :, None], reps[:, None, :]].mean(axis=2).sum(axis=1)
    n = les[cases].sum(axis=1)
    with np.errstate(all="ignore"):
        return np.where(n > 0, d / np.where(n > 0, n, 1), np.nan)


def _ci(values: np.ndarray, confidence: float) -> list[float] | None:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    a = (1 - confidence) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def gap_closed(arm: float | None, baseline: float | None, ceiling: float | None) -> float | None:
    """(arm - baseline) / (ceiling - baseline); None when a value is missing or the ceiling has no headroom."""
    if arm is None or baseline is None or ceiling is None or not ceiling > baseline:
        return None
    return (arm - baseline) / (ceiling - baseline)


def _gap(point: tuple, boot: tuple, confidence: float) -> dict:
    """Gap closed with its interval from per-replicate (arm, baseline, ceiling) arrays."""
    a, b, c = point
    value = gap_closed(a, b, c)
    out = {"value": value, "ci": None, "note": None, "headroom": None if b is None or c is None else c - b}
    if value is None:
        out["note"] = NO_HEADROOM if (b is not None and c is not None) else "undefined: a value is missing"
        return out
    ba, bb, bc = boot
    head = bc - bb
    ok = np.isfinite(head) & np.isfinite(ba) & np.isfinite(bb)
    no_head = float(np.mean(~(head > 0) | ~ok))
    if no_head > (1 - confidence) / 2:
        out["note"] = (f"interval withheld: {100 * no_head:.0f}% of bootstrap replicates have no ceiling headroom "
                       "(the ceiling's advantage over the baseline is not established)")
        return out
    sel = ok & (head > 0)
    out["ci"] = _ci((ba[sel] - bb[sel]) / head[sel], confidence)
    return out


# ---------------------------------------------------------------------------------------------- comparison
def compare_arms(evaluations: dict[str, dict[int, dict]], reference: str | None = None, ceiling: str | None = None,
                 paired_cases: str = "defined", n_boot: int = N_BOOT, confidence: float = CONFIDENCE,
                 seed: int = 0) -> dict:
    """The comparison (JSON-ready dict) of ``{arm: {repeat: results}}``; see the module docstring.

    reference: the baseline arm every other arm is tested against; ceiling: the arm that defines 100 % of
    "gap closed" (needs a reference). Returns {reference, ceiling, paired_cases, arms, classes, cases, repeats,
    n_boot, confidence, table: {class: {arm: {<metric>: {mean, sd, n}, per_repeat, case_level: {Dice, sensitivity,
    n_cases}, test: {n, mean_diff, t, p_ttest, p_wilcoxon, ci, sensitivity_diff, sensitivity_ci} or None,
    gap_closed: {Dice: {value, ci, note, headroom}, sensitivity: {...}} or None,
    secondary: {<SECONDARY metric>: {case_mean, n_cases, test: {n, mean_diff, t, p_ttest, p_wilcoxon} or None}}}}}}.
    <metric> runs over METRICS (HD95_mm and ASSD_mm in mm, the others fractions); the further metrics get paired
    tests without bootstrap.
    """
    if paired_cases not in ("defined", "with_class"):
        raise ValueError(f"paired_cases must be 'defined' or 'with_class', got '{paired_cases}'")
    arms = list(evaluations)
    if not arms:
        raise ValueError("no evaluated arm to compare")
    for what, a in (("reference", reference), ("ceiling", ceiling)):
        if a is not None and a not in evaluations:
            raise ValueError(f"{what} arm '{a}' has no evaluation (arms: {arms})")
    if ceiling is not None and reference is None:
        raise ValueError("a ceiling arm needs a reference (baseline) arm")
    first = next(iter(next(iter(evaluations.values())).values()))
    classes = [c["name"] for c in first["classes"]]
    cases = sorted(r["case"] for r in first["cases"])
    for arm, reps in evaluations.items():
        for rep, res in reps.items():
            got = sorted(r["case"] for r in res["cases"])
            if got != cases:
                raise ValueError(f"arm '{arm}' repeat {rep} evaluated other test cases than the rest "
                                 f"({len(got)} vs {len(cases)}); the paired tests need the same cases")
    rng = np.random.default_rng(seed)
    table = {}
    for cls in classes:
        dice = {a: case_matrix(evaluations[a], cls, cases, paired_cases) for a in arms}
        detm = {a: detection_matrix(evaluations[a], cls, cases) for a in arms}
        boot_cases, boot_reps = _draws(rng, n_boot, len(cases), {a: len(evaluations[a]) for a in arms})
        boot_d = {a: _boot_dice(dice[a], boot_cases, boot_reps[a]) for a in arms}
        boot_s = {a: _boot_sens(*detm[a], boot_cases, boot_reps[a]) if detm[a] else None for a in arms}
        case_mean = {a: _nanmean(dice[a], axis=1) for a in arms}
        secondary = {m: {a: _nanmean(case_matrix(evaluations[a], cls, cases, paired_cases, m), axis=1) for a in arms}
                     for m in SECONDARY}
        table[cls] = {}
        for arm in arms:
            reps = evaluations[arm]
            per_repeat = {m: [reps[r]["summary"][cls].get(m) for r in sorted(reps)] for m in METRICS}
            row = {m: dict(zip(("mean", "sd", "n"), mean_sd(per_repeat[m]))) for m in METRICS}
            row["per_repeat"] = per_repeat
            row["fp_by_size"] = fp_by_size(reps, cls)
            ok = np.isfinite(case_mean[arm])
            row["case_level"] = {"Dice": float(case_mean[arm][ok].mean()) if ok.any() else None,
                                 "n_cases": int(ok.sum()), "sensitivity": _sens(detm[arm]),
                                 "detected": None if detm[arm] is None else float(detm[arm][0].mean(axis=1).sum()),
                                 "lesions": None if detm[arm] is None else int(detm[arm][1].sum())}
            row["secondary"] = {m: _secondary(secondary[m], arm, reference) for m in SECONDARY}
            row["test"] = row["gap_closed"] = None
            if reference is not None and arm != reference:
                row["test"] = _difference(case_mean[arm], case_mean[reference], boot_d[arm], boot_d[reference],
                                          boot_s[arm], boot_s[reference], detm[arm], detm[reference], confidence)
                row["test"]["repeats"] = {arm: len(reps), reference: len(evaluations[reference])}
            if ceiling is not None and arm not in (reference, ceiling):
                row["gap_closed"] = _gaps(arm, reference, ceiling, case_mean, boot_d, detm, boot_s, confidence)
            table[cls][arm] = row
    return {"reference": reference, "ceiling": ceiling, "paired_cases": paired_cases, "arms": arms, "classes": classes,
            "cases": len(cases), "repeats": {a: sorted(evaluations[a]) for a in arms}, "n_boot": n_boot,
            "confidence": confidence, "table": table}


#: false-positive component sizes (voxels of the evaluated grid) reported separately: most false positives are
#: specks of a few voxels, so a count alone hides whether an arm adds large ones
FP_SIZE_BINS = (10, 100, 1000)


def fp_by_size(reps: dict[int, dict], cls: str, bins=FP_SIZE_BINS) -> dict | None:
    """{">=N": mean over repeats of the false-positive components per case with at least N voxels} of ``cls``;
    None when the evaluations list no false-positive components (a class without lesion-wise counting)."""
    per = {f">={b}": [] for b in bins}
    for r in sorted(reps):
        res = reps[r]
        fps = res.get("false_positives")
        if fps is None:
            return None
        n_cases = max(len(res["cases"]), 1)
        sizes = np.asarray([f["voxels"] for f in fps if f.get("class") == cls], float)
        for b in bins:
            per[f">={b}"].append(float((sizes >= b).sum()) / n_cases)
    return {k: float(np.mean(v)) if v else None for k, v in per.items()}


def _secondary(case_means: dict[str, np.ndarray], arm: str, reference: str | None) -> dict:
    """{case_mean, n_cases, test}: one further metric of ``arm`` at case level (each case averaged over repeats,
    undefined cases left out) and its paired tests against the reference (None for the reference itself)."""
    v = case_means[arm]
    ok = np.isfinite(v)
    out = {"case_mean": float(v[ok].mean()) if ok.any() else None, "n_cases": int(ok.sum()), "test": None}
    if reference is not None and arm != reference:
        out["test"] = paired_tests(v, case_means[reference])
    return out


def _sens(dm) -> float | None:
    if dm is None:
        return None
    det, les = dm
    return float(det.mean(axis=1).sum() / les.sum()) if les.sum() > 0 else None


def _difference(x, y, bx, by, sx, sy, dx, dy, confidence) -> dict:
    out = paired_tests(x, y)
    keep = np.isfinite(x) & np.isfinite(y)
    # as in the test, a drawn case undefined in either arm (NaN) is left out of the replicate's mean difference
    out["ci"] = _ci(_nanmean(bx - by, axis=1), confidence) if keep.any() else None
    sa, sb = _sens(dx), _sens(dy)
    out["sensitivity_diff"] = None if sa is None or sb is None else sa - sb
    out["sensitivity_ci"] = _ci(sx - sy, confidence) if sx is not None and sy is not None else None
    return out


def _gaps(arm, ref, ceil, case_mean, boot_d, detm, boot_s, confidence) -> dict:
    keep = np.isfinite(case_mean[arm]) & np.isfinite(case_mean[ref]) & np.isfinite(case_mean[ceil])
    if keep.any():
        point = tuple(float(case_mean[a][keep].mean()) for a in (arm, ref, ceil))
        # replicate means over the drawn cases that are defined in all three arms
        stack = np.stack([boot_d[a] for a in (arm, ref, ceil)])
        joint = np.all(np.isfinite(stack), axis=0)
        boot = tuple(_nanmean(np.where(joint, s, np.nan), axis=1) for s in stack)
        dice = _gap(point, boot, confidence)
    else:
        dice = _gap((None, None, None), None, confidence)
    if all(detm[a] is not None for a in (arm, ref, ceil)):
        sens = _gap(tuple(_sens(detm[a]) for a in (arm, ref, ceil)), tuple(boot_s[a] for a in (arm, ref, ceil)),
                    confidence)
    else:
        sens = None
    return {"Dice": dice, "sensitivity": sens}


# ---------------------------------------------------------------------------------------------- formatting
def format_table(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """Columns padded to their widest cell, two spaces apart; the first column left-aligned, others right."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return indent + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _pct(v, digits: int = 1, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:{'+' if sign else ''}.{digits}f}"


def _ms(m: dict, pct: bool = True) -> str:
    if m["mean"] is None:
        return "n/a"
    f, digits = (100.0, 1) if pct else (1.0, 2)
    return f"{f * m['mean']:.{digits}f}" + (f" ± {f * m['sd']:.{digits}f}" if m["sd"] is not None else "")


def _p(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2g}" if v >= 1e-3 else f"{v:.1e}"


def _ci_str(ci, sign: bool = True) -> str:
    return "" if not ci else f" [{_pct(ci[0], sign=sign)}, {_pct(ci[1], sign=sign)}]"


def _gap_str(g: dict | None) -> str:
    if g is None:
        return ""
    if g["value"] is None:
        return "no headroom" if g["note"] == NO_HEADROOM else "n/a"
    return f"{100 * g['value']:.0f}%" + (f" [{100 * g['ci'][0]:.0f}, {100 * g['ci'][1]:.0f}]" if g["ci"] else " [n/a]")


def _role(comp: dict, arm: str) -> str:
    return "baseline" if arm == comp["reference"] else "ceiling" if arm == comp.get("ceiling") else ""


def format_comparison_text(comp: dict, title: str | None = None, class_notes: dict[str, str] | None = None,
                           gauges: dict | None = None) -> str:
    """The report: one aligned text table per class, arms as rows (baseline first, ceiling last).

    gauges: optional {class: {arm: {"max_softmax", "mean_softmax", "outside_ratio", "synthetic_pseudo_dice",
    "verdict"}}} (the
    transfer gauges); shown in extra columns where present.
    """
    ref, ceil = comp["reference"], comp.get("ceiling")
    conf = int(round(100 * comp.get("confidence", CONFIDENCE)))
    order = ([ref] if ref else []) + [a for a in comp["arms"] if a not in (ref, ceil)] + ([ceil] if ceil else [])
    lines = [title, ""] if title else []
    reps = ", ".join(f"{a} {len(r)}" for a, r in comp["repeats"].items())
    lines += [f"{comp['cases']} test cases; repeats (independent trainings) per arm: {reps}.",
              "Dice: mean ± sd over repeats of the per-repeat Dice (%); case Dice: mean over test cases of each case's",
              "Dice averaged over repeats. Sens: lesion-wise sensitivity, detected / ground-truth lesions (detections",
              "averaged over repeats). FP/case: false-positive components per case; FP>=: those of at least",
              "10 / 100 / 1000 voxels (of the evaluated image grid) per case, mean over repeats."]
    if ref:
        lines += [f"dDice: case Dice minus the baseline's (points) with its {conf}% bootstrap CI over test cases and",
                  "trainings; n, p t, p W: test cases compared, paired t-test and Wilcoxon p, each case's Dice",
                  "averaged over repeats first; " + ("cases whose ground truth holds the class (a miss is 0)."
                                                     if comp.get("paired_cases") == "with_class"
                                                     else "cases where both Dice values are defined.")]
    if ceil:
        lines += ["gap: (arm - baseline) / (ceiling - baseline) of the case-level Dice and of the sensitivity,",
                  f"with its {conf}% bootstrap CI; 'no headroom': the ceiling does not beat the baseline."]
    if any(comp["table"][c][a].get(m, {}).get("mean") is not None
           for c in comp["classes"] for a in comp["arms"] for m in SECONDARY):
        lines += ["Second table per class: voxel IoU, precision, recall (%) and the surface distances HD95",
                  "(95th-percentile Hausdorff) and ASSD (average symmetric surface distance) in mm, lower is",
                  "better; mean ± sd over repeats; HD95 and ASSD over the cases where both masks hold the class."]
        if ref:
            lines += ["dIoU, dHD95, dASSD: case mean minus the baseline's over the cases defined in both (each case",
                      "averaged over repeats first), Wilcoxon p."]
    for cls in comp["classes"]:
        rows_by_arm = comp["table"][cls]
        lesion = any(rows_by_arm[a]["case_level"].get("lesions") for a in order)
        note = (class_notes or {}).get(cls)
        lines += ["", f"{cls}" + (f"  ({note})" if note else "")]
        header = ["arm", "role", "Dice", "case Dice"]
        if lesion:
            header += ["Sens", "FP/case", "FP>=" + "/".join(str(b) for b in FP_SIZE_BINS)]
        if ref:
            header += ["dDice [CI]", "n", "p t", "p W"]
        if ceil:
            header += ["gap Dice [CI]"] + (["gap Sens [CI]"] if lesion else [])
        g = (gauges or {}).get(cls) or {}
        if g:
            header += ["max sm", "mean sm", "outside", "syn pDice", "verdict"]
        rows = []
        for arm in order:
            row = rows_by_arm[arm]
            cl = row["case_level"]
            cells = [arm, _role(comp, arm), _ms(row["Dice"]), _pct(cl["Dice"])]
            if lesion:
                sens = "n/a" if cl["lesions"] in (None, 0) else \
                    f"{round(cl['detected'], 1):g}/{cl['lesions']} ({_pct(cl['sensitivity'], 0)}%)"
                fs = row.get("fp_by_size")
                cells += [sens, _ms(row["fp_per_case"], pct=False),
                          "n/a" if not fs else "/".join(_num(v, 1) for v in fs.values())]
            if ref:
                t = row["test"]
                if t is None:
                    cells += ["", "", "", ""]
                else:
                    cells += [_pct(t["mean_diff"], sign=True) + _ci_str(t["ci"]), str(t["n"]), _p(t["p_ttest"]),
                              _p(t["p_wilcoxon"])]
            if ceil:
                gc = row["gap_closed"]
                cells += [_gap_str(gc and gc["Dice"])] + ([_gap_str(gc and gc["sensitivity"])] if lesion else [])
            if g:
                a = g.get(arm) or {}
                o = a.get("outside_ratio")
                cells += [_num(a.get("max_softmax")), _num(a.get("mean_softmax")), "" if o is None else f"{o:.1f}x",
                          _pct(a.get("synthetic_pseudo_dice")),
                          a.get("verdict") or ""]
            rows.append(cells)
        lines.append(format_table(header, rows))
        if ceil:
            gd = [rows_by_arm[a]["gap_closed"] for a in order if rows_by_arm[a]["gap_closed"]]
            no_headroom = bool(gd) and gd[0]["Dice"]["note"] == NO_HEADROOM
            if no_headroom:
                lines.append(f"  {NO_HEADROOM}.")
            missed, n = ceiling_misses(comp, cls)
            if missed and missed == n:
                if not no_headroom:   # that line already says the class is not learnt at this budget
                    lines.append(f"  ceiling: none of its {n} trainings learnt the class (Dice < "
                                 f"{100 * CEILING_MISS_DICE:.0f} %): at this budget no arm can show an effect on it.")
            elif missed:
                # The mean hides it and the gap's interval is then withheld as "n/a": say why, in words.
                lines.append(f"  ceiling: {missed} of {n} trainings did not learn the class (Dice < "
                             f"{100 * CEILING_MISS_DICE:.0f} %); the ceiling's mean and 'gap closed' rest on the "
                             "other(s). More repeats or a larger budget would steady it.")
        if any(rows_by_arm[a].get(m, {}).get("mean") is not None for a in order for m in SECONDARY):
            lines += secondary_table(comp, cls, order)
    return "\n".join(lines).rstrip() + "\n"


def secondary_table(comp: dict, cls: str, order: list[str]) -> list[str]:
    """The lines of the second table of a class: voxel IoU / precision / recall (%) and HD95 / ASSD (mm), mean ± sd
    over repeats; with a baseline, the case-level difference of IoU, HD95 and ASSD with its Wilcoxon p."""
    ref = comp["reference"]
    header = ["arm", "role", "IoU", "vox prec", "vox rec", "HD95 mm", "ASSD mm"]
    if ref:
        header += ["dIoU (p W)", "dHD95 mm (p W)", "dASSD mm (p W)"]
    rows = []
    for arm in order:
        row = comp["table"][cls][arm]
        cells = [arm, _role(comp, arm)] + [_ms(row.get(m) or {"mean": None}) for m in SECONDARY[:3]] + \
                [_ms(row.get(m) or {"mean": None}, pct=False) for m in SECONDARY[3:]]
        if ref:
            for m in ("IoU", "HD95_mm", "ASSD_mm"):
                t = ((row.get("secondary") or {}).get(m) or {}).get("test")
                if t is None or t["mean_diff"] is None:
                    cells.append("")
                else:
                    d = _pct(t["mean_diff"], sign=True) if m == "IoU" else f"{t['mean_diff']:+.2f}"
                    cells.append(f"{d} ({_p(t['p_wilcoxon'])})")
        rows.append(cells)
    return [f"  {cls}: voxel overlap and surface distances", format_table(header, rows)]


def ceiling_misses(comp: dict, cls: str) -> tuple[int, int]:
    """(ceiling trainings whose Dice of ``cls`` is below CEILING_MISS_DICE, ceiling trainings with a Dice)."""
    ceil = comp.get("ceiling")
    if not ceil:
        return 0, 0
    per = [v for v in comp["table"][cls][ceil]["per_repeat"]["Dice"] if v is not None]
    return sum(v < CEILING_MISS_DICE for v in per), len(per)


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_comparison_markdown(comp: dict, title: str | None = None, **kw) -> str:
    """The text report inside a markdown document (one report format for terminal and file)."""
    head = f"## {title}\n\n" if title else ""
    return head + "```\n" + format_comparison_text(comp, **kw) + "```\n"


def plot_comparison(comp: dict, path: str | os.PathLike, metric: str = "Dice", title: str | None = None) -> None:
    """Grouped bars (class x arm) of ``metric``: mean over repeats, sd as error bar, one dot per repeat."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

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
