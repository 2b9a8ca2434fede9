"""promptlesion_realism: real vs synthetic lesions per class (Fréchet distance, KS tests, blinded montage)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from ..utils.atomic import write_json_atomic
from ..utils.env_names import ENV_SETTINGS

EPILOG = """\
example (dataset planned and preprocessed; a baseline trained with nnUNetTrainer_earlyStopping, fold 0):
  promptlesion_realism -d 501 --settings my_arm_settings.json -o realism_501
  promptlesion_realism -d 501 --features intensity_shape -o realism_501      # no trained model needed

Synthetic lesions are drawn by PromptLesionTrainer's own training loader with the given settings
(PROMPTLESION_SETTINGS; default: the dataset's promptlesion_settings.json or the defaults), so any
synthesizer works (rule_based, diffusion_cache, diffusion_online). Real lesions are the connected
components of the same fold's training cases. Both are centred on the lesion in a patch of the
configuration's size. 2D configurations (e.g. the demo's 2d_demo) compare in plane, as the 2D trainer
paints: a real lesion is its largest slice section, sizes are equivalent-circle radii.

Features (--features): nnunet_encoder (default) = the encoder of a trained nnU-Net model of the same
dataset/plans/configuration, stage outputs averaged over the lesion mask; the model folder is
--model-folder or found in $nnUNet_results (a real-only trainer preferred). intensity_shape = weight-free
intensity and shape descriptors.

