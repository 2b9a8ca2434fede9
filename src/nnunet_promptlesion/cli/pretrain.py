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
  promptlesion_pretrain -d 501 -c 2d_demo -f 0 --device cpu        # 2D generators, preset cpu2d (CPU minutes)"""

# (VQGAN steps, diffusion steps) per preset
PRESET_STEPS = {"tiny": (2000, 2000), "paper": (100000, 60000), "tiny2d": (500, 500), "cpu2d": (3000, 4000),
                "gpu2d": (50000, 60000)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_pretrain", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-f", "--fold", default="0", help="fold (default 0): only its training cases are used")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--preset", choices=list(PRESET_STEPS), default=None,
                   help="generator preset for both models (default paper for a 3D configuration, cpu2d for a 2D one); "
                        "3D: paper, tiny; 2D: tiny2d, cpu2d, gpu2d")
    p.add_argument("--vqgan-steps", type=int, default=None,
                   help="VQGAN steps (default tiny 2000, paper 100000, tiny2d 500, cpu2d 3000, gpu2d 50000)")
    p.add_argument("--diffusion-steps", type=int, default=None,
                   help="diffusion steps (default tiny 2000, paper 60000, tiny2d 500, cpu2d 3000, gpu2d 60000)")
    p.add_argument("--prompt-type", choices=["onehot", "mask"], default="onehot", help="diffusion prompt (default onehot)")
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
    p.add_argument("--vqgan-args", default="", help="extra arguments for promptlesion_train_vqgan (one quoted string)")
    p.add_argument("--diffusion-args", default="", help="extra arguments for promptlesion_train_diffusion (one quoted string)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return p


def plan_steps(args, dataset_name: str, results: Path) -> list[dict]:
    vq_steps, df_steps = PRESET_STEPS[args.preset]
    vq_steps = args.vqgan_steps or vq_steps
    df_steps = args.diffusion_steps or df_steps
    tag = f"{args.preset}__{args.configuration}__fold{args.fold}"
    vq_dir = results / dataset_name / f"promptlesion_vqgan__{tag}"
    df_dir = results / dataset_name / f"promptlesion_diffusion__{tag}"
    common = ["-d", str(args.dataset), "-c", args.configuration, "-f", str(args.fold), "-p", args.plans,
              "--device", args.device] + (["--num-threads", str(args.num_threads)] if args.num_threads else [])
    steps = [
        {"name": "vqgan", "module": "train_vqgan", "output": vq_dir / "checkpoint_final.pt",
         "argv": [*common, "--preset", args.preset, "--steps", str(vq_steps), "-o", str(vq_dir),
                  *shlex.split(args.vqgan_args)]},
        {"name": "diffusion", "module": "train_diffusion", "output": df_dir / "checkpoint_final.pt",
         "argv": [*common, "--preset", args.preset, "--steps", str(df_steps), "-o", str(df_dir),
                  "--vqgan", str(vq_dir / "checkpoint_final.pt"), "--prompt-type", args.prompt_type,
                  *(["--attributes", args.attributes] if args.attributes else []),
                  *shlex.split(args.diffusion_args)]},
    ]
    if args.cache_per_class > 0:
        steps.append({"name": "cache", "module": "build_cache", "output": None,
                      "argv": [*common, "--diffusion", str(df_dir / "checkpoint_final.pt"),
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
    res = os.environ.get("nnUNet_results")
    if not res:
        print("error: nnUNet_results is not set", file=sys.stderr)
        return 2
    steps = plan_steps(args, ds.name, Path(res))
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
        settings = {"synthesizer": "diffusion_online", "diffusion": str(Path(steps[1]["output"]).resolve())}
    print("paste into promptlesion_settings.json:")
    print(json.dumps(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
