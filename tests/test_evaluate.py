"""promptlesion_evaluate against hand-computed values on tiny volumes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_promptlesion.evaluation.evaluate import (EvaluationError, evaluate_folders, format_markdown,
                                                     load_results, write_outputs)
from nnunet_promptlesion.evaluation.metrics import SizeBins, match_lesions, normalized_surface_dice
from nnunet_promptlesion.lesions.masks import equivalent_radius_mm
from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpec

LABELS = {"background": 0, "organ": 1, "lesion_a": 2, "lesion_b": 3}


def _write(path, arr_zyx, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr_zyx.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def _spec():
    return LesionSpec([LesionClass("lesion_a", 2, [1], radius_mm=[(0.5, 1.0), (1.0, 2.0)]),
                       LesionClass("lesion_b", 3, [1], radius_mm=[(0.5, 3.0)])])


def _cases():
    """Two 10^3 cases at 1 mm. Case c1, class A: lesions a1 (2^3 cube, half predicted), a2 (one voxel, missed),
    a3 (3^3 cube, exact); false positives of 1 and 2 voxels. Case c2: a one-voxel false positive of class A
    where A is absent; class B exact."""
    gt1, pr1 = np.zeros((10, 10, 10), np.uint8), np.zeros((10, 10, 10), np.uint8)
    gt1[0:2, 6:10, 6:10] = 1
    pr1[0:2, 6:10, 6:10] = 1
    gt1[1:3, 1:3, 1:3] = 2                 # a1: 8 voxels
    pr1[1:3, 1:3, 1:2] = 2                 # 4 of them
    gt1[7, 7, 7] = 2                       # a2: 1 voxel, missed
    gt1[5:8, 0:3, 0:3] = 2                 # a3: 27 voxels
    pr1[5:8, 0:3, 0:3] = 2
    pr1[0, 9, 0] = 2                       # FP, 1 voxel
    pr1[9, 5, 5:7] = 2                     # FP, 2 voxels
    gt2, pr2 = np.zeros((10, 10, 10), np.uint8), np.zeros((10, 10, 10), np.uint8)
    gt2[4:6, 4:6, 4:6] = 3
    pr2[4:6, 4:6, 4:6] = 3
    pr2[0, 0, 0] = 2                       # FP of class A in a case without A
    return {"c1": (gt1, pr1), "c2": (gt2, pr2)}


@pytest.fixture()
def folders(tmp_path):
    gt, pred = tmp_path / "raw" / "labelsTs", tmp_path / "pred"
    gt.mkdir(parents=True)
    pred.mkdir()
    for name, (g, p) in _cases().items():
        _write(gt / f"{name}.nii.gz", g)
        _write(pred / f"{name}.nii.gz", p)
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz",
                                                               "channel_names": {"0": "CT"}, "numTraining": 2}))
    _spec().save(tmp_path / "raw" / "lesion_spec.json")
    return pred, gt


def test_hand_computed_values(folders, tmp_path):
    pred, gt = folders
    r = evaluate_folders(pred, gt)        # dataset.json and lesion_spec.json found next to labelsTs
    a = r["summary"]["lesion_a"]
    c1 = r["cases"][0]["metrics"]["lesion_a"]
    assert (c1["TP"], c1["FP"], c1["FN"]) == (31, 3, 5)
    assert c1["Dice"] == pytest.approx(62 / 70)
    assert r["cases"][1]["metrics"]["lesion_a"]["Dice"] == 0.0          # absent in GT, one predicted voxel
    assert r["cases"][0]["metrics"]["lesion_b"]["Dice"] is None          # absent in both: NaN, left out
    assert r["summary"]["lesion_b"]["cases"] == 1 and r["summary"]["lesion_b"]["Dice"] == 1.0
    assert a["Dice"] == pytest.approx((62 / 70 + 0) / 2)
    assert (a["lesions"], a["detected"], a["false_positives"]) == (3, 2, 3)
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["lesion_dice"] == pytest.approx((2 * 4 / 12 + 0 + 1) / 3)
    assert a["fp_per_case"] == pytest.approx(1.5)
    assert a["precision"] == pytest.approx(2 / 5)                         # 5 predicted components, 3 false
    # size bins from the spec's ranges: <=1mm, 1-2mm, >2mm (equivalent radii: 1 voxel 0.62 mm, 8 voxels 1.24 mm,
    # 27 voxels 1.86 mm, 2 voxels 0.78 mm)
    bins = r["by_size"]["lesion_a"]
    assert list(bins) == ["<=1mm", "1-2mm", ">2mm"]
    assert (bins["<=1mm"]["lesions"], bins["<=1mm"]["detected"], bins["<=1mm"]["false_positives"]) == (1, 0, 3)
    assert (bins["1-2mm"]["lesions"], bins["1-2mm"]["detected"]) == (2, 2)
    assert bins["1-2mm"]["lesion_dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert bins[">2mm"]["lesions"] == 0 and bins[">2mm"]["sensitivity"] is None
    assert r["by_stage"]["lesion_a"]["early"]["lesions"] == 3 and r["by_stage"]["lesion_a"]["late"]["lesions"] == 0
    # the organ is not a lesion class in the spec: no lesion-wise numbers
    assert "lesions" not in r["summary"]["organ"] and r["summary"]["organ"]["Dice"] == 1.0
    lesion_records = sorted((l["voxels"], l["detected"], l["size_bin"]) for l in r["lesions"] if l["class"] == "lesion_a")
    assert lesion_records == [(1, False, "<=1mm"), (8, True, "1-2mm"), (27, True, "1-2mm")]
    # early/late boundary moved below the 27-voxel lesion: it becomes "late"
    r2 = evaluate_folders(pred, gt, early_radius_mm=1.5)
    assert r2["by_stage"]["lesion_a"]["late"]["lesions"] == 1
    # stricter detection: the half-predicted lesion (Dice 0.667) no longer counts
    r3 = evaluate_folders(pred, gt, detection_min_dice=0.7)
    assert r3["summary"]["lesion_a"]["detected"] == 1

    paths = write_outputs(r, tmp_path / "eval", title="tiny")
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert "| lesion_a | 2 | 44.3 ± 62.6 |" in md and "| lesion_a | <=1mm | 1 | 0 | 0.0 |" in md
    assert load_results(tmp_path / "eval")["summary"]["lesion_a"]["detected"] == 2
    lines = (tmp_path / "eval" / "lesions.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 + 1 + 3   # header, 3 + 1 lesions (A, B), 3 false positives
    for k in ("plot_dice", "plot_detection"):
        assert open(paths[k], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # overall row, distance-table row, bins <=3mm and >3mm, early, late
    assert format_markdown(r).count("\n| lesion_b |") == 6


def test_overlap_and_surface_distances_in_every_output(folders, tmp_path):
    """IoU, voxel precision / recall and HD95 / ASSD (mm) per case, their class means over the defined cases (NaN
    left out as for Dice), and the same numbers in evaluation.json, per_case.csv, summary.csv and summary.md."""
    import csv

    from nnunet_promptlesion.evaluation.metrics import surface_distances

    pred, gt = folders
    r = evaluate_folders(pred, gt)
    c1, c2 = (r["cases"][i]["metrics"] for i in (0, 1))
    # c1, lesion_a: TP 31, FP 3, FN 5 (test_hand_computed_values)
    assert c1["lesion_a"]["IoU"] == pytest.approx(31 / 39)
    assert c1["lesion_a"]["voxel_precision"] == pytest.approx(31 / 34)
    assert c1["lesion_a"]["voxel_recall"] == pytest.approx(31 / 36)
    g, p = (a == 2 for a in _cases()["c1"])
    d = surface_distances(g, p, (1.0, 1.0, 1.0))
    assert c1["lesion_a"]["HD95_mm"] == d["HD95_mm"] > 0 and c1["lesion_a"]["ASSD_mm"] == d["ASSD_mm"] > 0
    # c2, lesion_a: one predicted voxel, none in the reference: IoU and precision 0, recall and distances undefined
    assert c2["lesion_a"]["IoU"] == 0.0 and c2["lesion_a"]["voxel_precision"] == 0.0
    assert c2["lesion_a"]["voxel_recall"] is None and c2["lesion_a"]["HD95_mm"] is None
    # lesion_b: absent from both in c1 (all undefined), exact in c2
    assert all(c1["lesion_b"][k] is None for k in ("IoU", "voxel_precision", "voxel_recall", "HD95_mm", "ASSD_mm"))
    assert (c2["lesion_b"]["IoU"], c2["lesion_b"]["HD95_mm"], c2["lesion_b"]["ASSD_mm"]) == (1.0, 0.0, 0.0)
    a = r["summary"]["lesion_a"]
    assert a["IoU"] == pytest.approx((31 / 39 + 0) / 2) and a["voxel_recall"] == pytest.approx(31 / 36)
    assert a["voxel_precision"] == pytest.approx((31 / 34 + 0) / 2) and a["voxel_recall_sd"] is None
    assert a["HD95_mm"] == d["HD95_mm"] and a["distance_cases"] == 1 and a["cases"] == 2
    assert r["summary"]["organ"]["HD95_mm"] == 0.0 and r["summary"]["organ"]["distance_cases"] == 1
    assert r["foreground_mean"]["IoU"] == pytest.approx((1 + a["IoU"] + 1) / 3)
    assert r["foreground_mean"]["HD95_mm"] == pytest.approx(d["HD95_mm"] / 3)

    write_outputs(r, tmp_path / "eval", plots=False)
    per_case = list(csv.DictReader(open(tmp_path / "eval" / "per_case.csv")))
    row = next(x for x in per_case if x["case"] == "c1" and x["class"] == "lesion_a")
    assert float(row["IoU"]) == pytest.approx(31 / 39) and float(row["HD95_mm"]) == pytest.approx(d["HD95_mm"])
    assert float(row["ASSD_mm"]) == pytest.approx(d["ASSD_mm"]) and float(row["voxel_precision"]) == pytest.approx(31 / 34)
    row = next(x for x in per_case if x["case"] == "c2" and x["class"] == "lesion_a")
    assert row["voxel_recall"] == "" and row["HD95_mm"] == "" and row["ASSD_mm"] == ""      # undefined: empty cell
    summary = {x["class"]: x for x in csv.DictReader(open(tmp_path / "eval" / "summary.csv")) if x["group"] == "all"}
    assert float(summary["lesion_a"]["ASSD_mm"]) == pytest.approx(d["ASSD_mm"]) and summary["lesion_a"]["distance_cases"] == "1"
    assert list(summary["lesion_a"])[:14] == ["class", "group", "cases", "Dice", "Dice_sd", "NSD", "NSD_sd", "lesions",
                                              "detected", "sensitivity", "lesion_dice", "false_positives", "fp_per_case",
                                              "precision"]     # the existing columns keep their places
    assert load_results(tmp_path / "eval")["summary"]["lesion_a"]["HD95_mm"] == d["HD95_mm"]
    md = (tmp_path / "eval" / "summary.md").read_text()
    assert "| class | IoU | voxel precision | voxel recall | HD95 (mm) | ASSD (mm) | distance cases |" in md
    assert f"| lesion_a | {100 * a['IoU']:.1f} ± " in md and f"| {d['HD95_mm']:.2f} | {d['ASSD_mm']:.2f} | 1 |" in md


def test_dice_matches_nnunet_evaluator(folders, tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    pred, gt = folders
    ours = evaluate_folders(pred, gt)
    theirs = compute_metrics_on_folder(str(gt), str(pred), None, SimpleITKIO(), ".nii.gz", [1, 2, 3], None, 1)
    for name, v in (("organ", 1), ("lesion_a", 2), ("lesion_b", 3)):
        assert ours["summary"][name]["Dice"] == pytest.approx(theirs["mean"][v]["Dice"])


def test_lesion_matching_merge_and_anisotropy():
    ref = np.zeros((6, 6, 12), bool)
    ref[1:3, 1:3, 1:3] = True
    ref[1:3, 1:3, 6:8] = True
    pred = np.zeros_like(ref)
    pred[1:3, 1:3, 1:8] = True            # one component bridging both lesions
    m = match_lesions(ref, pred, spacing=(1.0, 1.0, 2.0))
    assert [l["detected"] for l in m.lesions] == [True, True] and m.false_positives == [] and m.n_pred == 1
    # each lesion (8 voxels) against the whole bridging component (28 voxels)
    assert [l["dice"] for l in m.lesions] == pytest.approx([16 / 36, 16 / 36])
    assert m.lesions[0]["radius_mm"] == pytest.approx(equivalent_radius_mm(8, (1, 1, 2)))
    assert equivalent_radius_mm(8, (1, 1, 2)) == pytest.approx((3 * 16 / (4 * math.pi)) ** (1 / 3))
    # diagonal neighbours are one lesion (26-connectivity)
    diag = np.zeros((4, 4, 4), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert len(match_lesions(diag, np.zeros_like(diag), (1, 1, 1)).lesions) == 1


def test_size_bins():
    b = SizeBins.from_ranges([(6, 10), (3, 5), (12, 20)])
    assert b.names == ["<=5mm", "5-10mm", "10-20mm", ">20mm"]
    assert [b.assign(r) for r in (1, 5, 5.01, 10, 19.9, 64)] == ["<=5mm", "<=5mm", "5-10mm", "5-10mm", "10-20mm", ">20mm"]
    assert SizeBins.from_ranges(None).names == ["all"] and SizeBins.from_ranges(None).assign(3) == "all"


def test_nsd_hand_computed_and_monai():
    # a one-voxel-thick strip: every voxel is a surface voxel. ref x=0..3, pred x=2..5.
    ref = np.zeros((3, 1, 8), bool)
    pred = np.zeros_like(ref)
    ref[1, 0, 0:4] = True
    pred[1, 0, 2:6] = True
    # distances pred->ref: 0,0,1,2 ; ref->pred: 2,1,0,0 (in voxels along the last axis)
    assert normalized_surface_dice(ref, pred, (5.0, 5.0, 1.0), 1.0) == pytest.approx(6 / 8)
    assert normalized_surface_dice(ref, pred, (5.0, 5.0, 2.0), 1.0) == pytest.approx(4 / 8)   # spacing on that axis
    assert normalized_surface_dice(ref, pred, (5.0, 5.0, 2.0), 2.0) == pytest.approx(6 / 8)
    assert normalized_surface_dice(ref, ref, (1, 1, 1), 0.0) == 1.0
    assert normalized_surface_dice(ref, np.zeros_like(ref), (1, 1, 1), 1.0) == 0.0
    assert math.isnan(normalized_surface_dice(np.zeros_like(ref), np.zeros_like(ref), (1, 1, 1), 1.0))

    # random blobs, anisotropic spacing: same value as MONAI's voxel-based surface Dice
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_surface_dice
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(3):
        a = ndimage.gaussian_filter(rng.random((20, 18, 16)), 2) > 0.5
        b = ndimage.gaussian_filter(rng.random((20, 18, 16)), 2) > 0.5
        spacing, tol = (0.7, 1.0, 2.5), 1.5
        ours = normalized_surface_dice(a, b, spacing, tol)
        oh = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))
        theirs = compute_surface_dice(oh(b), oh(a), class_thresholds=[tol], include_background=False,
                                      spacing=list(spacing)).item()
        assert ours == pytest.approx(theirs, abs=1e-6)


def test_refuses_mismatched_folders(folders, tmp_path):
    pred, gt = folders
    (pred / "c2.nii.gz").rename(tmp_path / "c2.nii.gz")
    with pytest.raises(EvaluationError, match=r"1 ground-truth case\(s\) without prediction: \['c2'\]"):
        evaluate_folders(pred, gt)
    assert len(evaluate_folders(pred, gt, only_common=True)["cases"]) == 1
    (tmp_path / "c2.nii.gz").rename(pred / "c2.nii.gz")
    _write(pred / "extra.nii.gz", np.zeros((10, 10, 10), np.uint8))
    with pytest.raises(EvaluationError, match=r"prediction\(s\) without ground truth: \['extra'\]"):
        evaluate_folders(pred, gt)
    (pred / "extra.nii.gz").unlink()

    g, p = _cases()["c1"]
    _write(pred / "c1.nii.gz", p, spacing_xyz=(1.0, 1.0, 1.5))
    with pytest.raises(EvaluationError, match=r"case 'c1': spacing of prediction .* differs"):
        evaluate_folders(pred, gt)
    _write(pred / "c1.nii.gz", p, origin=(0.0, 4.0, 0.0))
    with pytest.raises(EvaluationError, match=r"case 'c1': .*origin"):
        evaluate_folders(pred, gt)
    _write(pred / "c1.nii.gz", p[:, :, :9])
    with pytest.raises(EvaluationError, match=r"case 'c1': prediction shape \(10, 10, 9\) differs"):
        evaluate_folders(pred, gt)
    p7 = p.copy()
    p7[0, 0, 0] = 7
    _write(pred / "c1.nii.gz", p7)
    with pytest.raises(EvaluationError, match=r"label\(s\) \[7\]"):
        evaluate_folders(pred, gt)


def test_cli(folders, tmp_path):
    pred, gt = folders
    out = tmp_path / "cli_out"
    p = subprocess.run([sys.executable, "-m", "nnunet_promptlesion.cli.evaluate", str(pred), str(gt), "-o", str(out),
                        "--no-plots"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "| lesion_a | 2 |" in p.stdout and (out / "summary.csv").is_file() and not (out / "dice_nsd.png").exists()
    p = subprocess.run([sys.executable, "-m", "nnunet_promptlesion.cli.evaluate", str(pred), str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "ground-truth folder" in p.stderr and "does not exist" in p.stderr


def test_refuses_truncated_files_and_unknown_labels_on_both_sides(folders, tmp_path):
    """A prediction cut short (what a killed nnUNetv2_predict leaves) reads as zeros through SimpleITK: it must be
    refused naming the file, not scored with every lesion "missed"; the same for the ground truth and for an
    uncompressed .nii; a label dataset.json does not define is refused in the ground truth as in the prediction."""
    pred, gt = folders
    g, p = _cases()["c1"]
    # organ voxels at random outside the first 10^3: a gzip stream long enough that a third of it holds the header
    big = (np.random.default_rng(0).random((40, 40, 40)) < 0.5).astype(np.uint8)
    big[:10, :10, :10] = p
    big_gt = big.copy()
    big_gt[:10, :10, :10] = g
    _write(pred / "c1.nii.gz", big)
    _write(gt / "c1.nii.gz", big_gt)
    evaluate_folders(pred, gt)                                   # whole files evaluate
    whole = (pred / "c1.nii.gz").read_bytes()
    (pred / "c1.nii.gz").write_bytes(whole[: len(whole) // 3])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "c1.nii.gz"))).shape == (40, 40, 40)  # ITK takes it
    with pytest.raises(EvaluationError, match=r"case 'c1': prediction file .*c1.nii.gz does not decode completely"):
        evaluate_folders(pred, gt)
    r = subprocess.run([sys.executable, "-m", "nnunet_promptlesion.cli.evaluate", str(pred), str(gt), "--no-plots",
                        "-o", str(tmp_path / "ev")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not decode completely" in r.stderr and "predict the case again" in r.stderr
    assert not (tmp_path / "ev").exists()
    (pred / "c1.nii.gz").write_bytes(whole)
    ref = (gt / "c1.nii.gz").read_bytes()
    (gt / "c1.nii.gz").write_bytes(ref[: len(ref) // 2])
    with pytest.raises(EvaluationError, match=r"case 'c1': ground-truth file .*c1.nii.gz does not decode completely"):
        evaluate_folders(pred, gt)
    (gt / "c1.nii.gz").write_bytes(ref)
    # uncompressed NIfTI: the data block ends early
    for d, arr in ((pred, big), (gt, big_gt)):
        (d / "c1.nii.gz").unlink()
        (d / "c2.nii.gz").unlink()
        _write(d / "c1.nii", arr)
    (tmp_path / "raw" / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ".nii",
                                                               "channel_names": {"0": "CT"}, "numTraining": 2}))
    evaluate_folders(pred, gt)
    raw = (pred / "c1.nii").read_bytes()
    (pred / "c1.nii").write_bytes(raw[:-5000])
    with pytest.raises(EvaluationError, match=r"prediction file .*c1.nii does not decode completely"):
        evaluate_folders(pred, gt)
    (pred / "c1.nii").write_bytes(raw)
    # a ground-truth label outside dataset.json
    g9 = big_gt.copy()
    g9[20, 20, 20] = 9
    _write(gt / "c1.nii", g9)
    with pytest.raises(EvaluationError, match=r"case 'c1': ground truth .*c1.nii holds label\(s\) \[9\] that dataset.json"):
        evaluate_folders(pred, gt)
