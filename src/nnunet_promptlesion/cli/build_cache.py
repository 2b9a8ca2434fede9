"""promptlesion_build_cache: render diffusion lesions into a fold's training cases, ahead of training.

Lesions of every class of the lesion spec (``--per-class`` each) are placed like PromptLesionTrainer places
them (a parent-structure voxel of a training case whose surroundings hold no real lesion, an elastic or
real-mask shape drawn inside the parent), rendered in batches by the diffusion model (space mapping to the
generator's spacing/intensity/axis order and back, blended so that only voxels near the lesion change) and
stored in a sharded cache. Only the fold's training cases (nnU-Net's own split) are carriers. Use the cache
with ``"synthesizer": "diffusion_cache", "cache": "<folder>"`` in promptlesion_settings.json; class weights
apply when training draws from it.

Resumable: re-run the same command and it continues with the first missing shard (a kill loses at most the
shard being rendered). Several GPUs: ``torchrun --nproc_per_node G $(which promptlesion_build_cache) ...``.
Writes manifest.json, shards/, build.log and montage.png (cached samples per class) into the cache folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

EPILOG = """examples:
  promptlesion_build_cache -d 601 -c 3d_fullres -f 0 --per-class 500 \\
      --diffusion $nnUNet_results/Dataset601_PhantomCCTA/promptlesion_diffusion__paper__3d_fullres__fold0/checkpoint_final.pt \\
      --sampler ddim --steps 50 --batch 16 --device cuda
  torchrun --nproc_per_node 4 $(which promptlesion_build_cache) -d 601 -f 0 --per-class 5000 --diffusion ck.pt

Default output: $nnUNet_preprocessed/DatasetXXX/promptlesion_cache/CONFIG__foldF__<diffusion id>/ (a sibling of
nnU-Net's data folders, which nnU-Net wipes when it re-preprocesses). The last line printed is the settings
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
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="reverse sampler (default ddim)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50; ddpm runs all T)")
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


def find_lesion_spec(arg, dataset_folder: Path) -> Path:
    from ..lesions.spec import LESION_SPEC_FILENAME

    cands = [Path(arg)] if arg else [dataset_folder / LESION_SPEC_FILENAME,
                                     Path(os.environ.get("nnUNet_raw", "")) / dataset_folder.name / LESION_SPEC_FILENAME]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no lesion spec found (looked at {[str(c) for c in cands]}); pass --lesion-spec")


class RunContext:
    """Everything about the nnU-Net side of a cache build: plans, split, reader, lesion index."""

    def __init__(self, dataset, configuration, fold, plans_name, lesion_spec=None):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from ..generator.data import nnunet_fold_split, resolve_preprocessed_dataset
        from ..synthesis.cache import run_fingerprint
        from ..synthesis.diffusion_render import CaseReader
        from ..lesions.spec import LesionSpec
        from ..synthesis.space import GridSpec

        self.dataset_folder = resolve_preprocessed_dataset(dataset)
        plans_file = self.dataset_folder / f"{plans_name}.json"
        if not plans_file.is_file():
            raise FileNotFoundError(f"{plans_file} not found; pass the plans identifier used for preprocessing (-p)")
        self.plans = json.loads(plans_file.read_text())
        self.cm = PlansManager(self.plans).get_configuration(configuration)
        self.configuration = configuration
        self.data_folder = self.dataset_folder / self.cm.data_identifier
        if not self.data_folder.is_dir():
            raise FileNotFoundError(f"{self.data_folder} not found: run nnUNetv2_preprocess -c {configuration} first")
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        all_ids = infer_dataset_class(str(self.data_folder)).get_identifiers(str(self.data_folder))
        self.train_ids, self.val_ids = nnunet_fold_split(self.dataset_folder, all_ids, fold)
        self.train_ids = sorted(self.train_ids)
        self.fold = fold
        self.spec_path = find_lesion_spec(lesion_spec, self.dataset_folder)
        self.spec = LesionSpec.load(self.spec_path)
        dataset_json = json.loads((self.dataset_folder / "dataset.json").read_text())
        self.spec.validate_against_dataset(dataset_json, source=f"{self.dataset_folder}/dataset.json")
        self.grid = GridSpec.from_nnunet(self.plans, configuration)
        self.reader = CaseReader(self.data_folder, self.train_ids)
        self.fingerprint = run_fingerprint(self.plans, configuration, fold, self.train_ids, self.dataset_folder.name)

    def build_index(self, centre_fraction: float, max_cases: int, progress: bool):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        from ..trainers.lesion_index import build_lesion_index

        ds = infer_dataset_class(str(self.data_folder))(str(self.data_folder), self.train_ids)
        return build_lesion_index(ds, self.train_ids, self.spec, spacing=self.cm.spacing,
                                  patch_size=self.cm.patch_size, centre_fraction=centre_fraction,
                                  max_cases=max_cases, progress=progress)


