"""promptlesion_demo: the whole chain on a procedural CCTA phantom, on the CPU, in one command.

Steps (each skipped when its output already exists, so an interrupted demo resumes):
  1. promptlesion_make_phantoms --kind ccta --preset demo   -> nnUNet_raw/DatasetNNN_PhantomCCTA
  2. nnUNetv2_plan_and_preprocess --verify_dataset_integrity (nnU-Net's own 3d_fullres plan), then a
     small-patch configuration "3d_demo" added to nnUNetPlans.json the nnU-Net way (a configuration that
     "inherits_from" 3d_fullres: same preprocessed data, 32^3 patch, 4 stages of 16-128 features)
  3. for every repeat: nnUNetv2_train ... -tr nnUNetTrainer_promptlesionDemo (real data only) and
     PromptLesionTrainer_demo (1 real : 1 rule-based synthetic), the same budget, fold "all"
  4. nnUNetv2_predict on imagesTs with every model
  5. evaluation (promptlesion_evaluate's API): per-class Dice, lesion-wise detection, paired tests of
     every arm against the real-only arm over test cases x repeats; an aligned text table, report.md,
     results.json, a bar plot and a montage of synthetic samples drawn with one intensity window

Independent trainings are the repeats (nnU-Net does not seed its trainings): repeat r lives in
work-dir/nnUNet_results/repeat_r, so nnU-Net's folder layout stays standard.
All nnU-Net folders live under --work-dir; every command's output is logged to work-dir/logs/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..utils.atomic import write_json_atomic, write_text_atomic

LESION_CLASSES = ["calcified_plaque", "noncalcified_plaque"]
CONTEXT_CLASSES = ["vessel_wall"]
DEMO_CONFIGURATION = "3d_demo"
FOLD = "all"
# One display window for every montage panel (HU): a CCTA-like window (W 900 / L 250) in which the wall,
# fat and lumen are distinguishable and calcium saturates.
MONTAGE_WINDOW_HU = (-200.0, 700.0)


@dataclass(frozen=True)
class Arm:
    label: str
    trainer: str
    tag: str  # folder name of this arm's results and predictions
    settings: dict | None = None  # promptlesion_settings.json for this arm (None = the trainer's defaults)


REAL_ONLY = Arm("nnU-Net, real only", "nnUNetTrainer_promptlesionDemo", "real_only")
RULE_BASED = Arm("PromptLesion rule-based 1:1", "PromptLesionTrainer_demo", "rule_based")
# The diffusion arm needs a generator pretrained inside the demo (promptlesion_pretrain: VQGAN, diffusion,
# lesion cache); it is opt-in (--diffusion) because that does not fit the 20-minute CPU budget.
DIFFUSION_LABEL = "PromptLesion diffusion 1:1"


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Runner:
    def __init__(self, work: Path, env: dict):
        self.work, self.env = work, env
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def stage(self, msg: str) -> None:
        print(f"[demo {time.time() - self.t0:6.0f}s] {msg}", flush=True)

    def run(self, name: str, cmd: list[str], show: tuple[str, ...] = (), env: dict | None = None) -> None:
        """Run ``cmd``, logging everything to logs/<name>.log; echo lines containing any of ``show``."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or self.env, text=True)
            for line in p.stdout:
                f.write(line)
                if any(s in line for s in show):
                    print("    " + line.rstrip(), flush=True)
            rc = p.wait()
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"demo step '{name}' failed (exit {rc}); full log: {log}\n{tail}")


