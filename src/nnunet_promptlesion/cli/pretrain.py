"""promptlesion_pretrain: VQGAN, then PromptLesion diffusion, then (optionally) the lesion cache, for one fold.

Runs the three bundled commands in order on the fold's training cases of an nnU-Net preprocessed dataset:

1. promptlesion_train_vqgan      -> $nnUNet_results/DatasetXXX/promptlesion_vqgan__PRESET__CONFIG__foldF/
2. promptlesion_train_diffusion  -> $nnUNet_results/DatasetXXX/promptlesion_diffusion__PRESET__CONFIG__foldF/
3. promptlesion_build_cache      -> $nnUNet_preprocessed/DatasetXXX/promptlesion_cache/... (with --cache-per-class N)

Each step is skipped when its output exists (checkpoint_final.pt, a complete cache manifest) and resumes from
its own checkpoint / shards when interrupted: re-run the same command after a stop. The generators are trained
on the dataset's own preprocessed patches, so the trainer uses them with the identity space mapping. The last
line printed is the settings snippet for promptlesion_settings.json (diffusion_cache with a cache, else
diffusion_online). For several GPUs run the steps one by one under torchrun (each command supports it).

A 2D configuration (e.g. promptlesion_demo's 2d_demo, 32 x 32 slices) trains 2D generators on (y, x) slices of its
preprocessed data; without --preset it uses cpu2d (3000 VQGAN + 4000 diffusion steps, about 8 CPU minutes on one thread). Its lesion
cache (--cache-per-class) and the diffusion_online snippet serve PromptLesionTrainer on that 2D configuration (lesions
rendered in plane, in the slices the 2D trainer paints).

Pretrain on much, fine-tune on little. The VQGAN needs no labels: ``--vqgan-fold all`` trains it on every case of the
dataset and ``--extra-images FOLDER`` (repeatable) adds unlabelled CT scans (NIfTI, HU), while the diffusion model
still sees only fold F's training cases (its lesions). ``--vqgan CHECKPOINT`` skips the VQGAN step and uses that
VQGAN (e.g. trained on all cases or on a larger dataset of the same configuration space). ``--vqgan-init-from`` /
``--diffusion-init-from`` fine-tune existing generators (promptlesion_train_* --init-from). A run folder that holds a
checkpoint resumes instead (resume takes precedence). Folders whose VQGAN is not the fold's own get a suffix
(``__vqgan_foldall+extra``, ``__vqgan_<id>``, ``__init_<id>``) so the recipes never share one. Extra folders must not
hold the experiment's held-out test cases.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import shlex
import sys
from contextlib import redirect_stdout
from pathlib import Path

from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS

EPILOG = """examples:
  promptlesion_pretrain -d 502 -c 3d_fullres -f 0 --preset tiny --device cpu            # CPU demo scale
  promptlesion_pretrain -d 502 -f 0 --preset paper --cache-per-class 2000 --device cuda  # paper scale
  promptlesion_pretrain -d 502 -f 0 --preset tiny --dry-run                              # print the plan only
  promptlesion_pretrain -d 501 -c 2d_demo -f 0 --device cpu        # 2D generators, preset cpu2d (CPU minutes)
  # VQGAN on every case (labels unused) + unlabelled CT, diffusion on the scarce fold 5 only
  promptlesion_pretrain -d 501 -c 2d_demo -f 5 --vqgan-fold all --extra-images more_ct/ --device cpu
  # diffusion on fold 5 with a VQGAN trained elsewhere; fine-tune a diffusion model trained on all cases
  promptlesion_pretrain -d 501 -c 2d_demo -f 5 --vqgan vq_all.pt --diffusion-init-from diffusion_all.pt"""

# (VQGAN steps, diffusion steps) per preset
PRESET_STEPS = {"tiny": (2000, 2000), "paper": (100000, 60000), "tiny2d": (500, 500), "cpu2d": (3000, 4000),
                "gpu2d": (50000, 60000)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_pretrain", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-f", "--fold", default="0",
                   help="fold (default 0): only its training cases train the diffusion model (and the VQGAN, unless "
                        "--vqgan-fold or --vqgan says otherwise)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--preset", choices=list(PRESET_STEPS), default=None,
                   help="generator preset for both models (default paper for a 3D configuration, cpu2d for a 2D one); "
                        "3D: paper, tiny; 2D: tiny2d, cpu2d, gpu2d")
    p.add_argument("--vqgan-steps", type=int, default=None,
                   help="VQGAN steps (default tiny 2000, paper 100000, tiny2d 500, cpu2d 3000, gpu2d 50000)")
    p.add_argument("--diffusion-steps", type=int, default=None,
                   help="diffusion steps (default tiny 2000, paper 60000, tiny2d 500, cpu2d 3000, gpu2d 60000)")
    p.add_argument("--prompt-type", choices=["onehot", "mask"], default=None,
                   help="diffusion prompt (default onehot, or --diffusion-init-from's)")
    p.add_argument("--attributes", default=None, metavar="NAMES",
                   help="attribute prompts for the diffusion model, e.g. radius,contrast (promptlesion_train_diffusion "
                        "--attributes; default none)")
    p.add_argument("--cache-per-class", type=int, default=0, help="also build a lesion cache with N samples per class")
    p.add_argument("--cache-attribute-mix", default=None, metavar="JSON|FILE",
                   help="attribute mix of the cache (promptlesion_build_cache --attribute-mix)")
    p.add_argument("--cache-sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER,
                   help=f"sampler for the cache (default {DEFAULT_SAMPLER})")
    p.add_argument("--cache-steps", type=int, default=DEFAULT_STEPS,
                   help=f"model evaluations per cached lesion for ddim/dpmpp/unipc (default {DEFAULT_STEPS})")
    p.add_argument("--cache-guidance", type=float, default=1.0,
                   help="classifier-free guidance scale for the cache (1 = off; the demo's 2D recipe uses 5)")
    p.add_argument("--cache-batch", type=int, default=8, help="lesions per generator call for the cache (default 8)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    g = p.add_argument_group("pretrain on much, fine-tune on little")
    g.add_argument("--vqgan-fold", default=None,
                   help="fold whose training cases train the VQGAN (default: -f); 'all' = every case of the dataset "
                        "(the VQGAN uses no labels; the diffusion model still sees only fold -f)")
    g.add_argument("--extra-images", action="append", default=[], metavar="FOLDER",
                   help="unlabelled CT NIfTIs (HU) added to the VQGAN's training (repeatable; preprocessed by nnU-Net's "
                        "preprocessor of -c). Must NOT contain the experiment's held-out test cases")
    g.add_argument("--vqgan", default=None, metavar="CHECKPOINT",
                   help="use this VQGAN checkpoint (no VQGAN training); it must match -c's spacing and intensity space")
    g.add_argument("--vqgan-init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune this VQGAN checkpoint instead of training from random weights")
    g.add_argument("--diffusion-init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune this diffusion checkpoint (same architecture and lesion classes; trained on the "
                        "latents of the VQGAN used here or of the VQGAN that one was fine-tuned from)")
    p.add_argument("--vqgan-args", default="", help="extra arguments for promptlesion_train_vqgan (one quoted string)")
    p.add_argument("--diffusion-args", default="", help="extra arguments for promptlesion_train_diffusion (one quoted string)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return p


def _short_id(path) -> str:
    """12 hex digits of a checkpoint's ``checkpoint_id``: names the run folders that depend on it (the same names
    promptlesion_train_diffusion's default output folder uses)."""
    from ..utils.checkpoint import load_checkpoint  # deferred: see cli/__init__.py
    from .train_diffusion import short_id

    return short_id(load_checkpoint(path, verify=False)["meta"])


