"""A cap on torch's CPU threads for the nnU-Net commands the experiment runner starts side by side.

nnU-Net's train and predict entry points call ``torch.set_num_threads(multiprocessing.cpu_count())`` when they
run on the CPU. Two such processes next to each other (runner ``"jobs": 2``) then run twice as many compute
threads as there are cores, and every parallel region waits for a thread that is not scheduled. With
``PROMPTLESION_TORCH_THREADS=N`` in the environment, :func:`cap_torch_threads` (called by the runner's entry
points :mod:`.nnunet_train` and :mod:`.nnunet_predict` before nnU-Net's) caps that call at N threads. The runner
sets it to ``cores // jobs`` for CPU experiments with jobs > 1 (measured in BENCHMARKS.md, "Parallel runs").
"""
from __future__ import annotations

import os

import torch

from ..utils.env_names import ENV_TORCH_THREADS


def torch_threads_cap() -> int | None:
    """The cap from the environment (None: not set); a value that is not a positive integer is an error."""
    v = os.environ.get(ENV_TORCH_THREADS, "").strip()
    if not v:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise SystemExit(f"environment variable {ENV_TORCH_THREADS}={v!r} must be a positive integer")
    return n


def cap_torch_threads() -> None:
    """Cap torch's intra-op threads, including later ``torch.set_num_threads`` calls (nnU-Net's), at the limit."""
    cap = torch_threads_cap()
    if cap is None:
        return
    set_num_threads = torch.set_num_threads

    def capped(n: int) -> None:
        set_num_threads(max(1, min(int(n), cap)))

    torch.set_num_threads = capped
    capped(cap)
