"""Sampler names and the default sampler / step count: one place, importable without torch.

Every caller that names a sampler (the online source's settings, ``promptlesion_build_cache``,
``promptlesion_synthesize``, ``promptlesion_pretrain``'s cache step, the renderer) takes its choices and defaults
from here, so changing the default is one line. ``steps`` counts denoiser evaluations for ``ddim``, ``dpmpp`` and
``unipc``; ``ddpm`` always runs all T steps of the schedule and ignores it.
"""
from __future__ import annotations

SOLVERS = ("dpmpp", "unipc")
SAMPLERS = ("ddpm", "ddim") + SOLVERS
#: Chosen by measurement (BENCHMARKS.md "Generator recipe", the demo's cpu2d generator, 120 lesions per sampler):
#: the fastest sampler whose FD to the real lesions is within the real/real floor (14.2) of DDPM-400's (24.0).
#: DDIM-20: FD 25.8, 0.070 CPU s per lesion; DDIM-50 27.2, 0.103 s; DDPM-400 0.446 s. DPM-Solver++ 10 tied on time
#: (0.071 s, FD 26.1) but overshot the calcified plaques' HU (1004 vs 820 real; DDIM-20: 916).
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 20

SAMPLER_HELP = (f"reverse sampler: {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER}); ddim/dpmpp/unipc take --steps "
                "model evaluations, ddpm runs all T steps")
STEPS_HELP = f"model evaluations for ddim/dpmpp/unipc (default {DEFAULT_STEPS}); ignored by ddpm (all T steps)"


def check_sampler(sampler: str, steps) -> None:
    """Raise ValueError for an unknown sampler or a step count < 1 (``steps`` is not read for ddpm)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}', choose one of {list(SAMPLERS)}")
    if sampler != "ddpm" and (steps is None or int(steps) < 1):
        raise ValueError(f"sampler '{sampler}' needs steps >= 1 (model evaluations), got {steps}")


def sampler_steps(sampler: str, steps):
    """The step count to pass to ``samplers.sample``: None for ddpm (all T steps), else ``int(steps)``."""
    return None if sampler == "ddpm" else int(steps)
