"""Folder-level evaluation of nnU-Net predictions: per-class Dice, NSD, voxel IoU / precision / recall, HD95 and
ASSD (mm), lesion-wise detection per size bin and stage. The Python API behind ``promptlesion_evaluate``.

    from nnunet_promptlesion.evaluation.evaluate import evaluate_folders, write_outputs, format_markdown
    results = evaluate_folders("predictions", "nnUNet_raw/Dataset501_X/labelsTs")   # a JSON-ready dict
    write_outputs(results, "predictions/evaluation")   # evaluation.json, *.csv, summary.md, *.png
    print(format_markdown(results))

Dice uses nnU-Net's own per-case computation (``compute_tp_fp_fn_tn``; NaN when a class is absent from
both reference and prediction, left out of the class mean, as ``nnUNetv2_evaluate_folder`` does). Files are
read with nnU-Net's reader/writer for the dataset's file ending, so arrays and spacings follow nnU-Net's
axis order (SimpleITK: z, y, x; spacing in mm in the same order). The other per-case metrics and their rules
for empty masks: :mod:`.metrics` (IoU follows Dice's rule; voxel precision is NaN without a predicted voxel,
voxel recall without a reference voxel; HD95 and ASSD are NaN unless both masks hold the class). Every class
mean leaves NaN cases out, as for Dice.

Structure of the results dict (``None`` stands for "not defined", e.g. a sensitivity without lesions):
  settings: tolerances and thresholds used; classes: [{name, label, lesion, size_bins}];
  cases: [{case, spacing, metrics: {class: {Dice, NSD, IoU, voxel_precision, voxel_recall, HD95_mm, ASSD_mm, TP,
          FP, FN, n_ref, n_pred, lesions, detected, false_positives, pred_components}}}];
  lesions: one record per ground-truth lesion {case, class, id, voxels, volume_mm3, radius_mm, size_bin, stage,
          dice, detected, centroid}; false_positives: one record per unmatched predicted component;
  summary: {class: {Dice, Dice_sd, NSD, NSD_sd, IoU, IoU_sd, voxel_precision, voxel_precision_sd, voxel_recall,
          voxel_recall_sd, HD95_mm, HD95_mm_sd, ASSD_mm, ASSD_mm_sd, cases, distance_cases, lesions, detected,
          sensitivity, lesion_dice, false_positives, fp_per_case, precision}}, ``cases`` counting the cases with a
          defined Dice, ``distance_cases`` those with defined HD95/ASSD, ``precision`` the lesion-wise one
          (predicted components); foreground_mean: {Dice, NSD, IoU, voxel_precision, voxel_recall, HD95_mm, ASSD_mm};
  by_size / by_stage: {class: {bin or stage: {lesions, detected, sensitivity, lesion_dice, false_positives,
          fp_per_case}}}.
"""
from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from nnunetv2.imageio.reader_writer_registry import (determine_reader_writer_from_dataset_json,
                                                     determine_reader_writer_from_file_ending)

from ..dataset_conversion.validation import check_readable
from ..lesions.spec import EARLY_RADIUS_MM, LesionSpec
from ..utils.atomic import atomic_path, write_json_atomic, write_text_atomic
from .folders import resolve_folders
from .metrics import SizeBins, dice_counts, match_lesions, surface_metrics, voxel_overlap
from .transfer import attach_lesion_softmax

RESULTS_VERSION = 1
DEFAULT_NSD_TOLERANCE_MM = 2.0
#: per-case metrics of every class, averaged over the cases where defined (summary, foreground_mean)
CASE_METRICS = ("Dice", "NSD", "IoU", "voxel_precision", "voxel_recall", "HD95_mm", "ASSD_mm")


class EvaluationError(ValueError):
    """The folders cannot be evaluated together; the message says what does not match."""


