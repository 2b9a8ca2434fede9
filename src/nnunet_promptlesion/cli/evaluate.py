"""promptlesion_evaluate: per-class Dice/NSD, voxel IoU/precision/recall, HD95/ASSD (mm) and lesion-wise detection
of a prediction folder."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
example (after nnUNetv2_predict -i .../imagesTs -o preds ...):
  promptlesion_evaluate preds $nnUNet_raw/Dataset501_PhantomCCTA/labelsTs
    -> preds/evaluation/{evaluation.json, per_case.csv, lesions.csv, summary.csv, summary.md,
                         dice_nsd.png, lesion_detection.png}

Files are matched by name; every ground-truth case needs a prediction (and vice versa) with the same
shape, spacing and origin, otherwise the command stops and says what differs. Class names, regions and
the ignore label come from dataset.json (found next to the labels folder or in the prediction folder).
Lesion classes, their size bins (radius_mm ranges) come from lesion_spec.json next to the labels folder.
A ground-truth lesion is one connected component (26-connectivity) of its class; it is detected when its
Dice with the overlapping predicted components exceeds --detection-min-dice; predicted components that
touch no ground-truth lesion are false positives. Early/late: equivalent-sphere radius <= / > --early-radius-mm.
Per class and case also: voxel IoU, precision and recall, and the surface distances HD95 and ASSD in mm
(MONAI, boundary voxels, the image spacing). Undefined values (e.g. HD95 when the prediction or the reference
is empty, precision without a predicted voxel) are null in JSON, empty in CSV and left out of the means.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="promptlesion_evaluate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Evaluate nnU-Net predictions against ground truth: per-class Dice (nnU-Net's definition), "
                    "normalised surface Dice, voxel IoU / precision / recall, HD95 and ASSD (mm), and per lesion class the detected/missed ground-truth lesions, false "
                    "positive components per case and lesion-wise Dice, overall, per size bin and per early/late "
                    "stage. Writes CSV, JSON, a markdown table and PNG plots.")
    ap.add_argument("pred_dir", help="folder of predicted segmentations (e.g. the -o folder of nnUNetv2_predict)")
    ap.add_argument("gt_dir", help="folder of ground-truth segmentations with the same file names (e.g. labelsTs)")
    ap.add_argument("-o", "--output", default=None, help="output folder (default: PRED_DIR/evaluation)")
    ap.add_argument("--dataset-json", default=None, help="dataset.json giving label names/regions (default: next to "
                    "GT_DIR, else in PRED_DIR; without one, labels found in the files are named label_<k>)")
    ap.add_argument("--lesion-spec", default=None, help="lesion_spec.json (default: next to GT_DIR; without one, every "
                    "foreground class is analysed lesion-wise in a single size bin)")
    ap.add_argument("--nsd-tolerance-mm", type=float, default=2.0, help="surface tolerance of the NSD in mm (default 2)")
    ap.add_argument("--detection-min-dice", type=float, default=0.0, help="a lesion is detected when its lesion-wise "
                    "Dice exceeds this (default 0: any overlap)")
    ap.add_argument("--early-radius-mm", type=float, default=None, help="early/late boundary on the equivalent-sphere "
                    "radius in mm (default 10, i.e. 2 cm diameter, DiffTumor's early tumours)")
    ap.add_argument("--file-ending", default=None, help="file ending (default: from dataset.json, else detected)")
    ap.add_argument("--only-common", action="store_true", help="evaluate the cases present in both folders instead of "
                    "refusing folders with different case lists")
    ap.add_argument("--title", default=None, help="title for the markdown table and plots")
    ap.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)

    # deferred until the arguments are parsed: see cli/__init__.py
    from ..lesions.spec import EARLY_RADIUS_MM, LesionSpecError
    from ..evaluation.evaluate import EvaluationError, evaluate_folders, format_markdown, write_outputs

    try:
        results = evaluate_folders(args.pred_dir, args.gt_dir, spec=args.lesion_spec or "auto",
                                   dataset_json=args.dataset_json or "auto", nsd_tolerance_mm=args.nsd_tolerance_mm,
                                   detection_min_dice=args.detection_min_dice,
                                   early_radius_mm=EARLY_RADIUS_MM if args.early_radius_mm is None else args.early_radius_mm,
                                   file_ending=args.file_ending, only_common=args.only_common,
                                   num_processes=args.num_processes, progress=True)
    except (EvaluationError, LesionSpecError) as e:
        print(f"promptlesion_evaluate: {e}", file=sys.stderr)
        raise SystemExit(2)
    out = Path(args.output) if args.output else Path(args.pred_dir) / "evaluation"
    paths = write_outputs(results, out, title=args.title, plots=not args.no_plots)
    print(format_markdown(results, args.title))
    print("written: " + ", ".join(sorted(paths.values())))


if __name__ == "__main__":
    main()
