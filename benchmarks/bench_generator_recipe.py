"""Realism of PromptLesion lesions against training steps and sampling steps, with CPU times: the recipe curve.

For a dataset that nnU-Net has preprocessed (the demo's work folder, or the sarcoma experiment's), given a VQGAN
run and a diffusion run trained with ``--keep-every`` (promptlesion_train_vqgan / promptlesion_train_diffusion on
the SCARCE fold), this measures for every kept diffusion snapshot, and for every requested sampler on one
snapshot:

* time per lesion: ``promptlesion_build_cache`` renders ``--per-class`` lesions per class into the carriers of
  ``--realism-fold`` (wall and CPU seconds of the whole build, divided by the lesions it wrote);
* realism: ``promptlesion_realism --features intensity_shape`` of that cache (``"synthesizer": "diffusion_cache"``)
  against the real lesions of ``--realism-fold`` (the full fold: lesions the generator never saw): FD with its
  real/real floor, KS of radius, mean HU and contrast;
* training cost: CPU seconds per step of each run (from ``/usr/bin/time``-style rusage recorded by this script when
  it trains, or from the runs' own step timestamps when they were trained elsewhere: wall, an upper bound).

The rule-based painter gets the same realism run as the reference. Output: recipe.json and recipe.md in ``-o``.

    python benchmarks/bench_generator_recipe.py --work-dir demo_output -d 501 -c 2d_demo \\
        --train-fold 5 --realism-fold 6 --vqgan-run runs/vqgan --diffusion-run runs/diffusion \\
        --snapshots 500 1000 2000 4000 --samplers ddim:50 ddpm dpmpp:20 dpmpp:10 ddim:20 ddim:10 unipc:10 \\
        --sampler-snapshot 4000 --per-class 60 -o recipe_demo
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from nnunet_promptlesion.utils.atomic import write_json_atomic, write_text_atomic

KS_KEYS = ("ks_radius_mm", "ks_mean_hu", "ks_contrast_hu")


def _env(work: Path) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"))
    return env


def _timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; wall seconds and the CPU seconds (user + sys) of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {rc}); see {log}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def _snapshot(run: Path, step: int) -> Path:
    p = run / f"checkpoint_step{step:08d}.pt"
    if not p.is_file():
        final = run / "checkpoint_final.pt"
        settings = json.loads((run / "run_settings.json").read_text()) if (run / "run_settings.json").is_file() else {}
        if final.is_file() and int(settings.get("run_config", {}).get("max_steps", -1)) == step:
            return final
        raise SystemExit(f"{p} not found: train {run} with --keep-every dividing {step}")
    return p


def _step_seconds(run: Path) -> float | None:
    """Median wall seconds per step from the run's own log (train_log.jsonl "time" stamps)."""
    rows = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines() if l.strip()]
    pts = [(r["step"], r["time"]) for r in rows if "time" in r and "step" in r]
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts, pts[1:]) if s1 > s0]
    return sorted(rates)[len(rates) // 2] if rates else None


def _realism(args, env, settings: dict, out: Path, log: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(settings))
    t = _timed(["promptlesion_realism", "-d", args.dataset, "-c", args.configuration, "-f", str(args.realism_fold),
                "--settings", str(out / "settings.json"), "--features", "intensity_shape",
                "--per-class", str(args.per_class), "--montage-per-class", "8", "--seed", "0", "-o", str(out)],
               env, log)
    rep = json.loads((out / "realism.json").read_text())
    row = {"realism_wall_s": t["wall_s"]}
    for c in args.classes:
        e = rep["classes"].get(c, {})
        row[c] = {"n_real": e.get("n_real"), "n_synthetic": e.get("n_synthetic"), "fd": e.get("frechet"),
                  "fd_floor": e.get("frechet_real_split"), "fd_half": e.get("frechet_real_vs_synthetic_half"),
                  **{k: e.get(k) for k in KS_KEYS},
                  **{f"{s}_{m}_median": e.get(f"{s}_{m}_median") for s in ("real", "synthetic")
                     for m in ("radius_mm", "mean_hu", "contrast_hu")}}
    return row


def _cache_and_realism(args, env, diffusion: Path, vqgan: Path, sampler: str, out: Path, log: Path) -> dict:
    name, _, rest = sampler.partition(":")
    steps, _, guidance = rest.partition(":g")
    cache = out / "cache"
    cmd = ["promptlesion_build_cache", "-d", args.dataset, "-c", args.configuration, "-f", str(args.realism_fold),
           "--diffusion", str(diffusion), "--vqgan", str(vqgan), "--per-class", str(args.per_class),
           "--sampler", name, "--seed", "0", "--no-progress", "--num-threads", str(args.threads), "-o", str(cache)]
    if steps:
        cmd += ["--steps", steps]
    if guidance:
        cmd += ["--guidance", guidance]
    if (cache / "manifest.json").is_file() and args.reuse:
        t = json.loads((out / "build_time.json").read_text())
    else:
        t = _timed(cmd, env, log)
        write_json_atomic(t, out / "build_time.json")
    manifest = json.loads((cache / "manifest.json").read_text())
    n = sum(int(v) for v in manifest.get("counts", {}).values()) or args.per_class * len(args.classes)
    row = _realism(args, env, {"synthesizer": "diffusion_cache", "cache": str(cache)}, out / "realism", log)
    row.update(sampler=sampler, lesions=n, build_wall_s=t["wall_s"], build_cpu_s=t["cpu_s"],
               s_per_lesion_wall=round(t["wall_s"] / n, 3), s_per_lesion_cpu=round(t["cpu_s"] / n, 3))
    return row


def _fmt_row(label: str, row: dict, cls: str) -> str:
    e = row[cls]

    def f(v, d=1):
        return "n/a" if v is None else f"{v:.{d}f}"

    ks = " | ".join(f"{f(e[k]['statistic'], 2)} (p {e[k]['p']:.2g})" if e.get(k) else "n/a" for k in KS_KEYS)
    cost = str(row.get("train_cpu_s", ""))
    per = f"{row['s_per_lesion_cpu']:.3f}" if "s_per_lesion_cpu" in row else ""
    return (f"| {label} | {cost} | {per} | {f(e['fd'])} | {f(e['fd_floor'])} | {ks} | "
            f"{f(e['real_radius_mm_median'], 2)} / {f(e['synthetic_radius_mm_median'], 2)} | "
            f"{f(e['real_mean_hu_median'], 0)} / {f(e['synthetic_mean_hu_median'], 0)} | "
            f"{f(e['real_contrast_hu_median'], 0)} / {f(e['synthetic_contrast_hu_median'], 0)} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", required=True, help="folder holding nnUNet_raw / nnUNet_preprocessed")
    ap.add_argument("-d", "--dataset", required=True)
    ap.add_argument("-c", "--configuration", required=True)
    ap.add_argument("--train-fold", required=True, help="the fold the generators were trained on (recorded only)")
    ap.add_argument("--realism-fold", required=True, help="fold whose training cases give real lesions and carriers")
    ap.add_argument("--vqgan-run", required=True, type=Path)
    ap.add_argument("--diffusion-run", required=True, type=Path)
    ap.add_argument("--vqgan-step", type=int, help="VQGAN snapshot the diffusion run was trained on (recorded only)")
    ap.add_argument("--snapshots", type=int, nargs="+", required=True, help="diffusion training steps to measure")
    ap.add_argument("--snapshot-sampler", default="ddim:50", help="NAME[:STEPS[:gSCALE]] for the training-steps curve")
    ap.add_argument("--samplers", nargs="*", default=[],
                    help="NAME[:STEPS[:gSCALE]] for the sampling-steps curve, e.g. ddpm, ddim:50, dpmpp:20:g3 "
                         "(classifier-free guidance scale 3)")
    ap.add_argument("--sampler-snapshot", type=int, help="diffusion snapshot for the sampler curve (default: last)")
    ap.add_argument("--classes", nargs="+", required=True, help="lesion classes to report")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="reuse caches (and their times) already in -o")
    ap.add_argument("--train-cpu", type=Path, help="JSON {vqgan: {cpu_s, steps}, diffusion: {cpu_s, steps}} from "
                                                   "/usr/bin/time of the two training runs")
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args(argv)
    work = Path(args.work_dir).resolve()
    env = _env(work)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    log = out / "bench.log"
    vq_final = args.vqgan_run / "checkpoint_final.pt"
    train = json.loads(args.train_cpu.read_text()) if args.train_cpu else {}
    vq_cpu_per_step = (train["vqgan"]["cpu_s"] / train["vqgan"]["steps"]) if "vqgan" in train else None
    df_cpu_per_step = (train["diffusion"]["cpu_s"] / train["diffusion"]["steps"]) if "diffusion" in train else None
    vq_steps = args.vqgan_step or (train.get("vqgan", {}).get("steps"))
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".strip(),
              "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
              "dataset": args.dataset, "configuration": args.configuration, "train_fold": args.train_fold,
              "realism_fold": args.realism_fold, "vqgan_steps": vq_steps,
              "vqgan_cpu_s_per_step": vq_cpu_per_step, "diffusion_cpu_s_per_step": df_cpu_per_step,
              "vqgan_wall_s_per_step_logged": _step_seconds(args.vqgan_run),
              "diffusion_wall_s_per_step_logged": _step_seconds(args.diffusion_run),
              "rule_based": None, "training_curve": [], "sampler_curve": []}

    print("rule-based reference", flush=True)
    result["rule_based"] = _realism(args, env, {"synthesizer": "rule_based"}, out / "rule_based", log)
    for step in args.snapshots:
        print(f"diffusion snapshot {step} ({args.snapshot_sampler})", flush=True)
        row = _cache_and_realism(args, env, _snapshot(args.diffusion_run, step), vq_final, args.snapshot_sampler,
                                 out / f"train_{step}", log)
        row["diffusion_steps"] = step
        if vq_cpu_per_step and df_cpu_per_step and vq_steps:
            row["train_cpu_s"] = round(vq_cpu_per_step * vq_steps + df_cpu_per_step * step)
        result["training_curve"].append(row)
        write_json_atomic(result, out / "recipe.json")
    snap = args.sampler_snapshot or args.snapshots[-1]
    for sampler in args.samplers:
        print(f"sampler {sampler} on snapshot {snap}", flush=True)
        row = _cache_and_realism(args, env, _snapshot(args.diffusion_run, snap), vq_final, sampler,
                                 out / f"sampler_{sampler.replace(':', '_')}", log)
        row["diffusion_steps"] = snap
        result["sampler_curve"].append(row)
        write_json_atomic(result, out / "recipe.json")

    md = [f"# Generator recipe: dataset {args.dataset}, {args.configuration}; generators trained on fold "
          f"{args.train_fold}, realism against fold {args.realism_fold}'s real lesions",
          f"machine: {result['machine']}; command: `{result['command']}`", ""]
    head = ("| | train CPU s | CPU s / lesion | FD | FD floor | KS radius | KS mean HU | KS contrast | "
            "radius mm real / syn | mean HU real / syn | contrast HU real / syn |")
    for cls in args.classes:
        md += [f"## {cls}", "", head, "|" + "---|" * 11, _fmt_row("rule-based", result["rule_based"], cls)]
        md += [_fmt_row(f"diffusion {r['diffusion_steps']} steps, {r['sampler']}", r, cls)
               for r in result["training_curve"]]
        md += [_fmt_row(f"{r['sampler']} (snapshot {r['diffusion_steps']})", r, cls) for r in result["sampler_curve"]]
        md.append("")
    write_text_atomic("\n".join(md), out / "recipe.md")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
