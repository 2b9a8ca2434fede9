"""Benchmark PromptLesion synthesis speed: volumes/min for 96^3 patches (DDPM-400 and DDIM-50), per preset and batch.

One "volume" is the full inpainting pipeline of :func:`inpaint_lesions` for one 96^3 patch: VQGAN encode of the
image and of the masked image (-> 8 x 24^3 latents), K denoiser evaluations at 24^3, VQGAN decode with the
codebook snap, blending. Untrained weights (speed does not depend on them). Per batch size it measures

* ``fixed``: encode + decode + blend for the batch (seconds);
* ``per_step``: one sampler step (denoiser + DDIM update + known-region resampling) over ``--measure-steps``
  steps, with the step-invariant conditioning computed once (as :func:`inpaint_lesions` does);
* ``flops_step``: FLOPs of one denoiser evaluation, counted from the model with
  ``torch.utils.flop_counter.FlopCounterMode`` (convs, matmuls, attention; 2 FLOPs per multiply-add);

and reports volumes/min = 60 * batch / (fixed + K * per_step) for K = 400 (DDPM, the paper's setting) and
K = 50 (DDIM), achieved TFLOP/s = flops_step / per_step, % of the device's dense bf16 peak (a table of known
GPUs; ``--peak-tflops`` overrides), and peak memory (CUDA: max allocated; CPU: process peak RSS).
``--full`` also runs DDIM-50 end to end through :func:`inpaint_lesions` as a check of the extrapolation.
``--eager-step`` times the step the way the sampler ran before step-invariant conditioning existed (full
forward with the prompt encoder and PromptGenBlock bases recomputed every step), for a before/after ratio.
``--ab-src DIR`` loads another checkout's ``nnunet_promptlesion`` (DIR = its ``src``) under another name and
times its sampler step against this one, interleaved round by round in one process (same preset, batch,
latents; medians), so machine load affects both alike: a before/after ratio for code changes.

    python benchmarks/bench_diffusion.py --preset tiny --batch 1 --threads 2

On a GPU run ``python benchmarks/gpu_suite.py`` instead: it imports :func:`build_models`, :func:`bench_batch` and
the peak table from here and measures every sampler row (eager and compiled, guidance 1 and > 1, batch 1/4/8)
inside a time budget, next to the other GPU numbers.

Paper reference: 3.1 volumes/min (400 steps, V100).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4,
                    "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "V100": 125.0}


def device_peak(dev: torch.device) -> tuple[str, float | None]:
    if dev.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(dev)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return name, PEAK_BF16_TFLOPS[key]
    return name, None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def peak_memory_mb(dev) -> float:
    from nnunet_promptlesion.generator.train_utils import peak_memory_mb as pm

    return pm(dev)


def build_models(preset: str, size: int, dev, dtype, prompt_type: str = "mask", num_classes: int = 2):
    """(VQGAN for size^3 patches, denoiser in ``dtype``, noise schedule): untrained weights, seed 0 (speed does not
    depend on the weights)."""
    from nnunet_promptlesion.generator.diffusion.config import make_config
    from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
    from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.from_preset(preset, patch_size=(size, size, size))).to(dev).eval()
    cfg = make_config(preset, num_classes=num_classes, prompt_type=prompt_type)
    model = PromptLesionUNet(cfg).to(device=dev, dtype=dtype).eval().requires_grad_(False)
    return vq, model, NoiseSchedule.from_config(cfg, dev)


def bench_args(**overrides) -> argparse.Namespace:
    """The options :func:`bench_batch` reads, with this script's defaults (for callers that import it)."""
    d = dict(measure_steps=10, guidance=1.0, vae_chunk=8, compile=False, eager_step=False, full=False)
    d.update(overrides)
    return argparse.Namespace(**d)


