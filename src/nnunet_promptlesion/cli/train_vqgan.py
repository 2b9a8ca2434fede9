"""promptlesion_train_vqgan: pretrain the VQGAN autoencoder on CT patches (3D, or 2D slices).

Data comes from (a) an nnU-Net preprocessed dataset (training cases of one fold, nnU-Net's own spacing and
CT normalisation) or (b) a folder of NIfTI CTs resampled to ``--spacing`` with a HU window. A 2D nnU-Net
configuration (e.g. promptlesion_demo's 2d_demo) trains a 2D VQGAN on (y, x) slices of its preprocessed data
at its in-plane spacing; the preset then defaults to cpu2d (2D presets: tiny2d, cpu2d, gpu2d).
Run it again with the same ``--output-dir`` to resume; run it under ``torchrun`` for DDP.

The VQGAN needs no labels: ``-f all`` trains on every case of the dataset, and ``--extra-images FOLDER`` (repeatable)
adds unlabelled CT scans in HU, brought into the configuration's space by nnU-Net's own preprocessor. Extra folders
must not contain the experiment's held-out test cases. ``--init-from CHECKPOINT`` fine-tunes another VQGAN of the
same architecture (e.g. one trained on a larger dataset) instead of starting from random weights.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .run_options import add_run_options

PRESET_CHOICES = ("paper", "tiny", "tiny2d", "cpu2d", "gpu2d")  # generator.vqgan.config.PRESETS (not imported: --help stays fast)

EPILOG = """examples:
  # (a) nnU-Net preprocessed dataset 501, 3d_fullres, training cases of fold 0 only
  promptlesion_train_vqgan -d 501 -c 3d_fullres -f 0 --preset paper --steps 100000
  # 2D configuration: a 2D VQGAN on 32 x 32 slices (preset cpu2d by default; gpu2d on a GPU)
  promptlesion_train_vqgan -d 501 -c 2d_demo -f 0 --steps 3000
  # (b) NIfTI CTs at 1 mm with DiffTumor's HU window, organ/lesion labels for oversampling
  promptlesion_train_vqgan --nifti-folder cts/ --label-folder labels/ --spacing 1 1 1 \\
      --hu-window -175 250 -o runs/vqgan_tiny --preset tiny --steps 2000
  # labels unused: every case of the dataset plus two folders of unlabelled CT (NIfTI, HU; never test cases)
  promptlesion_train_vqgan -d 501 -c 2d_demo -f all --extra-images more_ct/ --extra-images other_ct/ --steps 3000
  # fine-tune another dataset's VQGAN on this one (step counter restarts at 0, fresh optimizer)
  promptlesion_train_vqgan -d 502 -f 0 --init-from big_run/checkpoint_final.pt --steps 20000 --lr 1e-4
  # several GPUs (or CPU processes with gloo):
  torchrun --nproc_per_node 4 $(which promptlesion_train_vqgan) -d 501 --preset paper

