"""Do synthetic lesions follow the requested attribute bins? Requested vs measured radius and contrast.

For a diffusion checkpoint trained with attribute prompts (``promptlesion_train_diffusion --attributes
radius,contrast``), its VQGAN and an nnU-Net preprocessed dataset, this renders ``--per-combo`` lesions per class and
per requested bin combination into healthy carriers of the fold's training cases, through the path the lesion cache
uses (the trainer's placer with the mask drawn in the requested radius bin, ``DiffusionRenderer``: space mapping,
inpainting, blending), then measures every synthetic lesion with the same ``measure_lesion`` the training bins came
from (radius in mm of the written mask; contrast = mean lesion intensity minus its parent ring, in the generator's
model intensity space) and bins it with the checkpoint's training bins.

Radius follows by construction (the mask is drawn in the bin); contrast is what the model has to learn. Printed and
written (JSON, ``-o``): per class and attribute a confusion table (requested bin rows, measured bin columns), the
share on the diagonal, and Spearman's rank correlation between the requested bin and the measured value; a
``null`` row (all attributes null) shows where the unconditioned model puts its lesions.

    python benchmarks/bench_attributes.py -d 501 -c 2d_demo -f 0 --per-combo 20 --guidance 2 \\
        --diffusion $nnUNet_results/Dataset501_PhantomCCTA/promptlesion_diffusion__cpu2d__2d_demo__fold0/checkpoint_final.pt \\
        -o attributes_demo.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from nnunet_promptlesion.generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from nnunet_promptlesion.lesions.attributes import RING_MM, measure_lesion, radius_range
from nnunet_promptlesion.lesions.masks import MaskSampler
from nnunet_promptlesion.synthesis.cache_build import RunContext
from nnunet_promptlesion.synthesis.diffusion_render import DiffusionRenderer, LesionRequest
from nnunet_promptlesion.utils.atomic import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", default="0", help="fold whose training cases are the carriers (default 0)")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--diffusion", required=True, help="diffusion checkpoint with attribute prompts")
    p.add_argument("--vqgan", default=None, help="default: the path stored in the diffusion checkpoint")
    p.add_argument("--classes", nargs="+", default=None, help="lesion class names (default: every class with bins)")
    p.add_argument("--attributes", default=None,
                   help="comma-separated subset of the checkpoint's attributes to vary (the others stay null); "
                        "default all: every combination of their bins")
    p.add_argument("--per-combo", type=int, default=20, help="lesions per class and bin combination (default 20)")
    p.add_argument("--no-null", action="store_true", help="skip the all-null reference row")
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    p.add_argument("--batch", type=int, default=16, help="lesions per generator call")
    p.add_argument("--blend-sigma", type=float, default=1.0, help="blend sigma in data voxels (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tries", type=int, default=20, help="placement attempts per lesion before it is skipped")
    p.add_argument("-o", "--output", default=None, help="JSON result (default: print only)")
    return p


def measure_rendered(r, ctx: RunContext, renderer: DiffusionRenderer, parents) -> dict:
    """measure_lesion of a rendered lesion in the case: its crop with the stored voxels pasted, in model space."""
    spacing = [float(s) for s in ctx.cm.spacing]
    ring = int(np.ceil(RING_MM / min(spacing))) + 2  # the parent ring the contrast is measured against fits the crop
    margin = np.array([0 if (renderer.two_d and a == 0) else ring for a in range(3)])
    lo = np.asarray(r.box_lo) - margin
    size = np.asarray(r.box_shape) + 2 * margin
    img, seg = ctx.reader.crop(r.case, lo, size)
    mask = r.paste(img, lo)
    image = renderer.mapping.data_to_model(img[0])
    parent = np.isin(seg[0], parents)
    valid = seg[0] >= 0
    if renderer.two_d:  # one slice: measured in plane, as the 2D training lesions were
        image, mask, parent, valid = image[0], mask[0], parent[0], valid[0]
    return measure_lesion(image, mask, parent, spacing, valid=valid)


def summarise(rows: list[dict], names, n_bins: int) -> dict:
    """Per class and attribute: confusion (requested 1..n x measured 0..n), diagonal share, Spearman rho, p."""
    out = {}
    for cls in sorted({r["class"] for r in rows}):
        per = {}
        for ai, a in enumerate(names):
            sel = [r for r in rows if r["class"] == cls and r["requested"][ai] > 0]
            conf = np.zeros((n_bins, n_bins + 1), int)
            for r in sel:
                conf[r["requested"][ai] - 1, r["measured_bins"][ai]] += 1
            req = np.array([r["requested"][ai] for r in sel])
            val = np.array([r["measured"][a] for r in sel], float)
            ok = np.isfinite(val)
            rho, pval = (spearmanr(req[ok], val[ok]) if ok.sum() > 2 and len(set(req[ok])) > 1 else (np.nan, np.nan))
            null = [r["measured_bins"][ai] for r in rows if r["class"] == cls and not any(r["requested"])]
            per[a] = {"confusion": conf.tolist(), "n": int(len(sel)),
                      "diagonal": float(np.trace(conf[:, 1:]) / max(conf.sum(), 1)),
                      "spearman_rho": None if np.isnan(rho) else float(rho),
                      "spearman_p": None if np.isnan(pval) else float(pval),
                      "null_measured_bins": np.bincount(null, minlength=n_bins + 1).tolist() if null else None}
        out[cls] = per
    return out


def _num(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def print_tables(summary: dict, names, n_bins: int) -> None:
    for cls, per in summary.items():
        for a in names:
            s = per[a]
            print(f"\n{cls} / {a}: n={s['n']} diagonal {s['diagonal']:.2f} Spearman rho "
                  f"{_num(s['spearman_rho'], '.3f')} (p {_num(s['spearman_p'], '.2g')})")
            print("requested \\ measured  " + " ".join(f"{'null' if b == 0 else b:>5}" for b in range(n_bins + 1)))
            for i, row in enumerate(s["confusion"], start=1):
                print(f"{i:>20}  " + " ".join(f"{v:>5}" for v in row))
            if s["null_measured_bins"] is not None:
                print(f"{'null (unconditioned)':>20}  " + " ".join(f"{v:>5}" for v in s["null_measured_bins"]))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ctx = RunContext(args.dataset, args.configuration, args.fold, args.plans)
    renderer = DiffusionRenderer(args.diffusion, ctx.grid, ctx.spec, ctx.reader, vqgan=args.vqgan, device=args.device,
                                 sampler=args.sampler, steps=args.steps, guidance=args.guidance)
    bins = renderer.attribute_bins
    if bins is None:
        print(f"error: {args.diffusion} was trained without attribute prompts", file=sys.stderr)
        return 2
    vary = [a.strip() for a in args.attributes.split(",")] if args.attributes else list(bins.names)
    if any(a not in bins.names for a in vary):
        print(f"error: --attributes {vary}: the checkpoint has {list(bins.names)}", file=sys.stderr)
        return 2
    lesions = [l for l in ctx.spec.lesions if l.prompt in bins.edges]
    if args.classes:
        lesions = [l for l in lesions if l.name in args.classes or l.prompt in args.classes]
    combos = [tuple(dict(zip(vary, c)).get(a, 0) for a in bins.names)
              for c in itertools.product(range(1, bins.n_bins + 1), repeat=len(vary))]
    if not args.no_null:
        combos.append((0,) * len(bins.names))
    index = ctx.build_index(0.5, 1000, progress=False)
    placer = ctx.placer(index, MaskSampler(ctx.cm.spacing, bank=index.bank), renderer.mapping.footprint())
    rng = np.random.default_rng(args.seed)
    todo = []
    for l in lesions:
        ci = ctx.spec.lesions.index(l)
        for combo in combos:
            rr = radius_range(bins, l.prompt, combo)
            for _ in range(args.per_combo):
                for _ in range(args.max_tries):
                    placed = placer.place(ci, rng, seed=int(rng.integers(2**31 - 1)), radius_range_mm=rr,
                                          attributes=combo)
                    if placed is not None:
                        todo.append((l, combo, LesionRequest.from_placement(placed[0], args.blend_sigma)))
                        break
    t0 = time.perf_counter()
    rows = []
    for i in range(0, len(todo), args.batch):
        chunk = todo[i:i + args.batch]
        for (l, combo, _), r in zip(chunk, renderer.render([c[2] for c in chunk])):
            if r is None:
                continue
            m = measure_rendered(r, ctx, renderer, l.parents)
            rows.append({"class": l.prompt, "requested": list(combo), "measured": m,
                         "measured_bins": list(bins.to_bins(l.prompt, m)), "case": r.case, "seed": r.seed})
    elapsed = time.perf_counter() - t0
    summary = summarise(rows, bins.names, bins.n_bins)
    print(f"{len(rows)} lesions rendered ({len(todo) - len(rows)} did not fit) in {elapsed:.1f} s; "
          f"{args.sampler} {renderer.steps}, guidance {args.guidance}; bins {json.dumps(bins.edges)}")
    print_tables(summary, bins.names, bins.n_bins)
    if args.output:
        write_json_atomic({"diffusion": str(Path(args.diffusion).resolve()), "generator": renderer.identity(),
                           "dataset": args.dataset, "configuration": args.configuration, "fold": args.fold,
                           "bins": bins.as_dict(), "per_combo": args.per_combo, "combos": [list(c) for c in combos],
                           "seconds": elapsed, "summary": summary, "lesions": rows}, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
