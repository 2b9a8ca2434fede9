"""Transfer gauge B: the network's softmax for a lesion's own class inside every real test lesion.

At small budgets Dice is 0 for a class long before the network has learnt nothing about it; the softmax it
gives the class inside the real lesions is a finer gauge (DESIGN.md section 9). With the synthetic-validation
pseudo-Dice of training (gauge A, :mod:`nnunet_promptlesion.trainers.synthetic_validation`) it tells why a
synthesizer does or does not help a class:

- real lesions score (median over lesions of the max softmax >= :data:`REAL_TRANSFER_PROB`) and the class is not
  painted elsewhere (voxels outside the class's real lesions where its probability is >= 0.5, at most
  :data:`MAX_OUTSIDE_RATIO` times the lesions' own volume): **transfers**;
- real lesions score but the class is painted far outside them: **non-specific** (a network that paints the
  class everywhere "scores" every lesion; it has not learnt the class);
- real low, synthetic validation pseudo-Dice >= :data:`SYNTHETIC_LEARNT_DICE`: **realism gap** (the network
  learnt the synthetic lesions, and they do not look like real ones to it);
- real low, synthetic low: **budget gap** (the network learnt neither at this budget);
- real low without a synthetic gauge (a real-only or ceiling arm): **undetermined**.

Input: ``nnUNetv2_predict ... --save_probabilities`` folders. nnU-Net writes ``<case>.npz`` with the key
``probabilities``: float array (channels, *array axes of the label file), i.e. already cropped back into the
original image and transposed back (``transpose_backward``), the same axis order as nnU-Net's reader returns
for the label file (``read_seg``: (1, *axes)); softmax for label-based datasets (channel i = label
``all_labels[i]``), sigmoid per region for region-based datasets (channel i = region ``foreground_regions[i]``;
the class's channel is the region nnU-Net writes as that label, see
:func:`~nnunet_promptlesion.lesions.channels.class_channels`).

A lesion is a connected component (full connectivity: 26 neighbours in 3D, as in
:func:`~nnunet_promptlesion.evaluation.metrics.match_lesions`) of the class's label in the ground truth; its
``id`` is the one ``match_lesions`` gives it, so records join with ``promptlesion_evaluate``'s lesion records on
(case, class, id).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..lesions.channels import class_channels
from ..lesions.components import label_components
from ..lesions.spec import LesionSpec
from .folders import resolve_folders

#: a class "transfers" when the median over its real test lesions of the max softmax inside the lesion reaches
#: this: at >= 0.5 (softmax) the class wins the argmax in at least one voxel of more than half of the lesions
REAL_TRANSFER_PROB = 0.5
#: ... and at most this many voxels outside the class's real lesions have the class's probability >= 0.5, per
#: voxel of those lesions (summed over test cases). 4 allows a precision by volume down to ~20 %, which small
#: blurred lesions reach with partial-volume halos; a network that paints the class everywhere is at 100s.
MAX_OUTSIDE_RATIO = 4.0
#: the network "learnt the synthetic lesions" of a class when their validation pseudo-Dice reaches this
SYNTHETIC_LEARNT_DICE = 0.3
PROBABILITIES_KEY = "probabilities"

VERDICTS = ("transfers", "non-specific", "realism gap", "budget gap", "undetermined", "no lesions")

__all__ = ["REAL_TRANSFER_PROB", "MAX_OUTSIDE_RATIO", "SYNTHETIC_LEARNT_DICE", "VERDICTS", "TransferError", "lesion_softmax",
           "lesion_softmax_case", "lesion_softmax_folder", "attach_lesion_softmax", "summarize_lesion_softmax", "transfer_verdict",
           "transfer_verdicts", "format_transfer_markdown", "label_channels"]


class TransferError(ValueError):
    """The probability files cannot be read against the labels; the message says what does not match."""


def label_channels(dataset_json: dict, labels: Sequence[int]) -> dict[int, int]:
    """Lesion label -> channel of nnU-Net's probability file, from dataset.json through nnU-Net's LabelManager."""
    # deferred: nnU-Net (torch) costs ~1.7 CPU-s at import; the experiment runner imports this module for its verdicts
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    try:
        return {l: ch for l, (ch, _) in class_channels(lm, labels).items()}
    except ValueError as e:
        raise TransferError(str(e)) from e


def lesion_softmax(probabilities: np.ndarray, ref: np.ndarray, label: int, channel: int) -> list[dict]:
    """One record per connected component of ``ref == label``: {"id", "voxels", "max_prob", "mean_prob", "centroid"}.

    probabilities: (channels, *spatial) as in nnU-Net's npz; ref: (*spatial) label map, same axes.
    max_prob / mean_prob: max and mean of ``probabilities[channel]`` over the lesion's voxels. centroid: voxel
    indices in the array's axis order.
    """
    if probabilities.shape[1:] != ref.shape:
        raise TransferError(f"probabilities of shape {probabilities.shape[1:]} do not match the label's {ref.shape}")
    if not 0 <= channel < probabilities.shape[0]:
        raise TransferError(f"channel {channel} is not in the probability file ({probabilities.shape[0]} channels)")
    # the same labelling as the lesion-wise matching (evaluation.metrics), so lesion ids agree
    lab, n = label_components(ref == label)
    out = []
    if n == 0:
        return out
    slices = ndimage.find_objects(lab)
    for i, sl in enumerate(slices, start=1):
        m = lab[sl] == i
        p = np.asarray(probabilities[(channel,) + sl], dtype=np.float64)[m]
        idx = np.argwhere(m)
        out.append({"id": i, "voxels": int(m.sum()), "max_prob": float(p.max()), "mean_prob": float(p.mean()),
                    "centroid": [round(float(c + s.start), 1) for c, s in zip(idx.mean(0), sl)]})
    return out


def outside_voxels(probabilities: np.ndarray, ref: np.ndarray, label: int, channel: int) -> int:
    """Voxels outside ``ref == label`` where ``probabilities[channel] >= 0.5`` (the class painted elsewhere).
    Shapes as in :func:`lesion_softmax`."""
    return int(np.count_nonzero((probabilities[channel] >= 0.5) & (ref != label)))


def lesion_softmax_case(case: str, npz_file: str | os.PathLike, ref_file: str | os.PathLike, reader_class,
                        classes: list[dict], outside: dict | None = None) -> list[dict]:
    """Records of every lesion of ``classes`` ([{"name", "label", "channel"}]) in one case. With ``outside``
    (a dict), adds this case's :func:`outside_voxels` per class name to it."""
    with np.load(npz_file) as z:
        if PROBABILITIES_KEY not in z:
            raise TransferError(f"{npz_file} holds no '{PROBABILITIES_KEY}' array (keys {list(z.keys())}); is it a "
                                "file of nnUNetv2_predict --save_probabilities?")
        probs = z[PROBABILITIES_KEY]
    ref, _ = reader_class().read_seg(str(ref_file))
    ref = ref[0]
    if probs.shape[1:] != ref.shape:
        raise TransferError(f"case '{case}': probabilities {tuple(probs.shape[1:])} and label {ref.shape} differ in "
                            "shape (array axis order of nnU-Net's reader); was it predicted from the same image?")
    out = []
    for c in classes:
        if outside is not None:
            outside[c["name"]] = outside.get(c["name"], 0) + outside_voxels(probs, ref, c["label"], c["channel"])
        for rec in lesion_softmax(probs, ref, c["label"], c["channel"]):
            out.append({"case": case, "class": c["name"], "label": c["label"], "channel": c["channel"], **rec})
    return out