Outputs (in --output-dir): checkpoint_latest.pt / checkpoint_final.pt (use them with
promptlesion_reconstruct and the diffusion training), train_log.jsonl, train.log, recon_step*.png.
Interrupt at any time; the same command resumes from checkpoint_latest.pt at the exact step (also with
--init-from: a run folder that holds a checkpoint resumes, it is not initialised again)."""


def parse_label_weights(s: str | None) -> dict[int, float] | None:
    if not s:
        return None
    out = {}
    for part in s.split(","):
        try:
            k, v = part.split(":") if ":" in part else (part, "1")
            out[int(k)] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--oversample-labels expects 'label:weight,...' (e.g. '1:1,2:3'), got '{s}'")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_train_vqgan", description=__doc__,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data source (choose one)")
    src.add_argument("-d", "--dataset", help="nnU-Net dataset id or name (needs nnUNet_preprocessed)")
    src.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    src.add_argument("-f", "--fold", default="0", help="fold whose training cases are used ('all' = every case; default 0)")
    src.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    src.add_argument("--nifti-folder", help="folder of CT NIfTI files in HU")
    src.add_argument("--label-folder", help="label maps for --nifti-folder (case.nii.gz), used for oversampling")
    src.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("S0", "S1", "S2"),
                     help="target spacing in mm, NIfTI array axis order (default 1 1 1)")
    src.add_argument("--hu-window", type=float, nargs=2, default=(-175.0, 250.0), metavar=("LO", "HI"),
                     help="HU window mapped to [-1, 1] (default -175 250, DiffTumor)")
    src.add_argument("--val-cases", type=int, default=None,
                     help="NIfTI source: hold out the last N cases for PSNR/SSIM (default 1 if >= 3 cases, else 0)")
    src.add_argument("--extra-images", action="append", default=[], metavar="FOLDER",
                     help="with -d: also train on the unlabelled CT NIfTIs (HU) of FOLDER (repeatable), preprocessed "
                          "by nnU-Net's preprocessor of the configuration (its spacing, CTNormalization, axis order; "
                          "cached in OUTPUT_DIR/extra_images). Must NOT contain the experiment's test cases (files "
                          "named or identical to nnUNet_raw/DatasetXXX/imagesTs ones are refused)")
    m = p.add_argument_group("model and training")
    m.add_argument("--preset", default=None, choices=list(PRESET_CHOICES),
                   help="VQGAN preset (default paper for 3D data, cpu2d for a 2D configuration); 3D: paper, tiny; "
                        "2D: tiny2d, cpu2d, gpu2d")
    m.add_argument("-o", "--output-dir", help="run folder (default for -d: $nnUNet_results/DatasetXXX/"
                                             "promptlesion_vqgan__PRESET__CONFIG__foldF, ...foldF+extra with "
                                             "--extra-images, + __init_<id> with --init-from)")
    m.add_argument("--patch-size", type=int, nargs="+", default=None, metavar="P",
                   help="patch size in voxels, 3 values (3D) or 2 (2D preset) (default: preset, 96 96 96 for paper, "
                        "32 32 for cpu2d); divisible by 4")
    m.add_argument("--steps", type=int, default=100000, help="total training steps (default 100000)")
    m.add_argument("--batch-size", type=int, default=None, help="patches per step and process (default: preset, 4 for paper)")
    m.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 3e-4)")
    m.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps (default 0)")
    m.add_argument("--disc-start", type=int, default=None, help="step at which the adversarial terms start (default: preset, 10000 for paper)")
    m.add_argument("--adversarial", choices=["hinge", "least_squares"], default=None, help="adversarial loss (default hinge)")
    m.add_argument("--perceptual-weights", default=None,
                   help="local VGG16 weights (.pth state_dict or .safetensors, torchvision layout) for an LPIPS-style "
                        "perceptual term; without it a weight-free slice SSIM + gradient term is used")
    m.add_argument("--oversample-rate", type=float, default=0.33, help="probability that a patch is centred on a labelled voxel (default 0.33)")
    m.add_argument("--oversample-labels", default=None, help="label weights for oversampling, e.g. '1:1,2:3' (default: every label, weight 1)")
    m.add_argument("--num-eval-patches", type=int, default=8, help="held-out patches per evaluation (default 8)")
    m.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start from this VQGAN checkpoint's weights (autoencoder, codebook, discriminators) "
                        "instead of random ones; same architecture required (--preset defaults to its preset); the "
                        "step counter starts at 0, the optimizer fresh. Resume takes precedence: a --output-dir that "
                        "already holds checkpoint_latest.pt continues that run and ignores --init-from")
    m.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from: also carry over the Adam moments (the learning rate stays this run's)")
    add_run_options(m, "PSNR/SSIM evaluations and PNGs")
    return p


def make_sources(args):
    # deferred until the arguments are parsed: see cli/__init__.py
    from ..generator.data import NiftiPatchSource, PreprocessedPatchSource, list_nifti, _case_name

    if bool(args.dataset) == bool(args.nifti_folder):
        raise SystemExit("error: give exactly one data source: -d/--dataset (nnU-Net preprocessed) or --nifti-folder")
    if args.extra_images and not args.dataset:
        raise SystemExit("error: --extra-images needs -d/--dataset (the images are brought into its configuration's "
                         "space); with --nifti-folder put them into that folder")
    if args.dataset:
        fold = args.fold if args.fold == "all" else int(args.fold)
        train = PreprocessedPatchSource(args.dataset, args.configuration, fold, args.plans, subset="train")
        ev = PreprocessedPatchSource(args.dataset, args.configuration, fold, args.plans, subset="val")
        if str(fold) == "all" or not len(ev):
            ev = None
        return train, ev
    cases = sorted(_case_name(pth) for pth in list_nifti(Path(args.nifti_folder))) if Path(args.nifti_folder).is_dir() else []
    if not cases:
        raise SystemExit(f"error: no .nii.gz / .nii CT files in {args.nifti_folder}")
    n_val = args.val_cases if args.val_cases is not None else (1 if len(cases) >= 3 else 0)
    if n_val >= len(cases):
        raise SystemExit(f"error: --val-cases {n_val} leaves no training case ({len(cases)} cases in {args.nifti_folder})")
    tr_cases, val_cases = cases[: len(cases) - n_val], cases[len(cases) - n_val:]
    kw = dict(spacing_mm=args.spacing, hu_window=args.hu_window, label_folder=args.label_folder)
    train = NiftiPatchSource(args.nifti_folder, cases=tr_cases, **kw)
    ev = NiftiPatchSource(args.nifti_folder, cases=val_cases, **kw) if val_cases else None
    return train, ev


def add_extra_images(args, train, out: Path):
    """``train`` plus the --extra-images folders (training only: held-out metrics stay on the fold's cases)."""
    # deferred until the arguments are parsed: see cli/__init__.py
    from ..generator.data import CombinedPatchSource, ExtraImagesSource

    if not args.extra_images:
        return train
    # ExtraImagesSource refuses scans of the dataset's imagesTs (held-out test cases)
    extras = [ExtraImagesSource(folder, train, cache_folder=out / "extra_images") for folder in args.extra_images]
    return CombinedPatchSource([train, *extras])


def default_output_dir(args, train_source, init_meta: dict | None = None) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    if args.dataset:
        res = os.environ.get("nnUNet_results")
        if not res:
            raise SystemExit("error: set nnUNet_results or pass --output-dir")
        # another training set or start: never resumed as the plain run (promptlesion_pretrain uses the same names)
        tag = f"fold{args.fold}" + ("+extra" if args.extra_images else "")
        if init_meta is not None:
            from ..utils.checkpoint import short_weights_id  # deferred: see cli/__init__.py

            tag += "__init_" + short_weights_id(init_meta.get("checkpoint_id", ""))
        return (Path(res) / train_source.dataset_folder.name
                / f"promptlesion_vqgan__{args.preset}__{args.configuration}__{tag}")
    raise SystemExit("error: --output-dir is required with --nifti-folder")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # deferred until the arguments are parsed: see cli/__init__.py
    import torch

    from ..generator.train_utils import read_init_meta, run_trainer
    from ..generator.vqgan.config import DEFAULT_PRESET, VQGANConfig, check_preset_dims
    from ..generator.vqgan.train import VQGANRunConfig, VQGANTrainer

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.init_optimizer and not args.init_from:
        print("error: --init-optimizer needs --init-from", file=sys.stderr)
        return 2
    try:
        train_src, eval_src = make_sources(args)
        init_meta = read_init_meta(args.init_from, "vqgan") if args.init_from else None
        if init_meta is not None and args.preset is None:
            # fine-tuning keeps the checkpoint's architecture unless asked otherwise (then refused if it differs)
            args.preset = init_meta.get("preset")
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        print(f"error: {e}", file=sys.stderr)
        return 2
    overrides = {}
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.disc_start is not None:
        overrides["disc_start"] = args.disc_start
    if args.adversarial is not None:
        overrides["adversarial_criterion"] = args.adversarial
    if args.patch_size is not None:
        overrides["patch_size"] = tuple(args.patch_size)
    try:
        dims = train_src.spatial_dims
        if args.preset is None:
            args.preset = DEFAULT_PRESET[dims]
        what = f"configuration '{args.configuration}'" if args.dataset else "the NIfTI data"
        check_preset_dims(args.preset, dims, what)
        cfg = VQGANConfig.from_preset(args.preset, **overrides)
        if cfg.spatial_dims != dims:
            raise ValueError(f"--patch-size {list(cfg.patch_size)} has {cfg.spatial_dims} axes but {what} is {dims}D")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = VQGANRunConfig(max_steps=args.steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                         eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, keep_every=args.keep_every,
                         log_every=args.log_every, num_eval_patches=args.num_eval_patches,
                         oversample_rate=args.oversample_rate, oversample_labels=parse_label_weights(args.oversample_labels),
                         seed=args.seed, device=args.device, perceptual_weights=args.perceptual_weights,
                         stop_after=args.stop_after, progress=not args.no_progress)
    out = default_output_dir(args, train_src, init_meta)
    try:
        train_src = add_extra_images(args, train_src, out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_trainer(lambda: VQGANTrainer(cfg, run, train_src, eval_src, out, resume=not args.no_resume,
                                            init_from=args.init_from, init_optimizer=args.init_optimizer), out,
                       args.no_resume)


if __name__ == "__main__":
    sys.exit(main())
