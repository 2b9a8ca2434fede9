"""Section ``vqgan``: VQGAN encode / decode time and peak memory at 96^3, batch 1 and 4."""
from __future__ import annotations

import time

import torch

from .common import md_table, sig


def run(suite, sec: dict) -> None:
    # monai (through the package's generator modules): imported only when the section runs, see sampler.py
    from nnunet_promptlesion.generator.train_utils import autocast, peak_memory_mb, reset_peak_memory
    from nnunet_promptlesion.generator.vqgan import VQGAN, VQGANConfig

    preset, size = ("tiny", 32) if suite.args.tiny else ("paper", 96)
    batches = [1, 2] if suite.args.tiny else [1, 4]
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig.from_preset(preset, patch_size=(size,) * 3)).to(suite.dev).eval()
    sec.update(preset=preset, patch=[size] * 3, precision="bf16 autocast" if suite.dev.type == "cuda" else "fp32",
               memory_kind="torch.cuda.max_memory_allocated per call" if suite.dev.type == "cuda" else
               "process peak RSS (high-water mark since start, not per call)", rows=[])
    reps = 1 if suite.args.tiny else 3
    for b in batches:
        x = torch.rand(b, 1, size, size, size, device=suite.dev) * 2 - 1
        row = {"batch": b}
        with torch.no_grad(), autocast(suite.dev):
            z = vq.encode_latent(x)  # warm-up (cuDNN algorithm choice, allocator)
            vq.decode_latent(z)
            for name, fn in (("encode", lambda: vq.encode_latent(x)), ("decode", lambda: vq.decode_latent(z))):
                suite.sync()
                reset_peak_memory(suite.dev)
                base = torch.cuda.memory_allocated(suite.dev) / 2**20 if suite.dev.type == "cuda" else 0.0
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                suite.sync()
                row[f"{name}_seconds"] = (time.perf_counter() - t0) / reps
                row[f"{name}_peak_mib"] = peak_memory_mb(suite.dev)
                if suite.dev.type == "cuda":
                    row[f"{name}_peak_above_inputs_mib"] = row[f"{name}_peak_mib"] - base
        row["latent_shape"] = list(z.shape[1:])
        sec["rows"].append(row)
        suite.save()


def summary(sec: dict) -> dict:
    return {f"b{r['batch']}": {k: sig(v) for k, v in r.items() if k.endswith(("seconds", "peak_mib"))}
            for r in sec.get("rows", [])}


def markdown(sec: dict) -> list[str]:
    L: list[str] = []
    if "preset" in sec:
        L.append(f"Preset {sec['preset']}, patch {'x'.join(map(str, sec['patch']))}, {sec['precision']}; memory: "
                 f"{sec['memory_kind']}.")
        L.append("")
    L += md_table(["batch", "encode s", "decode s", "encode peak MiB", "decode peak MiB", "latent"],
                  [[r["batch"], r["encode_seconds"], r["decode_seconds"], r["encode_peak_mib"], r["decode_peak_mib"],
                    "x".join(map(str, r["latent_shape"]))] for r in sec.get("rows", [])])
    return L