# ---------------------------------------------------------------------------------------------- plan
def add_demo_configuration(plans_file: Path, patch_size=(32, 32, 32), batch_size: int = 4,
                           features=(16, 32, 64, 128)) -> dict:
    """Add the small-patch configuration ``3d_demo`` to an nnU-Net plans file (idempotent).

    nnU-Net's own mechanism: a configuration with ``"inherits_from": "3d_fullres"`` reuses the parent's
    preprocessed data (same data_identifier, spacing, normalisation) and overrides only what is listed.
    Why: nnU-Net's 3d_fullres network for this phantom (48 x 64 x 64 patch, 5 stages up to 320 features)
    costs ~4 s per iteration on 2 CPU cores; a 32^3 patch and 16-128 features cost ~0.3 s, so ~10x more
    iterations fit the demo budget. Foreground oversampling, loss, augmentation and inference are unchanged.
    """
    import copy

    plans = json.loads(plans_file.read_text())
    base = plans["configurations"]["3d_fullres"]
    shape = base.get("median_image_size_in_voxels") or patch_size
    ps = [int(min(p, s)) for p, s in zip(patch_size, shape)]
    n = len(features)
    # Stride 2 per stage while the patch stays divisible; the first stage keeps full resolution.
    strides = [[1, 1, 1]] + [[2 if p % 2 ** (k + 1) == 0 and p // 2 ** (k + 1) >= 4 else 1 for p in ps]
                             for k in range(n - 1)]
    arch = copy.deepcopy(base["architecture"])
    arch["arch_kwargs"].update(n_stages=n, features_per_stage=list(features), kernel_sizes=[[3, 3, 3]] * n,
                               strides=strides, n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    wanted = {"inherits_from": "3d_fullres", "patch_size": ps, "batch_size": int(batch_size), "architecture": arch}
    if plans["configurations"].get(DEMO_CONFIGURATION) != wanted:
        plans["configurations"][DEMO_CONFIGURATION] = wanted
        write_json_atomic(plans, plans_file)
    return wanted


# ---------------------------------------------------------------------------------------------- statistics
def paired_tests(a: list[float], b: list[float]) -> dict:
    """Paired t-test and Wilcoxon signed-rank test of b - a (scipy). NaN p-values where undefined."""
    import numpy as np
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = b - a
    out = {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else float("nan"),
           "t_p": float("nan"), "wilcoxon_p": float("nan")}
    if d.size >= 2 and np.any(d != 0):
        with np.errstate(all="ignore"):
            out["t_p"] = float(stats.ttest_rel(b, a).pvalue)
        try:
            out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
        except ValueError:
            pass
    elif d.size >= 1:
        out["t_p"] = out["wilcoxon_p"] = 1.0  # identical scores: no evidence of a difference
    return out


def per_case_dice(result: dict, cls: str) -> dict[str, float]:
    """{case: Dice} over the test cases whose reference holds ``cls`` (a miss counts 0, not NaN)."""
    out = {}
    for rec in result["cases"]:
        m = rec["metrics"][cls]
        if m["n_ref"] > 0:
            out[rec["case"]] = 0.0 if m["Dice"] is None or math.isnan(m["Dice"]) else float(m["Dice"])
    return out


def build_report(results: dict[str, list[dict]], classes: list[str], context: list[str], reference: str) -> dict:
    """Numbers behind the report. results: {arm label: [evaluation dict per repeat]} (evaluate_folders)."""
    import numpy as np

    report = {"classes": {}, "reference_arm": reference}
    for cls in context + classes:
        rows = {}
        for arm, reps in results.items():
            dices = [r["summary"][cls]["Dice"] for r in reps]
            row = {"dice_per_repeat": dices,
                   "dice_mean": float(np.mean([np.nan if d is None else d for d in dices])) if dices else None}
            if cls in classes:
                row["detected"] = sum(r["summary"][cls]["detected"] for r in reps)
                row["lesions"] = sum(r["summary"][cls]["lesions"] for r in reps)
                row["false_positives"] = sum(r["summary"][cls]["false_positives"] for r in reps)
                row["fp_per_case"] = row["false_positives"] / max(sum(len(r["cases"]) for r in reps), 1)
            rows[arm] = row
        entry = {"arms": rows}
        if cls in classes:
            tests = {}
            ref = results[reference]
            for arm, reps in results.items():
                if arm == reference:
                    continue
                a, b = [], []
                for r_ref, r_arm in zip(ref, reps):  # repeat k of an arm is paired with repeat k of the reference
                    da, db = per_case_dice(r_ref, cls), per_case_dice(r_arm, cls)
                    for case in sorted(da):
                        a.append(da[case])
                        b.append(db.get(case, 0.0))
                tests[arm] = paired_tests(a, b)
            entry["tests"] = tests
        report["classes"][cls] = entry
    return report


# ---------------------------------------------------------------------------------------------- formatting
def format_table(header: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    """Columns padded to their widest cell, two spaces apart; the first column left-aligned, others right."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return indent + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), indent + "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _p(v) -> str:
    return "n/a" if v is None or math.isnan(v) else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def format_report(report: dict, n_test: int, n_repeats: int, budget: str, class_notes: dict[str, str]) -> str:
    lines = [f"Test set: {n_test} held-out cases; {n_repeats} independent training(s) per arm; budget {budget}.",
             "Dice: nnU-Net's per-case Dice averaged over the cases that hold the class (in reference or prediction),",
             "one value per repeat, then their mean. Detected: ground-truth lesions touched by the prediction,",
             "summed over repeats. Paired tests: Dice of each arm vs the real-only arm on the same test case and",
             "repeat index (cases holding the class; a missed class counts 0).", ""]
    ref = report["reference_arm"]
    for cls, entry in report["classes"].items():
        note = class_notes.get(cls, "")
        lines.append(f"{cls}{'  (' + note + ')' if note else ''}")
        lesion = "tests" in entry
        header = ["arm", "Dice % per repeat", "mean"] + (["detected", "FP/case"] if lesion else [])
        rows = []
        for arm, row in entry["arms"].items():
            cells = [arm, " ".join(_pct(d) for d in row["dice_per_repeat"]), _pct(row["dice_mean"])]
            if lesion:
                frac = f" ({100 * row['detected'] / row['lesions']:.0f}%)" if row["lesions"] else ""
                cells += [f"{row['detected']}/{row['lesions']}{frac}", f"{row['fp_per_case']:.2f}"]
            rows.append(cells)
        lines.append(format_table(header, rows))
        for arm, t in entry.get("tests", {}).items():
            diff = "n/a" if math.isnan(t["mean_diff"]) else f"{100 * t['mean_diff']:+.1f}"
            lines.append(f"  {arm} vs {ref}: mean Dice difference {diff} points over {t['n']} case x repeat pairs; "
                         f"paired t-test p = {_p(t['t_p'])}, Wilcoxon p = {_p(t['wilcoxon_p'])}")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_report(report: dict, path: Path, title: str) -> None:
    """Bar plot: per class, one bar per arm (mean Dice over repeats) with a dot per repeat; detection rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..utils.atomic import atomic_path

    classes = list(report["classes"])
    arms = list(next(iter(report["classes"].values()))["arms"])
    lesion_classes = [c for c in classes if "tests" in report["classes"][c]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [len(classes), len(lesion_classes)]})
    width = 0.8 / len(arms)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, arm in enumerate(arms):
        x = np.arange(len(classes)) + (k - (len(arms) - 1) / 2) * width
        rows = [report["classes"][c]["arms"][arm] for c in classes]
        axes[0].bar(x, [100 * (r["dice_mean"] or 0) for r in rows], width, label=arm, color=colors[k % len(colors)])
        for xi, r in zip(x, rows):
            reps = [100 * d for d in r["dice_per_repeat"] if d is not None and not math.isnan(d)]
            axes[0].scatter([xi] * len(reps), reps, color="k", s=10, zorder=3)
        xl = np.arange(len(lesion_classes)) + (k - (len(arms) - 1) / 2) * width
        det = [report["classes"][c]["arms"][arm] for c in lesion_classes]
        axes[1].bar(xl, [100 * r["detected"] / r["lesions"] if r["lesions"] else 0 for r in det], width,
                    color=colors[k % len(colors)])
    axes[0].set_xticks(range(len(classes)), classes, fontsize=8)
    axes[0].set_ylabel("Dice (%) on test cases; dots: repeats")
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].set_xticks(range(len(lesion_classes)), lesion_classes, fontsize=8)
    axes[1].set_ylabel("lesions detected (%)")
    axes[1].set_ylim(0, 100)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    from ..trainers.variants import DEMO_EPOCHS, DEMO_ITERATIONS

    ap = argparse.ArgumentParser(
        prog="promptlesion_demo",
        description="Build a CCTA phantom dataset, train nnU-Net on real data only and PromptLesionTrainer "
                    "(1 real : 1 synthetic, class-balanced) for the same short CPU budget, repeat each training, "
                    "predict the held-out test cases and report per-class Dice, lesion detection and paired "
                    "tests. Re-running resumes: finished steps are skipped.")
    ap.add_argument("--work-dir", default="demo_output", help="folder for nnUNet_raw/_preprocessed/_results, logs, "
                    "predictions and the report (default: ./demo_output)")
    ap.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id of the phantom (default 501)")
    ap.add_argument("--cases", type=int, default=16, help="training cases in the phantom (default 16)")
    ap.add_argument("--test-cases", type=int, default=10, help="test cases in imagesTs/labelsTs (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    ap.add_argument("--preset", default="demo", help="CCTA phantom preset (default: demo; see docs/phantoms.md)")
    ap.add_argument("--repeats", type=int, default=2, help="independent trainings per arm (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--diffusion", action="store_true",
                    help="add a diffusion arm: pretrain a tiny generator with promptlesion_pretrain (VQGAN, diffusion, "
                         "lesion cache) on the same training cases, then train PromptLesionTrainer_demo with it. Not "
                         "part of the 20-minute CPU demo (the generator's pretraining alone takes longer on a CPU)")
    ap.add_argument("--diffusion-steps", type=int, default=2000,
                    help="--diffusion: VQGAN and diffusion training steps each (default 2000, the tiny preset)")
    ap.add_argument("--diffusion-cache", type=int, default=200, help="--diffusion: cached lesions per class (default 200)")
    ap.add_argument("--montage-samples", type=int, default=6, help="samples per class in the montage")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    work = Path(args.work_dir).resolve()
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"))
    env.setdefault("nnUNet_n_proc_DA", "2" if args.device == "cpu" else "8")
    env.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    r = Runner(work, env)
    d = args.dataset_id
    raw = work / "nnUNet_raw"
    arms = [REAL_ONLY, RULE_BASED]

    existing = sorted(raw.glob(f"Dataset{d:03d}_*")) if raw.is_dir() else []
    if existing:
        r.stage(f"1/5 phantom dataset exists: {existing[0]}")
    else:
        r.stage(f"1/5 making a CCTA phantom (preset {args.preset}): {args.cases} training + {args.test_cases} test cases")
        r.run("make_phantoms", [_bin("promptlesion_make_phantoms"), "--kind", "ccta", "--preset", args.preset,
                                "--dataset-id", str(d), "--cases", str(args.cases),
                                "--test-cases", str(args.test_cases), "--seed", str(args.seed), "--quiet"])
        existing = sorted(raw.glob(f"Dataset{d:03d}_*"))
    ds_dir = existing[0]
    pre = work / "nnUNet_preprocessed" / ds_dir.name
    if (pre / "nnUNetPlans.json").is_file() and (pre / "nnUNetPlans_3d_fullres").is_dir():
        r.stage("2/5 preprocessed data exists")
    else:
        r.stage("2/5 nnUNetv2_plan_and_preprocess --verify_dataset_integrity")
        r.run("plan_and_preprocess", [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(d), "-c", "3d_fullres",
                                      "--verify_dataset_integrity", "-np", "2", "-npfp", "2"])
    cfg = add_demo_configuration(pre / "nnUNetPlans.json")
    r.stage(f"2/5 configuration '{DEMO_CONFIGURATION}' in nnUNetPlans.json: inherits 3d_fullres, patch "
            f"{cfg['patch_size']}, batch {cfg['batch_size']}, features "
            f"{cfg['architecture']['arch_kwargs']['features_per_stage']}")

    if args.diffusion:
        r.stage("2/5 --diffusion: pretraining a tiny generator with promptlesion_pretrain (log: "
                f"{r.logs / 'pretrain.log'})")
        r.run("pretrain", [_bin("promptlesion_pretrain"), "-d", str(d), "-c", DEMO_CONFIGURATION, "-f", FOLD,
                           "--preset", "tiny", "--vqgan-steps", str(args.diffusion_steps),
                           "--diffusion-steps", str(args.diffusion_steps),
                           "--cache-per-class", str(args.diffusion_cache), "--device", args.device])
        # promptlesion_pretrain's last line is the settings snippet for its generator/cache.
        settings = json.loads((r.logs / "pretrain.log").read_text().strip().splitlines()[-1])
        arms.append(Arm(DIFFUSION_LABEL, "PromptLesionTrainer_demo", "diffusion", settings))

    from ..evaluation.evaluate import evaluate_folders, write_outputs

    n_test = len(list((ds_dir / "imagesTs").glob("*_0000.nii.gz")))
    results: dict[str, list[dict]] = {a.label: [] for a in arms}
    for rep in range(1, args.repeats + 1):
        res_root = work / "nnUNet_results" / f"repeat_{rep}"
        for arm in arms:
            tag = arm.tag
            # Arms sharing a trainer class need their own nnUNet_results (nnU-Net names folders by trainer).
            arm_env = dict(env, nnUNet_results=str(res_root / tag))
            if arm.settings:
                sfile = work / "settings" / f"{tag}.json"
                sfile.parent.mkdir(exist_ok=True)
                write_json_atomic(arm.settings, sfile)
                arm_env["PROMPTLESION_SETTINGS"] = str(sfile)
            out = Path(arm_env["nnUNet_results"]) / ds_dir.name / f"{arm.trainer}__nnUNetPlans__{DEMO_CONFIGURATION}" \
                / f"fold_{FOLD}"
            name = f"{tag}_repeat{rep}"
            if (out / "checkpoint_final.pth").is_file():
                r.stage(f"3/5 [{arm.label}, repeat {rep}] already trained")
            else:
                cont = ["--c"] if (out / "checkpoint_latest.pth").is_file() else []
                r.stage(f"3/5 [{arm.label}, repeat {rep}] training {arm.trainer} on {args.device}, "
                        f"{DEMO_EPOCHS} epochs x {DEMO_ITERATIONS} iterations (log: {r.logs / ('train_' + name + '.log')})")
                r.run(f"train_{name}", [_bin("nnUNetv2_train"), str(d), DEMO_CONFIGURATION, FOLD, "-tr", arm.trainer,
                                        "-device", args.device, *cont],
                      show=("Pseudo dice", "PromptLesion: batch", "Epoch time"), env=arm_env)
            pred = work / "predictions" / f"repeat_{rep}" / tag
            if pred.is_dir() and len(list(pred.glob("*.nii.gz"))) == n_test:
                r.stage(f"4/5 [{arm.label}, repeat {rep}] predictions exist")
            else:
                r.stage(f"4/5 [{arm.label}, repeat {rep}] predicting {n_test} test cases")
                r.run(f"predict_{name}", [_bin("nnUNetv2_predict"), "-i", str(ds_dir / "imagesTs"), "-o", str(pred),
                                          "-d", str(d), "-c", DEMO_CONFIGURATION, "-f", FOLD, "-tr", arm.trainer,
                                          "-device", args.device, "--disable_tta", "-npp", "1", "-nps", "1"],
                      env=arm_env)
            ev = evaluate_folders(pred, ds_dir / "labelsTs")
            write_outputs(ev, pred / "evaluation", title=f"{arm.label}, repeat {rep}", plots=False)
            results[arm.label].append(ev)

    r.stage("5/5 evaluation on the held-out test cases")
    report = build_report(results, LESION_CLASSES, CONTEXT_CLASSES, REAL_ONLY.label)
    manifest = json.loads((ds_dir / "phantom_manifest.json").read_text())
    notes = _class_notes(manifest)
    budget = f"{DEMO_EPOCHS} epochs x {DEMO_ITERATIONS} iterations, config {DEMO_CONFIGURATION}, fold {FOLD}, no mirroring"
    text = format_report(report, n_test, args.repeats, budget, notes)
    print(text, flush=True)
    write_text_atomic(text + "\n", work / "report.txt")
    write_text_atomic("# PromptLesion demo report\n\n```\n" + text + "\n```\n\n![Dice and detection](report_dice.png)\n\n"
                      "![synthetic samples](synthetic_montage.png)\n", work / "report.md")
    write_json_atomic({"report": report, "budget": budget, "repeats": args.repeats, "test_cases": n_test,
                       "arms": [a.__dict__ for a in arms], "class_notes": notes}, work / "results.json")
    plot_report(report, work / "report_dice.png",
                f"PromptLesion demo: {n_test} test cases, {args.repeats} repeat(s) per arm, {budget}")
    montage = work / "synthetic_montage.png"
    try:
        make_montage(d, montage, args.montage_samples)
    except Exception as e:  # the report above stands on its own; say why the picture is missing
        r.stage(f"montage not written: {type(e).__name__}: {e}")
    r.stage(f"done: {work / 'report.txt'}, {work / 'report.md'}, {work / 'report_dice.png'}, {montage}; logs {r.logs}")


def _class_notes(manifest: dict) -> dict[str, str]:
    """'N training lesions in K cases; M test lesions' per class, from the phantom manifest."""
    notes = {}
    for cls in LESION_CLASSES:
        tr = [l for c in manifest["training"] for l in c["lesions"] if l["class"] == cls]
        trc = sum(1 for c in manifest["training"] if any(l["class"] == cls for l in c["lesions"]))
        ts = [l for c in manifest.get("test", []) for l in c["lesions"] if l["class"] == cls]
        notes[cls] = f"{len(tr)} training lesions in {trc}/{len(manifest['training'])} cases; {len(ts)} test lesions"
    return notes


def make_montage(dataset_id: int, path: Path, per_class: int, seed: int = 0) -> None:
    """Real lesions and ``per_class`` synthetic samples of every lesion class, with one intensity window.

    Synthetic samples come from PromptLesionTrainer's own training loader (rule-based synthesis), so the
    picture shows exactly what the trainer feeds nnU-Net (before augmentation).
    """
    import numpy as np
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from ..evaluation.montage import save_montage
    from ..trainers.promptlesion_trainer import PromptLesionTrainer

    name = maybe_convert_to_dataset_name(dataset_id)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # nnunetv2 2.8's run_training sets this key before building a trainer
    trainer = PromptLesionTrainer(plans, DEMO_CONFIGURATION, FOLD, load_json(str(pre / "dataset.json")),
                                  device=torch.device("cpu"))
    trainer.initialize()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    ps = trainer.configuration_manager.patch_size
    loader = trainer.build_train_loader(dataset_tr, ps, None)
    # The data are CT-normalised z-scores: map the HU window with the dataset's own normalisation.
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    window = tuple((h - props["mean"]) / props["std"] for h in MONTAGE_WINDOW_HU)
    np.random.seed(seed)
    rows = []
    for ci, lesion in enumerate(loader.index.spec.lesions):
        real = []
        for ident in dataset_tr.identifiers:
            if len(real) >= per_class:
                break
            data, seg, _, _ = dataset_tr.load_case(ident)
            m = np.asarray(seg[0]) == lesion.label
            if m.any():
                # Crop the real lesion with the synthetic samples' field of view (the patch), centred on it.
                c = np.argwhere(m).mean(0).round().astype(int)
                bbox = [[int(ci) - p // 2, int(ci) - p // 2 + p] for ci, p in zip(c, ps)]
                img = crop_and_pad_nd(np.asarray(data[:1]), [[0, 1]] + bbox, 0)[0]
                real.append((img, crop_and_pad_nd(m, bbox, 0)))
        if real:
            rows.append((f"real {lesion.name}", real))
        samples = []
        for _ in range(per_class):
            sample = loader.make_synthetic(class_idx=ci)
            samples.append((np.asarray(sample.data[0]), np.asarray(sample.mask)))
        rows.append((f"synthetic {lesion.name}", samples))
    lo, hi = MONTAGE_WINDOW_HU
    save_montage(rows, path, window=window,
                 title=f"Real and PromptLesion synthetic (rule-based) lesions, red contour = lesion; "
                       f"one window for all panels: {lo:.0f} to {hi:.0f} HU")


if __name__ == "__main__":
    main()
