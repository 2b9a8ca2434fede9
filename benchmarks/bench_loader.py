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
    ap.add_argument("--diffusion-arms", action="store_true",
                    help="also measure PromptLesionTrainer with diffusion_cache and diffusion_online (see add_diffusion_arms)")
    ap.add_argument("--diffusion", default=None, help="diffusion checkpoint for the diffusion arms (default: a tiny "
                    "generator trained for a few steps on the benchmark dataset; throughput does not depend on quality)")
    ap.add_argument("--synthesis-device", default="cpu", help="device of the online producer and the cache build")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps for the diffusion arms (default 50)")
    ap.add_argument("--cache-per-class", type=int, default=32, help="cache samples per class (default 32)")
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
    if args.diffusion_arms:
        closers = add_diffusion_arms(loaders, work, did, pre, args)
    else:
        closers = []

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
    extra = {}
    for k in sps:
        if k.startswith("PromptLesionTrainer["):
            extra[f"ratio_{k}_over_nnunet"] = sps[k] / sps["nnUNetTrainer"]
    for t in closers:
        extra.setdefault("online_source_stats", t.promptlesion_source.epoch_stats() if t.promptlesion_source else None)
        t.close_sample_source()
    res = {"samples_per_s": sps, "ratio_promptlesion_over_nnunet": sps["PromptLesionTrainer"] / sps["nnUNetTrainer"],
           **extra,
           "batch_size": batch_size, "patch_size": list(ps), "samples_per_loader": n,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1, "
                      f"synthesis device {args.synthesis_device if args.diffusion_arms else '-'}",
           "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


def add_diffusion_arms(loaders: dict, work: Path, did: int, pre: Path, args) -> list:
    """Add PromptLesionTrainer[diffusion_cache] and PromptLesionTrainer[diffusion_online] to ``loaders``.

    Without --diffusion, a tiny generator is trained for a few steps on the benchmark dataset (fold 0, identity
    space mapping); loader throughput does not depend on its quality. The cache is built with
    promptlesion_build_cache (--cache-per-class samples per class). Both loaders are built exactly as the trainer
    builds them; the online producer runs in its own process on --synthesis-device while the loader is timed.
    Returns the trainers whose sources must be closed.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    ckpt = Path(args.diffusion) if args.diffusion else work / "bench_generator" / "diffusion" / "checkpoint_final.pt"
    if not ckpt.is_file():
        from nnunet_promptlesion.cli.train_diffusion import main as train_diffusion
        from nnunet_promptlesion.generator.data import PreprocessedPatchSource
        from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan

        src = PreprocessedPatchSource(did, fold=0)
        vq = work / "bench_generator" / "vqgan_tiny.pt"
        vq.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))), vq, spacing=src.spacing,
                   intensity=src.intensity, step=0, source=src.describe())
        rc = train_diffusion(["-d", str(did), "-f", "0", "--vqgan", str(vq), "--preset", "tiny", "--steps", "5",
                              "--eval-every", "0", "--checkpoint-every", "5", "--channels", "16", "32", "32",
                              "--num-threads", "1", "--no-progress", "-o", str(ckpt.parent), "--device", "cpu"])
        assert rc == 0, "tiny generator training failed"
    cache = work / "bench_cache"
    from nnunet_promptlesion.cli.build_cache import main as build_cache

    rc = build_cache(["-d", str(did), "-f", "0", "--diffusion", str(ckpt), "--per-class", str(args.cache_per_class),
                      "--steps", str(args.steps), "--batch", "8", "--device", args.synthesis_device,
                      "--num-threads", "1", "--no-progress", "-o", str(cache)])
    assert rc == 0, "cache build failed"
    arms = {"diffusion_cache": {"synthesizer": "diffusion_cache", "cache": str(cache)},
            "diffusion_online": {"synthesizer": "diffusion_online", "diffusion": str(ckpt), "steps": args.steps,
                                 "synthesis_device": args.synthesis_device, "online_warmup_s": 600}}
    closers = []
    for name, settings in arms.items():
        sfile = work / f"settings_{name}.json"
        sfile.write_text(json.dumps(settings))
        os.environ["PROMPTLESION_SETTINGS"] = str(sfile)
        try:
            plans = load_json(str(pre / "nnUNetPlans.json"))
            plans["continue_training"] = False
            t = PromptLesionTrainer(plans, "3d_fullres", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
            t.initialize()
            t.dataset_class = infer_dataset_class(t.preprocessed_dataset_folder)
            ds_tr, _ = t.get_tr_and_val_datasets()
            ps = t.configuration_manager.patch_size
            rot, dummy, initial, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            tr = t.get_training_transforms(ps, rot, t._get_deep_supervision_scales(), mirror, dummy,
                                           foreground_labels=t.label_manager.foreground_labels)
            loaders[f"PromptLesionTrainer[{name}]"] = t.build_train_loader(ds_tr, initial, tr)
            if name == "diffusion_online":
                closers.append(t)
        finally:
            os.environ.pop("PROMPTLESION_SETTINGS", None)
    return closers


if __name__ == "__main__":
    main()