def place_lesion(ctx: RunContext, index, sampler, label: int, footprint, rng, seed: int, sigma: float):
    """A LesionRequest for class ``label`` on a healthy carrier of the fold's training cases, or None."""
    import numpy as np

    from ..synthesis.diffusion_render import LesionRequest

    lesion = ctx.spec.by_label(label)
    pool = index.carrier_pool(lesion)
    if not pool:
        return None
    ident, centres = pool[int(rng.integers(len(pool)))]
    c = np.asarray(centres[int(rng.integers(len(centres)))], int)
    size = np.asarray(footprint, int)
    lo = c - size // 2
    _, seg = ctx.reader.crop(ident, lo, size)
    parent = np.isin(seg[0], lesion.parents)
    # keep the lesion near the middle of the generator patch so its blend rim fits
    half = np.maximum(size // 8, 1)
    mid = size // 2
    centre_region = tuple(slice(int(m - h), int(m + h + 1)) for m, h in zip(mid, half))
    mask = sampler.sample(lesion, parent, rng, centre_region)
    if mask is None:
        return None
    allowed = parent | (seg[0] == 0) if lesion.may_leave_parent else parent
    mask = mask & allowed & (seg[0] >= 0)
    if not mask.any():
        return None
    idx = np.argwhere(mask)
    mlo, mhi = idx.min(0), idx.max(0) + 1
    return LesionRequest(case=ident, label=int(label), mask_lo=lo + mlo,
                         mask=np.ascontiguousarray(mask[tuple(slice(a, b) for a, b in zip(mlo, mhi))]),
                         seed=int(seed), sigma=float(sigma))


def _setup_logging(path: Path, rank: int) -> logging.Logger:
    log = logging.getLogger(f"promptlesion.build_cache.{rank}")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fh = logging.FileHandler(path, mode="a")
    fh.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(message)s"))
    log.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    return log


def render_shard(k: int, plan, ctx: RunContext, index, mask_sampler, renderer, quality, args, stats: dict):
    """Render work items of shard ``k``; returns (samples, items). Deterministic given the shard index."""
    import numpy as np

    samples, items = [], []
    pending = [(i, 0) for i in plan.shard_items(k)]
    while pending:
        batch_reqs, batch_items = [], []
        while pending and len(batch_reqs) < args.batch:
            i, attempt = pending.pop(0)
            if attempt >= args.max_attempts:
                stats["skipped"][str(plan.item_class(i))] = stats["skipped"].get(str(plan.item_class(i)), 0) + 1
                continue
            seed = plan.item_seed(i, attempt)
            rng = np.random.default_rng(seed)
            sigma = float(rng.uniform(*args.blend_sigma))
            req = place_lesion(ctx, index, mask_sampler, plan.item_class(i), renderer.mapping.footprint(), rng, seed, sigma)
            if req is None:
                pending.insert(0, (i, attempt + 1))
                continue
            batch_reqs.append(req)
            batch_items.append((i, attempt))
        if not batch_reqs:
            continue
        rendered = renderer.render(batch_reqs)
        keep = [r is not None for r in rendered]
        if quality is not None:
            ok_idx = [j for j, r in enumerate(rendered) if r is not None]
            verdicts = quality.accept([rendered[j] for j in ok_idx], ctx.reader)
            for j, v in zip(ok_idx, verdicts):
                lab = str(rendered[j].label)
                q = stats["quality"].setdefault(lab, {"tested": 0, "accepted": 0})
                q["tested"] += 1
                q["accepted"] += int(v)
                keep[j] = bool(v)
        retry = []
        for (i, attempt), r, kp in zip(batch_items, rendered, keep):
            if kp:
                samples.append(r)
                items.append(i)
            else:
                if r is None:
                    stats["did_not_fit"] += 1
                retry.append((i, attempt + 1))
        pending = retry + pending
    order = np.argsort(items, kind="stable")
    return [samples[j] for j in order], [items[j] for j in order]


def save_cache_montage(folder: Path, ctx: RunContext, per_class: int = 4) -> Path:
    """montage.png: for each class a few cached samples (slice through the lesion, z-scores, mask contour)."""
    import numpy as np

    from ..evaluation.montage import save_montage
    from ..synthesis.cache import LesionCache

    cache = LesionCache(folder)
    rows = []
    for l in ctx.spec.lesions:
        samples = cache.samples.get(l.label, [])[:per_class]
        cells = []
        for s in samples:
            size = np.asarray(s.mask.shape) + 16
            lo = np.asarray(s.box_lo) - 8
            img, _ = ctx.reader.crop(s.case, lo, size)
            m = s.paste(img, lo)
            cells.append((img[0], m))
        if cells:
            rows.append((f"{l.name} (label {l.label})", cells))
    path = folder / "montage.png"
    if rows:
        save_montage(rows, path, title=f"{folder.name}: cached diffusion lesions (z-scores)")
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..generator.train_utils import resolve_device
    from ..synthesis.cache import (FORMAT, VERSION, BuildPlan, CacheError, completed_shards, read_manifest,
                                   shard_name, write_manifest, write_shard)
    from ..synthesis.diffusion_render import DiffusionRenderer
    from ..lesions.masks import MaskSampler
    from ..synthesis.space import SpaceMismatchError
    from ..utils.checkpoint import CheckpointError

    if args.per_class < 1 or args.batch < 1 or args.shard_size < 1:
        return _fail("--per-class, --batch and --shard-size must be >= 1")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # only for barriers; each rank renders on its own device
    if args.device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    else:
        device = str(resolve_device(args.device))
    try:
        ctx = RunContext(args.dataset, args.configuration, args.fold, args.plans, args.lesion_spec)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return _fail(str(e))
    if args.classes:
        try:
            classes = [ctx.spec.by_name(c).label if not str(c).isdigit() else ctx.spec.by_label(int(c)).label
                       for c in args.classes]
        except (KeyError, ValueError) as e:
            return _fail(f"--classes: {e}")
    else:
        classes = [l.label for l in ctx.spec.lesions]
    try:
        renderer = DiffusionRenderer(args.diffusion, ctx.grid, ctx.spec, ctx.reader, vqgan=args.vqgan, device=device,
                                     sampler=args.sampler, steps=args.steps, guidance=args.guidance, eta=args.eta,
                                     labels=classes)
    except (CheckpointError, SpaceMismatchError, FileNotFoundError) as e:
        return _fail(str(e))
    gen_id = renderer.identity()
    out = Path(args.output) if args.output else (
        ctx.dataset_folder / "promptlesion_cache" /
        f"{args.configuration}__fold{args.fold}__{str(gen_id['diffusion_checkpoint_id'])[:12]}")
    out.mkdir(parents=True, exist_ok=True)
    log = _setup_logging(out / "build.log", rank)
    plan = BuildPlan(classes=classes, per_class=args.per_class, shard_size=args.shard_size, seed=args.seed)
    quality_cfg = None
    if args.quality_model:
        quality_cfg = {"model": str(Path(args.quality_model).resolve()), "fold": str(args.quality_fold),
                       "min_iou": float(args.quality_min_iou)}
    build = {"plan": plan.as_dict(), "blend_sigma_voxels": list(args.blend_sigma), "centre_fraction": args.centre_fraction,
             "max_attempts": args.max_attempts, "quality": quality_cfg, "lesion_spec": ctx.spec.to_dict()}
    manifest = {"format": FORMAT, "version": VERSION, "fingerprint": ctx.fingerprint, "generator": gen_id,
                "diffusion_path": renderer.diffusion_path, "build": build, "complete": False}
    if (out / "manifest.json").is_file():
        try:
            old = read_manifest(out)
        except CacheError as e:
            return _fail(str(e))
        for key in ("fingerprint", "generator", "build"):
            if json.dumps(old.get(key), sort_keys=True) != json.dumps(manifest[key], sort_keys=True):
                return _fail(f"{out} holds a cache built with other {key} settings; pass another -o or delete it")
        manifest = {**old, "complete": old.get("complete", False)}
    elif rank == 0:
        write_manifest(out, manifest)
    if world > 1:
        torch.distributed.barrier()

    quality = None
    if quality_cfg:
        from ..synthesis.quality import QualityFilter

        quality = QualityFilter(args.quality_model, args.quality_fold, device=device, min_iou=args.quality_min_iou,
                                expect_plans=ctx.plans, configuration=args.configuration)
    done = set(completed_shards(out, plan))
    mine = [k for k in range(plan.n_shards) if k % world == rank and k not in done]
    log.info(f"cache {out}: {plan.n_items} samples in {plan.n_shards} shards, {len(done)} already done; rank {rank}/"
             f"{world} renders {len(mine)} on {device}; generator {gen_id['diffusion_checkpoint_id']} "
             f"({args.sampler} {renderer.steps}), mapping {json.dumps(renderer.mapping.describe())}")
    index = ctx.build_index(args.centre_fraction, args.max_scan_cases, progress=(rank == 0 and not args.no_progress))
    mask_sampler = MaskSampler(ctx.cm.spacing, bank=index.bank)
    stats = {"skipped": {}, "did_not_fit": 0, "quality": {}}
    t0 = time.perf_counter()
    n_done = 0
    bar = tqdm(total=sum(len(plan.shard_items(k)) for k in mine), desc=f"rank{rank} rendering", unit="sample",
               disable=args.no_progress, dynamic_ncols=True)
    for j, k in enumerate(mine):
        if args.stop_after_shards is not None and j >= args.stop_after_shards:
            log.info(f"stopping after {j} shards as asked")
            bar.close()
            return 0
        samples, items = render_shard(k, plan, ctx, index, mask_sampler, renderer, quality, args, stats)
        write_shard(out / "shards" / shard_name(k), samples, items,
                    {"shard": k, "rank": rank, "stats": {"did_not_fit": stats["did_not_fit"]}})
        n_done += len(plan.shard_items(k))
        bar.update(len(plan.shard_items(k)))
        rate = n_done / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(samples_per_s=f"{rate:.2f}")
        log.info(f"shard {k} written: {len(samples)} samples ({rate:.2f} samples/s, {60 * rate:.1f} volumes/min)")
    bar.close()
    elapsed = time.perf_counter() - t0
    rank_stats = {"rank": rank, "samples": n_done, "seconds": elapsed, **stats}
    from ..utils.atomic import write_json_atomic

    write_json_atomic(rank_stats, out / f".stats_rank{rank}.json")
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return 0
    missing = [k for k in range(plan.n_shards) if not (out / "shards" / shard_name(k)).is_file()]
    if missing:
        return _fail(f"shards {missing[:10]} are missing (another rank failed?); re-run the same command")
    counts: dict[str, int] = {}
    for k in range(plan.n_shards):
        with np.load(out / "shards" / shard_name(k), allow_pickle=False) as z:
            for lab in z["label"].tolist():
                counts[str(lab)] = counts.get(str(lab), 0) + 1
    per_rank = [json.loads(p.read_text()) for p in sorted(out.glob(".stats_rank*.json"))]
    qual: dict[str, dict] = {}
    for r in per_rank:
        for lab, q in r.get("quality", {}).items():
            a = qual.setdefault(lab, {"tested": 0, "accepted": 0})
            a["tested"] += q["tested"]
            a["accepted"] += q["accepted"]
    for q in qual.values():
        q["acceptance_rate"] = q["accepted"] / max(q["tested"], 1)
    manifest.update(complete=True, shards=[shard_name(k) for k in range(plan.n_shards)], counts=counts,
                    quality_acceptance=qual or None,
                    last_build={"world_size": world, "seconds": elapsed, "samples_this_run": n_done,
                                "volumes_per_min_rank0": 60 * n_done / elapsed if n_done and elapsed > 0 else None,
                                "device": device})
    write_manifest(out, manifest)
    try:
        png = save_cache_montage(out, ctx)
        log.info(f"montage: {png}")
    except Exception as e:  # noqa: BLE001 - a montage failure must not fail a finished build
        log.info(f"montage failed: {e}")
    log.info(f"cache complete: {counts} samples per class label in {out}")
    print(json.dumps({"synthesizer": "diffusion_cache", "cache": str(out.resolve())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
