"""Early stopping on nnU-Net's EMA pseudo-Dice, plus the experiment runner's per-run controls.

The PromptLesion paper stops segmentation training once validation Dice has not improved for 25 epochs.
nnU-Net already tracks the quantity to watch: after every epoch its logger appends ``ema_fg_dice`` (an
exponential moving average, weight 0.1, of the mean foreground pseudo-Dice on the validation batches) and
the trainer writes ``checkpoint_best.pth`` whenever that value strictly improves. :class:`EarlyStoppingMixin`
stops the run once the best value is ``patience`` epochs old; ``checkpoint_best.pth`` then holds the model to
evaluate (``nnUNetv2_predict -chk checkpoint_best.pth``, ``nnUNetv2_train ... --val_best``).

Patience, first match wins:
  1. environment variable ``PROMPTLESION_EARLY_STOPPING_PATIENCE`` (an integer; 0 or "none" switches it off);
  2. key ``"early_stopping_patience"`` in the PromptLesion settings file (``PROMPTLESION_SETTINGS`` or
     ``$nnUNet_preprocessed/DatasetXXX/promptlesion_settings.json``), read by the plain nnU-Net twin
     ``nnUNetTrainer_earlyStopping`` too, so a baseline and a PromptLesion arm follow the same rule;
  3. off.

Because the state lives in nnU-Net's logger (saved in every checkpoint), ``--c`` resumes the count, and a run
that stopped early stays stopped when continued. Checkpoints are written atomically (:mod:`.checkpointing`), so
``--c`` works after a kill at any moment, a kill during a checkpoint save included.

The same mixin reads the experiment runner's controls (environment variables, all optional; they override a
trainer variant's built-in budget, so set them only when you mean it):
  PROMPTLESION_NUM_EPOCHS, PROMPTLESION_NUM_ITERATIONS_PER_EPOCH, PROMPTLESION_NUM_VAL_ITERATIONS_PER_EPOCH
      nnU-Net's num_epochs / num_iterations_per_epoch / num_val_iterations_per_epoch;
  PROMPTLESION_SAVE_EVERY   checkpoint_latest.pth every N epochs (nnU-Net: 50), so a killed run loses little;
  PROMPTLESION_SEED         seeds Python, NumPy and torch before the network is built (independent repeats);
  PROMPTLESION_MIRRORING    "0" switches off mirroring augmentation and mirrored test-time augmentation
                            (as nnUNetTrainerNoMirroring; 8x cheaper validation on a CPU).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..utils.atomic import write_json_atomic
from ..utils.env_names import (ENV_EPOCHS, ENV_ITERATIONS, ENV_MIRRORING, ENV_PATIENCE, ENV_SAVE_EVERY, ENV_SEED,
                               ENV_VAL_ITERATIONS)
from .checkpointing import AtomicCheckpointMixin
from .progress_plot import ThrottledProgressPlotMixin
from .settings import SETTINGS_ENV, SETTINGS_FILENAME

CONTROL_ENV_VARS = (ENV_PATIENCE, ENV_EPOCHS, ENV_ITERATIONS, ENV_VAL_ITERATIONS, ENV_SAVE_EVERY, ENV_SEED,
                    ENV_MIRRORING)
SETTINGS_KEY = "early_stopping_patience"
#: written into the fold folder when early stopping ends a run
STOP_RECORD = "early_stopping.json"


class EarlyStoppingConfigError(ValueError):
    pass


def epochs_since_best(ema: Sequence[float]) -> tuple[int, int | None]:
    """(epochs since the best value, index of the best epoch) of an EMA pseudo-Dice history.

    The best epoch is the first one reaching the maximum, as nnU-Net only replaces checkpoint_best.pth on a
    strict improvement. NaN entries never count as best; an all-NaN history has no best epoch.
    """
    vals = np.asarray([np.nan if v is None else float(v) for v in ema], dtype=float)
    if vals.size == 0 or not np.isfinite(vals).any():
        return int(vals.size), None
    best = int(np.nanargmax(np.where(np.isfinite(vals), vals, -np.inf)))
    return int(vals.size - 1 - best), best


def _env_int(name: str, minimum: int) -> int | None:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    try:
        n = int(v)
    except ValueError:
        raise EarlyStoppingConfigError(f"environment variable {name}={v!r} must be an integer") from None
    if n < minimum:
        raise EarlyStoppingConfigError(f"environment variable {name}={n} must be >= {minimum}")
    return n


def resolve_patience(preprocessed_dataset_folder_base: str | os.PathLike) -> tuple[int | None, str]:
    """(patience in epochs or None for off, where it came from), following the module docstring's order."""
    env = os.environ.get(ENV_PATIENCE)
    if env is not None and env.strip() != "":
        if env.strip().lower() in ("none", "off", "0"):
            return None, f"{ENV_PATIENCE}={env}"
        return _env_int(ENV_PATIENCE, 1), f"{ENV_PATIENCE}={env}"
    path = Path(os.environ[SETTINGS_ENV]) if os.environ.get(SETTINGS_ENV) else \
        Path(preprocessed_dataset_folder_base) / SETTINGS_FILENAME
    if path.is_file():
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise EarlyStoppingConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(d, dict):   # a list or number at the top level: say so rather than an AttributeError
            raise EarlyStoppingConfigError(f"{path}: the settings must be a JSON object {{\"key\": value, ...}}, "
                                           f"got {type(d).__name__}")
        value = d.get(SETTINGS_KEY)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EarlyStoppingConfigError(f"{path}: '{SETTINGS_KEY}' must be a positive integer or null, got {value!r}")
            return int(value), str(path)
    return None, "off"


