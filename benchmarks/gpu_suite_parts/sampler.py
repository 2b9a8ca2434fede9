"""Sections ``sampler`` (eager) and ``sampler_compiled`` (torch.compile): sampler throughput, paper preset, 96^3
patches, bf16 denoiser, batch 1/4/8, guidance 1 and --guidance; volumes/min for DDPM-400 and DDIM-50 extrapolated
from a few timed steps, achieved TFLOP/s from the model's counted FLOPs, % of the device's dense bf16 peak."""
from __future__ import annotations

import time
import warnings

import torch

import bench_diffusion  # benchmarks/ (on sys.path, see __init__): model building, timing, FLOP counting, peak table

from .common import md_table, sig


def _rows(suite, sec: dict, compiled: bool) -> None:
    # the package's generator modules import monai: a section whose packages are missing is skipped before it
    # runs (common.SECTION_NEEDS), so they are imported only here
    from nnunet_promptlesion.generator.diffusion.checkpoint import resolve_dtype
    from nnunet_promptlesion.generator.diffusion.unet import parameter_report
    from nnunet_promptlesion.generator.train_utils import autocast

    a = suite.args
    tiny = a.tiny
    preset, size = ("tiny", 32) if tiny else ("paper", 96)
    steps = a.measure_steps or (2 if tiny else 20)
    batches = a.batches or ([1, 2] if tiny else [1, 4, 8])
    mode = None if a.compile_mode == "default" else a.compile_mode
    dtype = resolve_dtype("auto", suite.dev)
    vq, model, sched = bench_diffusion.build_models(preset, size, suite.dev, dtype, a.prompt_type)
    sec.update(preset=preset, patch=[size] * 3, dtype=str(dtype).replace("torch.", ""), prompt_type=a.prompt_type,
               measure_steps=steps, parameters=parameter_report(model)["total"],
               compile=(a.compile_mode if compiled else False),
               extrapolation="vol/min = 60*batch/(fixed + K*per_step), K = 400 (DDPM) / 50 (DDIM); per_step timed "
                             f"over {steps} DDIM steps", rows=[], skipped_rows=[])
    big = max(batches)
    configs = [(g, b) for g in (1.0, a.guidance) for b in ([big] + [x for x in batches if x != big])]
    ac = (lambda: autocast(suite.dev))
    last = None
    for g, b in configs:
        # projected cost of this row: the last row's time scaled by batch and guidance passes
        proj = 0.0 if last is None else last[0] * (b / last[1]) * (2.0 if g != 1.0 else 1.0) / (2.0 if last[2] != 1.0 else 1.0)
        if compiled and last is None:
            proj = suite.est("sampler_compiled") * 0.5
        if proj > suite.budget.left():
            sec["skipped_rows"].append({"guidance": g, "batch": b, "reason": f"projected {proj:.0f} s > "
                                        f"{max(suite.budget.left(), 0):.0f} s left"})
            continue
        args = bench_diffusion.bench_args(measure_steps=steps, guidance=g, vae_chunk=8,
                                          compile=(mode or True) if compiled else False,
                                          full=(not tiny and not compiled and g == 1.0 and b == big))
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                r = bench_diffusion.bench_batch(vq, model, sched, b, size, suite.dev, args, ac)
            except torch.cuda.OutOfMemoryError as e:
                torch.cuda.empty_cache()
                sec["skipped_rows"].append({"guidance": g, "batch": b, "reason": f"CUDA out of memory: {str(e)[:200]}"})
                continue
        fallback = [str(w.message)[:300] for w in caught if "eager" in str(w.message)]
        r.update(guidance=g, percent_of_peak=(100.0 * r["tflops_achieved"] / suite.peak_tflops) if suite.peak_tflops
                 else "unknown", row_seconds=round(time.monotonic() - t0, 2))
        if compiled:
            r["compile_fell_back_to_eager"] = fallback or False
        if suite.dev.type != "cuda":
            r["peak_memory_kind"] = "process peak RSS (high-water mark since start)"
        sec["rows"].append(r)
        last = (time.monotonic() - t0, b, g)
        suite.save()
    if not sec["rows"]:
        sec.update(status="skipped", reason="no row fitted the budget: " +
                   "; ".join(f"g={s['guidance']} b={s['batch']}: {s['reason']}" for s in sec["skipped_rows"]))
    best = max(sec["rows"], key=lambda r: r["ddpm400_volumes_per_min"], default=None)
    if best:
        sec["best"] = {k: best[k] for k in ("batch", "guidance", "ddpm400_volumes_per_min", "ddim50_volumes_per_min",
                                             "tflops_achieved", "percent_of_peak")}
    sec["paper_reference_ddpm400_volumes_per_min_v100"] = 3.1

def run(suite, sec: dict) -> None:
    _rows(suite, sec, compiled=False)

def run_compiled(suite, sec: dict) -> None:
    if suite.args.tiny and suite.dev.type == "cpu" and not suite.args.compile_on_cpu:
        sec.update(status="skipped", reason="--tiny on a CPU: torch.compile's C++ compilation takes minutes there "
                                            "(pass --compile-on-cpu to run it anyway); the eager rows are in 'sampler'")
        return
    _rows(suite, sec, compiled=True)


def summary(sec: dict) -> dict:
    return {f"g{r['guidance']:g}_b{r['batch']}": {"ddpm400_vpm": sig(r["ddpm400_volumes_per_min"]),
                                                  "ddim50_vpm": sig(r["ddim50_volumes_per_min"]),
                                                  "tflops": sig(r["tflops_achieved"])} for r in sec.get("rows", [])}


def markdown(sec: dict) -> list[str]:
    L: list[str] = []
    if "preset" in sec:
        L.append(f"Preset {sec['preset']}, patch {'x'.join(map(str, sec['patch']))}, denoiser {sec['dtype']}, "
                 f"{sec['prompt_type']} prompt, {sec['parameters'] / 1e6:.2f}M parameters, compile "
                 f"{sec['compile']}. {sec['extrapolation']}. Paper: 3.1 vol/min DDPM-400 on a V100.")
        L.append("")
    L += md_table(["guidance", "batch", "per step s", "fixed s", "DDPM-400 vol/min", "DDIM-50 vol/min",
                   "DDIM-50 measured vol/min", "GFLOP/step", "TFLOP/s", "% bf16 peak", "peak MiB", "warm-up s"],
                  [[r["guidance"], r["batch"], r["per_step_seconds"], r["fixed_seconds"],
                    r["ddpm400_volumes_per_min"], r["ddim50_volumes_per_min"],
                    r.get("ddim50_measured_volumes_per_min"), r["flops_per_step"] / 1e9, r["tflops_achieved"],
                    r["percent_of_peak"], r["peak_memory_mb"], r["warmup_seconds"]]
                    for r in sorted(sec.get("rows", []), key=lambda r: (r["guidance"], r["batch"]))])
    for s in sec.get("skipped_rows", []):
        L.append(f"- not run: guidance {s['guidance']:g}, batch {s['batch']}: {s['reason']}")
    for r in sec.get("rows", []):
        if r.get("compile_fell_back_to_eager"):
            L.append(f"- batch {r['batch']} guidance {r['guidance']:g}: compile fell back to eager: "
                     f"{r['compile_fell_back_to_eager'][0][:200]}")
    return L
