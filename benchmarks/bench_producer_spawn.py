"""How long a spawned child takes to start under nnUNetv2_train, with and without re-running its main module.

The online producer is a "spawn" child. By default such a child first re-imports the parent's main module; under
``nnUNetv2_train`` that is nnU-Net's console script, i.e. all of nnU-Net's training code. This script imports
what that console script imports, then starts a child whose target (``torch.get_num_threads``, pickled by
reference) makes it import torch, as the producer does, and times start -> exit, alternating the default start
and ``spawn_without_main`` (what the producer uses).

    python benchmarks/bench_producer_spawn.py [--repeats 3]
"""
import argparse
import multiprocessing as mp
import time

import torch
from nnunetv2.run.run_training import run_training_entry  # noqa: F401  (what nnUNetv2_train's script imports)

from nnunet_promptlesion.utils.lifetime import spawn_without_main


def child_seconds(hide: bool) -> float:
    p = mp.get_context("spawn").Process(target=torch.get_num_threads)
    t0 = time.perf_counter()
    if hide:
        with spawn_without_main():
            p.start()
    else:
        p.start()
    p.join()
    assert p.exitcode == 0, p.exitcode
    return time.perf_counter() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    n = ap.parse_args().repeats
    default, hidden = [], []
    for _ in range(n):
        default.append(child_seconds(False))
        hidden.append(child_seconds(True))
    print(f"spawned child start -> exit, {n} each, alternating: default {min(default):.1f}-{max(default):.1f} s, "
          f"spawn_without_main {min(hidden):.1f}-{max(hidden):.1f} s, ratio of medians "
          f"{sorted(default)[n // 2] / sorted(hidden)[n // 2]:.1f}x")