# ---------------------------------------------------------------------------------------------- inputs
def _classes(dataset_json: dict | None, spec: LesionSpec | None, present_labels: set[int]) -> tuple[list[dict], int | None]:
    """[{name, label (int or tuple for regions), lesion, ranges}], ignore label."""
    ignore = None
    classes = []
    if dataset_json is not None:
        for name, v in dataset_json["labels"].items():
            if name == "ignore":
                ignore = int(v)
                continue
            if name == "background" or (not isinstance(v, (list, tuple)) and int(v) == 0):
                continue
            label = tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else int(v)
            if isinstance(label, tuple) and len(label) == 1:
                label = label[0]
            classes.append({"name": name, "label": label})
    else:
        classes = [{"name": f"label_{v}", "label": int(v)} for v in sorted(present_labels) if v != 0]
    by_label = {c["label"]: c for c in classes if isinstance(c["label"], int)}
    for c in classes:
        c["lesion"], c["ranges"] = spec is None, None
    if spec is not None:
        for l in spec.lesions:
            if l.label not in by_label:
                raise EvaluationError(f"lesion spec names label {l.label} ('{l.name}'), which the dataset's labels "
                                      f"{[c['label'] for c in classes]} do not hold")
            by_label[l.label]["lesion"] = True
            by_label[l.label]["ranges"] = [list(r) for r in l.radius_mm]
    return classes, ignore