def bench_batch(vq, model, sched, b: int, s: int, dev, args, ac) -> dict:
    """One row: fixed (encode + decode + blend) and per-step seconds of batch ``b`` of s^3 patches, counted FLOPs per
    step, extrapolated DDPM-400 / DDIM-50 volumes/min, warm-up seconds (incl. compilation), peak memory."""
    from nnunet_promptlesion.generator.diffusion.inpaint import blend, encode_inputs, inpaint_lesions
    from nnunet_promptlesion.generator.diffusion.samplers import ddim_sample, guided_eps_fn

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    img = torch.rand(b, 1, s, s, s, device=dev) * 2 - 1
    mask = torch.zeros_like(img)
    c = s // 2
    h = max(2, s // 12)  # lesion box of side s/6 (16 voxels at 96^3), parent box of side s/2 (48 at 96^3)
    mask[:, :, c - h:c + h, c - h:c + h, c - h:c + h] = 1
    parent = torch.zeros_like(img)
    parent[:, :, c - 3 * h:c + 3 * h, c - 3 * h:c + 3 * h, c - 3 * h:c + 3 * h] = 1
    ids = torch.ones(b, dtype=torch.long, device=dev)
    res = {"batch": b}
    with torch.no_grad():
        sync(dev)
        t0 = time.perf_counter()
        inpaint_lesions(vq, model, img, mask, ids, steps=2, schedule=sched, autocast=ac, parent_mask=parent,
                        vae_chunk=args.vae_chunk, compile=args.compile)  # warm-up (allocator, kernels, compile)
        sync(dev)
        res["warmup_seconds"] = time.perf_counter() - t0  # includes torch.compile's compilation when asked
        t0 = time.perf_counter()
        enc = encode_inputs(vq, img, mask, parent, ac, args.vae_chunk)
        with ac():
            dec = vq.decode_latent(enc["z"]).float()
        blend(img, dec, mask, 1.0)
        sync(dev)
        res["fixed_seconds"] = time.perf_counter() - t0
        z, region = enc["z"], enc["region"]
        eps = guided_eps_fn(model, enc["context"], region, ids, args.guidance, autocast=ac, parent=enc["parent"],
                            compile=args.compile)
        zt = torch.randn_like(z)
        t0 = time.perf_counter()
        ddim_sample(eps, sched, zt, steps=2, known=z, keep=1 - region, clip_x0=1.0)  # warm-up at this shape
        sync(dev)
        res["warmup_seconds"] += time.perf_counter() - t0  # a guided step has another shape: compiled again
        t0 = time.perf_counter()
        ddim_sample(eps, sched, zt, steps=args.measure_steps, known=z, keep=1 - region, clip_x0=1.0)
        sync(dev)
        per_step = (time.perf_counter() - t0) / args.measure_steps
        res["per_step_seconds"] = per_step
        if args.eager_step:
            n = max(2, args.measure_steps // 2)
            tt = torch.full((b,), 100, device=dev, dtype=torch.long)
            zin = z.to(next(model.parameters()).dtype)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(n):
                with ac():
                    model(zin, tt, enc["context"], region, ids, enc["parent"])
            sync(dev)
            res["eager_full_forward_seconds"] = (time.perf_counter() - t0) / n
        passes = 2 if args.guidance != 1.0 else 1
        cond = model.prepare(enc["context"], region, ids, enc["parent"])
        tt = torch.full((b,), 100, device=dev, dtype=torch.long)
        flops = count_flops(lambda: model.forward_prepared(z, tt, cond)) * passes
        res["flops_per_step"] = flops
        res["tflops_achieved"] = flops / per_step / 1e12
        for name, k in (("ddpm400", 400), ("ddim50", 50)):
            res[f"{name}_volumes_per_min"] = 60.0 * b / (res["fixed_seconds"] + k * per_step)
        if args.full:
            sync(dev)
            t0 = time.perf_counter()
            inpaint_lesions(vq, model, img, mask, ids, steps=50, schedule=sched, autocast=ac, parent_mask=parent,
                            vae_chunk=args.vae_chunk, compile=args.compile, guidance=args.guidance)
            sync(dev)
            res["ddim50_measured_volumes_per_min"] = 60.0 * b / (time.perf_counter() - t0)
    res["peak_memory_mb"] = peak_memory_mb(dev)
    return res


def load_other_package(src_dir: str, name: str = "nnunet_promptlesion_other"):
    """Import ``src_dir/nnunet_promptlesion`` as package ``name`` (its modules import each other relatively)."""
    import importlib.util
    import sys
    from pathlib import Path

    init = Path(src_dir) / "nnunet_promptlesion" / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return name


def ab_step(preset: str, b: int, s: int, dev, args) -> dict:
    """Median seconds per sampler step, other checkout vs this one, interleaved (onehot prompt, fp32)."""
    import importlib
    import statistics

    from nnunet_promptlesion.generator.diffusion.config import make_config
    from nnunet_promptlesion.generator.diffusion.samplers import ddim_sample, guided_eps_fn
    from nnunet_promptlesion.generator.diffusion.schedule import NoiseSchedule
    from nnunet_promptlesion.generator.diffusion.unet import PromptLesionUNet

    other = load_other_package(args.ab_src)
    o_cfg = importlib.import_module(f"{other}.generator.diffusion.config")
    o_unet = importlib.import_module(f"{other}.generator.diffusion.unet")
    o_samp = importlib.import_module(f"{other}.generator.diffusion.samplers")
    lat = s // 4
    torch.manual_seed(0)
    z = torch.rand(b, 8, lat, lat, lat, device=dev) * 2 - 1
    region = torch.zeros(b, 1, lat, lat, lat, device=dev)
    c = lat // 2
    region[..., c - 2:c + 2, c - 2:c + 2, c - 2:c + 2] = 1
    ids = torch.ones(b, dtype=torch.long, device=dev)
    cfg = make_config(preset, num_classes=2, prompt_type="onehot")
    new = PromptLesionUNet(cfg).to(dev).eval()
    old = o_unet.PromptLesionUNet(o_cfg.make_config(preset, num_classes=2, prompt_type="onehot")).to(dev).eval()
    sched = NoiseSchedule.from_config(cfg, dev)
    fns = {"other": (o_samp.ddim_sample, o_samp.guided_eps_fn(old, (1 - region) * z, region, ids, 1.0)),
           "this": (ddim_sample, guided_eps_fn(new, (1 - region) * z, region, ids, 1.0))}
    times: dict[str, list[float]] = {k: [] for k in fns}
    zt = torch.randn_like(z)
    # process CPU time is far less disturbed by other jobs on a shared CPU than wall time (use --threads 1)
    clock = time.process_time if args.ab_clock == "cpu" else time.perf_counter
    with torch.no_grad():
        for _ in range(args.ab_rounds + 1):  # the first round warms up and is dropped
            for k, (sampler, eps) in fns.items():
                sync(dev)
                t0 = clock()
                sampler(eps, sched, zt, steps=args.measure_steps, known=z, keep=1 - region, clip_x0=1.0)
                sync(dev)
                times[k].append((clock() - t0) / args.measure_steps)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"preset": preset, "batch": b, "other_src": args.ab_src, "rounds": args.ab_rounds, "clock": args.ab_clock,
            "other_per_step_seconds": med["other"], "this_per_step_seconds": med["this"],
            "speedup": med["other"] / med["this"], "all_seconds": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "paper"], nargs="+", default=["tiny"], help="diffusion and VQGAN preset(s)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="volumes per batch (several: one row each)")
    ap.add_argument("--size", type=int, default=96, help="patch side in voxels (default 96)")
    ap.add_argument("--measure-steps", type=int, default=10, help="sampler steps timed for the per-step cost")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="denoiser weights: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32")
    ap.add_argument("--prompt-type", choices=["onehot", "mask"], default="mask")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1 = one pass per step)")
    ap.add_argument("--vae-chunk", type=int, default=8, help="samples per VQGAN encode/decode call")
    ap.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                    help="torch.compile the denoiser step (eager fallback); optional mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--eager-step", action="store_true", help="also time the full forward per step (the pre-caching path)")
    ap.add_argument("--ab-src", help="src folder of another checkout: time its sampler step against this one (interleaved)")
    ap.add_argument("--ab-rounds", type=int, default=5, help="interleaved rounds for --ab-src (median; one extra warm-up)")
    ap.add_argument("--ab-clock", choices=["wall", "cpu"], default="wall",
                    help="--ab-src timing: wall time, or process CPU time (robust on a shared CPU; use --threads 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the %% column (default: table)")
    ap.add_argument("--full", action="store_true", help="also run DDIM-50 end to end")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    from nnunet_promptlesion.generator.diffusion.checkpoint import resolve_dtype
    from nnunet_promptlesion.generator.diffusion.unet import parameter_report
    from nnunet_promptlesion.generator.train_utils import autocast

    if args.ab_src:
        rows = [ab_step(p, b, args.size, dev, args) for p in args.preset for b in args.batch]
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "all_seconds"}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": str(dev), "threads": args.threads, "torch": torch.__version__, "rows": rows}, f, indent=2)
        return 0
    name, peak = device_peak(dev)
    peak = args.peak_tflops or peak
    dtype = resolve_dtype(args.dtype, dev)
    out = {"device": str(dev), "device_name": name, "peak_tflops": peak, "threads": args.threads,
           "torch": torch.__version__, "dtype": str(dtype), "compile": args.compile, "guidance": args.guidance,
           "prompt_type": args.prompt_type, "patch": [args.size] * 3, "rows": []}
    s = args.size
    for preset in args.preset:
        vq, model, sched = build_models(preset, s, dev, dtype, args.prompt_type)
        ac = (lambda: autocast(dev))
        for b in args.batch:
            r = bench_batch(vq, model, sched, b, s, dev, args, ac)
            r.update(preset=preset, parameters=parameter_report(model)["total"])
            r["percent_of_peak"] = 100.0 * r["tflops_achieved"] / peak if peak else None
            out["rows"].append(r)
            print(json.dumps(r), flush=True)
    out["paper_reference_volumes_per_min"] = 3.1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(f"\n| preset | batch | per step (s) | DDPM-400 vol/min | DDIM-50 vol/min | GFLOP/step | TFLOP/s | % peak | peak mem (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["rows"]:
        pct = f"{r['percent_of_peak']:.1f}" if r["percent_of_peak"] is not None else "-"
        print(f"| {r['preset']} | {r['batch']} | {r['per_step_seconds']:.4g} | {r['ddpm400_volumes_per_min']:.3g} | "
              f"{r['ddim50_volumes_per_min']:.3g} | {r['flops_per_step'] / 1e9:.1f} | {r['tflops_achieved']:.3g} | {pct} | "
              f"{r['peak_memory_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
