"""Training data loader benchmarks on one nnU-Net preprocessed phantom.

Two sections, chosen with ``--sections``:

throughput
    Loader samples/s for each arm of :data:`ARMS` (nnUNetTrainer's loader, PromptLesionTrainer with the
    rule-based source, and any arm added there), built exactly as their trainers build them (nnU-Net's
    training transforms, deep-supervision targets), run in this process (no worker pool), alternating in
    rounds so machine noise hits all arms alike. Reports samples/s and each arm's ratio to nnUNetTrainer
    measured in this one run.
scan
    PromptLesionTrainer's start-up scan of the fold's training cases, interleaved over rounds:
    ``full_volume`` (the scan before issue 10: np.unique, np.isin and a maximum filter over every whole
    volume, lesion measurement on whole volumes), ``class_locations`` (the current scan, no cache) and
    ``cached`` (loading the fingerprinted cache a restart or another DDP rank uses). Wall and CPU seconds.

    python benchmarks/bench_loader.py [--kind ccta|abdomen] [--preset default] [--cases 12]
        [--sections throughput,scan] [--batches 40] [--rounds 3] [--work-dir DIR] [--out results.json]

To add a throughput arm (e.g. a diffusion cache source), add ``ARMS["name"] = builder`` where
``builder(pre: Path, args) -> (loader, batch_size)``; ``nnUNetTrainer`` is the reference arm.
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
from typing import Callable

DATASETS = {"ccta": (650, "Dataset650_PhantomCCTA"), "abdomen": (651, "Dataset651_PhantomAbdomen")}


def _trainer(cls, pre: Path, configuration: str = "3d_fullres"):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    t = cls(plans, configuration, 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    t.initialize()
    t.dataset_class = infer_dataset_class(t.preprocessed_dataset_folder)
    return t


def arm_nnunet(pre: Path, args):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_promptlesion.trainers.transforms import training_transforms

    t = _trainer(nnUNetTrainer, pre)
    ds_tr, _ = t.get_tr_and_val_datasets()
    initial, tr = training_transforms(t)
    return nnUNetDataLoader(ds_tr, t.batch_size, initial, t.configuration_manager.patch_size, t.label_manager,
                            oversample_foreground_percent=t.oversample_foreground_percent, transforms=tr), t.batch_size


def arm_promptlesion_rule_based(pre: Path, args):
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
    from nnunet_promptlesion.trainers.transforms import training_transforms

    t = _trainer(PromptLesionTrainer, pre)
    ds_tr, _ = t.get_tr_and_val_datasets()
    initial, tr = training_transforms(t)
    return t.build_train_loader(ds_tr, initial, tr), t.batch_size


#: throughput arms: name -> builder(pre, args) -> (loader, batch size). "nnUNetTrainer" is the reference.
ARMS: dict[str, Callable] = {"nnUNetTrainer": arm_nnunet, "PromptLesionTrainer": arm_promptlesion_rule_based}


def bench_throughput(pre: Path, args) -> dict:
    import numpy as np

    loaders, batch = {}, {}
    for name in args.arms.split(","):
        loaders[name], batch[name] = ARMS[name](pre, args)
    np.random.seed(0)
    times = {k: 0.0 for k in loaders}
    for _ in range(args.rounds):
        for k, dl in loaders.items():
            t0 = time.perf_counter()
            for _ in range(args.batches):
                dl.generate_train_batch()
            times[k] += time.perf_counter() - t0
    sps = {k: args.rounds * args.batches * batch[k] / v for k, v in times.items()}
    ref = sps.get("nnUNetTrainer")
    return {"samples_per_s": sps, "ratio_to_nnUNetTrainer": {k: v / ref for k, v in sps.items()} if ref else None,
            "batch_size": batch, "samples_per_arm": {k: args.rounds * args.batches * batch[k] for k in sps}}


def scan_full_volume(dataset, identifiers, spec, spacing, patch_size, centre_fraction):
    """The start-up scan as it was before issue 10, for comparison: whole-volume np.unique, np.isin,
    maximum filter and lesion measurement in every case."""
    import numpy as np
    from scipy import ndimage

    from nnunet_promptlesion.lesions.masks import MaskBank
    from nnunet_promptlesion.lesions.intensity_stats import LesionIntensityStats, measure_lesions
    from nnunet_promptlesion.placement.index import centre_box

    box = centre_box(patch_size, centre_fraction)
    stats = {l.label: LesionIntensityStats() for l in spec.lesions}
    bank = MaskBank.empty(spacing)
    carriers = {p: [] for p in spec.parent_labels}
    for ident in identifiers:
        data, seg, _, props = dataset.load_case(ident)
        seg = np.asarray(seg[0])
        present = set(np.unique(seg).tolist())
        lesion_any = np.isin(seg, spec.labels)
        near = None
        if any(l in present for l in spec.labels):
            img = np.asarray(data[:])
            for l in spec.lesions:
                if l.label in present:
                    bank.masks.setdefault(l.label, []).extend(measure_lesions(img, seg, l, stats[l.label])[:20])
            near = ndimage.maximum_filter(lesion_any.astype(np.uint8), size=tuple(box), mode="constant") > 0
        for p in spec.parent_labels:
            pts = props.get("class_locations", {}).get(p)
            if pts is None or len(pts) == 0:
                continue
            xyz = np.asarray(pts)[:, 1:].astype(np.int64)
            if near is not None:
                xyz = xyz[~near[tuple(xyz.T)]]
            carriers[p].append((ident, xyz))
    return carriers


def bench_scan(pre: Path, args) -> dict:
    from nnunet_promptlesion.placement.index import build_lesion_index, index_fingerprint, load_cached_index, save_index
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

    t = _trainer(PromptLesionTrainer, pre)
    ds_tr, _ = t.get_tr_and_val_datasets()
    ids = list(ds_tr.identifiers)
    cm, s, spec = t.configuration_manager, t.promptlesion_settings, t.promptlesion_spec
    fp = index_fingerprint(t.preprocessed_dataset_folder, ids, spec, cm.spacing, cm.patch_size, s.centre_fraction,
                           s.max_scan_cases)
    cache = Path(tempfile.mkdtemp(prefix="bench_scan_")) / "index.pkl"

    def new():
        return build_lesion_index(ds_tr, ids, spec, cm.spacing, cm.patch_size, s.centre_fraction, progress=False)

    save_index(cache, fp, new())
    arms = {"full_volume": lambda: scan_full_volume(ds_tr, ids, spec, cm.spacing, cm.patch_size, s.centre_fraction),
            "class_locations": new, "cached": lambda: load_cached_index(cache, fp)}
    wall = {k: [] for k in arms}
    cpu = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k, fn in arms.items():
            w0, c0 = time.perf_counter(), time.process_time()
            assert fn() is not None
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"cases": len(ids), "median_wall_s": {k: med(v) for k, v in wall.items()},
            "median_cpu_s": {k: med(v) for k, v in cpu.items()},
            "speedup_cpu_vs_full_volume": {k: med(cpu["full_volume"]) / max(med(v), 1e-9) for k, v in cpu.items()},
            "cache_bytes": cache.stat().st_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=None, help="nnU-Net folders go here (default: a temporary folder)")
    ap.add_argument("--kind", choices=sorted(DATASETS), default="ccta")
    ap.add_argument("--preset", default="default", help="promptlesion_make_phantoms --preset")
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--sections", default="throughput,scan")
    ap.add_argument("--arms", default="nnUNetTrainer,PromptLesionTrainer", help=f"throughput arms, from {list(ARMS)}")
    ap.add_argument("--batches", type=int, default=40, help="batches per loader per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    # options of the diffusion arms (PromptLesionTrainer[diffusion_cache] / PromptLesionTrainer[diffusion_online])
    ap.add_argument("--diffusion", default=None, help="diffusion checkpoint for the diffusion arms (default: a tiny "
                    "generator trained for a few steps on the benchmark dataset; loader throughput does not depend on quality)")
    ap.add_argument("--synthesis-device", default="cpu", help="device of the online producer and the cache build")
    ap.add_argument("--diffusion-steps", type=int, default=50, help="DDIM steps of the diffusion arms (default 50)")
    ap.add_argument("--cache-per-class", type=int, default=32, help="cache samples per class (default 32)")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_loader_"))
    os.environ.update({"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
                       "nnUNet_results": str(work / "results")})
    os.environ.pop("PROMPTLESION_SETTINGS", None)
    bin_ = Path(sys.executable).parent
    did, name = DATASETS[args.kind]
    if not (work / "preprocessed" / name / "nnUNetPlans_3d_fullres").is_dir():
        subprocess.run([bin_ / "promptlesion_make_phantoms", "--kind", args.kind, "--dataset-id", str(did), "--cases",
                        str(args.cases), "--seed", "0", "--preset", args.preset, "--overwrite"], check=True,
                       capture_output=True)
        subprocess.run([bin_ / "nnUNetv2_plan_and_preprocess", "-d", str(did), "-c", "3d_fullres", "-np", "1",
                        "-npfp", "1"], check=True, capture_output=True)

    import torch

    torch.set_num_threads(1)
    pre = work / "preprocessed" / name
    res = {"dataset": f"{name} ({args.kind} phantom, preset {args.preset}, {args.cases} cases)"}
    sections = args.sections.split(",")
    if "scan" in sections:
        res["startup_scan"] = bench_scan(pre, args)
    if "throughput" in sections:
        res["throughput"] = bench_throughput(pre, args)
    res.update({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1, "
                           "no GPU", "command": " ".join(["python"] + sys.argv)})
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


# ---------------------------------------------------------------------------------------------- diffusion arms
def _bench_generator(pre: Path, args) -> Path:
    """--diffusion, or a tiny generator trained for 5 steps on the benchmark dataset (fold 0, identity mapping)."""
    if args.diffusion:
        return Path(args.diffusion)
    work = pre.parents[1]
    ckpt = work / "bench_generator" / "diffusion" / "checkpoint_final.pt"
    if not ckpt.is_file():
        import torch

        from nnunet_promptlesion.cli.train_diffusion import main as train_diffusion
        from nnunet_promptlesion.generator.data import PreprocessedPatchSource
        from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan

        src = PreprocessedPatchSource(pre.name, fold=0)
        vq = work / "bench_generator" / "vqgan_tiny.pt"
        vq.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_vqgan(VQGAN(VQGANConfig.tiny(patch_size=(24, 24, 24))), vq, spacing=src.spacing, intensity=src.intensity,
                   step=0, source=src.describe())
        rc = train_diffusion(["-d", pre.name, "-f", "0", "--vqgan", str(vq), "--preset", "tiny", "--steps", "5",
                              "--eval-every", "0", "--checkpoint-every", "5", "--channels", "16", "32", "32",
                              "--num-threads", "1", "--no-progress", "-o", str(ckpt.parent), "--device", "cpu"])
        assert rc == 0, "tiny generator training failed"
    return ckpt


def _promptlesion_with_settings(pre: Path, settings: dict, tag: str):
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
    from nnunet_promptlesion.trainers.transforms import training_transforms

    sfile = pre.parents[1] / f"bench_settings_{tag}.json"
    sfile.write_text(json.dumps(settings))
    os.environ["PROMPTLESION_SETTINGS"] = str(sfile)
    try:
        t = _trainer(PromptLesionTrainer, pre)
        ds_tr, _ = t.get_tr_and_val_datasets()
        initial, tr = training_transforms(t)
        return t, t.build_train_loader(ds_tr, initial, tr)
    finally:
        os.environ.pop("PROMPTLESION_SETTINGS", None)


def arm_diffusion_cache(pre: Path, args):
    """PromptLesionTrainer with a cache built by promptlesion_build_cache (--cache-per-class, --diffusion-steps)."""
    from nnunet_promptlesion.cli.build_cache import main as build_cache

    ckpt = _bench_generator(pre, args)
    cache = pre.parents[1] / "bench_cache"
    rc = build_cache(["-d", pre.name, "-f", "0", "--diffusion", str(ckpt), "--per-class", str(args.cache_per_class),
                      "--steps", str(args.diffusion_steps), "--batch", "8", "--device", args.synthesis_device,
                      "--num-threads", "1", "--no-progress", "-o", str(cache)])
    assert rc == 0, "cache build failed"
    t, loader = _promptlesion_with_settings(pre, {"synthesizer": "diffusion_cache", "cache": str(cache)}, "cache")
    return loader, t.batch_size


def arm_diffusion_online(pre: Path, args):
    """PromptLesionTrainer with the online producer on --synthesis-device (its ring stats go to stderr at exit)."""
    import atexit

    ckpt = _bench_generator(pre, args)
    t, loader = _promptlesion_with_settings(pre, {"synthesizer": "diffusion_online", "diffusion": str(ckpt),
                                                  "steps": args.diffusion_steps, "online_warmup_s": 900,
                                                  "synthesis_device": args.synthesis_device}, "online")

    def _close():
        src = t.promptlesion_source
        if src is not None:
            print("diffusion_online source stats: " + json.dumps(src.epoch_stats(), default=str), file=sys.stderr)
        t.close_sample_source()

    atexit.register(_close)
    return loader, t.batch_size


ARMS["PromptLesionTrainer[diffusion_cache]"] = arm_diffusion_cache
ARMS["PromptLesionTrainer[diffusion_online]"] = arm_diffusion_online


if __name__ == "__main__":
    main()
