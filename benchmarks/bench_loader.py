"""Training data-loader throughput: PromptLesionTrainer (1 real + 1 synthetic) vs nnUNetTrainer.

Both loaders are built exactly as their trainers build them (nnU-Net's training transforms, deep
supervision targets), on the same preprocessed CCTA phantom, and run in this process (no worker
pool), alternating in rounds so machine noise hits both alike. Reports samples/s and the ratio
measured in this one run.

    python benchmarks/bench_loader.py [--work-dir DIR] [--batches 40] [--rounds 4] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=None, help="nnU-Net folders go here (default: a temporary folder)")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--batches", type=int, default=40, help="batches per loader per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_loader_"))
    env = {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results")}
    os.environ.update(env)
    bin_ = Path(sys.executable).parent
    did, name = 650, "Dataset650_PhantomCCTA"
    if not (work / "preprocessed" / name / "nnUNetPlans_3d_fullres").is_dir():
        subprocess.run([bin_ / "promptlesion_make_phantoms", "--kind", "ccta", "--dataset-id", str(did), "--cases",
                        str(args.cases), "--seed", "0", "--overwrite"], check=True, capture_output=True)
        subprocess.run([bin_ / "nnUNetv2_plan_and_preprocess", "-d", str(did), "-c", "3d_fullres", "-np", "1",
                        "-npfp", "1"], check=True, capture_output=True)

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    torch.set_num_threads(1)
    pre = work / "preprocessed" / name
    loaders = {}
    for cls in (nnUNetTrainer, PromptLesionTrainer):
        plans = load_json(str(pre / "nnUNetPlans.json"))
        plans["continue_training"] = False
        t = cls(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
        t.initialize()
        t.dataset_class = infer_dataset_class(t.preprocessed_dataset_folder)
        ds_tr, _ = t.get_tr_and_val_datasets()
        ps = t.configuration_manager.patch_size
        rot, dummy, initial, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        tr = t.get_training_transforms(ps, rot, t._get_deep_supervision_scales(), mirror, dummy,
                                       foreground_labels=t.label_manager.foreground_labels)
        if cls is PromptLesionTrainer:
            loaders[cls.__name__] = t.build_train_loader(ds_tr, initial, tr)
        else:
            loaders[cls.__name__] = nnUNetDataLoader(ds_tr, t.batch_size, initial, ps, t.label_manager,
                                                     oversample_foreground_percent=t.oversample_foreground_percent,
                                                     transforms=tr)
        batch_size = t.batch_size

    np.random.seed(0)
    times = {k: 0.0 for k in loaders}
    for _ in range(args.rounds):
        for k, dl in loaders.items():
            t0 = time.perf_counter()
            for _ in range(args.batches):
                dl.generate_train_batch()
            times[k] += time.perf_counter() - t0
    n = args.rounds * args.batches * batch_size
    sps = {k: n / v for k, v in times.items()}
    res = {"samples_per_s": sps, "ratio_promptlesion_over_nnunet": sps["PromptLesionTrainer"] / sps["nnUNetTrainer"],
           "batch_size": batch_size, "patch_size": list(ps), "samples_per_loader": n,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1, no GPU",
           "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
