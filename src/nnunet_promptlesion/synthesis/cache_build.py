"""Building a lesion cache (what ``promptlesion_build_cache`` runs): placement, shard rendering, packing, logging.

Lesions of every requested class (``per_class`` each) are placed by the placer PromptLesionTrainer places with
(:class:`~nnunet_promptlesion.placement.placer.Placer`: a parent-structure voxel of a training case whose
surroundings hold no real lesion, an elastic or real-mask shape drawn inside the allowed region; here the carrier
patch is the generator's footprint and the lesion centre stays in its middle quarter), rendered in batches by the diffusion model (:class:`.diffusion_render.DiffusionRenderer`:
space mapping to the generator's spacing/intensity/axis order and back, blending) and written as shards of a
:mod:`.cache`. Only the fold's training cases (nnU-Net's own split) are carriers. Resumable and torchrun-aware
(see :mod:`.cache`).

2D configurations (e.g. ``2d_demo``) take a 2D generator (another is refused, naming both): the placer places a
2D mask in one (y, x) slice of a training case (carrier patch: the generator's in-plane footprint) and the lesion is
rendered in plane on that slice, where the 2D trainer's patches lie.

The montage lives in the evaluation layer: it is passed in as a function (``save_montage``) so that this module
only imports downwards.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from ..generator.data import nnunet_fold_split, resolve_preprocessed_dataset
from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from ..generator.train_utils import resolve_device
from ..lesions.masks import MaskSampler
from ..lesions.spec import LesionSpec, dataset_spec_folders, find_lesion_spec
from ..placement.index import LesionIndex, build_lesion_index
from ..placement.placer import NnunetCases, Placer
from ..utils.atomic import write_json_atomic
from ..utils.checkpoint import CheckpointError, short_weights_id
from .cache import (FORMAT, VERSION, BuildPlan, CacheError, LesionCache, completed_shards, describe_difference,
                    pack_shards, read_manifest, run_fingerprint, shard_name, write_manifest, write_shard)
from .diffusion_render import AttributeRequests, CaseReader, DiffusionRenderer, LesionRequest
from .quality import QualityFilter
from .space import GridSpec, SpaceMismatchError


class CacheBuildError(ValueError):
    """A cache build that cannot start or finish; the message says what to change."""


@dataclass
class CacheBuildConfig:
    """Arguments of a cache build (the command line's, same names). Paths as given; voxels in the data grid."""

    dataset: str
    diffusion: str
    per_class: int
    configuration: str = "3d_fullres"
    fold: str = "0"
    plans: str = "nnUNetPlans"
    vqgan: str | None = None
    classes: Sequence[str] | None = None
    lesion_spec: str | None = None
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    guidance: float = 1.0
    eta: float = 0.0
    batch: int = 8
    shard_size: int = 64
    blend_sigma: Sequence[float] = field(default_factory=lambda: [0.5, 1.5])
    centre_fraction: float = 0.5
    max_scan_cases: int = 1000
    seed: int = 0
    quality_model: str | None = None
    quality_fold: str = "0"
    quality_min_iou: float = 0.7
    output: str | None = None
    device: str = "auto"
    num_threads: int | None = None
    max_attempts: int = 8
    no_progress: bool = False
    stop_after_shards: int | None = None  # tests: simulate a stop after this many shards
    # attribute prompts: {class: {attribute: [p per bin]}}; None = the lesion spec's per-class attribute_mix
    attribute_mix: dict | None = None


class RunContext:
    """Everything about the nnU-Net side of a cache build: plans, split, reader, lesion index, fingerprint."""

    def __init__(self, dataset, configuration, fold, plans_name, lesion_spec=None):
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
        all_ids = infer_dataset_class(str(self.data_folder)).get_identifiers(str(self.data_folder))
        self.train_ids, self.val_ids = nnunet_fold_split(self.dataset_folder, all_ids, fold)
        self.train_ids = sorted(self.train_ids)
        self.fold = fold
        self.spec_path = find_lesion_spec(dataset_spec_folders(self.dataset_folder), given=lesion_spec,
                                          error=FileNotFoundError, hint="Pass --lesion-spec.")
        self.spec = LesionSpec.load(self.spec_path)
        dataset_json = json.loads((self.dataset_folder / "dataset.json").read_text())
        self.spec.validate_against_dataset(dataset_json, source=f"{self.dataset_folder}/dataset.json")
        self.grid = GridSpec.from_nnunet(self.plans, configuration)
        self.reader = CaseReader(self.data_folder, self.train_ids)
        self.fingerprint = run_fingerprint(self.plans, configuration, fold, self.train_ids, self.dataset_folder.name,
                                           data_folder=self.data_folder, labels=dataset_json.get("labels"),
                                           lesion_spec=self.spec.to_dict())

    def build_index(self, centre_fraction: float, max_cases: int, progress: bool) -> LesionIndex:
        """The trainer's carrier index over the fold's training cases."""
        return build_lesion_index(self.cases(), self.train_ids, self.spec, spacing=self.cm.spacing,
                                  patch_size=self.cm.patch_size, centre_fraction=centre_fraction,
                                  max_cases=max_cases, progress=progress)

    def cases(self):
        """The fold's training cases as an nnU-Net dataset (``load_case``)."""
        return infer_dataset_class(str(self.data_folder))(str(self.data_folder), self.train_ids)

    def placer(self, index: LesionIndex, mask_sampler: MaskSampler, footprint) -> Placer:
        """The training placer's rule on carriers of the generator patch ``footprint`` (data voxels, X, Y, Z of the
        preprocessed grid), one carrier per try (a failed attempt is retried with the next seed)."""
        size = np.asarray(footprint, int)
        # lesion centres in the middle quarter of the generator patch, so that the blend rim fits inside it
        box = 2 * np.maximum(size // 8, 1) + 1
        return Placer(NnunetCases(self.cases()), index, mask_sampler, size, box, tries=1)


def place_lesion(placer: Placer, label: int, rng, seed: int, sigma: float,
                 requests: AttributeRequests | None = None) -> LesionRequest | None:
    """A LesionRequest for class ``label`` on a healthy carrier of the fold's training cases, or None. With attribute
    ``requests`` the lesion's bins are drawn first and the mask is drawn in the requested radius bin."""
    class_idx = placer.index.spec.lesions.index(placer.index.spec.by_label(label))
    radius, attrs = requests.draw(class_idx, rng) if requests is not None else (None, None)
    placed = placer.place(class_idx, rng, seed=seed, radius_range_mm=radius, attributes=attrs)
    return None if placed is None else LesionRequest.from_placement(placed[0], sigma)


def setup_logging(path: Path, rank: int) -> logging.Logger:
    """build.log for every rank (prefixed ``rankR``), and stderr for rank 0."""
    log = logging.getLogger(f"promptlesion.build_cache.{rank}")
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path, mode="a")
    fh.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(message)s"))
    log.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(sh)
    return log


def render_shard(k: int, plan, ctx: RunContext, placer: Placer, renderer, quality, cfg: CacheBuildConfig,
                 stats: dict, requests: AttributeRequests | None = None, requested: dict | None = None):
    """Render work items of shard ``k``; returns (samples, items). Deterministic given the shard index.
    ``requested`` (filled in): work item -> the attribute bins its lesion was rendered with."""
    samples, items = [], []
    attrs_of = {}
    pending = [(i, 0) for i in plan.shard_items(k)]
    while pending:
        batch_reqs, batch_items = [], []
        while pending and len(batch_reqs) < cfg.batch:
            i, attempt = pending.pop(0)
            if attempt >= cfg.max_attempts:
                stats["skipped"][str(plan.item_class(i))] = stats["skipped"].get(str(plan.item_class(i)), 0) + 1
                continue
            seed = plan.item_seed(i, attempt)
            rng = np.random.default_rng(seed)
            sigma = float(rng.uniform(*cfg.blend_sigma))
            req = place_lesion(placer, plan.item_class(i), rng, seed, sigma, requests)
            if req is None:
                pending.insert(0, (i, attempt + 1))
                continue
            attrs_of[i] = req.attributes
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
    if requested is not None:
        requested.update({int(items[j]): attrs_of[items[j]] for j in order if attrs_of.get(items[j]) is not None})
    return [samples[j] for j in order], [items[j] for j in order]


def save_cache_montage(folder: Path, ctx: RunContext, save_montage: Callable, per_class: int = 4) -> Path:
    """montage.png: for each class a few cached samples (slice through the lesion, z-scores, mask contour).

    ``save_montage(rows, path, title)``: evaluation.montage's (passed in: it lives on a higher floor)."""
    cache = LesionCache(folder)
    rows = []
    for l in ctx.spec.lesions:
        cells = []
        for k in range(min(per_class, cache.count(l.label))):
            s = cache.get(l.label, k)
            # context around the lesion; in plane only for a 2D cache (its lesions lie in one slice)
            pad = np.full(len(s.mask.shape), 8)
            if len(cache.manifest.get("generator", {}).get("patch_size", ())) == 2:
                pad[0] = 0
            size = np.asarray(s.mask.shape) + 2 * pad
            lo = np.asarray(s.box_lo) - pad
            img, _ = ctx.reader.crop(s.case, lo, size)
            m = s.paste(img, lo)
            cells.append((img[0], m))
        if cells:
            rows.append((f"{l.name} (label {l.label})", cells))
    path = Path(folder) / "montage.png"
    if rows:
        save_montage(rows, path, title=f"{Path(folder).name}: cached diffusion lesions (z-scores)")
    return path


def _device(cfg: CacheBuildConfig, world: int, local_rank: int) -> str:
    if cfg.device == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and world > 1:
        return f"cuda:{local_rank}"
    return str(resolve_device(cfg.device))


def build_cache(cfg: CacheBuildConfig, save_montage: Callable | None = None,
                announce: Callable[[str], None] = print) -> Path | None:
    """Build (or resume) a cache; returns its folder on the rank that completed it (rank 0), else None.

    ``save_montage``: evaluation.montage's (None: no montage). ``announce`` gets the settings snippet line at the end. Raises CacheBuildError for
    anything the user must change. Under torchrun (WORLD_SIZE > 1) every rank calls this."""
    if cfg.per_class < 1 or cfg.batch < 1 or cfg.shard_size < 1:
        raise CacheBuildError("--per-class, --batch and --shard-size must be >= 1")
    try:
        check_sampler(cfg.sampler, cfg.steps)
    except ValueError as e:
        raise CacheBuildError(str(e)) from e
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")  # only for barriers; each rank renders on its own device
    device = _device(cfg, world, local_rank)
    try:
        ctx = RunContext(cfg.dataset, cfg.configuration, cfg.fold, cfg.plans, cfg.lesion_spec)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise CacheBuildError(str(e)) from e
    if cfg.classes:
        try:
            classes = [ctx.spec.by_name(c).label if not str(c).isdigit() else ctx.spec.by_label(int(c)).label
                       for c in cfg.classes]
        except (KeyError, ValueError) as e:
            raise CacheBuildError(f"--classes: {e}") from e
    else:
        classes = [l.label for l in ctx.spec.lesions]
    try:
        renderer = DiffusionRenderer(cfg.diffusion, ctx.grid, ctx.spec, ctx.reader, vqgan=cfg.vqgan, device=device,
                                     sampler=cfg.sampler, steps=cfg.steps, guidance=cfg.guidance, eta=cfg.eta,
                                     labels=classes)
    except (CheckpointError, SpaceMismatchError, FileNotFoundError) as e:
        raise CacheBuildError(str(e)) from e
    try:
        mix = cfg.attribute_mix if cfg.attribute_mix is not None else ctx.spec.attribute_mix()
        where = "--attribute-mix" if cfg.attribute_mix is not None else f"{ctx.spec_path} attribute_mix"
        requests = AttributeRequests(ctx.spec, renderer.attribute_bins, mix, where, cfg.diffusion)
    except ValueError as e:  # LesionSpecError, AttributeRequestError
        raise CacheBuildError(str(e)) from e
    gen_id = renderer.identity()
    out = Path(cfg.output) if cfg.output else (
        ctx.dataset_folder / "promptlesion_cache" /
        f"{cfg.configuration}__fold{cfg.fold}__{short_weights_id(gen_id['diffusion_checkpoint_id'])}")
    out.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out / "build.log", rank)
    plan = BuildPlan(classes=classes, per_class=cfg.per_class, shard_size=cfg.shard_size, seed=cfg.seed)
    quality_cfg = None
    if cfg.quality_model and renderer.two_d:
        raise CacheBuildError("--quality-model runs on 3D crops; it is not available for 2D configurations yet")
    if cfg.quality_model:
        quality_cfg = {"model": str(Path(cfg.quality_model).resolve()), "fold": str(cfg.quality_fold),
                       "min_iou": float(cfg.quality_min_iou)}
    build = {"plan": plan.as_dict(), "blend_sigma_voxels": list(cfg.blend_sigma), "centre_fraction": cfg.centre_fraction,
             "max_attempts": cfg.max_attempts, "quality": quality_cfg, "lesion_spec": ctx.spec.to_dict()}
    if requests.active:  # only then: a build without a mix keeps the build record (and resumability) it had
        build["attribute_mix"] = requests.mix
    manifest = {"format": FORMAT, "version": VERSION, "fingerprint": ctx.fingerprint, "generator": gen_id,
                "diffusion_path": renderer.diffusion_path, "build": build, "complete": False}
    if (out / "manifest.json").is_file():
        try:
            old = read_manifest(out)
        except CacheError as e:
            raise CacheBuildError(str(e)) from e
        for key in ("fingerprint", "generator", "build"):
            if json.dumps(old.get(key), sort_keys=True) != json.dumps(manifest[key], sort_keys=True):
                detail = ""
                if key == "fingerprint":
                    detail = f" ({describe_difference(old.get(key) or {}, manifest[key])})"
                raise CacheBuildError(f"{out} holds a cache built with other {key} settings{detail}; pass another -o "
                                      "or delete it")
        manifest = {**old, "complete": old.get("complete", False)}
    elif rank == 0:
        write_manifest(out, manifest)
    if world > 1:
        torch.distributed.barrier()

    quality = None
    if quality_cfg:
        quality = QualityFilter(cfg.quality_model, cfg.quality_fold, device=device, min_iou=cfg.quality_min_iou,
                                expect_plans=ctx.plans, configuration=cfg.configuration)
    done = set(completed_shards(out, plan))
    mine = [k for k in range(plan.n_shards) if k % world == rank and k not in done]
    log.info(f"cache {out}: {plan.n_items} samples in {plan.n_shards} shards, {len(done)} already done; rank {rank}/"
             f"{world} renders {len(mine)} on {device}; generator {gen_id['diffusion_checkpoint_id']} "
             f"({cfg.sampler} {renderer.steps}), mapping {json.dumps(renderer.mapping.describe())}")
    index = ctx.build_index(cfg.centre_fraction, cfg.max_scan_cases, progress=(rank == 0 and not cfg.no_progress))
    placer = ctx.placer(index, MaskSampler(ctx.cm.spacing, bank=index.bank), renderer.mapping.footprint())
    stats = {"skipped": {}, "did_not_fit": 0, "quality": {}}
    t0 = time.perf_counter()
    n_done = 0
    bar = tqdm(total=sum(len(plan.shard_items(k)) for k in mine), desc=f"rank{rank} rendering", unit="sample",
               disable=cfg.no_progress, dynamic_ncols=True)
    for j, k in enumerate(mine):
        if cfg.stop_after_shards is not None and j >= cfg.stop_after_shards:
            log.info(f"stopping after {j} shards as asked")
            bar.close()
            return None
        requested: dict = {}
        samples, items = render_shard(k, plan, ctx, placer, renderer, quality, cfg, stats, requests, requested)
        shard_meta = {"shard": k, "rank": rank, "stats": {"did_not_fit": stats["did_not_fit"]}}
        if renderer.attribute_bins is not None:
            shard_meta["attributes"] = {str(i): list(a) for i, a in sorted(requested.items())}
        write_shard(out / "shards" / shard_name(k), samples, items, shard_meta)
        n_done += len(plan.shard_items(k))
        bar.update(len(plan.shard_items(k)))
        rate = n_done / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(samples_per_s=f"{rate:.2f}")
        log.info(f"shard {k} written: {len(samples)} samples ({rate:.2f} samples/s, {60 * rate:.1f} volumes/min)")
    bar.close()
    elapsed = time.perf_counter() - t0
    rank_stats = {"rank": rank, "samples": n_done, "seconds": elapsed, **stats}
    write_json_atomic(rank_stats, out / f".stats_rank{rank}.json")
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    missing = [k for k in range(plan.n_shards) if not (out / "shards" / shard_name(k)).is_file()]
    if missing:
        raise CacheBuildError(f"shards {missing[:10]} are missing (another rank failed?); re-run the same command")
    counts: dict[str, int] = {}
    requested_all: dict[str, list[int]] = {}
    for k in range(plan.n_shards):
        with np.load(out / "shards" / shard_name(k), allow_pickle=False) as z:
            for lab in z["label"].tolist():
                counts[str(lab)] = counts.get(str(lab), 0) + 1
            requested_all.update(json.loads(str(z["meta"])).get("attributes", {}))
    per_rank = [json.loads(p.read_text()) for p in sorted(out.glob(".stats_rank*.json"))]
    qual: dict[str, dict] = {}
    for r in per_rank:
        for lab, q in r.get("quality", {}).items():
            a = qual.setdefault(lab, {"tested": 0, "accepted": 0})
            a["tested"] += q["tested"]
            a["accepted"] += q["accepted"]
    for q in qual.values():
        q["acceptance_rate"] = q["accepted"] / max(q["tested"], 1)
    shards = [shard_name(k) for k in range(plan.n_shards)]
    packed = pack_shards(out, shards)
    if renderer.attribute_bins is not None:
        # per lesion (work item, the packed arrays' "item"): the attribute bins it was rendered with, 0 = null
        manifest["attributes"] = {"names": list(renderer.attribute_bins.names),
                                  "n_bins": renderer.attribute_bins.n_bins, "mix": requests.mix,
                                  "requested": requested_all}
    manifest.update(complete=True, shards=shards, counts=counts, packed=packed,
                    quality_acceptance=qual or None,
                    last_build={"world_size": world, "seconds": elapsed, "samples_this_run": n_done,
                                "volumes_per_min_rank0": 60 * n_done / elapsed if n_done and elapsed > 0 else None,
                                "device": device})
    write_manifest(out, manifest)
    if save_montage is not None:
        try:
            png = save_cache_montage(out, ctx, save_montage)
            log.info(f"montage: {png}")
        except Exception as e:  # noqa: BLE001 - a montage failure must not fail a finished build
            log.info(f"montage failed: {e}")
    log.info(f"cache complete: {counts} samples per class label in {out}")
    snippet = {"synthesizer": "diffusion_cache", "cache": str(out.resolve())}
    if requests.active:
        snippet["attribute_mix"] = requests.mix
    announce(json.dumps(snippet))
    return out
