"""Early stopping on nnU-Net's EMA pseudo-Dice (trainers/early_stopping.py)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from tiny_plans import write_tiny_plans

from nnunet_promptlesion.trainers.early_stopping import (ENV_PATIENCE, EarlyStoppingConfigError, epochs_since_best,
                                                         honours_experiment_controls, nnUNetTrainer_earlyStopping,
                                                         resolve_patience)
from nnunet_promptlesion.trainers.settings import SETTINGS_ENV, PromptLesionSettings, SettingsError


def test_epochs_since_best():
    assert epochs_since_best([]) == (0, None)
    assert epochs_since_best([0.1, 0.2, 0.3]) == (0, 2)
    # only a strict improvement resets the count (nnU-Net replaces checkpoint_best.pth on '>')
    assert epochs_since_best([0.1, 0.3, 0.3, 0.2]) == (2, 1)
    assert epochs_since_best([float("nan"), 0.2, float("nan")]) == (1, 1)
    assert epochs_since_best([float("nan")] * 4) == (4, None)


def test_patience_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_PATIENCE, raising=False)
    monkeypatch.delenv(SETTINGS_ENV, raising=False)
    assert resolve_patience(tmp_path) == (None, "off")
    (tmp_path / "promptlesion_settings.json").write_text(json.dumps({"early_stopping_patience": 25}))
    assert resolve_patience(tmp_path) == (25, str(tmp_path / "promptlesion_settings.json"))
    other = tmp_path / "arm.json"
    other.write_text(json.dumps({"early_stopping_patience": 7, "synthetic_fraction": 0.75}))
    monkeypatch.setenv(SETTINGS_ENV, str(other))
    assert resolve_patience(tmp_path)[0] == 7
    monkeypatch.setenv(ENV_PATIENCE, "3")
    assert resolve_patience(tmp_path)[0] == 3
    monkeypatch.setenv(ENV_PATIENCE, "none")
    assert resolve_patience(tmp_path)[0] is None
    monkeypatch.setenv(ENV_PATIENCE, "x")
    with pytest.raises(EarlyStoppingConfigError, match="must be an integer"):
        resolve_patience(tmp_path)
    monkeypatch.delenv(ENV_PATIENCE)
    other.write_text(json.dumps({"early_stopping_patience": 0}))
    with pytest.raises(EarlyStoppingConfigError, match="positive integer"):
        resolve_patience(tmp_path)
    # PromptLesionTrainer's own settings accept (and check) the key
    assert PromptLesionSettings(early_stopping_patience=25).early_stopping_patience == 25
    with pytest.raises(SettingsError, match="early_stopping_patience"):
        PromptLesionSettings(early_stopping_patience=-1)


def test_trainers_carry_the_mixin():
    from nnunet_promptlesion.trainers.progress_plot import ThrottledProgressPlotMixin
    from nnunet_promptlesion.trainers.promptlesion_trainer import PromptLesionTrainer
    from nnunet_promptlesion.trainers.variants import nnUNetTrainer_promptlesionDemo
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    assert honours_experiment_controls(PromptLesionTrainer)
    assert honours_experiment_controls(nnUNetTrainer_earlyStopping)
    assert not honours_experiment_controls(nnUNetTrainer)
    for cls in (PromptLesionTrainer, nnUNetTrainer_earlyStopping, nnUNetTrainer_promptlesionDemo):
        assert issubclass(cls, ThrottledProgressPlotMixin)


def test_progress_plot_throttle_skips_redraws_closer_than_cost_over_share_and_flushes_the_last():
    from nnunet_promptlesion.trainers.progress_plot import ProgressPlotThrottle

    now = [0.0]
    drawn = []

    def plot(folder):            # a drawing that takes 2 s of the fake clock
        now[0] += 2.0
        drawn.append((folder, now[0]))

    t = ProgressPlotThrottle(plot, max_share=0.1, clock=lambda: now[0])
    t("e0")                      # the first call draws: ends at 2
    now[0] += 5.0
    t("e1")                      # 5 s after it: < 2 / 0.1 = 20 s, skipped
    now[0] += 14.0
    t("e2")                      # 19 s: still skipped
    now[0] += 1.0
    t("e3")                      # 20 s: drawn, ends at 24
    now[0] += 1.0
    t("e4")                      # skipped; flush draws it (the last state), then nothing is pending
    t.flush()
    t.flush()
    assert [f for f, _ in drawn] == ["e0", "e3", "e4"] and (t.calls, t.skipped) == (5, 3) and t.cost == 2.0
    # a flush with nothing skipped draws nothing; max_share None draws every call (nnU-Net's behaviour)
    every = ProgressPlotThrottle(plot, max_share=None, clock=lambda: now[0])
    n = len(drawn)
    for i in range(3):
        every(f"x{i}")
    every.flush()
    assert len(drawn) == n + 3 and every.skipped == 0
    with pytest.raises(ValueError, match="max_share"):
        ProgressPlotThrottle(plot, max_share=0.0)


# nnU-Net's own entry points (get_trainer_from_args' steps, maybe_load_checkpoint, run_training) on the real
# phantom; only the validation pseudo-Dice is scripted, so that when the patience runs out is known exactly.
DRIVER = textwrap.dedent("""
    import json, os, sys, torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, join
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunet_promptlesion.trainers.early_stopping import nnUNetTrainer_earlyStopping

    SCRIPT = [0.5, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]

    class ScriptedDice(nnUNetTrainer_earlyStopping):
        def on_validation_epoch_end(self, val_outputs):
            # what nnU-Net logs here, with a scripted pseudo-Dice (the logger derives ema_fg_dice from it)
            self.logger.log('mean_fg_dice', SCRIPT[self.current_epoch], self.current_epoch)
            self.logger.log('dice_per_class_or_region', [SCRIPT[self.current_epoch]], self.current_epoch)
            self.logger.log('val_losses', float(sum(o['loss'] for o in val_outputs) / len(val_outputs)),
                            self.current_epoch)

    if sys.argv[2] == 'tear':
        # a kill in the middle of writing epoch 1's checkpoint_latest.pth: half the bytes reach the disk
        import io, signal
        real_save, latest_saves = torch.save, []

        def tearing_save(obj, f, *args, **kwargs):
            if 'checkpoint_latest' in str(f):
                latest_saves.append(f)
                if len(latest_saves) == 2:
                    buf = io.BytesIO()
                    real_save(obj, buf, *args, **kwargs)
                    with open(f, 'wb') as fh:
                        fh.write(buf.getvalue()[:len(buf.getvalue()) // 2])
                        fh.flush()
                        os.fsync(fh.fileno())
                    print('TORN', f, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = tearing_save

    pre = join(os.environ['nnUNet_preprocessed'], sys.argv[1])
    plans = load_json(join(pre, sys.argv[3] + '.json'))
    cont = sys.argv[2] == 'continue'
    plans['continue_training'] = cont
    t = ScriptedDice(plans, '3d_fullres', 0, load_json(join(pre, 'dataset.json')), device=torch.device('cpu'))
    maybe_load_checkpoint(t, cont, False)
    t.run_training()
    print('EMA_HISTORY', json.dumps([float(v) for v in t.logger.get_value('ema_fg_dice', step=None)]))
""")


@pytest.mark.slow
def test_early_stopping_in_nnunet_training_loop_continued_after_a_kill_mid_save(ccta_dataset, tmp_path):
    import torch

    root, did, env = ccta_dataset
    name = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    plans = write_tiny_plans(root / "preprocessed" / name)
    env = dict(env, nnUNet_results=str(tmp_path / "results"), nnUNet_n_proc_DA="0", PROMPTLESION_NUM_EPOCHS="10",
               PROMPTLESION_NUM_ITERATIONS_PER_EPOCH="1", PROMPTLESION_NUM_VAL_ITERATIONS_PER_EPOCH="1",
               PROMPTLESION_MIRRORING="0", PROMPTLESION_SEED="1", PROMPTLESION_SAVE_EVERY="1")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"early_stopping_patience": 2}))
    env[SETTINGS_ENV] = str(settings)
    fold = tmp_path / "results" / name / f"ScriptedDice__{plans}__3d_fullres" / "fold_0"
    # killed while writing epoch 1's checkpoint_latest.pth (save_every 1): the complete one of epoch 0 stays
    p = subprocess.run([sys.executable, "-c", DRIVER, name, "tear", plans], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == -signal.SIGKILL, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Epoch 1" in p.stdout and "Epoch 2" not in p.stdout
    assert "TORN" in p.stdout, "the kill did not land in the save"
    assert torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1

    # --c continues from epoch 1 and runs until the patience is out
    p = subprocess.run([sys.executable, "-c", DRIVER, name, "continue", plans], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Epoch 0" not in p.stdout and "Epoch 1" in p.stdout
    assert not list(fold.glob(".checkpoint_*.tmp")), "the torn temporary file was left behind"
    # EMA of the script: 0.5, 0.51, 0.514 (best, epoch 2), 0.5126, 0.5013 -> 2 epochs without improvement
    assert "early stopping patience 2 epochs" in p.stdout
    assert "Early stopping: the EMA pseudo-Dice has not improved for 2 epochs" in p.stdout
    ema = json.loads(p.stdout.split("EMA_HISTORY ", 1)[1].splitlines()[0])
    assert len(ema) == 5 and ema[2] == pytest.approx(0.514)
    record = json.loads((fold / "early_stopping.json").read_text())
    assert record["stopped_after_epoch"] == 4 and record["best_epoch"] == 2 and record["patience"] == 2
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # nnU-Net stores the epoch to continue from: best after epoch 2, final after epoch 4
    assert best["current_epoch"] == 3 and final["current_epoch"] == 5
    assert best["_best_ema"] == pytest.approx(0.514)
    # few-second epochs: nnU-Net's progress plot was redrawn less often, and once more at the end (all epochs)
    m = re.search(r"progress.png: (\d+) of 4 epoch redraws skipped", p.stdout)
    assert m and int(m.group(1)) >= 1, p.stdout[-3000:]
    assert (fold / "progress.png").stat().st_mtime_ns >= (fold / "checkpoint_final.pth").stat().st_mtime_ns

    # continuing the stopped run (--c) does not train further
    p = subprocess.run([sys.executable, "-c", DRIVER, name, "continue", plans], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Epoch 5" not in p.stdout and "Early stopping" in p.stdout
    assert len(json.loads(p.stdout.split("EMA_HISTORY ", 1)[1].splitlines()[0])) == 5
