"""The steps of an (arm, repeat) chain, each an nnU-Net command or an in-process evaluation that skips itself when
its record says it is finished: train (every fold), predict the test cases, evaluate them (+ the transfer
gauges); with ``"postprocessing"``, decide and apply nnU-Net's postprocessing and evaluate the result. A pretrain arm
(:mod:`.config`) has two trainings per fold: ``pretrain`` (stage 1, synthetic only, in the run folder's
``pretrain/``), then ``train`` (stage 2, real only, from stage 1's final weights via nnU-Net's -pretrained_weights).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..utils.atomic import atomic_dir, write_json_atomic, write_text_atomic
from ..utils.env_names import ENV_SEED, ENV_SETTINGS, ENV_TORCH_THREADS
from .config import BUDGET_KEYS, Arm, ExperimentError, expand_env
from .layout import DONE_MARKER, EVALUATE_RECORD, ExperimentLayout, remove_partials
from .processes import run_command
from .report import mean_dicts


class ExperimentSteps(ExperimentLayout):
    """The steps, as the runner runs them. Uses ``show`` (nnU-Net output lines to echo), ``print`` and
    ``_children`` (the running commands, for the runner to stop), which the runner sets."""

    show: tuple[str, ...]
    print: Callable[[str], None]
    _children: set[subprocess.Popen]

    def _env(self, arm: Arm, repeat: int, fold: str | None) -> dict:
        env = dict(os.environ)
        env.update(self.cfg.env)
        env["nnUNet_results"] = str(self.stage_dir(arm, repeat) / "nnUNet_results")
        env.setdefault("PYTHONUNBUFFERED", "1")
        for k in BUDGET_KEYS.values():
            env.pop(k, None)
        for k, v in self.cfg.budget.items():
            if k == "mirroring":
                env[BUDGET_KEYS[k]] = "1" if v else "0"
            elif k == "early_stopping_patience":
                env[BUDGET_KEYS[k]] = "none" if not v else str(int(v))
            else:
                env[BUDGET_KEYS[k]] = str(int(v))
        if arm.pretrain:   # a pretrain arm's stage runs its share of the budget's epochs
            env[BUDGET_KEYS["epochs"]] = str(self.stage_epochs(arm))
        if arm.stage == "pretrain":
            # nothing reads stage 1's validation predictions: the arm is evaluated (and postprocessed) from stage 2
            env[BUDGET_KEYS["final_validation"]] = "0"
        env.pop(ENV_SETTINGS, None)
        settings_file = self.stage_dir(arm, repeat) / "settings.json"
        if settings_file.is_file():
            env[ENV_SETTINGS] = str(settings_file)
        env[ENV_SEED] = str(self.cfg.seed + 1000 * repeat + self._base_index(fold))
        if self.cfg.jobs > 1 and self.cfg.device == "cpu" and ENV_TORCH_THREADS not in env:
            # nnU-Net would give every one of the parallel commands all cores (see .torch_threads)
            env[ENV_TORCH_THREADS] = str(max(1, (os.cpu_count() or 1) // self.cfg.jobs))
        return env

    def _run(self, cmd: list[str], env: dict, log: Path) -> int:
        """Run a command with output appended to ``log`` (lines containing one of ``self.show`` are echoed)."""
        return run_command(cmd, env, log, show=self.show, echo=self.print, running=self._children)

    def _fail(self, what: str, log: Path) -> None:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:]) if log.is_file() else ""
        raise ExperimentError(f"{what} failed; full log: {log}\n{tail}")


    def pretrain(self, arm: Arm, repeat: int, fold: str) -> str:
        """Stage 1 of a pretrain arm: its synthetic-only training (skipped once the fine-tuning made from it is
        finished: a re-run after a kill in stage 2 never trains stage 1 again)."""
        if self._train_finished(arm, repeat, fold):
            return "skipped (its fine-tuning finished)"
        stage = self.pretrain_stage(arm)
        self._write_settings(stage, repeat)
        return self.train(stage, repeat, fold)

    def pretrained_weights(self, arm: Arm, repeat: int, fold: str) -> Path:
        """Stage 1's final weights, which stage 2 of a pretrain arm starts from; refused unless stage 1 finished
        from the inputs the config gives now (a killed pretraining's checkpoints are not its final weights)."""
        stage = self.pretrain_stage(arm)
        if not self._train_finished(stage, repeat, fold):
            raise ExperimentError(f"arm '{arm.name}' repeat {repeat} fold {fold}: the fine-tuning needs the finished "
                                  f"synthetic pretraining ({self.fold_dir(stage, repeat, fold)}), which did not finish; "
                                  "run the experiment again to complete it first")
        return self.fold_dir(stage, repeat, fold) / "checkpoint_final.pth"

    def train(self, arm: Arm, repeat: int, fold: str) -> str:
        if self._train_finished(arm, repeat, fold):
            return "skipped (finished)"
        fd = self.fold_dir(arm, repeat, fold)
        marker = self._train_marker(arm, repeat, fold)
        resume = any((fd / c).is_file() for c in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"))
        # nnU-Net's entry point, with its final validation switched off by the budget and torch's threads capped
        # for parallel CPU jobs (see .nnunet_train)
        cmd = [sys.executable, "-m", "nnunet_promptlesion.experiments.nnunet_train", self.dataset_name,
               self.cfg.configuration, fold, "-tr", arm.trainer, "-p", self.cfg.plans, "-device", self.cfg.device]
        if self.cfg.checkpoint == "checkpoint_best.pth":
            cmd.append("--val_best")   # nnU-Net's own validation then also scores the model we evaluate
        pretrained = None
        if arm.pretrain and arm.stage is None:
            # checked also when resuming: stage 2's record holds stage 1's digest, so its checkpoints came from it
            pretrained = self.pretrained_weights(arm, repeat, fold)
        if resume:
            cmd.append("--c")   # nnU-Net refuses -pretrained_weights with --c: the checkpoint holds the fine-tuned net
        elif pretrained is not None:
            cmd += ["-pretrained_weights", str(pretrained)]
        log = self.stage_dir(arm, repeat) / "logs" / f"train_fold{fold}.log"
        # before nnU-Net writes anything: a killed training is resumed (--c) only from these same inputs
        write_json_atomic({"inputs": self.train_inputs(arm, repeat, fold),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, self._train_record(arm, repeat, fold))
        if self._run(cmd, self._env(arm, repeat, fold), log) != 0:
            self._fail(f"training arm '{arm.name}' repeat {repeat} fold {fold}", log)
        write_text_atomic(time.strftime("%Y-%m-%d %H:%M:%S\n"), marker)
        stop = fd / "early_stopping.json"
        note = ""
        if stop.is_file():
            s = json.loads(stop.read_text())
            note = f", early stop after epoch {s['stopped_after_epoch']} (best epoch {s['best_epoch']})"
        if pretrained is not None and not resume:
            note += f", from the weights of its {self.stage_epochs(self.pretrain_stage(arm))} synthetic-only epochs"
        return ("resumed with --c" if resume else "trained") + note

    def predict(self, arm: Arm, repeat: int) -> str:
        if self._predict_finished(arm, repeat):
            return "skipped (finished)"
        pred = self.run_dir(arm.name, repeat) / "predictions"
        folds = self.arm_folds(arm)
        done = pred / DONE_MARKER
        # an interrupted prediction may have left a half-written file, or the model changed (other folds):
        # predict again (cheap) and evaluate again
        for d in (pred, self.run_dir(arm.name, repeat) / "evaluation"):
            if d.exists():
                shutil.rmtree(d)
        p = self.cfg.predict
        # nnU-Net's nnUNetv2_predict, torch's threads capped for parallel CPU jobs (see .nnunet_predict)
        cmd = [sys.executable, "-m", "nnunet_promptlesion.experiments.nnunet_predict", "-i", str(self.images),
               "-o", str(pred), "-d", self.dataset_name, "-c", self.cfg.configuration, "-p", self.cfg.plans,
               "-tr", arm.trainer, "-f", *folds, "-chk", self.cfg.checkpoint, "-device", self.cfg.device,
               "-npp", str(p.get("npp", 1)), "-nps", str(p.get("nps", 1))]
        if p.get("disable_tta"):
            cmd.append("--disable_tta")
        if p.get("save_probabilities", True):
            cmd.append("--save_probabilities")   # softmax inside the real test lesions: the transfer gauge
        log = self.run_dir(arm.name, repeat) / "logs" / "predict.log"
        if self._run(cmd, self._env(arm, repeat, None), log) != 0:
            self._fail(f"prediction arm '{arm.name}' repeat {repeat}", log)
        write_text_atomic(time.strftime("%Y-%m-%d %H:%M:%S ") + self._predict_stamp(arm, repeat) + "\n", done)
        return "predicted"

    def evaluate(self, arm: Arm, repeat: int) -> str:
        # deferred: the metric libraries (4.7 s at import, measured here), for a step that is often skipped as finished
        from ..evaluation.evaluate import evaluate_folders, write_outputs

        if self._evaluate_finished(arm, repeat):
            return "skipped (finished)"
        rd = self.run_dir(arm.name, repeat)
        target = rd / "evaluation"
        e = self.cfg.evaluation
        kwargs = {k: e[k] for k in ("nsd_tolerance_mm", "detection_min_dice", "early_radius_mm") if k in e}

        results = evaluate_folders(rd / "predictions", self.labels,
                                   dataset_json=self.pre / self.dataset_name / "dataset.json", **kwargs)
        transfer = self._transfer(arm, repeat, results)
        with atomic_dir(target, overwrite=True) as tmp:
            write_outputs(results, tmp, title=f"{arm.name} repeat {repeat}")
            write_json_atomic({"inputs": self._evaluate_inputs(arm, repeat)}, Path(tmp) / EVALUATE_RECORD)
            if transfer is not None:
                write_json_atomic(transfer, Path(tmp) / "transfer.json")
        dice = {k: v["Dice"] for k, v in results["summary"].items()}
        return "evaluated: Dice " + ", ".join(f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in dice.items())

    def _transfer(self, arm: Arm, repeat: int, results: dict) -> dict | None:
        """Transfer gauges of one trained model: the softmax inside every real test lesion (evaluate_folders
        adds it when the predictions hold probabilities) and the synthetic-validation pseudo-Dice its training
        logged at the evaluated checkpoint's epoch, with the verdict per class."""
        real = results.get("lesion_softmax")
        if real is None:
            return None
        # deferred: scipy and torch (seconds at import), needed only once a model is evaluated
        from ..evaluation.transfer import transfer_verdicts
        from ..trainers.synthetic_validation import load_gauges, synthetic_summary

        epoch = "best" if self.cfg.checkpoint == "checkpoint_best.pth" else "last"
        syn = [synthetic_summary(g, epoch=epoch) for g in
               (load_gauges(self.fold_dir(arm, repeat, f)) for f in self.arm_folds(arm)) if g is not None]
        syn = [x for x in syn if x]
        synthetic = mean_dicts(syn) if syn else None
        return {"real": {"summary": real}, "synthetic": synthetic, "synthetic_epoch": epoch,
                "verdicts": transfer_verdicts(real, synthetic)}

    def postprocess(self, arm: Arm, repeat: int) -> str:
        """Decide nnU-Net's postprocessing on validation (unless finished), apply it to the test predictions."""
        decided = self._pp_done(arm, repeat, "postprocessing")
        applied = decided and self._pp_done(arm, repeat, "predictions_pp")
        if applied:
            return "skipped (finished)"
        n = None if decided else self._determine_postprocessing(arm, repeat)
        self._apply_postprocessing(arm, repeat)
        return (("decision kept (finished)" if n is None else f"decided on {n} validation cases") +
                f": {self._pp_decision_text(arm.name, repeat)}; applied to the test predictions")

    def _pp_command(self, name: str) -> str:
        exe = Path(sys.executable).parent / name   # nnU-Net's console script of this environment
        return str(exe) if exe.is_file() else (shutil.which(name) or name)

    def _determine_postprocessing(self, arm: Arm, repeat: int) -> int:
        rd = self.run_dir(arm.name, repeat)
        ds = self.pre / self.dataset_name
        ending = json.loads((ds / "dataset.json").read_text()).get("file_ending", ".nii.gz")
        cases: dict[str, Path] = {}
        for fold in self.arm_folds(arm):
            val = self.fold_dir(arm, repeat, fold) / "validation"
            found = sorted(val.glob(f"*{ending}")) if val.is_dir() else []
            if not found:
                raise ExperimentError(f"postprocessing arm '{arm.name}' repeat {repeat}: {val} holds no validation "
                                      f"predictions; nnU-Net writes them in the training's final validation (budget "
                                      f"\"final_validation\": true), retrain with --retrain-changed after setting it")
            for p in found:
                if p.name in cases:
                    raise ExperimentError(f"postprocessing arm '{arm.name}' repeat {repeat}: validation case {p.name} "
                                          f"is in two folds ({cases[p.name].parent.parent.name}, fold_{fold}); the "
                                          "decision takes every case once: use folds of one cross-validation")
                cases[p.name] = p
        remove_partials(rd, "postprocessing")
        log = rd / "logs" / "postprocessing.log"
        with atomic_dir(rd / "postprocessing", overwrite=True) as tmp:
            val = tmp / "validation"   # the folds' validation predictions together; nnU-Net writes into this folder
            val.mkdir()
            for name, p in cases.items():
                shutil.copyfile(p, val / name)
            cmd = [self._pp_command("nnUNetv2_determine_postprocessing"), "-i", str(val),
                   "-ref", str(ds / "gt_segmentations"), "-plans_json", str(ds / f"{self.cfg.plans}.json"),
                   "-dataset_json", str(ds / "dataset.json"), "-np", "1", "--remove_postprocessed"]
            if self._run(cmd, self._env(arm, repeat, None), log) != 0:
                self._fail(f"postprocessing decision arm '{arm.name}' repeat {repeat}", log)
            # postprocessing.pkl is the pickle nnU-Net writes here and reads back in nnUNetv2_apply_postprocessing;
            # only ever one that the command above made in this run's own folder, never a file from elsewhere
            for name in ("postprocessing.pkl", "postprocessing.json"):
                os.replace(val / name, tmp / name)
            shutil.rmtree(val)
            write_json_atomic({"inputs": self._pp_decision_inputs(arm, repeat), "validation_cases": sorted(cases)},
                              tmp / EVALUATE_RECORD)
        return len(cases)

    def _apply_postprocessing(self, arm: Arm, repeat: int) -> None:
        rd = self.run_dir(arm.name, repeat)
        ds = self.pre / self.dataset_name
        remove_partials(rd, "predictions_pp")
        log = rd / "logs" / "postprocessing.log"
        with atomic_dir(rd / "predictions_pp", overwrite=True) as tmp:
            cmd = [self._pp_command("nnUNetv2_apply_postprocessing"), "-i", str(rd / "predictions"), "-o", str(tmp),
                   "-pp_pkl_file", str(rd / "postprocessing" / "postprocessing.pkl"), "-np", "1",
                   "-plans_json", str(ds / f"{self.cfg.plans}.json"), "-dataset_json", str(ds / "dataset.json")]
            if self._run(cmd, self._env(arm, repeat, None), log) != 0:
                self._fail(f"applying the postprocessing arm '{arm.name}' repeat {repeat}", log)
            write_json_atomic({"inputs": self._pp_apply_inputs(arm, repeat)}, tmp / EVALUATE_RECORD)

    def evaluate_pp(self, arm: Arm, repeat: int) -> str:
        # deferred: as in evaluate()
        from ..evaluation.evaluate import evaluate_folders, write_outputs

        if self._pp_done(arm, repeat, "evaluation_pp"):
            return "skipped (finished)"
        rd = self.run_dir(arm.name, repeat)
        e = self.cfg.evaluation
        kwargs = {k: e[k] for k in ("nsd_tolerance_mm", "detection_min_dice", "early_radius_mm") if k in e}
        results = evaluate_folders(rd / "predictions_pp", self.labels,
                                   dataset_json=self.pre / self.dataset_name / "dataset.json", **kwargs)
        remove_partials(rd, "evaluation_pp")
        with atomic_dir(rd / "evaluation_pp", overwrite=True) as tmp:
            write_outputs(results, tmp, title=f"{arm.name} repeat {repeat}, after nnU-Net postprocessing")
            write_json_atomic({"inputs": self._pp_evaluate_inputs(arm, repeat)}, Path(tmp) / EVALUATE_RECORD)
        dice = {k: v["Dice"] for k, v in results["summary"].items()}
        return "evaluated after postprocessing: Dice " + ", ".join(
            f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in dice.items())

    def _write_settings(self, arm: Arm, repeat: int) -> None:
        path = self.stage_dir(arm, repeat) / "settings.json"
        settings = expand_env(arm.settings or {}, arm.name)
        if not path.is_file() or json.loads(path.read_text()) != settings:
            write_json_atomic(settings, path)
