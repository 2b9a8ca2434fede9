"""promptlesion_build_cache: render diffusion lesions into a fold's training cases, ahead of training.

Lesions of every class of the lesion spec (``--per-class`` each) are placed like PromptLesionTrainer places
them (a parent-structure voxel of a training case whose surroundings hold no real lesion, an elastic or
real-mask shape drawn inside the parent), rendered in batches by the diffusion model (space mapping to the
generator's spacing/intensity/axis order and back, blended so that only voxels near the lesion change) and
stored in a sharded cache. A 2D configuration (e.g. 2d_demo) takes a 2D generator: each lesion is placed in one
(y, x) slice and rendered in plane, as the 2D trainer paints; a generator of the other dimensionality is refused,
naming both. Only the fold's training cases (nnU-Net's own split) are carriers. Use the cache
with ``"synthesizer": "diffusion_cache", "cache": "<folder>"`` in promptlesion_settings.json; class weights
apply when training draws from it.

Resumable: re-run the same command and it continues with the first missing shard (a kill loses at most the
shard being rendered). Several GPUs: ``torchrun --nproc_per_node G $(which promptlesion_build_cache) ...``.
Writes manifest.json, shards/, build.log and montage.png (cached samples per class) into the cache folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_HELP, SAMPLERS, STEPS_HELP

EPILOG = """examples:
  promptlesion_build_cache -d 601 -c 3d_fullres -f 0 --per-class 500 \\
      --diffusion $nnUNet_results/Dataset601_PhantomCCTA/promptlesion_diffusion__paper__3d_fullres__fold0/checkpoint_final.pt \\
      --sampler ddim --steps 50 --batch 16 --device cuda
  torchrun --nproc_per_node 4 $(which promptlesion_build_cache) -d 601 -f 0 --per-class 5000 --diffusion ck.pt
  # attribute prompts: more small calcified plaques than the data has (radius tertiles of the training lesions)
  promptlesion_build_cache -d 501 -c 2d_demo -f 0 --per-class 200 --diffusion ck.pt \
      --attribute-mix '{"calcified_plaque": {"radius": [0.6, 0.3, 0.1]}}'

Default output: $nnUNet_preprocessed/DatasetXXX/promptlesion_cache/CONFIG__foldF__<diffusion id>/ (a sibling of
nnU-Net's data folders, which nnU-Net wipes when it re-preprocesses). The cache records the size and mtime of
every training case's preprocessed files, dataset.json's labels and the lesion spec: after re-preprocessing or a
label edit, training refuses it and names what changed (rebuild it). The last line printed is the settings
snippet for promptlesion_settings.json."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_build_cache", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name (needs nnUNet_preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="nnU-Net configuration (default 3d_fullres)")
    p.add_argument("-f", "--fold", default="0", help="fold whose training cases are the carriers (default 0; 'all')")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--diffusion", required=True, help="diffusion checkpoint (promptlesion_train_diffusion output)")
    p.add_argument("--vqgan", default=None, help="VQGAN checkpoint (default: the path stored in the diffusion checkpoint)")
    p.add_argument("--per-class", type=int, required=True, help="samples per lesion class")
    p.add_argument("--classes", nargs="+", default=None, help="lesion class names or labels (default: every class of the spec)")
    p.add_argument("--lesion-spec", default=None, help="lesion_spec.json (default: nnUNet_preprocessed/DatasetXXX, else nnUNet_raw)")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=STEPS_HELP)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    p.add_argument("--batch", type=int, default=8, help="lesions rendered per generator call (default 8)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (default 64): the unit of resumption")
    p.add_argument("--blend-sigma", type=float, nargs=2, default=[0.5, 1.5], metavar=("LO", "HI"),
                   help="blend sigma range in data voxels (default 0.5 1.5, as the trainer's default)")
    p.add_argument("--centre-fraction", type=float, default=0.5,
                   help="carrier centre region that must be lesion-free, fraction of the patch (default 0.5)")
    p.add_argument("--max-scan-cases", type=int, default=1000, help="training cases scanned for carriers (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--quality-model", default=None,
                   help="nnU-Net model folder (…/nnUNetTrainer__nnUNetPlans__3d_fullres) for the DiffAug-style filter")
    p.add_argument("--quality-fold", default="0", help="fold of --quality-model (default 0)")
    p.add_argument("--quality-min-iou", type=float, default=0.7, help="keep a sample if the model finds it with IoU >= this")
    p.add_argument("--attribute-mix", default=None, metavar="JSON|FILE",
                   help="attribute prompts (a checkpoint trained with --attributes): per class the probability of each "
                        "bin, e.g. '{\"calcified\": {\"radius\": [0.6, 0.3, 0.1]}}' or a JSON file. Default: the "
                        "trainer settings' \"attribute_mix\" (PROMPTLESION_SETTINGS or "
                        "nnUNet_preprocessed/DatasetXXX/promptlesion_settings.json), else the lesion spec's per-class "
                        "\"attribute_mix\", else null attributes")
    p.add_argument("-o", "--output", default=None, help="cache folder (default: see below)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu; torchrun: cuda:LOCAL_RANK")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-attempts", type=int, default=8, help="placements tried per sample before it is skipped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after-shards", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a stop
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def attribute_mix(args) -> dict | None:
    """The mix to build with: --attribute-mix (JSON or a file), else the trainer settings' attribute_mix, else None
    (the lesion spec's). Raises ValueError with a message."""
    if args.attribute_mix:
        text = args.attribute_mix
        if not text.lstrip().startswith("{"):
            if not Path(text).is_file():
                raise ValueError(f"--attribute-mix {text}: neither a JSON object nor a file")
            text = Path(text).read_text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--attribute-mix is not valid JSON: {e}") from None
    # deferred until the arguments are parsed: see cli/__init__.py
    from ..generator.data import resolve_preprocessed_dataset
    from ..trainers.settings import SettingsError, load_settings

    try:
        settings, where = load_settings(resolve_preprocessed_dataset(args.dataset))
    except (SettingsError, FileNotFoundError) as e:
        raise ValueError(f"reading the trainer settings for their attribute_mix: {e}") from None
    if settings.attribute_mix:
        print(f"attribute mix from {where}: {json.dumps(settings.attribute_mix)}", file=sys.stderr)
    return settings.attribute_mix


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # deferred until the arguments are parsed: see cli/__init__.py
    from ..evaluation.montage import save_montage
    from ..synthesis.cache_build import CacheBuildConfig, CacheBuildError, build_cache

    try:
        args.attribute_mix = attribute_mix(args)
    except ValueError as e:
        return _fail(str(e))
    try:
        build_cache(CacheBuildConfig(**vars(args)), save_montage=save_montage)
    except CacheBuildError as e:
        return _fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
