"""Every GPU number of the package in one command, inside a time budget: ``python benchmarks/gpu_suite.py``.

The command only; the suite lives in ``benchmarks/gpu_suite_parts/`` (its ``__init__`` documents the sections,
the extrapolation and the results files; ``--help`` prints the same). Runs from a copy of the repository without
an install: the package makes ``src/`` importable for itself and its child processes.

    python benchmarks/gpu_suite.py                          # CUDA machine, 7-minute budget
    python benchmarks/gpu_suite.py --tiny --device cpu --out /tmp/gpu_suite   # the CPU check of tests/test_gpu_suite.py
"""
from __future__ import annotations

from gpu_suite_parts.suite import main   # this folder is sys.path[0] when the file runs as a script

if __name__ == "__main__":
    raise SystemExit(main())