Outputs in -o: realism.json, realism.md (per class: FD with its real-vs-real floor, KS tests of radius,
mean HU and contrast), distributions.png, blinded_<class>.png (shuffled, numbered, one HU window) and
answer_key.json (kept apart: give the PNGs to a reader, compare with the key afterwards).
"""

PREFERRED_TRAINERS = ("nnUNetTrainer_earlyStopping", "nnUNetTrainer")


def find_model_folder(dataset_name: str, plans: str, configuration: str, fold: str, checkpoint: str) -> Path:
    res = os.environ.get("nnUNet_results")
    if not res:
        raise SystemExit("promptlesion_realism: nnUNet_results is not set; pass --model-folder or --features intensity_shape")
    cands = sorted(p for p in (Path(res) / dataset_name).glob(f"*__{plans}__{configuration}")
                   if (p / f"fold_{fold}" / checkpoint).is_file())
    if not cands:
        raise SystemExit(f"promptlesion_realism: no trained model with fold_{fold}/{checkpoint} under "
                         f"{Path(res) / dataset_name} (*__{plans}__{configuration}). Train one (e.g. nnUNetv2_train "
                         f"{dataset_name} {configuration} {fold} -tr nnUNetTrainer_earlyStopping -p {plans}), pass "
                         "--model-folder, or use --features intensity_shape")
    for t in PREFERRED_TRAINERS:
        for c in cands:
            if c.name.split("__")[0] == t:
                return c
    if len(cands) > 1:
        raise SystemExit(f"promptlesion_realism: several trained models, pick one with --model-folder: "
                         f"{[c.name for c in cands]}")
    return cands[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="promptlesion_realism", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Compare synthetic with real lesions per class: Fréchet distance on "
                                             "lesion-focused features, KS tests of size and intensity, and a blinded "
                                             "montage with a separate answer key.", epilog=EPILOG)
    ap.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (nnUNet_preprocessed)")
    ap.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    ap.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    ap.add_argument("-f", "--fold", default="0", help="fold whose training cases give the real lesions and carriers")
    ap.add_argument("--settings", default=None, help="PromptLesion settings JSON for the synthetic lesions")
    ap.add_argument("--per-class", type=int, default=50, help="lesions per class and source (default 50)")
    ap.add_argument("--features", choices=["nnunet_encoder", "intensity_shape"], default="nnunet_encoder")
    ap.add_argument("--model-folder", default=None, help="trained nnU-Net model folder (Trainer__Plans__Config)")
    ap.add_argument("--model-fold", default=None, help="fold of the model (default: --fold)")
    ap.add_argument("--checkpoint", default="checkpoint_best.pth", help="checkpoint of the model (default best)")
    ap.add_argument("--stages", type=int, nargs="+", default=None, help="encoder stages to pool (default all)")
    ap.add_argument("--window-hu", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="montage window in HU (default: 0.5th-99.9th percentile of the displayed slices)")
    ap.add_argument("--montage-per-class", type=int, default=12, help="lesions per class and source in the montage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True, help="output folder")
    args = ap.parse_args(argv)

    # deferred until the arguments are parsed: see cli/__init__.py
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from ..evaluation.realism import (IntensityShapeFeatures, NnUNetEncoderFeatures, blinded_montage,
                                      format_realism_markdown, lesion_slice, real_lesion_patches, realism_report,
                                      synthetic_lesion_patches, write_report)
    from ..trainers.promptlesion_trainer import PromptLesionTrainer

    t0 = time.time()

    def log(msg):
        print(f"[realism {time.time() - t0:5.0f}s] {msg}", flush=True)

    pre_root = os.environ.get("nnUNet_preprocessed")
    if not pre_root:
        raise SystemExit("promptlesion_realism: nnUNet_preprocessed is not set")
    name = args.dataset if str(args.dataset).startswith("Dataset") else \
        next(iter(sorted(Path(pre_root).glob(f"Dataset{int(args.dataset):03d}_*"))), Path("?")).name
    pre = Path(pre_root) / name
    if not (pre / f"{args.plans}.json").is_file():
        raise SystemExit(f"promptlesion_realism: {pre / (args.plans + '.json')} not found; plan and preprocess first")
    if args.settings and not Path(args.settings).is_file():
        # named here: the trainer would blame PROMPTLESION_SETTINGS, a variable the user never set
        raise SystemExit(f"promptlesion_realism: --settings {args.settings} does not point to a file")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    np.random.seed(args.seed)

    # The trainer writes a training log into its nnUNet_results fold folder when built: point it at a scratch
    # folder so a trained model's folder is left alone.
    saved = {k: os.environ.get(k) for k in ("nnUNet_results", ENV_SETTINGS)}
    os.environ["nnUNet_results"] = str(out / "scratch_trainer")
    if args.settings:
        os.environ[ENV_SETTINGS] = str(Path(args.settings).resolve())
    try:
        plans = load_json(str(pre / f"{args.plans}.json"))
        plans["continue_training"] = False
        fold = args.fold if args.fold == "all" else int(args.fold)
        with contextlib.redirect_stdout(sys.stderr):
            trainer = PromptLesionTrainer(plans, args.configuration, fold, load_json(str(pre / "dataset.json")),
                                          device=torch.device("cpu"))
            trainer.initialize()
            trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
            dataset_tr, _ = trainer.get_tr_and_val_datasets()
            ps = list(trainer.configuration_manager.patch_size)
            loader = trainer.build_train_loader(dataset_tr, ps, None)
        lesions = trainer.promptlesion_spec.lesions
        spacing = list(trainer.configuration_manager.spacing)
        log(f"{name} {args.plans}/{args.configuration} fold {args.fold}: patch {ps}, spacing {spacing} mm, "
            f"synthesizer {trainer.promptlesion_settings.synthesizer}")
        patches = real_lesion_patches(dataset_tr, list(dataset_tr.identifiers), lesions, ps, args.per_class, rng, log)
        patches += synthetic_lesion_patches(loader, lesions, args.per_class, ps, log)
        with contextlib.suppress(Exception):
            trainer.close_sample_source()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    props = plans["foreground_intensity_properties_per_channel"]["0"]

    def hu(z):
        return z * props["std"] + props["mean"]

    if args.features == "intensity_shape":
        extractor = IntensityShapeFeatures()
    else:
        folder = Path(args.model_folder) if args.model_folder else \
            find_model_folder(name, args.plans, args.configuration, args.model_fold or args.fold, args.checkpoint)
        extractor = NnUNetEncoderFeatures.from_model_folder(folder, args.model_fold or args.fold, args.checkpoint,
                                                            stages=args.stages)
    log(f"features: {extractor.name}")
    report = realism_report(patches, extractor, spacing, hu, rng)
    report.update(dataset=name, plans=args.plans, configuration=args.configuration, fold=args.fold,
                  settings=args.settings, synthesizer=trainer.promptlesion_settings.synthesizer, spacing_mm=spacing,
                  patch_size=ps)
    write_report(report, out)

    keys = []
    for l in lesions:
        sel = []
        for src in ("real", "synthetic"):
            grp = [p for p in patches if p.class_name == l.name and p.source == src]
            sel += [grp[i] for i in rng.permutation(len(grp))[:args.montage_per_class]]
        if not sel:
            continue
        if args.window_hu:
            window = tuple(args.window_hu)
        else:
            # the displayed slices (lesion and surroundings): a reader judges a lesion against its context
            vals = np.concatenate([hu(lesion_slice(p)).ravel() for p in sel])
            window = tuple(float(v) for v in np.percentile(vals, [0.5, 99.9]))
        key = blinded_montage(sel, out / f"blinded_{l.name}.png", out / f"answer_key_{l.name}.json", window, rng,
                              title=f"{l.name}: which are synthetic? window {window[0]:.0f} to {window[1]:.0f} HU",
                              hu=hu)
        keys += [{**k, "montage": f"blinded_{l.name}.png"} for k in key]
    write_json_atomic(keys, out / "answer_key.json")
    for f in out.glob("answer_key_*.json"):
        f.unlink()
    print(format_realism_markdown(report))
    log(f"done: {out}")


if __name__ == "__main__":
    main()