def plan_steps(args, dataset_name: str, results: Path) -> list[dict]:
    vq_steps, df_steps = PRESET_STEPS[args.preset]
    vq_steps = args.vqgan_steps or vq_steps
    df_steps = args.diffusion_steps or df_steps
    vq_fold = str(args.vqgan_fold or args.fold)
    vq_tag = f"fold{vq_fold}" + ("+extra" if args.extra_images else "")
    if args.vqgan_init_from:
        vq_tag += f"__init_{_short_id(args.vqgan_init_from)}"
    tag = f"{args.preset}__{args.configuration}__fold{args.fold}"
    vq_dir = results / dataset_name / f"promptlesion_vqgan__{args.preset}__{args.configuration}__{vq_tag}"
    # a diffusion model is tied to its VQGAN's latents: another VQGAN (or start) gets another folder, so that the
    # recipes never resume or skip into each other's runs
    df_name = f"promptlesion_diffusion__{tag}"
    if args.vqgan:
        df_name += f"__vqgan_{_short_id(args.vqgan)}"
    elif vq_tag != f"fold{args.fold}":
        df_name += f"__vqgan_{vq_tag}"
    if args.diffusion_init_from:
        df_name += f"__init_{_short_id(args.diffusion_init_from)}"
    if args.attributes:   # an attribute model never resumes into (or is skipped for) a class-only one
        df_name += "__attr_" + "_".join(a.strip() for a in args.attributes.split(",") if a.strip())
    df_dir = results / dataset_name / df_name
    vq_ck = Path(args.vqgan) if args.vqgan else vq_dir / "checkpoint_final.pt"
    common = ["-c", args.configuration, "-p", args.plans, "--device", args.device] \
        + (["--num-threads", str(args.num_threads)] if args.num_threads else [])
    steps = [
        {"name": "vqgan", "module": "train_vqgan", "output": vq_dir / "checkpoint_final.pt",
         "argv": ["-d", str(args.dataset), "-f", vq_fold, *common, "--preset", args.preset, "--steps", str(vq_steps),
                  "-o", str(vq_dir), *[a for f in args.extra_images for a in ("--extra-images", str(f))],
                  *(["--init-from", str(args.vqgan_init_from)] if args.vqgan_init_from else []),
                  *shlex.split(args.vqgan_args)]},
        {"name": "diffusion", "module": "train_diffusion", "output": df_dir / "checkpoint_final.pt",
         "argv": ["-d", str(args.dataset), "-f", str(args.fold), *common, "--preset", args.preset,
                  "--steps", str(df_steps), "-o", str(df_dir), "--vqgan", str(vq_ck),
                  *(["--prompt-type", args.prompt_type] if args.prompt_type else []),
                  *(["--init-from", str(args.diffusion_init_from)] if args.diffusion_init_from else []),
                  *(["--attributes", args.attributes] if args.attributes else []),
                  *shlex.split(args.diffusion_args)]},
    ]
    if args.vqgan:
        steps = steps[1:]
    if args.cache_per_class > 0:
        steps.append({"name": "cache", "module": "build_cache", "output": None,
                      "argv": ["-d", str(args.dataset), "-f", str(args.fold), *common,
                               "--diffusion", str(df_dir / "checkpoint_final.pt"),
                               "--per-class", str(args.cache_per_class), "--sampler", args.cache_sampler,
                               "--steps", str(args.cache_steps), "--guidance", str(args.cache_guidance),
                               "--batch", str(args.cache_batch),
                               *(["--attribute-mix", args.cache_attribute_mix] if args.cache_attribute_mix else [])]})
    return steps


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # deferred until the arguments are parsed: see cli/__init__.py
    from ..generator.data import configuration_spatial_dims, resolve_preprocessed_dataset
    from ..generator.vqgan.config import DEFAULT_PRESET, check_preset_dims

    try:
        ds = resolve_preprocessed_dataset(args.dataset)
        dims = configuration_spatial_dims(args.dataset, args.configuration, args.plans)
        if args.preset is None:
            args.preset = DEFAULT_PRESET[dims]
        check_preset_dims(args.preset, dims, f"configuration '{args.configuration}'")
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.vqgan and (args.vqgan_fold or args.extra_images or args.vqgan_init_from or args.vqgan_args):
        print("error: --vqgan uses a trained VQGAN as it is; --vqgan-fold, --extra-images, --vqgan-init-from and "
              "--vqgan-args train one", file=sys.stderr)
        return 2
    res = os.environ.get("nnUNet_results")
    if not res:
        print("error: nnUNet_results is not set", file=sys.stderr)
        return 2
    try:
        steps = plan_steps(args, ds.name, Path(res))
    except RuntimeError as e:  # an unreadable --vqgan / --*-init-from checkpoint (CheckpointError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = None
    for i, st in enumerate(steps, 1):
        out = st["output"]
        cmd = f"promptlesion_{st['module']} {' '.join(st['argv'])}"
        if out is not None and Path(out).is_file():
            print(f"[{i}/{len(steps)}] {st['name']}: {out} exists, skipped", flush=True)
            continue
        print(f"[{i}/{len(steps)}] {st['name']}: {cmd}", flush=True)
        if args.dry_run:
            continue
        mod = importlib.import_module(f"nnunet_promptlesion.cli.{st['module']}")
        if st["module"] == "build_cache":
            buf = io.StringIO()
            with redirect_stdout(buf):
                rc = mod.main(st["argv"])
            sys.stdout.write(buf.getvalue())
            lines = [l for l in buf.getvalue().splitlines() if l.startswith("{")]
            if rc == 0 and lines:
                settings = json.loads(lines[-1])
        else:
            rc = mod.main(st["argv"])
        if rc not in (0, None):
            print(f"error: step '{st['name']}' failed (exit {rc}); fix the cause and re-run the same command: "
                  "finished steps are skipped, interrupted ones resume", file=sys.stderr)
            return int(rc)
        if out is not None and not Path(out).is_file():
            print(f"error: step '{st['name']}' did not write {out}", file=sys.stderr)
            return 1
    if args.dry_run:
        return 0
    if settings is None:
        df_out = next(st["output"] for st in steps if st["name"] == "diffusion")
        settings = {"synthesizer": "diffusion_online", "diffusion": str(Path(df_out).resolve())}
    print("paste into promptlesion_settings.json:")
    print(json.dumps(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