def _case_files(pred_dir: Path, gt_dir: Path, file_ending: str, only_common: bool) -> list[str]:
    def ids(d: Path) -> set[str]:
        return {p.name[: -len(file_ending)] for p in d.iterdir() if p.is_file() and p.name.endswith(file_ending)}

    ref, pred = ids(gt_dir), ids(pred_dir)
    if not ref:
        raise EvaluationError(f"no '{file_ending}' files in the ground-truth folder {gt_dir}")
    if not pred:
        raise EvaluationError(f"no '{file_ending}' files in the prediction folder {pred_dir}")
    missing, extra = sorted(ref - pred), sorted(pred - ref)
    if (missing or extra) and not only_common:
        msg = [f"prediction folder {pred_dir} and ground-truth folder {gt_dir} hold different cases:"]
        if missing:
            msg.append(f"  {len(missing)} ground-truth case(s) without prediction: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if extra:
            msg.append(f"  {len(extra)} prediction(s) without ground truth: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
        msg.append("Predict every case (nnUNetv2_predict), point to the matching labels folder, or pass "
                   "--only-common to evaluate the cases found in both.")
        raise EvaluationError("\n".join(msg))
    common = sorted(ref & pred)
    if not common:
        raise EvaluationError(f"{pred_dir} and {gt_dir} have no case in common")
    return common


def _geometry(props: dict) -> dict:
    """The geometry entries of a reader's properties dict (spacing plus e.g. sitk origin/direction)."""
    out = {"spacing": np.asarray(props["spacing"], float)}
    for k, v in props.items():
        if k.endswith("_stuff") and isinstance(v, dict):
            for kk, vv in v.items():
                try:
                    out[f"{k}.{kk}"] = np.asarray(vv, float)
                except (TypeError, ValueError):
                    pass
    return out


def _check_geometry(case: str, ref: np.ndarray, pred: np.ndarray, gref: dict, gpred: dict) -> None:
    if ref.shape != pred.shape:
        raise EvaluationError(f"case '{case}': prediction shape {pred.shape[1:]} differs from ground truth "
                              f"{ref.shape[1:]} (array axis order of the reader). Was it predicted from the same images?")
    for k, a in gref.items():
        b = gpred.get(k)
        if b is None:
            continue
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-3):
            raise EvaluationError(f"case '{case}': {k} of prediction {np.round(b, 4).tolist()} differs from ground "
                                  f"truth {np.round(a, 4).tolist()}; the files do not share one geometry")


def _check_decodes(case: str, path: str, what: str) -> None:
    """Decode all of ``path`` or refuse naming it. SimpleITK (nnU-Net's reader) reads a truncated NIfTI without a
    word, filling the missing voxels with zeros: a prediction cut short by a killed nnUNetv2_predict would be
    scored as empty (every lesion "missed"). The decode check of the converters catches that."""
    try:
        check_readable(Path(path))
    except Exception as e:  # noqa: BLE001 - nibabel, gzip, zlib and ITK each raise their own kind
        fix = ("predict the case again (nnUNetv2_predict; a killed prediction leaves such files)" if what == "prediction"
               else "restore the file from the dataset")
        raise EvaluationError(f"case '{case}': {what} file {path} does not decode completely "
                              f"({type(e).__name__}: {e}); it is truncated or corrupt: {fix}") from None


def _check_labels(case: str, arr: np.ndarray, allowed: set[int], what: str, path: str) -> None:
    # nnU-Net's readers return float arrays; labels are whole numbers (a fraction would be rounded away by int())
    values = np.unique(arr)
    unknown = sorted({float(v) for v in values if float(v) != round(float(v)) or int(v) not in allowed})
    if unknown:
        shown = [int(v) if v == round(v) else v for v in unknown]
        raise EvaluationError(f"case '{case}': {what} {path} holds label(s) {shown} that dataset.json does not define "
                              f"({sorted(allowed)}); is this the right dataset?")


# ---------------------------------------------------------------------------------------------- per case
def evaluate_case(case: str, ref_file: str, pred_file: str, reader_class, classes: list[dict], ignore: int | None,
                  nsd_tolerance_mm: float, detection_min_dice: float, allowed_labels: set[int] | None) -> dict:
    """Everything measured on one case; see the module docstring for the record layout."""
    rw = reader_class()
    _check_decodes(case, ref_file, "ground-truth")
    _check_decodes(case, pred_file, "prediction")
    ref, ref_props = rw.read_seg(ref_file)
    pred, pred_props = rw.read_seg(pred_file)
    _check_geometry(case, ref, pred, _geometry(ref_props), _geometry(pred_props))
    if allowed_labels is not None:
        _check_labels(case, ref, allowed_labels, "ground truth", ref_file)
        _check_labels(case, pred, allowed_labels, "prediction", pred_file)
    spacing = [float(s) for s in ref_props["spacing"]]
    ref, pred = ref[0], pred[0]
    ignore_mask = (ref == ignore) if ignore is not None else None
    metrics, lesions, fps = {}, [], []
    for c in classes:
        lab = c["label"]
        m_ref = np.isin(ref, lab) if isinstance(lab, tuple) else ref == lab
        m_pred = np.isin(pred, lab) if isinstance(lab, tuple) else pred == lab
        if ignore_mask is not None:
            m_pred = m_pred & ~ignore_mask
        rec = dice_counts(m_ref, m_pred, ignore_mask)
        surface = surface_metrics(m_ref, m_pred, spacing, nsd_tolerance_mm)
        rec["NSD"] = surface.pop("NSD")
        rec.update(voxel_overlap(rec["TP"], rec["FP"], rec["FN"]))
        rec.update(surface)
        if c["lesion"]:
            match = match_lesions(m_ref, m_pred, spacing, detection_min_dice)
            rec.update(lesions=len(match.lesions), detected=sum(l["detected"] for l in match.lesions),
                       false_positives=len(match.false_positives), pred_components=match.n_pred)
            vox_mm3 = float(np.prod(spacing))
            for l in match.lesions:
                lesions.append({"case": case, "class": c["name"], **l, "volume_mm3": l["voxels"] * vox_mm3})
            for f in match.false_positives:
                fps.append({"case": case, "class": c["name"], **f, "volume_mm3": f["voxels"] * vox_mm3})
        metrics[c["name"]] = rec
    return {"case": case, "spacing": spacing, "metrics": metrics, "lesions": lesions, "false_positives": fps}


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                     spec: LesionSpec | str | os.PathLike | None = "auto",
                     dataset_json: dict | str | os.PathLike | None = "auto",
                     nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM, detection_min_dice: float = 0.0,
                     early_radius_mm: float = EARLY_RADIUS_MM, file_ending: str | None = None,
                     only_common: bool = False, num_processes: int = 1, progress: bool = False) -> dict:
    """Evaluate every prediction in ``pred_dir`` against the file of the same name in ``gt_dir``.

    spec: a LesionSpec, a path to lesion_spec.json, "auto" (look next to ``gt_dir``) or None. Lesion-wise
        numbers are computed for the spec's classes, binned by its ``radius_mm`` ranges; without a spec for
        every foreground class, in one size bin.
    dataset_json: dict, path, "auto" (next to ``gt_dir`` or in ``pred_dir``) or None (labels found in the
        files, named label_<k>). Gives class names, regions, the ignore label and the file ending.
    nsd_tolerance_mm: surface tolerance of the normalised surface Dice, mm.
    detection_min_dice: a ground-truth lesion counts as detected when its lesion-wise Dice exceeds this (0: any
        overlap).
    early_radius_mm: lesions with equivalent-sphere radius <= this are "early", larger ones "late".
    only_common: evaluate the cases present in both folders instead of refusing mismatched folders.
    Raises EvaluationError for mismatched case sets, shapes, spacings or origins.
    """
    pred_dir, gt_dir, dataset_json, spec = resolve_folders(pred_dir, gt_dir, dataset_json, spec, EvaluationError)

    if file_ending is None:
        file_ending = dataset_json.get("file_ending") if dataset_json else None
        if file_ending is None:
            endings = {".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".png"}
            found = [e for e in sorted(endings, key=len, reverse=True)
                     if any(p.name.endswith(e) for p in gt_dir.iterdir())]
            if not found:
                raise EvaluationError(f"cannot tell the file ending of {gt_dir}; pass file_ending / --file-ending")
            file_ending = found[0]
    cases = _case_files(pred_dir, gt_dir, file_ending, only_common)

    example = str(gt_dir / (cases[0] + file_ending))
    reader_class = (determine_reader_writer_from_dataset_json(dataset_json, example) if dataset_json
                    else determine_reader_writer_from_file_ending(file_ending, example))

    present = set()
    if dataset_json is None:
        rw = reader_class()
        for c in cases:
            present |= set(np.unique(rw.read_seg(str(gt_dir / (c + file_ending)))[0]).tolist())
    classes, ignore = _classes(dataset_json, spec, present)
    allowed = None
    if dataset_json is not None:
        allowed = {0} | ({ignore} if ignore is not None else set())
        for c in classes:
            allowed |= set(c["label"]) if isinstance(c["label"], tuple) else {c["label"]}
    bins = {c["name"]: SizeBins.from_ranges(c["ranges"]) for c in classes if c["lesion"]}

    jobs = [(c, str(gt_dir / (c + file_ending)), str(pred_dir / (c + file_ending)), reader_class, classes, ignore,
             nsd_tolerance_mm, detection_min_dice, allowed) for c in cases]
    per_case = []
    if num_processes > 1:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            for i, r in enumerate(pool.imap(_evaluate_case_star, jobs)):
                per_case.append(r)
                if progress:
                    print(f"[evaluate] {i + 1}/{len(jobs)} {r['case']}", flush=True)
    else:
        for i, j in enumerate(jobs):
            per_case.append(evaluate_case(*j))
            if progress:
                print(f"[evaluate] {i + 1}/{len(jobs)} {j[0]}", flush=True)

    lesions = [l for r in per_case for l in r.pop("lesions")]
    fps = [f for r in per_case for f in r.pop("false_positives")]
    for rec in lesions + fps:
        rec["size_bin"] = bins[rec["class"]].assign(rec["radius_mm"])
        rec["stage"] = "early" if rec["radius_mm"] <= early_radius_mm else "late"
    results = {
        "version": RESULTS_VERSION,
        "prediction_folder": str(pred_dir.resolve()),
        "reference_folder": str(gt_dir.resolve()),
        "settings": {"nsd_tolerance_mm": nsd_tolerance_mm, "detection_min_dice": detection_min_dice,
                     "early_radius_mm": early_radius_mm, "file_ending": file_ending,
                     "lesion_spec": spec is not None, "connectivity": "full (26 neighbours in 3D)"},
        "classes": [{"name": c["name"], "label": list(c["label"]) if isinstance(c["label"], tuple) else c["label"],
                     "lesion": c["lesion"], "size_bins": bins[c["name"]].names if c["lesion"] else None}
                    for c in classes],
        "cases": per_case,
        "lesions": lesions,
        "false_positives": fps,
    }
    results.update(summarize(results))
    if spec is not None and dataset_json is not None and all((pred_dir / f"{c}.npz").is_file() for c in cases):
        # nnUNetv2_predict --save_probabilities: softmax of its class inside every lesion (transfer gauge B)
        attach_lesion_softmax(results, pred_dir, gt_dir, dataset_json, spec, cases)
    return _json_ready(results)


def _evaluate_case_star(args):
    return evaluate_case(*args)


def _lesion_group(lesions: list[dict], fps: list[dict], n_cases: int) -> dict:
    n = len(lesions)
    det = sum(1 for l in lesions if l["detected"])
    return {"lesions": n, "detected": det, "sensitivity": det / n if n else None,
            "lesion_dice": float(np.mean([l["dice"] for l in lesions])) if n else None,
            "false_positives": len(fps), "fp_per_case": len(fps) / n_cases if n_cases else None}


def summarize(results: dict) -> dict:
    """summary, foreground_mean, by_size and by_stage from the per-case and per-lesion records."""
    cases = results["cases"]
    n_cases = len(cases)
    summary, by_size, by_stage = {}, {}, {}
    for c in results["classes"]:
        name = c["name"]
        recs = [r["metrics"][name] for r in cases]
        s = {}
        for k in CASE_METRICS:
            # .get: evaluation.json written before a metric existed (summarize on results read back)
            v = np.array([_nan(r.get(k)) for r in recs], float)
            s[k], s[f"{k}_sd"] = _nanmean(v), _nanstd(v)
        s["cases"] = int(np.isfinite(np.array([_nan(r["Dice"]) for r in recs], float)).sum())
        s["distance_cases"] = int(np.isfinite(np.array([_nan(r.get("HD95_mm")) for r in recs], float)).sum())
        if c["lesion"]:
            les = [l for l in results["lesions"] if l["class"] == name]
            fps = [f for f in results["false_positives"] if f["class"] == name]
            s.update(_lesion_group(les, fps, n_cases))
            n_pred = sum(r["pred_components"] for r in recs)
            s["precision"] = (n_pred - len(fps)) / n_pred if n_pred else None
            by_size[name] = {b: _lesion_group([l for l in les if l["size_bin"] == b],
                                              [f for f in fps if f["size_bin"] == b], n_cases)
                             for b in c["size_bins"]}
            by_stage[name] = {st: _lesion_group([l for l in les if l["stage"] == st],
                                                [f for f in fps if f["stage"] == st], n_cases)
                              for st in ("early", "late")}
        summary[name] = s
    fg = {k: _nanmean(np.array([_nan(summary[c["name"]][k]) for c in results["classes"]], float))
          for k in CASE_METRICS}
    return {"summary": summary, "foreground_mean": fg, "by_size": by_size, "by_stage": by_stage}


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _nanmean(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def _nanstd(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(a.std(ddof=1)) if a.size > 1 else None


def _json_ready(x):
    """NaN -> None (JSON has no NaN), numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def load_results(path: str | os.PathLike) -> dict:
    """Read evaluation.json written by :func:`write_outputs` (or a folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "evaluation.json"
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- outputs
def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _pct_sd(m, sd) -> str:
    if m is None:
        return "n/a"
    return f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _num(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _mm_sd(m, sd) -> str:
    if m is None:
        return "n/a"
    return f"{m:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def format_markdown(results: dict, title: str | None = None) -> str:
    """Markdown tables: per-class Dice/NSD and lesion-wise numbers; voxel IoU / precision / recall and HD95 / ASSD
    (mm); detection per size bin and stage."""
    s = results["settings"]
    out = []
    if title:
        out += [f"## {title}", ""]
    out.append(f"{len(results['cases'])} cases; Dice and NSD (tolerance {s['nsd_tolerance_mm']:g} mm) in %, mean ± sd "
               "over the cases that hold the class in reference or prediction. Lesions: connected components of the "
               f"ground truth; detected when lesion-wise Dice > {s['detection_min_dice']:g}.")
    out.append("")
    out.append("| class | cases | Dice | NSD | GT lesions | detected | sensitivity | FP / case | lesion Dice | precision |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in results["classes"]:
        m = results["summary"][c["name"]]
        if c["lesion"]:
            les = [str(m["lesions"]), str(m["detected"]), _pct(m["sensitivity"]), _num(m["fp_per_case"]),
                   _pct(m["lesion_dice"]), _pct(m["precision"])]
        else:
            les = ["", "", "", "", "", ""]
        out.append("| " + " | ".join([c["name"], str(m["cases"]), _pct_sd(m["Dice"], m["Dice_sd"]),
                                      _pct_sd(m["NSD"], m["NSD_sd"])] + les) + " |")
    fg = results["foreground_mean"]
    out.append(f"| foreground mean | | {_pct(fg['Dice'])} | {_pct(fg['NSD'])} | | | | | | |")
    if any(results["summary"][c["name"]].get("IoU") is not None for c in results["classes"]):
        out += ["", "Voxel overlap in %, surface distances in mm (MONAI, boundary voxels, voxel spacing), mean ± sd over "
                "the cases where defined: IoU as Dice; voxel precision without a predicted voxel and recall without a "
                "reference voxel are undefined; HD95 (95th-percentile Hausdorff) and ASSD (average symmetric surface "
                "distance) only where both masks hold the class (distance cases).", "",
                "| class | IoU | voxel precision | voxel recall | HD95 (mm) | ASSD (mm) | distance cases |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for c in results["classes"]:
            m = results["summary"][c["name"]]
            out.append("| " + " | ".join([c["name"]] + [_pct_sd(m.get(k), m.get(f"{k}_sd")) for k in
                                                         ("IoU", "voxel_precision", "voxel_recall")] +
                                         [_mm_sd(m.get(k), m.get(f"{k}_sd")) for k in ("HD95_mm", "ASSD_mm")] +
                                         [str(m.get("distance_cases", ""))]) + " |")
        out.append(f"| foreground mean | {_pct(fg.get('IoU'))} | {_pct(fg.get('voxel_precision'))} | "
                   f"{_pct(fg.get('voxel_recall'))} | {_num(fg.get('HD95_mm'))} | {_num(fg.get('ASSD_mm'))} | |")
    if results["by_size"]:
        out += ["", f"Lesion-wise by equivalent-sphere radius (size bins from the lesion spec; early: radius <= "
                    f"{s['early_radius_mm']:g} mm):", "",
                "| class | group | GT lesions | detected | sensitivity | lesion Dice | FP components | FP / case |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, groups in results["by_size"].items():
            for g, m in list(groups.items()) + list(results["by_stage"][name].items()):
                out.append(f"| {name} | {g} | {m['lesions']} | {m['detected']} | {_pct(m['sensitivity'])} | "
                           f"{_pct(m['lesion_dice'])} | {m['false_positives']} | {_num(m['fp_per_case'])} |")
    return "\n".join(out) + "\n"


def _csv(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_outputs(results: dict, out_dir: str | os.PathLike, title: str | None = None, plots: bool = True) -> dict:
    """Write evaluation.json, per_case.csv, lesions.csv, summary.csv, summary.md and (``plots``) dice_nsd.png and
    lesion_detection.png into ``out_dir``, each atomically. Returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "per_case": out / "per_case.csv", "lesions": out / "lesions.csv",
             "summary_csv": out / "summary.csv", "markdown": out / "summary.md"}
    write_json_atomic(results, paths["json"])
    rows = [{"case": r["case"], "class": k, **v} for r in results["cases"] for k, v in r["metrics"].items()]
    # new columns go last: readers that index columns keep working
    write_text_atomic(_csv(rows, ["case", "class", "Dice", "NSD", "TP", "FP", "FN", "n_ref", "n_pred", "lesions",
                                  "detected", "false_positives", "pred_components", "IoU", "voxel_precision",
                                  "voxel_recall", "HD95_mm", "ASSD_mm"]), paths["per_case"])
    rows = [{**l, "kind": "lesion"} for l in results["lesions"]] + \
           [{**f, "kind": "false_positive", "detected": ""} for f in results["false_positives"]]
    write_text_atomic(_csv(rows, ["case", "class", "kind", "id", "voxels", "volume_mm3", "radius_mm", "size_bin",
                                  "stage", "dice", "detected", "centroid"]), paths["lesions"])
    rows = [{"class": k, "group": "all", **v} for k, v in results["summary"].items()]
    for name, groups in results["by_size"].items():
        rows += [{"class": name, "group": g, **m} for g, m in groups.items()]
        rows += [{"class": name, "group": g, **m} for g, m in results["by_stage"][name].items()]
    write_text_atomic(_csv(rows, ["class", "group", "cases", "Dice", "Dice_sd", "NSD", "NSD_sd", "lesions", "detected",
                                  "sensitivity", "lesion_dice", "false_positives", "fp_per_case", "precision", "IoU",
                                  "IoU_sd", "voxel_precision", "voxel_precision_sd", "voxel_recall", "voxel_recall_sd",
                                  "distance_cases", "HD95_mm", "HD95_mm_sd", "ASSD_mm", "ASSD_mm_sd"]),
                      paths["summary_csv"])
    write_text_atomic(format_markdown(results, title), paths["markdown"])
    if plots:
        paths.update(plot_results(results, out, title))
    return {k: str(v) for k, v in paths.items()}


def plot_results(results: dict, out_dir: Path, title: str | None = None) -> dict:
    """dice_nsd.png (per-class bars, one dot per case) and lesion_detection.png (sensitivity per size bin)."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    paths = {}
    names = [c["name"] for c in results["classes"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names) + 1.5), 3.6))
    x = np.arange(len(names))
    for k, (metric, color) in enumerate((("Dice", "tab:blue"), ("NSD", "tab:orange"))):
        means = [_nan(results["summary"][n][metric]) for n in names]
        ax.bar(x + (k - 0.5) * 0.38, np.nan_to_num(means), width=0.36, color=color, alpha=0.75, label=metric)
        for i, n in enumerate(names):
            vals = [r["metrics"][n][metric] for r in results["cases"] if r["metrics"][n][metric] is not None]
            ax.scatter(np.full(len(vals), x[i] + (k - 0.5) * 0.38), vals, s=8, color="k", zorder=3)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("per case (dots), mean (bars)")
    ax.legend(fontsize=8)
    ax.set_title(title or f"Dice and NSD@{results['settings']['nsd_tolerance_mm']:g}mm", fontsize=9)
    fig.tight_layout()
    paths["plot_dice"] = out_dir / "dice_nsd.png"
    with atomic_path(paths["plot_dice"]) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    if results["by_size"]:
        groups = list(results["by_size"].items())
        fig, axes = plt.subplots(1, len(groups), figsize=(3.4 * len(groups), 3.2), squeeze=False)
        for ax, (name, bins) in zip(axes[0], groups):
            labels = list(bins)
            sens = [_nan(bins[b]["sensitivity"]) for b in labels]
            ax.bar(range(len(labels)), np.nan_to_num(sens), color="tab:green", alpha=0.8)
            for i, b in enumerate(labels):
                ax.text(i, 0.02 + np.nan_to_num(sens[i]), f"{bins[b]['detected']}/{bins[b]['lesions']}\n"
                        f"FP {bins[b]['false_positives']}", ha="center", fontsize=7)
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_ylim(0, 1.25)
            ax.set_title(name, fontsize=9)
            ax.set_ylabel("detection sensitivity")
        fig.tight_layout()
        paths["plot_detection"] = out_dir / "lesion_detection.png"
        with atomic_path(paths["plot_detection"]) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
    return paths
