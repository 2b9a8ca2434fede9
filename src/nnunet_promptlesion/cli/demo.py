"""promptlesion_demo: the whole chain on a procedural CCTA phantom, on the CPU, in one command.

Steps (each skipped when its output already exists, so an interrupted demo resumes):
  1. promptlesion_make_phantoms --kind ccta            -> nnUNet_raw/DatasetNNN_PhantomCCTA
  2. nnUNetv2_plan_and_preprocess --verify_dataset_integrity
  3. nnUNetv2_train with nnUNetTrainer_promptlesionDemo (baseline) and PromptLesionTrainer_demo,
     the same short budget for both
  4. nnUNetv2_predict on imagesTs with both models
  5. per-class Dice table (calcified, non-calcified, mean) and a PNG montage of synthetic samples

All nnU-Net folders live under --work-dir; every command's output is logged to work-dir/logs/.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..utils.atomic import write_text_atomic

LESION_CLASSES = ["calcified_plaque", "noncalcified_plaque"]
TRAINERS = {"nnU-Net (baseline)": "nnUNetTrainer_promptlesionDemo",
            "PromptLesion (rule-based)": "PromptLesionTrainer_demo"}


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

    def run(self, name: str, cmd: list[str], show: tuple[str, ...] = ()) -> None:
        """Run ``cmd``, logging everything to logs/<name>.log; echo lines containing any of ``show``."""
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, text=True)
            for line in p.stdout:
                f.write(line)
                if any(s in line for s in show):
                    print("    " + line.rstrip(), flush=True)
            rc = p.wait()
        if rc != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"demo step '{name}' failed (exit {rc}); full log: {log}\n{tail}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="promptlesion_demo",
        description="Build a CCTA phantom dataset, train nnU-Net with and without PromptLesion synthesis for the same "
                    "short CPU budget, predict the test cases and print per-class Dice side by side. Re-running "
                    "resumes: finished steps are skipped.")
    ap.add_argument("--work-dir", default="demo_output", help="folder for nnUNet_raw/_preprocessed/_results, logs, "
                    "predictions and the report (default: ./demo_output)")
    ap.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id of the phantom (default 501)")
    ap.add_argument("--cases", type=int, default=16, help="training cases in the phantom (default 16)")
    ap.add_argument("--test-cases", type=int, default=6, help="test cases in imagesTs/labelsTs (default 6)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--montage-samples", type=int, default=6, help="synthetic samples per class in the montage")
    args = ap.parse_args(argv)

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

    existing = sorted(raw.glob(f"Dataset{d:03d}_*")) if raw.is_dir() else []
    if existing:
        r.stage(f"1/5 phantom dataset exists: {existing[0]}")
    else:
        r.stage(f"1/5 making a CCTA phantom: {args.cases} training + {args.test_cases} test cases")
        r.run("make_phantoms", [_bin("promptlesion_make_phantoms"), "--kind", "ccta", "--dataset-id", str(d),
                                "--cases", str(args.cases), "--test-cases", str(args.test_cases),
                                "--seed", str(args.seed)])
        existing = sorted(raw.glob(f"Dataset{d:03d}_*"))
    ds_dir = existing[0]
    pre = work / "nnUNet_preprocessed" / ds_dir.name
    if (pre / "nnUNetPlans.json").is_file() and (pre / "nnUNetPlans_3d_fullres").is_dir():
        r.stage("2/5 preprocessed data exists")
    else:
        r.stage("2/5 nnUNetv2_plan_and_preprocess --verify_dataset_integrity")
        r.run("plan_and_preprocess", [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(d), "-c", "3d_fullres",
                                      "--verify_dataset_integrity", "-np", "2", "-npfp", "2"])

    results = {}
    for label, trainer in TRAINERS.items():
        out = work / "nnUNet_results" / ds_dir.name / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
        if (out / "checkpoint_final.pth").is_file():
            r.stage(f"3/5 {trainer} already trained")
        else:
            cont = ["--c"] if (out / "checkpoint_latest.pth").is_file() else []
            r.stage(f"3/5 training {trainer} on {args.device} (log: {r.logs / ('train_' + trainer + '.log')})")
            r.run(f"train_{trainer}", [_bin("nnUNetv2_train"), str(d), "3d_fullres", "0", "-tr", trainer,
                                       "-device", args.device, *cont],
                  show=("Epoch ", "train_loss", "Pseudo dice", "PromptLesion: batch", "Epoch time"))
        pred = work / "predictions" / trainer
        n_test = len(list((ds_dir / "imagesTs").glob("*_0000.nii.gz")))
        if pred.is_dir() and len(list(pred.glob("*.nii.gz"))) == n_test:
            r.stage(f"4/5 predictions of {trainer} exist")
        else:
            r.stage(f"4/5 predicting {n_test} test cases with {trainer}")
            r.run(f"predict_{trainer}", [_bin("nnUNetv2_predict"), "-i", str(ds_dir / "imagesTs"), "-o", str(pred),
                                         "-d", str(d), "-c", "3d_fullres", "-f", "0", "-tr", trainer,
                                         "-device", args.device, "--disable_tta", "-npp", "1", "-nps", "1"])
        from ..evaluation.segmentation import per_class_dice
        import json
        labels = json.loads((ds_dir / "dataset.json").read_text())["labels"]
        results[label] = per_class_dice(ds_dir / "labelsTs", pred, labels, str(pred / "summary.json"))

    from ..evaluation.segmentation import format_dice_table
    table = format_dice_table(results, LESION_CLASSES)
    r.stage("5/5 per-class Dice on the test cases (%)")
    print(table, flush=True)
    report = work / "report.txt"
    write_text_atomic(table + "\n", report)
    montage = work / "synthetic_montage.png"
    make_montage(d, montage, args.montage_samples)
    r.stage(f"done: report {report}, montage {montage}, logs {r.logs}")


def make_montage(dataset_id: int, path: Path, per_class: int, seed: int = 0) -> None:
    """Draw ``per_class`` synthetic samples of every lesion class with PromptLesionTrainer's own loader."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from ..evaluation.montage import save_montage
    from ..trainers.promptlesion_trainer import PromptLesionTrainer

    name = maybe_convert_to_dataset_name(dataset_id)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False  # nnunetv2 2.8's run_training sets this key before building a trainer
    trainer = PromptLesionTrainer(plans, "3d_fullres", 0,
                                  load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    trainer.initialize()
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    dataset_tr, _ = trainer.get_tr_and_val_datasets()
    ps = trainer.configuration_manager.patch_size
    loader = trainer.build_train_loader(dataset_tr, ps, None)
    np.random.seed(seed)
    rows = []
    for ci, lesion in enumerate(loader.index.spec.lesions):
        samples = []
        for _ in range(per_class):
            sample = loader.make_synthetic(class_idx=ci)
            samples.append((sample.data[0].numpy(), sample.mask))
        rows.append((lesion.name, samples))
    save_montage(rows, path, title="PromptLesion synthetic samples (red: synthetic lesion)")


if __name__ == "__main__":
    main()