def summarize_lesion_softmax(lesions: list[dict], class_names: Sequence[str],
                             outside: dict[str, int] | None = None) -> dict[str, dict]:
    """{class: {"lesions", "max_prob_median", "max_prob_max", "mean_prob_median", "mean_prob_max",
    "outside_ratio"}} (None without lesions). outside_ratio: ``outside[class]`` (voxels painted outside the
    class's lesions, :func:`outside_voxels` summed over cases) per voxel of its lesions; None without ``outside``."""
    out = {}
    for name in class_names:
        mx = [l["max_prob"] for l in lesions if l["class"] == name]
        mn = [l["mean_prob"] for l in lesions if l["class"] == name]
        vox = sum(l["voxels"] for l in lesions if l["class"] == name)
        out[name] = {"lesions": len(mx),
                     "outside_ratio": (float(outside.get(name, 0)) / vox) if (outside is not None and vox) else None,
                     "max_prob_median": float(np.median(mx)) if mx else None,
                     "max_prob_max": float(np.max(mx)) if mx else None,
                     "mean_prob_median": float(np.median(mn)) if mn else None,
                     "mean_prob_max": float(np.max(mn)) if mn else None}
    return out


def lesion_softmax_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                          dataset_json: dict | str | os.PathLike = "auto",
                          spec: LesionSpec | str | os.PathLike = "auto", only_common: bool = False) -> dict:
    """Softmax of its class inside every lesion of the spec's classes, for a ``--save_probabilities`` folder.

    pred_dir: holds ``<case>.npz``; gt_dir: the label files (``<case><file_ending>``). dataset_json / spec:
    dicts or paths, or "auto" (next to ``gt_dir``, as :func:`~.evaluate.evaluate_folders` finds them).
    Returns {"lesions": [{"case", "class", "label", "channel", "id", "voxels", "max_prob", "mean_prob",
    "centroid"}], "summary": {class: ...} (see :func:`summarize_lesion_softmax`), "cases": [...]}.
    """
    pred_dir, gt_dir, dataset_json, spec = resolve_folders(pred_dir, gt_dir, dataset_json, spec, TransferError)
    if dataset_json is None:
        raise TransferError(f"no dataset.json next to {gt_dir} or in {pred_dir}; pass dataset_json")
    if spec is None:
        raise TransferError(f"no lesion_spec.json next to {gt_dir}; pass spec (the gauge is per lesion class)")
    ending = dataset_json.get("file_ending")
    if not ending:
        raise TransferError("dataset.json has no 'file_ending'")
    npz = {p.name[:-4] for p in pred_dir.glob("*.npz")}
    if not npz:
        raise TransferError(f"no .npz probability files in {pred_dir}: predict with nnUNetv2_predict ... "
                            "--save_probabilities")
    refs = {p.name[:-len(ending)] for p in gt_dir.iterdir() if p.name.endswith(ending)}
    if (npz != refs) and not only_common:
        raise TransferError(f"probability files in {pred_dir} and labels in {gt_dir} cover different cases "
                            f"(without label: {sorted(npz - refs)[:10]}, without probabilities: "
                            f"{sorted(refs - npz)[:10]}); pass only_common=True to use the cases in both")
    cases = sorted(npz & refs)
    if not cases:
        raise TransferError(f"{pred_dir} and {gt_dir} have no case in common")
    classes, lesions, outside = _lesion_softmax_cases(pred_dir, gt_dir, dataset_json, spec, cases)
    return {"prediction_folder": str(pred_dir.resolve()), "reference_folder": str(gt_dir.resolve()),
            "classes": classes, "cases": cases, "lesions": lesions, "outside_voxels": outside,
            "summary": summarize_lesion_softmax(lesions, [c["name"] for c in classes], outside)}


