"""Section ``env``: torch / CUDA / cuDNN versions, device name and memory, bf16 support, which scaled-dot-product
attention backends accept this package's attention shapes, a dense matmul ceiling, and the missing packages."""
from __future__ import annotations

import platform
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import REQUIRED, fmt, have, nvidia_driver, sig, version_of


def run(suite, sec: dict) -> None:
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "cuda_available": torch.cuda.is_available()}
    for mod in ("nnunet_promptlesion", "nnunetv2", "monai", "numpy", "triton"):
        v[mod] = version_of(mod)
    sec["versions"] = v
    suite.res["versions"] = v
    sec["missing_packages"] = sorted(REQUIRED[m] for m in REQUIRED if not have(m))
    if suite.dev.type == "cuda":
        p = torch.cuda.get_device_properties(suite.dev)
        sec["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                         "multiprocessors": p.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported(),
                         "driver": nvidia_driver()}
        sec["sdpa_flags"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                             "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                             "math": torch.backends.cuda.math_sdp_enabled(),
                             "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()}
    else:
        sec["device"] = {"name": suite.device_name, "bf16_supported": "cpu (bf16 convolutions are slow; the package "
                                                                    "runs fp32 on CPUs)", "threads": torch.get_num_threads()}
    # which SDPA backends accept this package's attention call (B, heads, tokens, head_dim) in its dtype
    dtype = torch.bfloat16 if suite.dev.type == "cuda" else torch.float32
    tokens = 6 ** 3 if suite.args.tiny else 6 ** 3 * 8
    q = torch.randn(2, 4, tokens, 32 if suite.args.tiny else 64, device=suite.dev, dtype=dtype)
    probes = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        be = getattr(SDPBackend, name, None)
        if be is None:
            probes[name.lower()] = "not in this torch"
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel([be]):
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, q, q)
            suite.sync()
            probes[name.lower()] = "ok"
        except Exception as e:  # noqa: BLE001
            probes[name.lower()] = f"refused ({str(e).splitlines()[0][:120]})"
    sec["sdpa_backends"] = probes
    sec["fused_sdpa_available"] = any(probes.get(k) == "ok" for k in ("flash_attention", "efficient_attention",
                                                                       "cudnn_attention"))
    # a dense matmul ceiling for this dtype, to read the % of peak against
    n = 8192 if suite.dev.type == "cuda" else 512
    a = torch.randn(n, n, device=suite.dev, dtype=dtype)
    for _ in range(2):
        a @ a
    suite.sync()
    reps = 10 if suite.dev.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    suite.sync()
    dt = (time.perf_counter() - t0) / reps
    sec["matmul_tflops"] = {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops": 2 * n ** 3 / dt / 1e12}
    sec["peak_bf16_tflops"] = suite.peak_tflops if suite.peak_tflops else "unknown"


def summary(sec: dict) -> dict:
    return {"torch": sec.get("versions", {}).get("torch"), "cuda": sec.get("versions", {}).get("cuda_runtime"),
            "sdpa": sec.get("sdpa_backends"), "matmul_tflops": sig(sec.get("matmul_tflops", {}).get("tflops"))}


def markdown(sec: dict) -> list[str]:
    L: list[str] = []
    for key in ("versions", "device", "sdpa_flags", "sdpa_backends", "matmul_tflops"):
        if key in sec:
            L.append(f"- {key}: " + ", ".join(f"{k} = {fmt(x)}" for k, x in sec[key].items()))
    L.append(f"- fused SDPA kernel available: {sec.get('fused_sdpa_available')}")
    L.append(f"- missing packages: {', '.join(sec.get('missing_packages', [])) or 'none'}")
    return L
