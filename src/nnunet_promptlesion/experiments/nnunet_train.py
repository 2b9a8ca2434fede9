"""``nnUNetv2_train`` as the experiment runner starts it: nnU-Net's own entry point, plus one switch.

``python -m nnunet_promptlesion.experiments.nnunet_train <nnUNetv2_train arguments>`` runs
``nnunetv2.run.run_training.run_training_entry`` unchanged, except that with
``PROMPTLESION_FINAL_VALIDATION=0`` nnU-Net's final validation (``perform_actual_validation``, which
re-predicts the fold's validation cases after training) is skipped with one log line.

Why: a scarcity fold derived from base fold "all" validates on its own training cases (nnU-Net's fold-"all"
convention), so that prediction measures nothing, yet on a 2-core CPU it costs minutes per training (and
nnU-Net's export pool spawns ``nnUNet_def_n_proc`` workers of ~1 GB each). The experiment evaluates held-out
test cases instead. Budget key ``"final_validation": false`` sets the variable; by default it runs as usual.
Training, checkpoints and checkpoint selection are untouched: the switch acts after ``run_training``.
With ``PROMPTLESION_TORCH_THREADS`` set, torch's CPU threads are capped (see :mod:`.torch_threads`).
"""
from __future__ import annotations

import os
import sys

from nnunetv2.run.run_training import run_training_entry
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..utils.env_names import ENV_FINAL_VALIDATION
from .torch_threads import cap_torch_threads


def final_validation_enabled() -> bool:
    return os.environ.get(ENV_FINAL_VALIDATION, "1").strip().lower() not in ("0", "false", "no", "off")


def _skip_final_validation() -> None:
    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file(f"final validation skipped ({ENV_FINAL_VALIDATION}=0): the experiment evaluates its "
                               "held-out test cases instead", also_print_to_console=True)

    # Trainers that override the method and call super() (the demo variants) reach this one too.
    nnUNetTrainer.perform_actual_validation = perform_actual_validation


def main() -> None:
    cap_torch_threads()
    if not final_validation_enabled():
        _skip_final_validation()
    sys.argv[0] = "nnUNetv2_train"
    sys.exit(run_training_entry())


if __name__ == "__main__":
    main()
