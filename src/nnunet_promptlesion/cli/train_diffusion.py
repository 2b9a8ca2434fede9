"""promptlesion_train_diffusion: train the PromptLesion latent diffusion model on a frozen VQGAN.

Crops: lesion-centred crops of every lesion class of the lesion spec (class-balanced) and healthy crops
(with a pseudo-lesion region) for the "healthy" prompt, from (a) an nnU-Net preprocessed dataset
(training cases of one fold only) or (b) a folder of NIfTI CTs with label maps. The VQGAN checkpoint fixes
the patch spacing, intensity space and dimensionality; the data must match it (a VQGAN trained on the same
source does). A 2D VQGAN (trained on a 2D nnU-Net configuration such as 2d_demo) gives a 2D diffusion model on
(y, x) slices of that configuration; the preset then defaults to cpu2d (2D presets: tiny2d, cpu2d, gpu2d).
Run it again with the same --output-dir to resume; run it under torchrun for DDP.

--init-from CHECKPOINT fine-tunes a diffusion model (e.g. one trained on more data, or on another dataset)
instead of starting from random weights: same architecture and lesion classes, and the latents of the same VQGAN
(or of a VQGAN fine-tuned from that one with promptlesion_train_vqgan --init-from).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..lesions.spec import dataset_spec_folders, find_lesion_spec
from .run_options import add_run_options
from .train_vqgan import PRESET_CHOICES

EPILOG = """examples:
  # (a) nnU-Net preprocessed dataset 502, training cases of fold 0, VQGAN trained on the same data
  promptlesion_train_diffusion -d 502 -c 3d_fullres -f 0 \\
      --vqgan $nnUNet_results/Dataset502_PhantomAbdomen/promptlesion_vqgan__tiny__3d_fullres__fold0/checkpoint_final.pt \\
      --preset tiny --steps 2000
  # 2D configuration (VQGAN from promptlesion_train_vqgan -c 2d_demo; preset cpu2d by default)
  promptlesion_train_diffusion -d 501 -c 2d_demo -f 0 --steps 3000 \
      --vqgan $nnUNet_results/Dataset501_PhantomCCTA/promptlesion_vqgan__cpu2d__2d_demo__fold0/checkpoint_final.pt
  # (b) NIfTI CTs + label maps (lesion_spec.json next to the folder or --lesion-spec), one-hot or mask prompts
  promptlesion_train_diffusion --nifti-folder raw/imagesTr --label-folder raw/labelsTr \\
      --lesion-spec raw/lesion_spec.json --vqgan runs/vqgan/checkpoint_final.pt \\
      --prompt-type mask -o runs/diffusion --preset tiny --steps 2000
  # fine-tune on the scarce fold 5 a model trained on all cases (same VQGAN; preset, prompt type and channels
  # default to the checkpoint's; step counter at 0, fresh optimizer unless --init-optimizer)
  promptlesion_train_diffusion -d 501 -c 2d_demo -f 5 --vqgan vq_all/checkpoint_final.pt \
      --init-from diffusion_all/checkpoint_final.pt --steps 1000 --lr 1e-4 -o runs/diffusion_ft_fold5
  # attribute prompts: radius and contrast bins (tertiles of the training lesions) next to the class prompt
  promptlesion_train_diffusion -d 501 -c 2d_demo -f 0 --steps 3000 --attributes radius,contrast \
      --vqgan $nnUNet_results/Dataset501_PhantomCCTA/promptlesion_vqgan__cpu2d__2d_demo__fold0/checkpoint_final.pt
  # several GPUs:
  torchrun --nproc_per_node 4 $(which promptlesion_train_diffusion) -d 502 --vqgan vq.pt --preset paper