def _lesion_softmax_cases(pred_dir: Path, gt_dir: Path, dataset_json: dict, spec: LesionSpec,
                          cases: Sequence[str]) -> tuple[list[dict], list[dict], dict[str, int]]:
    # deferred like LabelManager in label_channels (nnU-Net imports torch)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    ending = dataset_json["file_ending"]
    channels = label_channels(dataset_json, spec.labels)
    classes = [{"name": l.name, "label": l.label, "channel": channels[l.label]} for l in spec.lesions]
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(gt_dir / (cases[0] + ending)), verbose=False)
    lesions, outside = [], {}
    for c in cases:
        lesions.extend(lesion_softmax_case(c, pred_dir / f"{c}.npz", gt_dir / (c + ending), reader, classes, outside))
    return classes, lesions, outside


def attach_lesion_softmax(results: dict, pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, dataset_json: dict,
                          spec: LesionSpec, cases: Sequence[str]) -> None:
    """Add ``max_prob`` / ``mean_prob`` to the lesion records of an :func:`~.evaluate.evaluate_folders` result
    (joined on case, class, id) and ``results["lesion_softmax"]`` = the per-class summary."""
    _, lesions, outside = _lesion_softmax_cases(Path(pred_dir), Path(gt_dir), dataset_json, spec, list(cases))
    by = {(l["case"], l["class"], l["id"]): l for l in lesions}
    for rec in results["lesions"]:
        m = by.get((rec["case"], rec["class"], rec["id"]))
        if m is None or m["voxels"] != rec["voxels"]:
            raise TransferError(f"lesion {rec['id']} of {rec['class']} in case {rec['case']} has no matching component "
                                "in the probability gauge (connectivity or label mismatch)")
        rec["max_prob"], rec["mean_prob"] = m["max_prob"], m["mean_prob"]
    results["lesion_softmax"] = summarize_lesion_softmax(lesions, [l.name for l in spec.lesions], outside)


