"""The suite itself: the budget, the order of the sections, the results files and the command line."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

import bench_diffusion  # benchmarks/ (on sys.path, see __init__): the device's peak table
from nnunet_promptlesion.utils.atomic import write_json_atomic, write_text_atomic

from . import cache, cuda_tests, env, sampler, training, vqgan
from .common import (ESTIMATE_S, HERE, REQUIRED, SECTION_NEEDS, SECTION_ORDER, Budget, command_line, cpu_name,
                     cpu_seconds, fmt, git_commit, have, loadavg, slug)

#: name -> what runs it, its console figures and its markdown; the order is SECTION_ORDER
SECTIONS = {"env": env, "cuda_tests": cuda_tests, "sampler": sampler, "cache": cache, "training": training,
            "vqgan": vqgan,
            "sampler_compiled": SimpleNamespace(run=sampler.run_compiled, summary=sampler.summary,
                                                markdown=sampler.markdown)}


class Suite:
    """One run of the suite: the device, the budget, the results (rewritten after every section) and the state the
    sections share (``setup_state``: see :mod:`.phantom`)."""

    def __init__(self, args):
        self.args = args
        self.dev = torch.device(args.device)
        self.mode = "tiny" if args.tiny else "full"
        self.budget = Budget(args.budget_min)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.work.mkdir(parents=True, exist_ok=True)
        name, peak = bench_diffusion.device_peak(self.dev)
        if self.dev.type != "cuda":
            name = cpu_name()
        self.device_name, self.peak_tflops = name, (args.peak_tflops or peak)
        tag = slug(name if self.dev.type == "cuda" else "cpu") + ("-tiny" if args.tiny else "")
        out = Path(args.out) if args.out else HERE / "results"
        self.md_path, self.json_path = out / f"gpu_{tag}.md", out / f"gpu_{tag}.json"
        self.setup_state: dict | None = None
        self.res = {
            "command": command_line(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "mode": self.mode, "device": str(self.dev), "device_name": self.device_name,
            "peak_bf16_tflops": self.peak_tflops, "budget_min": args.budget_min,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_at_start": loadavg()},
            "git_commit": git_commit(), "sections": {}, "elapsed_s": 0.0,
        }

    # ------------------------------------------------------------------ bookkeeping
    def est(self, key: str) -> float:
        return float(ESTIMATE_S[self.mode][key])

    def save(self) -> None:
        self.res["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.res["host"]["load_avg_now"] = loadavg()
        write_json_atomic(self.res, self.json_path)
        write_text_atomic(render_markdown(self.res), self.md_path)

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def run(self, names: list[str]) -> int:
        self.save()
        for name in names:
            sec = {"status": "running"}
            self.res["sections"][name] = sec
            missing = [m for m in SECTION_NEEDS.get(name, []) if not have(m)]
            cost = self.est(name) + (self.est("setup") if name in ("cache", "training") and self.setup_state is None else 0)
            t0, c0 = time.monotonic(), cpu_seconds()
            if missing:
                sec.update(status="skipped", reason=f"packages not importable here: {', '.join(missing)} "
                                                    f"(pip names: {', '.join(REQUIRED.get(m, m) for m in missing)})")
            elif cost > self.budget.left():
                sec.update(status="skipped", reason=f"estimated {cost:.0f} s > {max(self.budget.left(), 0):.0f} s "
                                                    f"left of the {self.args.budget_min:g}-minute budget")
            else:
                try:
                    SECTIONS[name].run(self, sec)
                    if sec["status"] == "running":
                        sec["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - record and go on with the next section
                    sec.update(status="failed", error=f"{type(e).__name__}: {e}",
                               traceback=traceback.format_exc()[-3000:])
                finally:
                    if self.dev.type == "cuda":
                        torch.cuda.empty_cache()
            sec["seconds"] = round(time.monotonic() - t0, 2)
            sec["cpu_seconds"] = round(cpu_seconds() - c0, 2)
            self.save()
            print(f"[gpu_suite] {name}: {sec['status']} in {sec['seconds']:.1f} s"
                  + (f" ({sec.get('reason') or sec.get('error')})" if sec["status"] != "ok" else "")
                  + f" | {json.dumps(summary_figures(name, sec), default=str)}", flush=True)
        self.save()
        print(f"[gpu_suite] results: {self.md_path} and {self.json_path} ({self.budget.elapsed():.0f} s)", flush=True)
        return 0


def summary_figures(name: str, sec: dict) -> dict:
    """The few figures of a section printed on the console line."""
    return SECTIONS[name].summary(sec) if name in SECTIONS else {}


def render_markdown(res: dict) -> str:
    L = [f"# GPU suite: {res['device_name']} ({res['mode']})", "",
         f"- command: `{res['command']}`",
         f"- date (UTC): {res['date_utc']}; elapsed {res['elapsed_s']:.0f} s of a {res['budget_min']:g}-minute budget",
         f"- device: {res['device']} = {res['device_name']}; dense bf16 peak used for % of peak: "
         f"{fmt(res['peak_bf16_tflops']) if res['peak_bf16_tflops'] else 'unknown'} TFLOP/s",
         f"- host: {res['host']['machine']}, {res['host']['cpus']} CPUs, load average at start "
         f"{res['host']['load_avg_at_start']}, now {res['host'].get('load_avg_now')}; git {res.get('git_commit')}"]
    v = res.get("versions")
    if v:
        L.append("- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    L.append("")
    for name in SECTION_ORDER:
        sec = res["sections"].get(name)
        if sec is None:
            continue
        L.append(f"## {name}: {sec['status']}" + (f" ({sec['seconds']:.1f} s wall, {sec.get('cpu_seconds', 0):.1f} s CPU)"
                                                 if "seconds" in sec else ""))
        L.append("")
        if sec.get("reason"):
            L += [f"Skipped: {sec['reason']}", ""]
        if sec.get("error"):
            L += [f"Error: `{sec['error'][:800]}`", ""]
        L += SECTIONS[name].markdown(sec)
        L.append("")
    return "\n".join(L) + "\n"



# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=sys.modules[__package__].__doc__,   # the suite's documentation
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=7.0, help="time budget in minutes (default 7)")
    ap.add_argument("--sections", default=",".join(SECTION_ORDER),
                    help=f"comma-separated subset of {','.join(SECTION_ORDER)} (run in that order)")
    ap.add_argument("--tiny", action="store_true", help="tiny presets, a few steps/iterations: the CPU check")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--out", default=None, help="folder for gpu_<device>.md/.json (default benchmarks/results)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary folder, removed at the end)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="sampler batch sizes (default 1 4 8; tiny 1 2)")
    ap.add_argument("--guidance", type=float, default=2.0, help="the classifier-free guidance scale > 1 (default 2)")
    ap.add_argument("--measure-steps", type=int, default=None, help="timed sampler steps per row (default 20; tiny 2)")
    ap.add_argument("--prompt-type", choices=["onehot", "mask"], default="mask", help="diffusion prompt (default mask)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode for sampler_compiled: default or reduce-overhead (CUDA graphs)")
    ap.add_argument("--compile-on-cpu", action="store_true", help="run sampler_compiled in --tiny on a CPU too")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (default: table)")
    ap.add_argument("--nnunet-root", default=None,
                    help="use the planned + preprocessed dataset --dataset under ROOT/raw and ROOT/preprocessed "
                         "instead of building a phantom (read only; outputs go to the scratch folder)")
    ap.add_argument("--dataset", type=int, default=None, help="dataset id under --nnunet-root")
    ap.add_argument("--phantom-cases", type=int, default=None, help="phantom training cases (default 10; tiny 5)")
    ap.add_argument("--phantom-preset", default="default", help="abdomen phantom size preset: default or large")
    ap.add_argument("--cache-per-class", type=int, default=None, help="cache samples per class (default 16; tiny 2)")
    ap.add_argument("--synthesis-steps", type=int, default=None,
                    help="DDIM steps of the cache build and the online producer (default 50; tiny 2)")
    ap.add_argument("--train-iterations", type=int, default=None, help="iterations per trainer (default 40; tiny 3)")
    ap.add_argument("--nnunet-compile", action="store_true",
                    help="let nnU-Net torch.compile its network (default off: each trainer would compile anew)")
    ap.add_argument("--n-proc-da", type=int, default=None,
                    help="nnUNet_n_proc_DA for the training section (default: nnU-Net's; tiny 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTION_ORDER))
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {SECTION_ORDER}", file=sys.stderr)
        return 2
    names = [s for s in SECTION_ORDER if s in names]
    if bool(args.nnunet_root) != (args.dataset is not None):
        print("error: --nnunet-root and --dataset go together", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device here; use --tiny --device cpu for the CPU check",
              file=sys.stderr)
        return 2
    if dev.type != "cuda" and not args.tiny:
        print("error: the full presets need a CUDA device (hours on a CPU); pass --tiny for the CPU check", file=sys.stderr)
        return 2
    suite = Suite(args)
    try:
        return suite.run(names)
    finally:
        if not args.keep_work and not args.work_dir:
            shutil.rmtree(suite.work, ignore_errors=True)