Outputs (in --output-dir): checkpoint_latest.pt / checkpoint_final.pt (use them with promptlesion_synthesize
and PromptLesionTrainer), train_log.jsonl, train.log, run_settings.json, samples/stepN_<prompt>.png.
Interrupt at any time; the same command resumes from checkpoint_latest.pt at the exact step (also with
--init-from: a run folder that holds a checkpoint resumes, it is not initialised again)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_train_diffusion", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data source (choose one)")
    src.add_argument("-d", "--dataset", help="nnU-Net dataset id or name (needs nnUNet_preprocessed)")
    src.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    src.add_argument("-f", "--fold", default="0", help="fold whose training cases are used ('all' = every case; default 0)")
    src.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    src.add_argument("--nifti-folder", help="folder of CT NIfTI files in HU")
    src.add_argument("--label-folder", help="label maps for --nifti-folder (case.nii.gz); required to find lesions")
    src.add_argument("--lesion-spec", help="lesion_spec.json (default: next to dataset.json in nnUNet_raw/nnUNet_preprocessed "
                                           "for -d, next to --nifti-folder / --label-folder otherwise)")
    m = p.add_argument_group("model and training")
    m.add_argument("--vqgan", default=None,
                   help="frozen VQGAN checkpoint (promptlesion_train_vqgan output); required unless --init-from is "
                        "given, whose VQGAN (the path it records) is then the default")
    m.add_argument("--preset", default=None, choices=list(PRESET_CHOICES),
                   help="diffusion preset (default paper for a 3D VQGAN, cpu2d for a 2D one); 3D: paper, tiny; "
                        "2D: tiny2d, cpu2d, gpu2d")
    m.add_argument("--prompt-type", default=None, choices=["onehot", "mask"],
                   help="onehot: class prompt; mask: implicit MaskTransformer prompt over the class mask (default onehot, "
                        "or the --init-from checkpoint's)")
    m.add_argument("--channels", type=int, nargs="+", default=None, metavar="C",
                   help="UNet channels per level, overriding the preset (e.g. 16 32 32 for a CPU smoke test)")
    m.add_argument("--mt-ff", type=int, default=None, metavar="N",
                   help="MaskTransformer feed-forward width (default 256, the paper's; 128 is the smaller option)")
    m.add_argument("--per-class-mask", action="store_true", help="feed one mask channel per class (plus the region) to the UNet")
    m.add_argument("-o", "--output-dir", help="run folder (default for -d: $nnUNet_results/DatasetXXX/"
                                             "promptlesion_diffusion__PRESET__CONFIG__foldF, with __vqgan_foldG(+extra) "
                                             "for a VQGAN of another fold and __init_<id> with --init-from)")
    m.add_argument("--steps", type=int, default=60000, help="total training steps (default 60000, the paper's)")
    m.add_argument("--batch-size", type=int, default=None,
                   help="crops per step and process (default: the preset's: 4 for paper/tiny, 16 for the 2D presets)")
    m.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: the preset's: 1e-4 for paper/tiny/gpu2d, 1e-3 for cpu2d/tiny2d)")
    m.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps (default 0)")
    m.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the sampling weights (default 0.999)")
    m.add_argument("--lesion-loss-weight", type=float, default=None, help="extra MSE weight inside the lesion region (default 1)")
    m.add_argument("--prompt-dropout", type=float, default=None, help="probability of the healthy/null prompt for CFG (default 0.1)")
    m.add_argument("--timesteps", type=int, default=None, help="diffusion steps T (default 400)")
    m.add_argument("--attributes", default=None, metavar="NAMES",
                   help="attribute prompts, comma-separated out of radius,contrast (e.g. radius,contrast): measured on "
                        "the training lesions, binned per class, learned next to the class prompt (default: none)")
    m.add_argument("--attribute-bins", type=int, default=3, metavar="N",
                   help="quantile bins per attribute and class (default 3: tertiles)")
    m.add_argument("--attribute-dropout", type=float, default=None, metavar="P",
                   help="probability of nulling each attribute of a crop on its own, for any-subset requests and CFG "
                        "(default 0.3)")
    m.add_argument("--healthy-fraction", type=float, default=0.25, help="share of healthy crops (default 0.25)")
    m.add_argument("--eval-steps", type=int, default=50, help="DDIM steps for the sample PNGs (default 50)")
    m.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start the denoiser and its EMA from this diffusion checkpoint instead of random "
                        "weights; same architecture, lesion classes and VQGAN (or a VQGAN fine-tuned from its VQGAN) "
                        "required; --preset, --prompt-type, --channels, --mt-ff, --timesteps and --per-class-mask "
                        "default to the checkpoint's. The step counter starts at 0, the optimizer fresh. Resume takes "
                        "precedence: a --output-dir that already holds checkpoint_latest.pt continues that run and "
                        "ignores --init-from")
    m.add_argument("--init-optimizer", action="store_true",
                   help="with --init-from: also carry over the Adam moments (the learning rate stays this run's)")
    add_run_options(m, "evaluations and sample PNGs")
    return p


def inherit_architecture(args, init_meta: dict) -> None:
    """Fill the architecture options the user left out from the --init-from checkpoint's config: a fine-tune
    keeps the architecture it starts from (options given explicitly are compared, and refused when they differ)."""
    cfg = init_meta.get("config", {})
    if args.preset is None:
        args.preset = init_meta.get("preset")
    if args.prompt_type is None:
        args.prompt_type = cfg.get("prompt_type")
    for name in ("channels", "mt_ff", "timesteps"):
        if getattr(args, name) is None and cfg.get(name) is not None:
            setattr(args, name, cfg[name])
    args.per_class_mask = args.per_class_mask or bool(cfg.get("per_class_mask", False))
    if args.attributes is None and cfg.get("attributes"):
        # the attribute embeddings are weights: a fine-tune keeps them (and their bin count)
        args.attributes = ",".join(cfg["attributes"])
        args.attribute_bins = int(cfg.get("attribute_bins", args.attribute_bins))