class _StopTraining(Exception):
    """Raised at the start of an epoch to leave nnU-Net's training loop (caught in run_training)."""


class EarlyStoppingMixin(ThrottledProgressPlotMixin, AtomicCheckpointMixin):
    """Put before the nnU-Net trainer class: ``class MyTrainer(EarlyStoppingMixin, nnUNetTrainer)``.

    Adds early stopping on the EMA pseudo-Dice and the environment controls listed in the module docstring,
    and writes checkpoints atomically (:mod:`.checkpointing`): the experiment runner continues killed runs with
    ``--c``, which a checkpoint torn by the kill would make impossible. nnU-Net's progress plot is throttled for
    few-second epochs (:mod:`.progress_plot`).
    nnU-Net's training loop itself is unchanged: the mixin leaves it at the start of the epoch after the
    patience ran out and then runs nnU-Net's own ``on_train_end`` (checkpoint_final.pth, loader shutdown).
    """

    def initialize(self):
        if not self.was_initialized:
            try:
                self._apply_experiment_controls()
            except Exception as e:
                # also into the training log: nnU-Net opened it with its header, and a log that stops there gives
                # no hint why the training never started
                self.print_to_log_file(f"{type(self).__name__} stopped: {type(e).__name__}: {e}",
                                       also_print_to_console=False)
                raise
        super().initialize()

    def _apply_experiment_controls(self) -> None:
        msgs = []
        seed = _env_int(ENV_SEED, 0)
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.manual_seed(seed)
            msgs.append(f"seed {seed}")
        for env, attr in ((ENV_EPOCHS, "num_epochs"), (ENV_ITERATIONS, "num_iterations_per_epoch"),
                          (ENV_VAL_ITERATIONS, "num_val_iterations_per_epoch"), (ENV_SAVE_EVERY, "save_every")):
            v = _env_int(env, 1)
            if v is not None:
                setattr(self, attr, v)
                msgs.append(f"{attr} {v} ({env})")
        self.early_stopping_patience, src = resolve_patience(self.preprocessed_dataset_folder_base)
        msgs.append(f"early stopping patience {self.early_stopping_patience} epochs ({src})"
                    if self.early_stopping_patience else "early stopping off")
        if not _mirroring_enabled():
            msgs.append(f"mirroring off ({ENV_MIRRORING}=0)")
        self.print_to_log_file("Experiment controls: " + "; ".join(msgs), also_print_to_console=True)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rot, dummy_2d, initial_patch_size, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not _mirroring_enabled():
            self.inference_allowed_mirroring_axes = None
            mirror_axes = None
        return rot, dummy_2d, initial_patch_size, mirror_axes

    def early_stopping_due(self) -> bool:
        patience = getattr(self, "early_stopping_patience", None)
        if not patience:
            return False
        since, _ = epochs_since_best(self.logger.get_value("ema_fg_dice", step=None))
        return since >= patience

    def on_epoch_start(self):
        if self.early_stopping_due():
            raise _StopTraining()
        super().on_epoch_start()

    def run_training(self):
        try:
            super().run_training()
        except _StopTraining:
            ema = self.logger.get_value("ema_fg_dice", step=None)
            since, best = epochs_since_best(ema)
            record = {"patience": self.early_stopping_patience, "stopped_after_epoch": self.current_epoch - 1,
                      "best_epoch": best, "best_ema_fg_dice": None if best is None else float(ema[best]),
                      "num_epochs": self.num_epochs}
            self.print_to_log_file(
                f"Early stopping: the EMA pseudo-Dice has not improved for {since} epochs (patience "
                f"{self.early_stopping_patience}); best {record['best_ema_fg_dice']} at epoch {best}. Stopped after "
                f"epoch {self.current_epoch - 1} of {self.num_epochs}; evaluate checkpoint_best.pth.",
                also_print_to_console=True)
            if self.local_rank == 0:
                write_json_atomic(record, Path(self.output_folder) / STOP_RECORD)
            self.on_train_end()


def _mirroring_enabled() -> bool:
    return os.environ.get(ENV_MIRRORING, "1").strip().lower() not in ("0", "false", "no", "off")


class nnUNetTrainer_earlyStopping(EarlyStoppingMixin, nnUNetTrainer):
    """Plain nnU-Net with the same early stopping rule and experiment controls as PromptLesionTrainer:
    the real-only baseline of an experiment (``-tr nnUNetTrainer_earlyStopping``)."""


def honours_experiment_controls(trainer_class: type) -> bool:
    """True when ``trainer_class`` reads the budget / seed / early-stopping controls of this module."""
    return isinstance(trainer_class, type) and issubclass(trainer_class, EarlyStoppingMixin)


__all__ = ["EarlyStoppingMixin", "nnUNetTrainer_earlyStopping", "epochs_since_best", "resolve_patience",
           "honours_experiment_controls", "CONTROL_ENV_VARS", "STOP_RECORD"]
