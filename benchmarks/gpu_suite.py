"""Every GPU number of the package in one command, inside a time budget: ``python benchmarks/gpu_suite.py``.

One process tree (pytest and nnU-Net preprocessing run as child processes, the online producer is spawned by
the trainer); installs nothing. Sections, in order of value (``--sections`` picks a subset, same order):

env               torch / CUDA / cuDNN versions, device name and memory, bf16 support, which scaled-dot-product
                  attention backends accept this package's attention shapes, a dense bf16 matmul ceiling, and
                  which required packages are missing.
cuda_tests        the CUDA-only tests of tests/ (fused SDPA kernel chosen, no host sync in the sampling loop) run
                  by pytest in a child process; on a machine without CUDA pytest skips them (recorded as a skip).
sampler           sampler throughput, eager: paper preset, 96^3 patches, bf16 denoiser, batch 1/4/8, guidance 1
                  and --guidance; volumes/min for DDPM-400 and DDIM-50, extrapolated from a few timed steps (see
                  below), achieved TFLOP/s from the model's counted FLOPs, % of the device's dense bf16 peak.
cache             a small diffusion cache built from a phantom by promptlesion_build_cache's code (volumes/min).
training          a phantom ``3d_fullres`` trained for the same number of iterations with nnUNetTrainer and
                  PromptLesionTrainer (rule_based, diffusion_cache, diffusion_online), nnU-Net's own trainer classes
                  in this process (no final validation); iteration time and its ratio to nnUNetTrainer.
vqgan             VQGAN encode / decode time and peak memory at 96^3, batch 1 and 4.
sampler_compiled  the sampler rows again with torch.compile (compilation time recorded separately).

Extrapolation: volumes/min = 60 * batch / (fixed + K * per_step), fixed = encode + decode + blend of the batch,
per_step = one DDIM step (denoiser + update + known-region resampling) averaged over ``--measure-steps`` steps;
K = 400 (DDPM) or 50 (DDIM). A DDPM step evaluates the same denoiser and differs only by elementwise updates.
One DDIM-50 row is also run end to end as a check of the extrapolation.

The generators of the cache and training sections are untrained (VQGAN: initial weights; diffusion: 2 training
steps on the phantom, which writes a real checkpoint): speed does not depend on the weights.

Results: ``<out>/gpu_<device>.md`` and ``.json`` (every figure, the command line, versions, date), rewritten
atomically after every section (and every sampler row), so a run cut off keeps what finished. A section whose
estimated cost exceeds the budget left is skipped with that reason; a failing section is recorded and the
suite goes on.

    python benchmarks/gpu_suite.py                          # CUDA machine, 7-minute budget
    python benchmarks/gpu_suite.py --budget-min 9 --sections sampler,sampler_compiled
    python benchmarks/gpu_suite.py --tiny --device cpu --out /tmp/gpu_suite   # the CPU check of tests/test_gpu_suite.py
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
try:  # run from a source tree without an install: the package lives in src/
    import nnunet_promptlesion  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p])

import bench_diffusion  # noqa: E402  (this folder; shared model building, timing, FLOP counting and peak table)

SECTION_ORDER = ["env", "cuda_tests", "sampler", "cache", "training", "vqgan", "sampler_compiled"]

#: rough cost of each section in seconds (full presets on a CUDA machine / --tiny on a CPU), used to skip a section
#: that cannot fit the budget left. "setup" is the phantom + nnU-Net preprocessing + generator checkpoints that
#: the cache and training sections share (paid once, by the first of them that runs).
ESTIMATE_S = {
    "full": {"env": 10, "cuda_tests": 30, "sampler": 45, "setup": 60, "cache": 20, "training": 90, "vqgan": 15,
             "sampler_compiled": 90},
    "tiny": {"env": 2, "cuda_tests": 10, "sampler": 10, "setup": 25, "cache": 5, "training": 25, "vqgan": 3,
             "sampler_compiled": 60},
}

#: packages the sections import (module name -> pip name); the env section lists those that are missing
REQUIRED = {"torch": "torch", "monai": "monai", "nnunetv2": "nnunetv2", "batchgenerators": "batchgenerators",
            "dynamic_network_architectures": "dynamic-network-architectures", "blosc2": "blosc2",
            "SimpleITK": "SimpleITK", "nibabel": "nibabel", "einops": "einops", "scipy": "scipy",
            "timm": "timm", "torchvision": "torchvision", "matplotlib": "matplotlib", "pytest": "pytest"}
SECTION_NEEDS = {"cuda_tests": ["pytest", "monai"], "sampler": ["monai", "einops"], "vqgan": ["monai"],
                 "sampler_compiled": ["monai", "einops"],
                 "cache": ["nnunetv2", "monai", "batchgenerators", "blosc2", "SimpleITK"],
                 "training": ["nnunetv2", "monai", "batchgenerators", "blosc2", "SimpleITK", "timm", "torchvision"]}

PHANTOM_ID = 990
TINY_PLANS_FILE = REPO / "tests" / "tiny_plans.py"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        return f"{v:.{nd}g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


class Budget:
    def __init__(self, minutes: float):
        self.t0 = time.monotonic()
        self.total = 60.0 * minutes

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Suite:
    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.dev = torch.device(args.device)
        self.mode = "tiny" if args.tiny else "full"
        self.budget = Budget(args.budget_min)
        self.work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.work.mkdir(parents=True, exist_ok=True)
        name, peak = bench_diffusion.device_peak(self.dev)
        if self.dev.type != "cuda":
            name = _cpu_name()
        self.device_name, self.peak_tflops = name, (args.peak_tflops or peak)
        slug = _slug(name if self.dev.type == "cuda" else "cpu") + ("-tiny" if args.tiny else "")
        out = Path(args.out) if args.out else HERE / "results"
        self.md_path, self.json_path = out / f"gpu_{slug}.md", out / f"gpu_{slug}.json"
        self.setup_state: dict | None = None
        self.res = {
            "command": _command_line(),
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "mode": self.mode, "device": str(self.dev), "device_name": self.device_name,
            "peak_bf16_tflops": self.peak_tflops, "budget_min": args.budget_min,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_at_start": _loadavg()},
            "git_commit": _git_commit(), "sections": {}, "elapsed_s": 0.0,
        }

    # ------------------------------------------------------------------ bookkeeping
    def est(self, key: str) -> float:
        return float(ESTIMATE_S[self.mode][key])

    def save(self) -> None:
        from nnunet_promptlesion.utils.atomic import write_json_atomic, write_text_atomic

        self.res["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.res["host"]["load_avg_now"] = _loadavg()
        write_json_atomic(self.res, self.json_path)
        write_text_atomic(render_markdown(self.res), self.md_path)

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def run(self, names: list[str]) -> int:
        self.save()
        for name in names:
            sec = {"status": "running"}
            self.res["sections"][name] = sec
            missing = [m for m in SECTION_NEEDS.get(name, []) if not _have(m)]
            cost = self.est(name) + (self.est("setup") if name in ("cache", "training") and self.setup_state is None else 0)
            t0, c0 = time.monotonic(), _cpu_seconds()
            if missing:
                sec.update(status="skipped", reason=f"packages not importable here: {', '.join(missing)} "
                                                    f"(pip names: {', '.join(REQUIRED.get(m, m) for m in missing)})")
            elif cost > self.budget.left():
                sec.update(status="skipped", reason=f"estimated {cost:.0f} s > {max(self.budget.left(), 0):.0f} s "
                                                    f"left of the {self.args.budget_min:g}-minute budget")
            else:
                try:
                    getattr(self, f"section_{name}")(sec)
                    if sec["status"] == "running":
                        sec["status"] = "ok"
                except Exception as e:  # noqa: BLE001 - record and go on with the next section
                    sec.update(status="failed", error=f"{type(e).__name__}: {e}",
                               traceback=traceback.format_exc()[-3000:])
                finally:
                    if self.dev.type == "cuda":
                        self.torch.cuda.empty_cache()
            sec["seconds"] = round(time.monotonic() - t0, 2)
            sec["cpu_seconds"] = round(_cpu_seconds() - c0, 2)
            self.save()
            print(f"[gpu_suite] {name}: {sec['status']} in {sec['seconds']:.1f} s"
                  + (f" ({sec.get('reason') or sec.get('error')})" if sec["status"] != "ok" else "")
                  + f" | {json.dumps(summary_figures(name, sec), default=str)}", flush=True)
        self.save()
        print(f"[gpu_suite] results: {self.md_path} and {self.json_path} ({self.budget.elapsed():.0f} s)", flush=True)
        return 0

    # ------------------------------------------------------------------ env
    def section_env(self, sec: dict) -> None:
        import torch
        import torch.nn.functional as F

        v = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "cuda_available": torch.cuda.is_available()}
        for mod in ("nnunet_promptlesion", "nnunetv2", "monai", "numpy", "triton"):
            v[mod] = _version(mod)
        sec["versions"] = v
        self.res["versions"] = v
        sec["missing_packages"] = sorted(REQUIRED[m] for m in REQUIRED if not _have(m))
        if self.dev.type == "cuda":
            p = torch.cuda.get_device_properties(self.dev)
            sec["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                             "multiprocessors": p.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported(),
                             "driver": _nvidia_driver()}
            sec["sdpa_flags"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                 "math": torch.backends.cuda.math_sdp_enabled(),
                                 "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()}
        else:
            sec["device"] = {"name": self.device_name, "bf16_supported": "cpu (bf16 convolutions are slow; the package "
                                                                        "runs fp32 on CPUs)", "threads": torch.get_num_threads()}
        # which SDPA backends accept this package's attention call (B, heads, tokens, head_dim) in its dtype
        dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        tokens = 6 ** 3 if self.args.tiny else 6 ** 3 * 8
        q = torch.randn(2, 4, tokens, 32 if self.args.tiny else 64, device=self.dev, dtype=dtype)
        probes = {}
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            be = getattr(SDPBackend, name, None)
            if be is None:
                probes[name.lower()] = "not in this torch"
                continue
            try:
                with warnings.catch_warnings(), sdpa_kernel([be]):
                    warnings.simplefilter("ignore")
                    F.scaled_dot_product_attention(q, q, q)
                self.sync()
                probes[name.lower()] = "ok"
            except Exception as e:  # noqa: BLE001
                probes[name.lower()] = f"refused ({str(e).splitlines()[0][:120]})"
        sec["sdpa_backends"] = probes
        sec["fused_sdpa_available"] = any(probes.get(k) == "ok" for k in ("flash_attention", "efficient_attention",
                                                                           "cudnn_attention"))
        # a dense matmul ceiling for this dtype, to read the % of peak against
        n = 8192 if self.dev.type == "cuda" else 512
        a = torch.randn(n, n, device=self.dev, dtype=dtype)
        for _ in range(2):
            a @ a
        self.sync()
        reps = 10 if self.dev.type == "cuda" else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        self.sync()
        dt = (time.perf_counter() - t0) / reps
        sec["matmul_tflops"] = {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / dt / 1e12}
        sec["peak_bf16_tflops"] = self.peak_tflops if self.peak_tflops else "unknown"

    # ------------------------------------------------------------------ CUDA-only tests
    def section_cuda_tests(self, sec: dict) -> None:
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if re.search(r"skipif\(\s*not\s+CUDA|torch\.cuda\.is_available\(\)", p.read_text()))
        if not files:
            raise RuntimeError("no test file in tests/ marks CUDA-only tests (skipif(not CUDA ...)); nothing to run")
        xml = self.work / "cuda_tests.xml"
        # CUDA-only tests carry "cuda" in their names (test_..._on_cuda); -k keeps the rest of each file out
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}", *files]
        env = dict(os.environ)
        if self.dev.type == "cuda" and self.dev.index is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.dev.index)
        t0 = time.monotonic()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=max(30, int(self.budget.left())))
        sec["command"] = " ".join(["python", *cmd[1:]]).replace(str(xml), "<xml>")
        sec["pytest_seconds"] = round(time.monotonic() - t0, 2)
        tests = _parse_junit(xml) if xml.is_file() else []
        sec["tests"] = tests
        counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
        sec["counts"] = counts
        if not tests:
            raise RuntimeError(f"pytest ran no test (exit {p.returncode}): {p.stdout[-1500:]} {p.stderr[-1500:]}")
        if counts["failed"] or counts["error"]:
            sec.update(status="failed", error=f"{counts['failed'] + counts['error']} CUDA test(s) failed: " +
                       ", ".join(t["name"] for t in tests if t["outcome"] in ("failed", "error")))
        elif counts["skipped"] == len(tests):
            reasons = sorted({t.get("message", "") for t in tests})
            sec.update(status="skipped", reason=f"no CUDA device here: pytest collected {len(tests)} CUDA-only tests and "
                                                f"skipped them ({'; '.join(reasons)})")

    # ------------------------------------------------------------------ sampler throughput
    def _sampler_rows(self, sec: dict, compiled: bool) -> None:
        import torch

        from nnunet_promptlesion.generator.diffusion.checkpoint import resolve_dtype
        from nnunet_promptlesion.generator.diffusion.unet import parameter_report
        from nnunet_promptlesion.generator.train_utils import autocast

        a = self.args
        tiny = a.tiny
        preset, size = ("tiny", 32) if tiny else ("paper", 96)
        steps = a.measure_steps or (2 if tiny else 20)
        batches = a.batches or ([1, 2] if tiny else [1, 4, 8])
        mode = None if a.compile_mode == "default" else a.compile_mode
        dtype = resolve_dtype("auto", self.dev)
        vq, model, sched = bench_diffusion.build_models(preset, size, self.dev, dtype, a.prompt_type)
        sec.update(preset=preset, patch=[size] * 3, dtype=str(dtype).replace("torch.", ""), prompt_type=a.prompt_type,
                   measure_steps=steps, parameters=parameter_report(model)["total"],
                   compile=(a.compile_mode if compiled else False),
                   extrapolation="vol/min = 60*batch/(fixed + K*per_step), K = 400 (DDPM) / 50 (DDIM); per_step timed "
                                 f"over {steps} DDIM steps", rows=[], skipped_rows=[])
        big = max(batches)
        configs = [(g, b) for g in (1.0, a.guidance) for b in ([big] + [x for x in batches if x != big])]
        ac = (lambda: autocast(self.dev))
        last = None
        for g, b in configs:
            # projected cost of this row: the last row's time scaled by batch and guidance passes
            proj = 0.0 if last is None else last[0] * (b / last[1]) * (2.0 if g != 1.0 else 1.0) / (2.0 if last[2] != 1.0 else 1.0)
            if compiled and last is None:
                proj = self.est("sampler_compiled") * 0.5
            if proj > self.budget.left():
                sec["skipped_rows"].append({"guidance": g, "batch": b, "reason": f"projected {proj:.0f} s > "
                                            f"{max(self.budget.left(), 0):.0f} s left"})
                continue
            args = bench_diffusion.bench_args(measure_steps=steps, guidance=g, vae_chunk=8,
                                              compile=(mode or True) if compiled else False,
                                              full=(not tiny and not compiled and g == 1.0 and b == big))
            t0 = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    r = bench_diffusion.bench_batch(vq, model, sched, b, size, self.dev, args, ac)
                except torch.cuda.OutOfMemoryError as e:
                    torch.cuda.empty_cache()
                    sec["skipped_rows"].append({"guidance": g, "batch": b, "reason": f"CUDA out of memory: {str(e)[:200]}"})
                    continue
            fallback = [str(w.message)[:300] for w in caught if "eager" in str(w.message)]
            r.update(guidance=g, percent_of_peak=(100.0 * r["tflops_achieved"] / self.peak_tflops) if self.peak_tflops
                     else "unknown", row_seconds=round(time.monotonic() - t0, 2))
            if compiled:
                r["compile_fell_back_to_eager"] = fallback or False
            if self.dev.type != "cuda":
                r["peak_memory_kind"] = "process peak RSS (high-water mark since start)"
            sec["rows"].append(r)
            last = (time.monotonic() - t0, b, g)
            self.save()
        if not sec["rows"]:
            sec.update(status="skipped", reason="no row fitted the budget: " +
                       "; ".join(f"g={s['guidance']} b={s['batch']}: {s['reason']}" for s in sec["skipped_rows"]))
        best = max(sec["rows"], key=lambda r: r["ddpm400_volumes_per_min"], default=None)
        if best:
            sec["best"] = {k: best[k] for k in ("batch", "guidance", "ddpm400_volumes_per_min", "ddim50_volumes_per_min",
                                                 "tflops_achieved", "percent_of_peak")}
        sec["paper_reference_ddpm400_volumes_per_min_v100"] = 3.1

    def section_sampler(self, sec: dict) -> None:
        self._sampler_rows(sec, compiled=False)

    def section_sampler_compiled(self, sec: dict) -> None:
        if self.args.tiny and self.dev.type == "cpu" and not self.args.compile_on_cpu:
            sec.update(status="skipped", reason="--tiny on a CPU: torch.compile's C++ compilation takes minutes there "
                                                "(pass --compile-on-cpu to run it anyway); the eager rows are in 'sampler'")
            return
        self._sampler_rows(sec, compiled=True)

    # ------------------------------------------------------------------ VQGAN
    def section_vqgan(self, sec: dict) -> None:
        import torch

        from nnunet_promptlesion.generator.train_utils import autocast, peak_memory_mb, reset_peak_memory
        from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

        preset, size = ("tiny", 32) if self.args.tiny else ("paper", 96)
        batches = [1, 2] if self.args.tiny else [1, 4]
        torch.manual_seed(0)
        vq = VQGAN(VQGANConfig.from_preset(preset, patch_size=(size,) * 3)).to(self.dev).eval()
        sec.update(preset=preset, patch=[size] * 3, precision="bf16 autocast" if self.dev.type == "cuda" else "fp32",
                   memory_kind="torch.cuda.max_memory_allocated per call" if self.dev.type == "cuda" else
                   "process peak RSS (high-water mark since start, not per call)", rows=[])
        reps = 1 if self.args.tiny else 3
        for b in batches:
            x = torch.rand(b, 1, size, size, size, device=self.dev) * 2 - 1
            row = {"batch": b}
            with torch.no_grad(), autocast(self.dev):
                z = vq.encode_latent(x)  # warm-up (cuDNN algorithm choice, allocator)
                vq.decode_latent(z)
                for name, fn in (("encode", lambda: vq.encode_latent(x)), ("decode", lambda: vq.decode_latent(z))):
                    self.sync()
                    reset_peak_memory(self.dev)
                    base = torch.cuda.memory_allocated(self.dev) / 2**20 if self.dev.type == "cuda" else 0.0
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    self.sync()
                    row[f"{name}_seconds"] = (time.perf_counter() - t0) / reps
                    row[f"{name}_peak_mib"] = peak_memory_mb(self.dev)
                    if self.dev.type == "cuda":
                        row[f"{name}_peak_above_inputs_mib"] = row[f"{name}_peak_mib"] - base
            row["latent_shape"] = list(z.shape[1:])
            sec["rows"].append(row)
            self.save()

    # ------------------------------------------------------------------ phantom, plans, generators (shared)
    def setup(self) -> dict:
        if self.setup_state is not None:
            return self.setup_state
        import torch

        t0 = time.monotonic()
        tiny = self.args.tiny
        root = self.work / "nnunet"
        os.environ.pop("PROMPTLESION_SETTINGS", None)
        if self.args.nnunet_root:
            # an existing planned + preprocessed dataset (read; the suite's outputs go to its own folders)
            ext = Path(self.args.nnunet_root)
            os.environ.update(nnUNet_raw=str(ext / "raw"), nnUNet_preprocessed=str(ext / "preprocessed"),
                              nnUNet_results=str(root / "results"))
            hits = sorted((ext / "preprocessed").glob(f"Dataset{int(self.args.dataset):03d}_*"))
            if not hits:
                raise FileNotFoundError(f"no Dataset{int(self.args.dataset):03d}_* in {ext / 'preprocessed'}")
            pre = hits[0]
            desc = f"existing dataset {pre.name} from {ext}"
            t_ph = t_pp = time.monotonic()
        else:
            os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                              nnUNet_results=str(root / "results"))
            from nnunet_promptlesion.dataset_conversion.phantoms import write_phantom_dataset

            n_cases = self.args.phantom_cases or (5 if tiny else 10)
            preset = self.args.phantom_preset
            raw = write_phantom_dataset("abdomen", PHANTOM_ID, n_cases, seed=0, n_test=0, output_root=root / "raw",
                                        overwrite=True, preset=preset, progress=False)
            desc = f"abdomen phantom, preset {preset}, {n_cases} training cases, dataset {raw.name}"
            t_ph = time.monotonic()
            n_proc = "1" if tiny else str(min(8, os.cpu_count() or 1))
            # nnU-Net's own planning and preprocessing (its console entry point, as a user runs it)
            code = ("import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
                    "plan_and_preprocess_entry as m; sys.argv[0] = 'nnUNetv2_plan_and_preprocess'; m()")
            p = subprocess.run([sys.executable, "-c", code, "-d", str(PHANTOM_ID), "-c", "3d_fullres", "-np", n_proc,
                                "-npfp", n_proc], env=dict(os.environ), capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"nnUNetv2_plan_and_preprocess failed: {p.stdout[-2000:]} {p.stderr[-2000:]}")
            t_pp = time.monotonic()
            pre = root / "preprocessed" / raw.name
        plans = "nnUNetPlans"
        if tiny:  # the test suite's cheap plan: same preprocessed data, 3 stages of 8/16/32 features, 24x32x32 patch
            spec = importlib.util.spec_from_file_location("_tiny_plans", TINY_PLANS_FILE)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            plans = mod.write_tiny_plans(pre)
        # generators: an untrained VQGAN saved with the dataset's spacing and intensity space (identity mapping), and
        # a diffusion model trained 2 steps by promptlesion_train_diffusion (a real checkpoint with its metadata)
        from nnunet_promptlesion.cli.train_diffusion import main as train_diffusion
        from nnunet_promptlesion.generator.data import PreprocessedPatchSource
        from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig, save_vqgan

        gpreset = "tiny" if tiny else "paper"
        gsize = 24 if tiny else 96
        src = PreprocessedPatchSource(pre.name, fold=0, plans=plans)
        vq_path = root / "generator" / f"vqgan_{gpreset}.pt"
        vq_path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_vqgan(VQGAN(VQGANConfig.from_preset(gpreset, patch_size=(gsize,) * 3)), vq_path, spacing=src.spacing,
                   intensity=src.intensity, step=0, source=src.describe())
        ddir = root / "generator" / f"diffusion_{gpreset}"
        argv = ["-d", pre.name, "-f", "0", "-p", plans, "--vqgan", str(vq_path), "--preset", gpreset, "--steps", "2",
                "--eval-every", "0", "--checkpoint-every", "2", "--no-progress", "-o", str(ddir),
                "--device", str(self.dev), "--prompt-type", self.args.prompt_type, "--batch-size", "2",
                # lesion crops only: a small phantom has no lesion-free crop of the paper's 96^3
                "--healthy-fraction", "0"]
        if tiny:
            argv += ["--channels", "16", "32", "32"]
        if self.dev.type == "cpu":
            argv += ["--num-threads", str(torch.get_num_threads())]
        with contextlib.redirect_stdout(sys.stderr):
            rc = train_diffusion(argv)
        if rc != 0:
            raise RuntimeError(f"promptlesion_train_diffusion {' '.join(argv)} failed")
        root.mkdir(parents=True, exist_ok=True)
        self.setup_state = {"root": root, "pre": pre, "name": pre.name, "plans": plans, "generator_preset": gpreset,
                            "generator_patch": [gsize] * 3, "diffusion": ddir / "checkpoint_final.pt", "vqgan": vq_path,
                            "cache": None, "info": {
                                "phantom": desc,
                                "plans": plans, "phantom_seconds": round(t_ph - t0, 2),
                                "preprocess_seconds": round(t_pp - t_ph, 2),
                                "generator_seconds": round(time.monotonic() - t_pp, 2),
                                "generator": f"{gpreset} preset, {gsize}^3 patches, untrained (VQGAN initial weights, "
                                             "diffusion 2 training steps)"}}
        return self.setup_state

    def build_cache(self, sec: dict | None = None) -> dict:
        """A cache for the phantom's fold 0 through promptlesion_build_cache's code; returns its figures."""
        st = self.setup()
        from nnunet_promptlesion.cli import build_cache as bc

        tiny = self.args.tiny
        per_class = self.args.cache_per_class or (2 if tiny else 16)
        steps = self.args.synthesis_steps or (2 if tiny else 50)
        batch = 2 if tiny else 16
        out = st["root"] / "cache"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["-d", st["name"], "-f", "0", "-p", st["plans"], "--diffusion", str(st["diffusion"]),
                "--per-class", str(per_class), "--steps", str(steps), "--batch", str(batch),
                "--shard-size", str(max(per_class, batch)), "--device", str(self.dev), "--no-progress", "-o", str(out)]
        if self.dev.type == "cpu":
            argv += ["--num-threads", str(self.torch.get_num_threads())]
        try:  # the library function promptlesion_build_cache runs, where it exists; else the command's main()
            from nnunet_promptlesion.synthesis.cache_build import CacheBuildConfig, build_cache
        except ImportError:
            build_cache = None
        t0 = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):
            if build_cache is not None:
                cfg = CacheBuildConfig(**vars(bc.build_parser().parse_args(argv)))
                build_cache(cfg, save_montage=None, announce=lambda msg: None)
                via, rc = "nnunet_promptlesion.synthesis.cache_build.build_cache (no montage)", 0
            else:
                via, rc = "nnunet_promptlesion.cli.build_cache.main", bc.main(argv)
        wall = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"build_cache {' '.join(argv)} returned {rc}")
        man = json.loads((out / "manifest.json").read_text())
        n = sum(man.get("counts", {}).values())
        lb = man.get("last_build", {})
        st["cache"] = out
        return {"command": "promptlesion_build_cache " + " ".join(argv), "via": via, "samples": n, "classes": len(man.get("counts", {})),
                "sampler": f"ddim {steps}", "batch": batch, "render_seconds": round(lb.get("seconds", float("nan")), 2),
                "volumes_per_min_rendering": lb.get("volumes_per_min_rank0"),
                "command_seconds": round(wall, 2), "volumes_per_min_whole_command": 60.0 * n / wall if wall > 0 else None,
                "volume": f"one {st['generator_preset']} generator patch ({'x'.join(map(str, st['generator_patch']))} voxels)"}

    def section_cache(self, sec: dict) -> None:
        st = self.setup()
        sec["setup"] = st["info"]
        sec.update(self.build_cache(sec))

    # ------------------------------------------------------------------ training iteration time
    def section_training(self, sec: dict) -> None:
        st = self.setup()
        sec["setup"] = st["info"]
        tiny = self.args.tiny
        iters = self.args.train_iterations or (3 if tiny else 40)
        warm = 1 if tiny else 5
        if iters <= warm:
            raise ValueError(f"--train-iterations must exceed the {warm} warm-up iteration(s)")
        if st["cache"] is None:
            sec["cache_build"] = self.build_cache()
        if not self.args.nnunet_compile:
            os.environ["nnUNet_compile"] = "f"
        if self.args.n_proc_da is not None:
            os.environ["nnUNet_n_proc_DA"] = str(self.args.n_proc_da)
        elif tiny:
            os.environ["nnUNet_n_proc_DA"] = "0"
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        steps = self.args.synthesis_steps or (2 if tiny else 50)
        common = {"class_weights": "uniform"}
        arms = [("nnUNetTrainer", None),
                ("PromptLesionTrainer[diffusion_online]", {**common, "synthesizer": "diffusion_online",
                                                          "diffusion": str(st["diffusion"]), "steps": steps,
                                                          "online_batch": 2 if tiny else 8,
                                                          "ring_slots_per_class": 4 if tiny else 16,
                                                          "online_warmup_s": 600}),
                ("PromptLesionTrainer[diffusion_cache]", {**common, "synthesizer": "diffusion_cache", "cache": str(st["cache"])}),
                ("PromptLesionTrainer[rule_based]", {**common, "synthesizer": "rule_based"})]
        from nnunet_promptlesion.synthesis.sources import registered_settings

        if "baseline_iterations" in registered_settings():
            # the online source can pause rendering for its first iterations (its own no-rendering baseline);
            # here every timed iteration must run with the producer rendering, as in a long training
            arms[1][1]["baseline_iterations"] = 0
        sec.update(iterations=iters, warmup_iterations=warm, timed_iterations=iters - warm,
                   plans=st["plans"], nnunet_compile=bool(self.args.nnunet_compile),
                   n_proc_DA=get_allowed_n_proc_DA(), online_sampler=f"ddim {steps}", arms={}, skipped_arms={},
                   iteration_time="wall time of next(dataloader) + train_step (its loss .cpu() synchronises), "
                                  "after the warm-up iterations; ratio = median / nnUNetTrainer's median")
        last_cost = None
        for name, settings in arms:
            proj = last_cost * (1.5 if settings else 1.0) if last_cost else 0.0
            if proj > self.budget.left():
                sec["skipped_arms"][name] = f"projected {proj:.0f} s > {max(self.budget.left(), 0):.0f} s left"
                continue
            t0 = time.monotonic()
            try:
                sec["arms"][name] = self._train_arm(name, settings, st, iters, warm)
            except Exception as e:  # noqa: BLE001 - one arm failing leaves the others' figures
                sec["arms"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            gc.collect()  # the trainer (network, optimizer, loaders) goes before the next one is built
            if self.dev.type == "cuda":
                self.torch.cuda.empty_cache()
            last_cost = time.monotonic() - t0
            self.save()
        ref = sec["arms"].get("nnUNetTrainer", {}).get("median_iteration_s")
        for name, r in sec["arms"].items():
            if "median_iteration_s" in r and ref:
                r["ratio_to_nnUNetTrainer"] = r["median_iteration_s"] / ref
        bad = [n for n, r in sec["arms"].items() if "error" in r]
        if bad:
            sec.update(status="failed", error="arm(s) failed: " + "; ".join(f"{n}: {sec['arms'][n]['error']}" for n in bad))
        sec["goal"] = "diffusion_online iteration time <= 1.3 x nnUNetTrainer (on a GPU, paper generator, DDIM-50)"

    def _train_arm(self, name: str, settings: dict | None, st: dict, iters: int, warm: int) -> dict:
        import torch
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer

        os.environ.pop("PROMPTLESION_SETTINGS", None)
        cls = nnUNetTrainer
        if settings is not None:
            sfile = st["root"] / f"settings_{_slug(name)}.json"
            sfile.write_text(json.dumps(settings))
            os.environ["PROMPTLESION_SETTINGS"] = str(sfile)
            cls = PromptLesionTrainer
        plans = load_json(str(st["pre"] / f"{st['plans']}.json"))
        plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args sets for a new run
        times, losses = [], []
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's console chatter; our summary stays on stdout
            t = cls(plans, "3d_fullres", 0, load_json(str(st["pre"] / "dataset.json")), device=self.dev)
            t.num_iterations_per_epoch = iters
            t0 = time.monotonic()
            try:
                t.on_train_start()
                startup = time.monotonic() - t0
                t.on_epoch_start()
                t.on_train_epoch_start()
                for _ in range(iters):
                    a = time.perf_counter()
                    out = t.train_step(next(t.dataloader_train))
                    self.sync()
                    times.append(time.perf_counter() - a)
                    losses.append(float(out["loss"]))
                stats = t.promptlesion_epoch_summary() if isinstance(t, PromptLesionTrainer) else None
            except BaseException:
                with contextlib.suppress(Exception):  # clean up (loader workers, producer), keep the first error
                    t.on_train_end()
                raise
            else:
                t.on_train_end()  # saves checkpoint_final, stops loader workers (and the source's producer)
            finally:
                os.environ.pop("PROMPTLESION_SETTINGS", None)
        timed = times[warm:]
        r = {"trainer": cls.__name__, "settings": settings, "startup_s": round(startup, 2),
             "median_iteration_s": statistics.median(timed), "mean_iteration_s": statistics.fmean(timed),
             "min_iteration_s": min(timed), "max_iteration_s": max(timed), "timed_iterations": len(timed),
             "warmup_iteration_s": [round(x, 4) for x in times[:warm]], "batch_size": t.batch_size,
             "patch_size": list(t.configuration_manager.patch_size), "losses_finite": all(map(math.isfinite, losses))}
        if stats is not None:
            r["promptlesion_stats"] = stats
        return r


# ---------------------------------------------------------------------------------------------- helpers
def _command_line() -> str:
    import shlex

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path(__file__)
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _have(mod: str) -> bool:
    """Whether ``mod`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str):
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return "importable (version unknown)" if _have(mod) else None


def _nvidia_driver():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        return subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _parse_junit(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    out = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        rec = {"name": f"{tc.get('classname', '')}::{tc.get('name')}", "seconds": float(tc.get("time", 0) or 0),
               "outcome": "passed"}
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                rec["outcome"] = {"failure": "failed"}.get(tag, tag)
                rec["message"] = (el.get("message") or el.text or "")[:500]
        out.append(rec)
    return out


def summary_figures(name: str, sec: dict) -> dict:
    """The few figures of a section printed on the console line."""
    if name == "env":
        return {"torch": sec.get("versions", {}).get("torch"), "cuda": sec.get("versions", {}).get("cuda_runtime"),
                "sdpa": sec.get("sdpa_backends"), "matmul_tflops": _r(sec.get("matmul_tflops", {}).get("tflops"))}
    if name == "cuda_tests":
        return sec.get("counts", {})
    if name.startswith("sampler"):
        return {f"g{r['guidance']:g}_b{r['batch']}": {"ddpm400_vpm": _r(r["ddpm400_volumes_per_min"]),
                                                      "ddim50_vpm": _r(r["ddim50_volumes_per_min"]),
                                                      "tflops": _r(r["tflops_achieved"])} for r in sec.get("rows", [])}
    if name == "vqgan":
        return {f"b{r['batch']}": {k: _r(v) for k, v in r.items() if k.endswith(("seconds", "peak_mib"))}
                for r in sec.get("rows", [])}
    if name == "cache" and "samples" in sec:
        return {k: _r(sec.get(k)) for k in ("samples", "volumes_per_min_rendering", "volumes_per_min_whole_command")}
    if name == "training":
        return {n: {"median_s": _r(r.get("median_iteration_s")), "ratio": _r(r.get("ratio_to_nnUNetTrainer"))}
                for n, r in sec.get("arms", {}).items()}
    return {}


def _r(v, nd=4):
    return float(f"{v:.{nd}g}") if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else v


# ---------------------------------------------------------------------------------------------- markdown
def render_markdown(res: dict) -> str:
    L = [f"# GPU suite: {res['device_name']} ({res['mode']})", "",
         f"- command: `{res['command']}`",
         f"- date (UTC): {res['date_utc']}; elapsed {res['elapsed_s']:.0f} s of a {res['budget_min']:g}-minute budget",
         f"- device: {res['device']} = {res['device_name']}; dense bf16 peak used for % of peak: "
         f"{_fmt(res['peak_bf16_tflops']) if res['peak_bf16_tflops'] else 'unknown'} TFLOP/s",
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
        L += _md_section(name, sec)
        L.append("")
    return "\n".join(L) + "\n"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def _md_section(name: str, sec: dict) -> list[str]:
    L: list[str] = []
    if name == "env":
        for key in ("versions", "device", "sdpa_flags", "sdpa_backends", "matmul_tflops"):
            if key in sec:
                L.append(f"- {key}: " + ", ".join(f"{k} = {_fmt(x)}" for k, x in sec[key].items()))
        L.append(f"- fused SDPA kernel available: {sec.get('fused_sdpa_available')}")
        L.append(f"- missing packages: {', '.join(sec.get('missing_packages', [])) or 'none'}")
    elif name == "cuda_tests":
        if sec.get("command"):
            L.append(f"`{sec['command']}`")
            L.append("")
        L += _md_table(["test", "outcome", "s", "message"],
                       [[t["name"], t["outcome"], t["seconds"], t.get("message", "")[:150]] for t in sec.get("tests", [])])
    elif name.startswith("sampler"):
        if "preset" in sec:
            L.append(f"Preset {sec['preset']}, patch {'x'.join(map(str, sec['patch']))}, denoiser {sec['dtype']}, "
                     f"{sec['prompt_type']} prompt, {sec['parameters'] / 1e6:.2f}M parameters, compile "
                     f"{sec['compile']}. {sec['extrapolation']}. Paper: 3.1 vol/min DDPM-400 on a V100.")
            L.append("")
        L += _md_table(["guidance", "batch", "per step s", "fixed s", "DDPM-400 vol/min", "DDIM-50 vol/min",
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
    elif name == "vqgan":
        if "preset" in sec:
            L.append(f"Preset {sec['preset']}, patch {'x'.join(map(str, sec['patch']))}, {sec['precision']}; memory: "
                     f"{sec['memory_kind']}.")
            L.append("")
        L += _md_table(["batch", "encode s", "decode s", "encode peak MiB", "decode peak MiB", "latent"],
                       [[r["batch"], r["encode_seconds"], r["decode_seconds"], r["encode_peak_mib"], r["decode_peak_mib"],
                         "x".join(map(str, r["latent_shape"]))] for r in sec.get("rows", [])])
    elif name == "cache":
        if "samples" in sec:
            L.append(f"Phantom: {sec['setup']['phantom']}; generator: {sec['setup']['generator']}; set-up: phantom "
                     f"{sec['setup']['phantom_seconds']} s, nnU-Net preprocessing {sec['setup']['preprocess_seconds']} s, "
                     f"generators {sec['setup']['generator_seconds']} s.")
            L.append("")
            L.append(f"`{sec['command']}` (run in-process through `{sec.get('via')}`)")
            L.append("")
            L += _md_table(["samples", "classes", "sampler", "batch", "render s", "vol/min (rendering)",
                            "command s", "vol/min (whole command)"],
                           [[sec["samples"], sec["classes"], sec["sampler"], sec["batch"], sec["render_seconds"],
                             sec["volumes_per_min_rendering"], sec["command_seconds"],
                             sec["volumes_per_min_whole_command"]]])
            L.append(f"\nA volume is {sec['volume']}.")
    elif name == "training":
        if "iterations" in sec:
            L.append(f"{sec['iterations']} iterations per trainer ({sec['warmup_iterations']} warm-up), plans "
                     f"{sec['plans']}, nnU-Net compile {sec['nnunet_compile']}, nnUNet_n_proc_DA {sec['n_proc_DA']}, "
                     f"online sampler {sec['online_sampler']}. Iteration time: {sec['iteration_time']}.")
            L.append("")
        rows = []
        for n, r in sec.get("arms", {}).items():
            if "error" in r:
                rows.append([n, "failed", "", "", "", "", r["error"][:120]])
                continue
            extra = ""
            src = (r.get("promptlesion_stats") or {}).get("source") or {}
            if "rendered" in src:
                extra = f"online: rendered {src['rendered']}, draws {src['draws']}, reuse {_fmt(src['reuse_rate'])}"
            rows.append([n, r["median_iteration_s"], r["mean_iteration_s"], r["timed_iterations"], r["startup_s"],
                         r.get("ratio_to_nnUNetTrainer"), extra])
        L += _md_table(["trainer", "median s/it", "mean s/it", "timed its", "start-up s", "ratio to nnUNetTrainer",
                        "notes"], rows)
        for n, why in sec.get("skipped_arms", {}).items():
            L.append(f"- not run: {n}: {why}")
        if "goal" in sec:
            L.append(f"\nGoal: {sec['goal']}.")
    return L


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    import torch

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


if __name__ == "__main__":
    raise SystemExit(main())
