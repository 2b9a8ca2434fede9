"""What a process of the test suite pays before doing any work, and what nnU-Net's progress plot costs per epoch
(BENCHMARKS.md, "Session 22"). Each import is timed in a fresh interpreter (user + sys CPU seconds of that
child); the plot is timed in this process, for a 4-epoch log, a few times.

    .venv/bin/python benchmarks/bench_startup.py            # about a minute on a 2-core machine
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

IMPORTS = {
    "python (no imports)": "pass",
    "import torch": "import torch",
    "nnU-Net's trainer": "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer",
    "import monai": "import monai",
    "trainer + monai": "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer; import monai",
    "PromptLesionTrainer": "import nnunet_promptlesion.trainers.promptlesion_trainer",
}


def child_cpu(code: str) -> float:
    """User + sys CPU seconds of a fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", code], check=True, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def plot_seconds(repeats: int = 3) -> list[float]:
    """CPU seconds of nnU-Net's LocalLogger.plot_progress_png for a 4-epoch, 3-class log."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    log = LocalLogger()
    for e in range(4):
        for k in ("mean_fg_dice", "ema_fg_dice", "train_losses", "val_losses", "lrs", "epoch_start_timestamps",
                  "epoch_end_timestamps"):
            log.log(k, 0.1 * e, e)
        log.log("dice_per_class_or_region", [0.1, 0.2, 0.3], e)
    out = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            t0 = time.process_time()
            log.plot_progress_png(d)
            out.append(time.process_time() - t0)
    return out


def main() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print(f"{os.cpu_count()} cores, python {sys.version.split()[0]}")
    for name, code in IMPORTS.items():
        child_cpu(code)   # warm the file cache once; the second run is the figure
        print(f"{name:>22}: {child_cpu(code):5.1f} CPU-s")
    print("nnU-Net progress.png (4 epochs): " + ", ".join(f"{s:.2f}" for s in plot_seconds()) + " CPU-s")


if __name__ == "__main__":
    main()