# ---------------------------------------------------------------------------------------------- verdict
def transfer_verdict(real: dict | None, synthetic: dict | None) -> dict:
    """Verdict of one class from its real summary ({"lesions", "max_prob_median", ...}) and its synthetic gauge
    ({"pseudo_dice", ...} from :func:`~nnunet_promptlesion.trainers.synthetic_validation.synthetic_summary`, or
    None for an arm without synthesis). See the module docstring for the rules."""
    r = None if not real else real.get("max_prob_median")
    o = None if not real else real.get("outside_ratio")
    s = None if not synthetic else synthetic.get("pseudo_dice")
    out = {"real_max_prob_median": r, "outside_ratio": o, "synthetic_pseudo_dice": s}
    if r is None:
        return {**out, "verdict": "no lesions", "reason": "no real test lesion of this class"}
    if r >= REAL_TRANSFER_PROB and o is not None and o > MAX_OUTSIDE_RATIO:
        return {**out, "verdict": "non-specific",
                "reason": f"median max softmax in real lesions {r:.3f} >= {REAL_TRANSFER_PROB}, but the class is "
                          f"painted on {o:.1f}x the lesions' volume outside them (> {MAX_OUTSIDE_RATIO})"}
    if r >= REAL_TRANSFER_PROB:
        return {**out, "verdict": "transfers",
                "reason": f"median max softmax in real lesions {r:.3f} >= {REAL_TRANSFER_PROB}"
                          + ("" if o is None else f", painted outside them on {o:.1f}x their volume")}
    if s is None:
        return {**out, "verdict": "undetermined",
                "reason": f"real lesions low ({r:.3f} < {REAL_TRANSFER_PROB}); no synthetic-validation gauge"}
    if s >= SYNTHETIC_LEARNT_DICE:
        return {**out, "verdict": "realism gap",
                "reason": f"synthetic pseudo-Dice {s:.3f} >= {SYNTHETIC_LEARNT_DICE} but real lesions {r:.3f} < "
                          f"{REAL_TRANSFER_PROB}"}
    return {**out, "verdict": "budget gap",
            "reason": f"synthetic pseudo-Dice {s:.3f} < {SYNTHETIC_LEARNT_DICE} and real lesions {r:.3f} < "
                      f"{REAL_TRANSFER_PROB}"}


def transfer_verdicts(real_summary: dict[str, dict], synthetic: dict[str, dict] | None) -> dict[str, dict]:
    """:func:`transfer_verdict` for every class of ``real_summary``."""
    return {name: transfer_verdict(real_summary.get(name), (synthetic or {}).get(name)) for name in real_summary}


def _f(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_transfer_markdown(arms: dict[str, tuple[dict, dict | None]]) -> str:
    """A markdown table: per arm and class the real-lesion softmax (median / max over lesions), the synthetic
    pseudo-Dice and the verdict. ``arms``: {arm: (real summary, synthetic summary or None)}."""
    lines = ["| arm | class | real lesions | max softmax median | max softmax max | mean softmax median | "
             "outside / lesion voxels | synthetic pseudo-Dice | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, (real, syn) in arms.items():
        verdicts = transfer_verdicts(real, syn)
        for name, r in real.items():
            v = verdicts[name]
            lines.append(f"| {arm} | {name} | {r.get('lesions', 0)} | {_f(r.get('max_prob_median'))} | {_f(r.get('max_prob_max'))} | "
                         f"{_f(r.get('mean_prob_median'))} | {_f(r.get('outside_ratio'), 1)} | "
                         f"{_f(v['synthetic_pseudo_dice'])} | {v['verdict']} |")
    lines.append("")
    lines.append(f"Verdict: transfers = median max softmax in real lesions >= {REAL_TRANSFER_PROB} and the class painted "
                 f"outside them on at most {MAX_OUTSIDE_RATIO:g}x their volume (more: non-specific); otherwise realism "
                 f"gap = synthetic pseudo-Dice >= {SYNTHETIC_LEARNT_DICE}, budget gap = below; undetermined = no "
                 "synthetic gauge (real-only / ceiling arm).")
    return "\n".join(lines) + "\n"
