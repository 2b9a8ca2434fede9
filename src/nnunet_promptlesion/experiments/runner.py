"""The experiment runner behind ``promptlesion_experiment``: arms x repeats x folds of nnU-Net training,
prediction of the test cases and evaluation, resumable, then the comparison table.

The runner orchestrates; each job has its own module of this package, lowest first:

    config       the config file: format, checks, defaults, ``${VAR}`` in settings, ``--budget``
    processes    child processes: run a command into its log, stop its whole process tree, SIGTERM as Ctrl-C
    layout       the output folder: run folders, step records and markers, changed steps, the folds (scarcity)
    executors    where the chains run: here, or as SLURM / submitit jobs
    report       collect the evaluations, compare the arms, write OUT/results
    steps        the steps of a chain: train, predict, evaluate, nnU-Net's postprocessing
    runner       check the arms, settle changed steps, run the chains (one after another or in parallel), report

Postprocessing: with ``"postprocessing": true`` every (arm, repeat) also gets nnU-Net's own postprocessing (keep
only the largest connected component of the foreground and/or of single classes where that raised the Dice),
decided by ``nnUNetv2_determine_postprocessing`` on the training's *validation* predictions (nnU-Net's final
validation: cases held out of that training; never the test set), applied to the test predictions by
``nnUNetv2_apply_postprocessing`` and evaluated; the report shows it as a second block after the raw predictions,
which stay first and unchanged. It needs the budget's ``final_validation`` and numeric folds (fold "all" validates
on its training cases: refused). Several folds: decided once on all their validation predictions together (each case
once), as nnU-Net's ``nnUNetv2_find_best_configuration`` does on merged cross-validation folds.

Parallel runs: with ``"jobs": N`` (or ``--jobs N``) up to N (arm, repeat) chains - train every fold, predict,
evaluate - run at the same time, each its own nnU-Net processes. Worth it where one training leaves the device
partly idle: on a CPU (data loading and nnU-Net's start-up are single-threaded; a demo training uses ~1.5 of
2 cores) or a large GPU with small models. What runs does not change (on a CPU each command gets cores // jobs
torch threads instead of all cores); the progress lines interleave. If a step fails, nothing new starts and the
steps already running finish (Ctrl-C stops them); a SIGTERM or Ctrl-C stops every running command, and the same
command resumes.

The config format is documented in :mod:`.config`, the output folder in :mod:`.layout`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

from ..utils.atomic import write_json_atomic
from .config import PATH_SETTINGS, Arm, ExperimentConfig, ExperimentError, expand_env
from .executors import import_submitit, run_chains
from .processes import one_line_at_a_time, raise_interrupt, stop_process_tree
from .report import ExperimentReport, scarcity_line
from .steps import ExperimentSteps


class ExperimentRunner(ExperimentSteps, ExperimentReport):
    """Runs one experiment config into ``out_dir``. ``log`` receives progress lines (default: print).

    arms: run only these arms; include: names of optional arm groups to run (``"optional"`` in an arm);
    show: substrings of nnU-Net output lines to echo while a training runs (e.g. "Pseudo dice");
    class_notes: extra words per class for the report's table titles;
    retrain_changed: redo the steps whose recorded inputs differ from the config's (default: refuse, naming them).
    """

    def __init__(self, cfg: ExperimentConfig, out_dir: str | os.PathLike, arms: list[str] | None = None,
                 log: Callable[[str], None] | None = None, include: list[str] | None = None,
                 show: tuple[str, ...] = (), class_notes: dict[str, str] | None = None,
                 retrain_changed: bool = False):
        self.retrain_changed = retrain_changed
        self.print = one_line_at_a_time(log or (lambda s: print(s, flush=True)))
        self.show = tuple(show)
        self.class_notes = dict(class_notes or {})
        if arms:
            unknown = set(arms) - {a.name for a in cfg.arms}
            if unknown:
                raise ExperimentError(f"--arms names unknown arm(s) {sorted(unknown)}; arms: {[a.name for a in cfg.arms]}")
            cfg.arms = [a for a in cfg.arms if a.name in arms]
        else:
            cfg.arms = [a for a in cfg.arms if a.optional is None or a.optional in (include or ())]
        self.t0 = time.time()
        self._children: set[subprocess.Popen] = set()   # running nnU-Net commands (several with jobs > 1)
        self._halt = threading.Event()                    # parallel runs: start no further step
        self._evaluate_lock = threading.Lock()            # evaluation writes matplotlib figures (not thread-safe)
        self._promptlesion_arms: set[str] = set()   # arms whose trainer reads PROMPTLESION_SETTINGS (set by check)
        super().__init__(cfg, out_dir)   # the folders (ExperimentLayout): needs nnU-Net's paths and the dataset

    # ------------------------------------------------------------------ checks
    def check(self) -> list[str]:
        """Check dataset, test folders and every arm before anything runs; returns info lines."""
        info = []
        plans_file = self.pre / self.dataset_name / f"{self.cfg.plans}.json"
        if not plans_file.is_file():
            raise ExperimentError(f"{plans_file} not found: plan and preprocess first, e.g. nnUNetv2_plan_and_preprocess "
                                  f"-d {self.dataset_name} -c {self.cfg.configuration} --verify_dataset_integrity")
        plans = json.loads(plans_file.read_text())
        if self.cfg.configuration not in plans["configurations"]:
            raise ExperimentError(f"{plans_file} has no configuration '{self.cfg.configuration}' "
                                  f"(it has {sorted(plans['configurations'])})")
        # deferred, as every nnU-Net and trainer import here: they load torch (seconds), which a refused or finished
        # re-run, --report-only and --list-configs never need
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        cm = PlansManager(plans).get_configuration(self.cfg.configuration)
        if not (self.pre / self.dataset_name / cm.data_identifier).is_dir():
            raise ExperimentError(f"configuration '{self.cfg.configuration}' is planned but not preprocessed "
                                  f"({self.pre / self.dataset_name / cm.data_identifier} missing): run "
                                  f"nnUNetv2_preprocess -d {self.dataset_name} -c {self.cfg.configuration} -plans_name "
                                  f"{self.cfg.plans}")
        dj = json.loads((self.pre / self.dataset_name / "dataset.json").read_text())
        ending = dj.get("file_ending", ".nii.gz")
        for folder, what, pattern in ((self.images, "test images", f"*_0000{ending}"),
                                      (self.labels, "test labels", f"*{ending}")):
            if not folder.is_dir() or not any(folder.glob(pattern)):
                raise ExperimentError(f"{what} folder {folder} is missing or holds no '{pattern}' files; set "
                                      f"\"test_images\"/\"test_labels\" in the config")
        n_test = len(list(self.images.glob(f"*_0000{ending}")))
        info.append(f"dataset {self.dataset_name}, {self.cfg.plans}/{self.cfg.configuration} (patch "
                    f"{list(cm.patch_size)}, batch {cm.batch_size}), {n_test} test cases in {self.images}")
        if self.cfg.scarcity:
            for rec in self._derive_scarcity(write=False):
                info.append(scarcity_line(rec))
        errors = []
        self._promptlesion_arms = set()
        for arm in self.cfg.arms:
            stages = self.training_stages(arm)
            try:
                lines = [self._check_training(arm, stage, cm.batch_size) for stage in stages]
            except ExperimentError as e:
                errors.append(str(e))
                continue
            if arm.pretrain:
                n1, n2 = (self.stage_epochs(st) for st in stages)
                info.append(f"arm {arm.name}: {n1} epochs {lines[0]}, then {n2} epochs {lines[1]} from its final "
                            "weights (nnU-Net -pretrained_weights)")
            else:
                info.append(f"arm {arm.name}: {lines[0]}")
        if errors:
            raise ExperimentError("these arms cannot run:\n  " + "\n  ".join(errors))
        return info

    def _check_training(self, arm: Arm, stage: Arm, batch_size: int) -> str:
        """One training of ``arm`` (the arm itself, or a pretrain arm's stage): what it trains on, for the info line;
        ExperimentError naming the arm when it cannot run. A pretrain arm's stage 1 must synthesize and its stage 2
        (the arm's own trainer) must train on real data only."""
        # deferred, as every nnU-Net and trainer import here (see check): they load torch
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from ..trainers.early_stopping import honours_experiment_controls
        from ..trainers.promptlesion_trainer import PromptLesionTrainer
        from ..trainers.settings import PromptLesionSettings

        need = None if not arm.pretrain else "synthetic" if stage.stage == "pretrain" else "real"
        what = f"arm '{arm.name}'" + (" pretrain" if stage.stage == "pretrain" else "")
        try:
            with contextlib.redirect_stdout(io.StringIO()):   # nnU-Net prints its search path
                cls = recursive_find_trainer_class_by_name(stage.trainer)
        except (RuntimeError, AssertionError) as e:
            raise ExperimentError(f"{what}: trainer '{stage.trainer}' not found by nnU-Net: {e}") from None
        if not honours_experiment_controls(cls):
            raise ExperimentError(f"{what}: trainer '{stage.trainer}' ignores the experiment budget, seed and early "
                                  "stopping (it does not derive from EarlyStoppingMixin): use nnUNetTrainer_earlyStopping "
                                  "for a plain nnU-Net arm, or add nnunet_promptlesion.trainers.early_stopping."
                                  "EarlyStoppingMixin to the trainer's bases")
        if not issubclass(cls, PromptLesionTrainer):
            if need == "synthetic":
                raise ExperimentError(f"{what}: trainer '{stage.trainer}' is not a PromptLesionTrainer: the pretraining "
                                      "needs one to train on synthetic samples")
            if stage.settings:
                raise ExperimentError(f"{what}: trainer '{stage.trainer}' is not a PromptLesionTrainer and does not "
                                      "read PromptLesion settings; remove \"settings\" or use a PromptLesion trainer")
            return f"{stage.trainer} (real data only)"
        if need == "real":
            raise ExperimentError(f"{what}: trainer '{stage.trainer}' synthesizes, but a pretrain arm fine-tunes on "
                                  "real data only: use the baseline's plain trainer (e.g. nnUNetTrainer_earlyStopping)")
        if stage.stage is None:
            self._promptlesion_arms.add(arm.name)
        settings = expand_env(stage.settings or {}, arm.name)
        try:
            s = PromptLesionSettings.from_dict(settings, f"{what} settings")
        except Exception as e:   # SettingsError and friends: the message names the bad key
            raise ExperimentError(f"{what}: settings cannot run: {e}") from None
        missing = [f"{k}={settings[k]}" for k in PATH_SETTINGS
                   if isinstance(settings.get(k), str) and not Path(settings[k]).exists()]
        if missing:
            raise ExperimentError(f"{what}: settings point to missing files: {missing}")
        n = s.n_synthetic(batch_size)
        warn = ""
        if n == 0:
            warn = "  WARNING: no synthetic sample per batch at this batch size"
        elif abs(n / batch_size - float(s.synthetic_fraction)) > 1e-6:
            warn = (f"  WARNING: synthetic_fraction {s.synthetic_fraction} is {n}/{batch_size} at this batch size; "
                    "raise the batch size (plans) to get the requested ratio")
        return f"{stage.trainer}, synthesizer {s.synthesizer}, batch {batch_size} = {batch_size - n} real + {n} synthetic{warn}"

    def _progress(self, i: int, n: int, msg: str) -> None:
        el = int(time.time() - self.t0)
        line = f"[experiment {i}/{n} {el // 3600:d}:{el // 60 % 60:02d}:{el % 60:02d}] {msg}"
        self.print(line)
        with open(self.out / "experiment.log", "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    def _settle_changed_steps(self) -> None:
        """Refuse to run over steps made from other inputs (naming what changed and the steps), or with
        ``retrain_changed`` clear exactly those steps so that they run again from scratch."""
        changed = self.changed_steps()
        if not changed:
            return
        lines = [f"{kind} arm={arm.name} repeat={r}" + (f" fold={fold}" if fold is not None else "") + f": {why}"
                 for kind, arm, r, fold, why in changed]
        if not self.retrain_changed:
            raise ExperimentError(
                f"{self.out} holds results made from other inputs than this config gives; these steps would "
                "change:\n  " + "\n  ".join(lines) + "\nRun again with --retrain-changed to redo exactly these steps "
                "(their old models and outputs are deleted), use another output folder, or --report-only to report "
                "the models as they are.")
        for line in lines:
            self.print(f"[experiment] redo (inputs changed): {line}")
        self._clear_steps(changed)

    def run(self, report: bool = True) -> dict | None:
        """Every step (skipping finished ones), then the report. Returns the comparison dict (or None).

        SIGTERM is handled like Ctrl-C while the steps run: every running nnU-Net command and every process it
        started are stopped (see :func:`.processes.run_command`), finished steps stay, and the same call resumes."""
        executor = (self.cfg.executor or {}).get("kind", "local")
        if executor != "local":   # before the checks: without submitit, say how to install it at once
            import_submitit()
        self.out.mkdir(parents=True, exist_ok=True)
        old = signal.signal(signal.SIGTERM, raise_interrupt)
        try:
            if self._finished_before():
                self.print(f"[experiment] every step of this config finished in an earlier run ({self.out}): "
                           "nothing to check or run")
            else:
                if not self.retrain_changed:
                    self._settle_changed_steps()   # a refusal needs no arm checks (they import every trainer)
                for line in self.check():
                    self.print(f"[experiment] {line}")
            # before experiment.json is rewritten: a folder's record never describes models it does not hold (with
            # --retrain-changed only after the checks: a config that cannot run deletes nothing)
            self._settle_changed_steps()
            write_json_atomic(self.cfg.to_dict(), self.out / "experiment.json")
            if self.scarcity is None:   # not yet derived by the caller or by _finished_before (same config)
                self.prepare()
            if self.scarcity is not None:
                write_json_atomic({"records": self.scarcity, "setting": self.cfg.scarcity}, self.out / "scarcity.json")
            for rec in self.scarcity or []:
                self.print(f"[experiment] {scarcity_line(rec)} (recorded in {self.out / 'scarcity.json'})")
            # one chain per (arm, repeat): its folds' trainings, then prediction and evaluation, in that order
            chains, n = [], 0
            for r in range(self.cfg.repeats):
                for arm in self.cfg.arms:
                    kinds = [("pretrain" if st.stage else "train", f) for f in self.arm_folds(arm)
                             for st in self.training_stages(arm)] + [("predict", None), ("evaluate", None)]
                    if self.cfg.postprocessing:
                        kinds += [("postprocess", None), ("evaluate_pp", None)]
                    chains.append((arm, r, [(n + k + 1, kind, fold) for k, (kind, fold) in enumerate(kinds)]))
                    n += len(kinds)
            self._halt.clear()
            if executor != "local":   # one submitit job per chain (slurm, submitit_local): see .executors
                run_chains(self, chains, n)
            elif self.cfg.jobs == 1 or len(chains) == 1:
                for arm, r, steps in chains:
                    self._run_chain(arm, r, steps, n)
            else:
                self._run_parallel(chains, n)
        finally:
            signal.signal(signal.SIGTERM, old)
        return self.report() if report else None

    def _run_chain(self, arm: Arm, r: int, steps: list[tuple[int, str, str | None]], n: int) -> None:
        try:
            self._run_steps(arm, r, steps, n)
        except BaseException:
            self._halt.set()   # before this thread can take the next chain: nothing new starts after a failure
            raise

    def _run_steps(self, arm: Arm, r: int, steps: list[tuple[int, str, str | None]], n: int) -> None:
        for i, kind, fold in steps:
            if self._halt.is_set():
                return
            if kind == "train" and arm.name in self._promptlesion_arms:
                self._write_settings(arm, r)
            what = f"{kind:8s} arm={arm.name} repeat={r}" + (f" fold={fold}" if fold is not None else "")
            self._progress(i, n, what + " ...")
            t = time.time()
            if kind == "train":
                msg = self.train(arm, r, fold)
            elif kind == "pretrain":
                msg = self.pretrain(arm, r, fold)
            elif kind == "predict":
                msg = self.predict(arm, r)
            elif kind == "postprocess":
                msg = self.postprocess(arm, r)
            else:
                with self._evaluate_lock:
                    msg = self.evaluate_pp(arm, r) if kind == "evaluate_pp" else self.evaluate(arm, r)
            self._progress(i, n, f"{what}: {msg} ({time.time() - t:.0f} s)")

    def _run_parallel(self, chains: list, n: int) -> None:
        """Chains on ``cfg.jobs`` threads, each thread waiting on its own nnU-Net command. A failing chain sets
        ``_halt`` itself, so the others start no new step. Signals reach the main thread only: there, an
        interruption stops every running command, then the chains end."""
        self.print(f"[experiment] {len(chains)} (arm, repeat) chains, up to {self.cfg.jobs} at a time")
        with ThreadPoolExecutor(max_workers=self.cfg.jobs, thread_name_prefix="experiment") as pool:
            futures = [pool.submit(self._run_chain, arm, r, steps, n) for arm, r, steps in chains]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                if any(f.done() and f.exception() is not None for f in futures) and self._children:
                    self.print(f"[experiment] a step failed: starting nothing new; waiting for the "
                               f"{len(self._children)} running step(s) to finish (Ctrl-C stops them; they resume on "
                               "the next run)")
                wait(futures)
            except BaseException:   # Ctrl-C, or SIGTERM turned into KeyboardInterrupt
                self._halt.set()
                for f in futures:
                    f.cancel()
                self._stop_children()
                wait(futures)
                raise
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

    def _stop_children(self) -> None:
        """Stop every running command's process tree, all at once (each may take its grace period)."""
        stoppers = [threading.Thread(target=stop_process_tree, args=(c,)) for c in list(self._children)
                    if c.poll() is None]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()


def run_as_command(prog: str, body: Callable[[], Any]) -> Any:
    """Run ``body`` as a console command: SIGTERM stops it like Ctrl-C (the runner then takes its nnU-Net child's
    whole process tree down), an ExperimentError exits 2 with its message, an interruption exits 130."""
    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return body()
    except ExperimentError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
