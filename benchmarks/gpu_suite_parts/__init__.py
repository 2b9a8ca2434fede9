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

Code: ``benchmarks/gpu_suite.py`` is the command; this package holds the suite (:mod:`.suite`: budget, results,
command line), one module per section (:mod:`.env`, :mod:`.cuda_tests`, :mod:`.sampler` (both sampler sections),
:mod:`.cache`, :mod:`.training`, :mod:`.vqgan`), the phantom, plans and generators the cache and training sections
share (:mod:`.phantom`) and small helpers (:mod:`.common`). Each section module has ``run(suite, sec)``, the few
figures of its console line (``summary(sec)``) and its markdown (``markdown(sec)``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parent.parent
_SRC = _BENCHMARKS.parent / "src"
try:  # run from a source tree without an install (a bare GPU machine): the package lives in src/
    import nnunet_promptlesion  # noqa: F401
except ImportError:
    sys.path.insert(0, str(_SRC))
    # the children (pytest, nnU-Net's preprocessing, the online producer) import it too
    os.environ["PYTHONPATH"] = os.pathsep.join([str(_SRC)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
if str(_BENCHMARKS) not in sys.path:   # bench_diffusion, beside this folder (shared model building and timing)
    sys.path.insert(0, str(_BENCHMARKS))