def short_id(meta: dict) -> str:
    """12 hex digits of a checkpoint's ``checkpoint_id``."""
    from ..utils.checkpoint import short_weights_id  # deferred: see cli/__init__.py

    return short_weights_id(meta.get("checkpoint_id", ""))


def default_run_name(args, source, vqgan_meta: dict, init_meta: dict | None) -> str:
    """``promptlesion_diffusion__PRESET__CONFIG__foldF``, plus ``__vqgan_foldG`` (``+extra``) when the VQGAN was trained
    on another fold of this configuration (``__vqgan_<id>`` when elsewhere) and ``__init_<id>`` for a fine-tune: a
    diffusion model belongs to its VQGAN's latents, so recipes with other VQGANs or starts never share a folder
    (promptlesion_pretrain names its folders the same way)."""
    name = f"promptlesion_diffusion__{args.preset}__{args.configuration}__fold{args.fold}"
    src = vqgan_meta.get("source") or {}
    train = src.get("train", src if "type" in src else {})  # a VQGAN saved outside the trainer records its source
    extra = ""
    if train.get("type") == "combined":
        train, extra = (train.get("parts") or [{}])[0], "+extra"
    same_space = (train.get("type") == "nnunet_preprocessed" and train.get("dataset") == source.dataset_folder.name
                  and train.get("configuration") == args.configuration)
    vq_tag = f"fold{train.get('fold')}{extra}" if same_space else short_id(vqgan_meta)
    # a VQGAN without a recorded source keeps the plain name (the resume check still refuses another VQGAN)
    if train and vq_tag != f"fold{args.fold}":
        name += f"__vqgan_{vq_tag}"
    if init_meta is not None:
        name += f"__init_{short_id(init_meta)}"
    if getattr(args, "attributes", None):   # as promptlesion_pretrain: an attribute model gets its own folder
        name += "__attr_" + "_".join(a.strip() for a in args.attributes.split(",") if a.strip())
    return name


def spec_folders(args, source) -> list[Path]:
    """Where lesion_spec.json may be when --lesion-spec is not given: the dataset's folders, or next to the NIfTI
    folders (in them, then in their parent, where the converters write it)."""
    if args.dataset:
        return dataset_spec_folders(source.dataset_folder)
    return [p for f in (args.nifti_folder, args.label_folder) if f for p in (Path(f), Path(f).parent)]


