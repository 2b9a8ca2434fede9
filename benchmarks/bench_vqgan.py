"""VQGAN training-step benchmark: steps/s and peak memory per preset.

Each configuration runs in a fresh process (the CPU peak is the process' peak resident set size from
``getrusage``, which never goes down); on CUDA the peak is ``torch.cuda.max_memory_allocated``.
A step is the full training step of ``promptlesion_train_vqgan`` (generator + discriminator updates with
the adversarial terms active, weight-free perceptual term) on random CT-like patches.

    python benchmarks/bench_vqgan.py                      # tiny + paper on CPU, writes benchmarks/results/vqgan.json
    python benchmarks/bench_vqgan.py --device cuda        # adds paper at batch 4 on the GPU
    python benchmarks/bench_vqgan.py --one tiny --batch 2 --steps 10 --device cpu   # a single configuration
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_one(preset: str, batch: int, steps: int, warmup: int, device: str, threads: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from scipy.ndimage import gaussian_filter

    from nnunet_promptlesion.generator.data import CaseArrays, PatchSource
    from nnunet_promptlesion.generator.intensity import IntensitySpace
    from nnunet_promptlesion.generator.train_utils import peak_memory_mb, reset_peak_memory
    from nnunet_promptlesion.generator.vqgan import VQGANConfig
    from nnunet_promptlesion.generator.vqgan.train import VQGANRunConfig, VQGANTrainer

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    class RandomCT(PatchSource):
        """Smooth random 'CT' cases in HU (only the patch statistics matter for timing)."""
        def __init__(self, shape):
            super().__init__()
            self.case_ids, self.spacing, self.intensity, self.shape = ["a", "b"], (1.0, 1.0, 1.0), IntensitySpace.hu_window(), shape

        def _load_case(self, cid):
            rng = np.random.default_rng(len(cid))
            img = gaussian_filter(rng.normal(0, 1, self.shape), 2).astype(np.float32) * 600
            return CaseArrays(image=img[None], seg=None, class_locations={})

        def describe(self):
            return {"type": "random"}

    cfg = VQGANConfig.from_preset(preset, disc_start=0)
    src = RandomCT(tuple(p + 8 for p in cfg.patch_size))
    run = VQGANRunConfig(max_steps=10**9, batch_size=batch, device=device, progress=False, save_png=False,
                         num_eval_patches=1)
    with tempfile.TemporaryDirectory() as tmp:
        tr = VQGANTrainer(cfg, run, src, None, tmp, resume=False)
        dev = tr.device
        n = tr.model.num_parameters()
        nd = sum(p.numel() for p in tr.discs.parameters())
        rng = np.random.default_rng(0)
        xs = [torch.from_numpy(np.stack([src.random_patch(rng, cfg.patch_size).image for _ in range(batch)])).to(dev)
              for _ in range(2)]
        for i in range(warmup):
            tr.train_step(xs[i % 2])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        reset_peak_memory(dev)
        t = time.perf_counter()
        for i in range(steps):
            tr.train_step(xs[i % 2])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        with torch.no_grad():
            z = tr.model.encode_latent(xs[0][:1])
    return {
        "preset": preset, "device": str(dev), "batch": batch, "patch": list(cfg.patch_size), "threads": threads,
        "steps_timed": steps, "s_per_step": dt / steps, "steps_per_s": steps / dt,
        "peak_memory_mb": peak_memory_mb(dev), "memory_kind": "cuda_max_allocated" if dev.type == "cuda" else "process_peak_rss",
        "rss_after_imports_mb": rss_before,
        "params_encoder": n["encoder"], "params_decoder": n["decoder"], "codebook_entries": n["codebook"],
        "params_discriminators": nd, "latent_shape": list(z.shape[1:]),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", choices=["tiny", "paper"], help="run a single configuration in this process")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vqgan.json"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one, a.batch, a.steps, a.warmup, a.device, a.threads)))
        return 0
    configs = [("tiny", 2, 20, 2, "cpu"), ("paper", 1, 3, 1, "cpu")]
    if a.device == "cuda":
        configs += [("paper", 4, 20, 3, "cuda")]
    results = []
    for preset, batch, steps, warm, dev in configs:
        cmd = [sys.executable, __file__, "--one", preset, "--batch", str(batch), "--steps", str(steps),
               "--warmup", str(warm), "--device", dev, "--threads", str(a.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(res))
        results.append(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