def make_source(args, vqgan_meta):
    # deferred until the arguments are parsed: see cli/__init__.py
    from ..generator.data import NiftiPatchSource, PreprocessedPatchSource
    from ..generator.intensity import IntensitySpace

    if bool(args.dataset) == bool(args.nifti_folder):
        raise SystemExit("error: give exactly one data source: -d/--dataset (nnU-Net preprocessed) or --nifti-folder")
    if args.dataset:
        fold = args.fold if args.fold == "all" else int(args.fold)
        return PreprocessedPatchSource(args.dataset, args.configuration, fold, args.plans, subset="train")
    if not args.label_folder:
        raise SystemExit("error: --nifti-folder needs --label-folder (the lesion labels pick the training crops)")
    if int(vqgan_meta.get("spatial_dims", 3)) != 3:
        raise SystemExit(f"error: the VQGAN {args.vqgan} is 2D; 2D generators train on a 2D nnU-Net configuration "
                         "(-d DATASET -c 2d_demo), not on a NIfTI folder")
    space = IntensitySpace.from_dict(vqgan_meta["intensity"])
    if space.kind != "hu_window":
        raise SystemExit(f"error: the VQGAN {args.vqgan} was trained on nnU-Net preprocessed data "
                         f"({space.describe()}); train on that dataset with -d, not on a NIfTI folder")
    return NiftiPatchSource(args.nifti_folder, spacing_mm=vqgan_meta["spacing"], hu_window=(space.lo, space.hi),
                            label_folder=args.label_folder)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # deferred until the arguments are parsed: see cli/__init__.py
    import torch

    from ..generator.diffusion.config import TRAINING_DEFAULTS, PromptVocabulary, make_config
    from ..generator.diffusion.data import LesionCropSampler, NoLesionsError
    from ..generator.diffusion.train import DiffusionRunConfig, DiffusionTrainer
    from ..generator.train_utils import read_init_meta, run_trainer
    from ..generator.vqgan import (DEFAULT_PRESET, check_meta, check_preset_dims, check_spatial_dims, load_vqgan,
                                   meta_spatial_dims)
    from ..lesions.spec import LesionSpec, LesionSpecError
    from ..utils.checkpoint import CheckpointError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.init_optimizer and not args.init_from:
        print("error: --init-optimizer needs --init-from", file=sys.stderr)
        return 2
    try:
        init_meta = read_init_meta(args.init_from, "promptlesion_diffusion") if args.init_from else None
        if init_meta is not None:
            if args.vqgan is None:
                args.vqgan = init_meta.get("vqgan", {}).get("path")
                if not args.vqgan or not Path(args.vqgan).is_file():
                    raise FileNotFoundError(f"--init-from {args.init_from} names VQGAN {args.vqgan}, which does not "
                                            "exist here; pass --vqgan")
        if args.vqgan is None:
            raise FileNotFoundError("--vqgan is required (the frozen VQGAN checkpoint) unless --init-from is given")
        vqgan, vqgan_meta = load_vqgan(args.vqgan)
        if init_meta is not None:
            # before its preset becomes the default: a 2D model cannot start a 3D one (and the reverse)
            check_spatial_dims(init_meta, f"--init-from {args.init_from}", meta_spatial_dims(vqgan_meta),
                               "diffusion model")
            inherit_architecture(args, init_meta)
        args.prompt_type = args.prompt_type or "onehot"
        source = make_source(args, vqgan_meta)
        # the VQGAN only understands the dimensionality, spacing and intensity space it was trained in
        check_meta(vqgan_meta, args.vqgan, expect_intensity=source.intensity, expect_spacing=source.spacing,
                   expect_spatial_dims=source.spatial_dims)
        dims = source.spatial_dims
        if args.preset is None:
            args.preset = DEFAULT_PRESET[dims]
        check_preset_dims(args.preset, dims, f"VQGAN {args.vqgan}")
        batch, lr = TRAINING_DEFAULTS[args.preset]
        args.batch_size = batch if args.batch_size is None else args.batch_size
        args.lr = lr if args.lr is None else args.lr
        spec_path = find_lesion_spec(spec_folders(args, source), given=args.lesion_spec, error=FileNotFoundError,
                                     hint="Pass --lesion-spec (promptlesion_make_phantoms and promptlesion_convert "
                                          "write one).")
        spec = LesionSpec.load(spec_path)
        vocab = PromptVocabulary.from_lesion_spec(spec)
        overrides = {}
        for name, key in (("lesion_loss_weight", "lesion_loss_weight"), ("prompt_dropout", "prompt_dropout"),
                          ("timesteps", "timesteps"), ("channels", "channels"), ("mt_ff", "mt_ff")):
            if getattr(args, name) is not None:
                overrides[key] = getattr(args, name)
        attributes = tuple(a.strip() for a in (args.attributes or "").split(",") if a.strip())
        if attributes:
            overrides.update(attributes=attributes, attribute_bins=args.attribute_bins)
            if args.attribute_dropout is not None:
                overrides["attribute_dropout"] = args.attribute_dropout
        patch = tuple(int(x) for x in vqgan.config.patch_size)
        cfg = make_config(args.preset, num_classes=len(spec.lesions), prompt_type=args.prompt_type,
                          per_class_mask=args.per_class_mask, latent_channels=int(vqgan.config.latent_dim),
                          **overrides)
        data = LesionCropSampler(source, spec, vocab, patch, healthy_fraction=args.healthy_fraction,
                                 attributes=attributes, attribute_bins=args.attribute_bins)
    except (CheckpointError, FileNotFoundError, ValueError, LesionSpecError, NoLesionsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.output_dir:
        out = Path(args.output_dir)
    elif args.dataset:
        res = os.environ.get("nnUNet_results")
        if not res:
            print("error: set nnUNet_results or pass --output-dir", file=sys.stderr)
            return 2
        out = Path(res) / source.dataset_folder.name / default_run_name(args, source, vqgan_meta, init_meta)
    else:
        print("error: --output-dir is required with --nifti-folder", file=sys.stderr)
        return 2
    run = DiffusionRunConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                             ema_decay=args.ema_decay, healthy_fraction=args.healthy_fraction, eval_every=args.eval_every,
                             eval_steps=args.eval_steps, checkpoint_every=args.checkpoint_every, keep_every=args.keep_every,
                             log_every=args.log_every, seed=args.seed, device=args.device, stop_after=args.stop_after,
                             progress=not args.no_progress)
    return run_trainer(lambda: DiffusionTrainer(cfg, run, data, vqgan, vqgan_meta, args.vqgan, out,
                                                lesion_spec=spec.to_dict(), resume=not args.no_resume,
                                                init_from=args.init_from, init_optimizer=args.init_optimizer),
                       out, args.no_resume, errors=(CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
