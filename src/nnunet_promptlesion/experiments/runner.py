"""The experiment runner behind ``promptlesion_experiment``: arms x repeats x folds of nnU-Net training,
prediction of the test cases and evaluation, resumable, then the comparison table.

Config (JSON; relative paths are relative to the config file)::

    {
      "name": "ccta_ablation",
      "dataset": 501,                      # id or DatasetXXX_Name (needs nnUNet_raw and nnUNet_preprocessed)
      "configuration": "3d_fullres",       # nnU-Net configuration
      "plans": "nnUNetPlans",              # plans identifier (-p)
      "folds": [0],                        # trained per repeat; the test cases are predicted by their ensemble
      "repeats": 3,                        # independent trainings per arm (own results folder, own seed)
      "seed": 0,                           # repeat r, fold f trains with seed + 1000 * r + f (the same in every arm)
      "device": "cuda",
      "jobs": 1,                           # (arm, repeat) chains run at the same time (see "Parallel runs")
      "budget": {"epochs": 1000, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50,
                 "early_stopping_patience": 25, "mirroring": true, "save_every": 10,
                 "final_validation": true},  # false: skip nnU-Net's re-prediction of the validation cases
      "checkpoint": "checkpoint_best.pth", # what nnUNetv2_predict uses (-chk)
      "reference_arm": "real_only",        # paired tests of every other arm against this one
      "test_images": null, "test_labels": null,   # default nnUNet_raw/<dataset>/imagesTs, labelsTs
      "predict": {"disable_tta": false},
      "evaluation": {"nsd_tolerance_mm": 2.0, "detection_min_dice": 0.0,
                     "paired_cases": "defined"},   # or "with_class": pair only cases whose ground truth has the class
      "env": {"nnUNet_n_proc_DA": "4"},    # extra environment for every nnU-Net command
      "scarcity": {"class": "noncalcified_plaque", "keep_carriers": 3, "seed": 0},   # optional, see below
      "postprocessing": false,             # true: also nnU-Net's own postprocessing, see "Postprocessing" below
      "arms": [
        {"name": "real_scarce", "role": "baseline", "trainer": "nnUNetTrainer_earlyStopping"},
        {"name": "rule_based", "trainer": "PromptLesionTrainer", "settings": {"synthesizer": "rule_based"}},
        {"name": "diffusion", "trainer": "PromptLesionTrainer", "settings": "diffusion_settings.json",
         "optional": "diffusion"},         # only run when asked for (--include diffusion)
        {"name": "ceiling", "role": "ceiling", "trainer": "nnUNetTrainer_earlyStopping"}
      ]
    }

Scarcity and ceiling (:mod:`.scarcity`): with ``"scarcity"``, every base fold in ``folds`` gives two nnU-Net
folds appended to splits_final.json: a *scarce* one (only ``keep_carriers`` training cases carry the class; the
other carriers are dropped, never relabelled) and a *full* one. Arms with role "baseline" (real data only; the
reference of the paired tests) and "arm" (the default: real + synthesis) train on the scarce folds, the
"ceiling" arm (same trainer, settings and budget as the baseline) on the full folds; all are evaluated on the
same test set. What was kept is recorded in OUT/scarcity.json. Without scarcity every arm trains on ``folds``
and a ceiling arm is refused (it would be the baseline again).

The budget reaches the trainers through environment variables read by
:class:`nnunet_promptlesion.trainers.early_stopping.EarlyStoppingMixin` (PromptLesionTrainer and
nnUNetTrainer_earlyStopping carry it); an arm whose trainer ignores them is refused before anything runs.
``"${VAR}"`` in a settings value is replaced by the environment variable VAR (e.g. a checkpoint path).

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

Layout of the output folder::

    experiment.json            the resolved config
    scarcity.json              with "scarcity": the derived folds, kept and dropped carrier cases
    experiment.log             every step with its command and outcome (progress lines are printed too)
    runs/<arm>/repeat_<r>/
        settings.json          PROMPTLESION_SETTINGS of the arm (PromptLesion trainers)
        train_fold<f>.inputs.json  what the training was made from (trainer, settings, budget, seed, fold, plans,
                               configuration, data digests), written before it starts; a re-run whose config gives
                               other inputs refuses naming them and the affected steps (--retrain-changed: redo them)
        nnUNet_results/        nnUNet_results of this training (folds, checkpoints, nnU-Net's logs)
        predictions/           nnUNetv2_predict output for the test images (+ .complete when finished)
        evaluation/            promptlesion_evaluate output (+ transfer.json: softmax in real test lesions,
                               synthetic pseudo-Dice, verdict; needs predict.save_probabilities, the default)
        logs/                  train_fold<f>.log, predict.log (+ postprocessing.log)
        postprocessing/        with "postprocessing": nnU-Net's postprocessing.pkl and postprocessing.json decided on
                               the validation predictions (+ inputs.json: what it was decided from)
        predictions_pp/        the test predictions after nnUNetv2_apply_postprocessing (+ inputs.json)
        evaluation_pp/         promptlesion_evaluate output of predictions_pp
    results/                   comparison.json, report.txt, results.md, per-class CSVs, dice_by_arm.png,
                               sensitivity_by_arm.png, nsd_by_arm.png
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..utils.atomic import atomic_dir, write_json_atomic, write_text_atomic
from ..utils.schema import SchemaError, bounds, check_value, choices, fields_of
from .torch_threads import ENV_TORCH_THREADS

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
DONE_MARKER = ".complete"
TRAIN_RECORD = ".inputs.json"      # runs/<arm>/repeat_<r>/train_fold<f>.inputs.json: what the training is made from
EVALUATE_RECORD = "inputs.json"    # runs/<arm>/repeat_<r>/evaluation/inputs.json: what the evaluation scored
_PATH_SETTINGS = ("cache", "diffusion", "vqgan", "quality_model", "lesion_spec")


class ExperimentError(RuntimeError):
    """The experiment cannot run as configured; the message says what to fix."""


ROLES = ("baseline", "arm", "ceiling")


@dataclass
class Arm:
    name: str
    trainer: str
    settings: dict | None = None
    settings_source: str | None = None
    role: str = "arm"               # "baseline" (scarce, real only), "arm" (scarce + synthesis), "ceiling" (full)
    optional: str | None = None     # run only when this name is included (e.g. "diffusion")
    description: str = ""


@dataclass
class ExperimentConfig:
    dataset: str
    arms: list[Arm]
    name: str = "experiment"
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    folds: list[str] = field(default_factory=lambda: ["0"])
    repeats: int = 3
    seed: int = 0
    device: str = "cuda"
    jobs: int = 1
    budget: dict = field(default_factory=dict)
    checkpoint: str = "checkpoint_best.pth"
    reference_arm: str | None = None
    test_images: str | None = None
    test_labels: str | None = None
    predict: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    postprocessing: bool = False    # nnU-Net's postprocessing decided on validation, reported beside the raw
    env: dict = field(default_factory=dict)
    scarcity: dict | None = None
    description: str = ""
    source: str = ""
    prepare: dict | None = None     # how the dataset is made from source files (experiments.prepare)
    executor: dict | None = None    # where the chains run: local (default), slurm, submitit_local (.executors)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "arms"}
        if not d.get("postprocessing"):   # off: experiment.json reads as before the option existed
            d.pop("postprocessing", None)
        if not d.get("executor"):   # local: experiment.json reads as before the option existed
            d.pop("executor", None)
        d["arms"] = [{"name": a.name, "trainer": a.trainer, "settings": a.settings, "role": a.role,
                      **({"optional": a.optional} if a.optional else {})} for a in self.arms]
        return d

    def arm_with_role(self, role: str) -> Arm | None:
        return next((a for a in self.arms if a.role == role), None)


BUDGET_KEYS = {"epochs": "PROMPTLESION_NUM_EPOCHS", "iterations_per_epoch": "PROMPTLESION_NUM_ITERATIONS_PER_EPOCH",
               "val_iterations_per_epoch": "PROMPTLESION_NUM_VAL_ITERATIONS_PER_EPOCH",
               "save_every": "PROMPTLESION_SAVE_EVERY", "early_stopping_patience": "PROMPTLESION_EARLY_STOPPING_PATIENCE",
               "mirroring": "PROMPTLESION_MIRRORING", "final_validation": "PROMPTLESION_FINAL_VALIDATION"}
EVALUATION_KEYS = {"nsd_tolerance_mm", "detection_min_dice", "early_radius_mm", "paired_cases", "bootstrap"}
PREDICT_KEYS = {"disable_tta", "save_probabilities", "npp", "nps"}
SCARCITY_KEYS = {"class", "keep_carriers", "seed"}
TOP_KEYS = {"name", "dataset", "configuration", "plans", "folds", "repeats", "seed", "device", "jobs", "budget",
            "checkpoint", "reference_arm", "test_images", "test_labels", "predict", "evaluation", "env", "arms",
            "postprocessing", "executor",
            "description", "scarcity", "source", "prepare"}   # "source": where OUT/experiment.json's config came from (informational)
ARM_KEYS = {"name", "trainer", "settings", "description", "role", "optional"}


# The JSON types and ranges of the config's keys (utils.schema): checked before any value is used, so that an error
# names the file, the key, the expected type and the value. Which keys exist is still TOP_KEYS & co.: a key known
# there but not typed here passes unchecked.
@dataclass
class _BudgetTypes:
    epochs: int = field(default=1, metadata=bounds(1))
    iterations_per_epoch: int = field(default=1, metadata=bounds(1))
    val_iterations_per_epoch: int = field(default=1, metadata=bounds(1))
    early_stopping_patience: int | None = field(default=None, metadata=bounds(0))   # 0 or null: off
    mirroring: bool = True
    save_every: int = field(default=1, metadata=bounds(1))
    final_validation: bool = True


@dataclass
class _PredictTypes:
    disable_tta: bool = False
    save_probabilities: bool = True
    npp: int = field(default=1, metadata=bounds(0))   # 0: nnU-Net pre/post-processes in the main process (demo)
    nps: int = field(default=1, metadata=bounds(0))


@dataclass
class _BootstrapTypes:
    n: int = field(default=2000, metadata=bounds(1))
    seed: int = 0


@dataclass
class _EvaluationTypes:
    nsd_tolerance_mm: float = field(default=2.0, metadata=bounds(0.0, lo_open=True))
    detection_min_dice: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    early_radius_mm: float = field(default=10.0, metadata=bounds(0.0, lo_open=True))
    paired_cases: str = field(default="defined", metadata=choices("defined", "with_class"))
    bootstrap: _BootstrapTypes | None = None


@dataclass
class _ArmTypes:
    name: str = ""
    trainer: str = ""
    settings: dict | str | None = None
    description: str = ""
    role: str = field(default="arm", metadata=choices(*ROLES))
    optional: str | None = None


@dataclass
class _ConfigTypes:
    name: str = ""
    dataset: int | str = ""
    configuration: str = ""
    plans: str = ""
    folds: list[int | str] = field(default_factory=list)
    repeats: int = field(default=1, metadata=bounds(1))
    seed: int = 0
    device: str = ""
    jobs: int = field(default=1, metadata=bounds(1))
    checkpoint: str = ""
    reference_arm: str | None = None
    test_images: str | None = None
    test_labels: str | None = None
    env: dict[str, str | int | float] = field(default_factory=dict)
    description: str = ""
    scarcity: dict | None = None
    arms: list[dict] = field(default_factory=list)
    source: str = ""


def _check_types(d: dict, path: Path) -> None:
    """Type and range of every typed key of config ``d`` (nested: budget, predict, evaluation, arms, scarcity)."""
    def typed(schema: type, obj: Any, prefix: str) -> None:
        known = fields_of(schema)
        for k, v in obj.items():
            if k in known:
                check_value(v, known[k][0], f"{prefix}{k}", str(path), known[k][1])

    try:
        typed(_ConfigTypes, d, "")
        for key, schema in (("budget", _BudgetTypes), ("predict", _PredictTypes), ("evaluation", _EvaluationTypes)):
            if key in d:
                typed(schema, check_value(d[key], dict, key, str(path)), f"{key}.")
        for i, a in enumerate(d.get("arms") or []):
            typed(_ArmTypes, a, f"arms[{i}].")
        sc = d.get("scarcity")
        if isinstance(sc, dict):   # "class" is a Python keyword: no dataclass field, checked by hand
            for k, tp, meta in (("class", str, {}), ("keep_carriers", int, bounds(0)), ("seed", int, {})):
                if k in sc:
                    check_value(sc[k], tp, f"scarcity.{k}", str(path), meta)
    except SchemaError as e:
        raise ExperimentError(str(e)) from None


def resolve_config_path(config: str) -> Path:
    """A config file path, or the name of a shipped config (``paper_ablation``)."""
    p = Path(config)
    if p.is_file():
        return p
    shipped = SHIPPED_CONFIGS / (config if config.endswith(".json") else config + ".json")
    if shipped.is_file():
        return shipped
    raise ExperimentError(f"config '{config}' is neither a file nor a shipped config "
                          f"(shipped: {sorted(q.stem for q in SHIPPED_CONFIGS.glob('*.json'))})")


def load_config(config: str, overrides: dict | None = None) -> ExperimentConfig:
    """Parse and check a config file (or shipped config name); ``overrides`` replaces top-level keys."""
    path = resolve_config_path(config)
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExperimentError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ExperimentError(f"{path}: an experiment config must be a JSON object {{\"name\": ..., \"arms\": [...]}}, "
                              f"got {type(d).__name__}")
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k == "budget":   # merged key by key, so "--budget epochs=5" keeps the other budget entries
            d["budget"] = {**d.get("budget", {}), **v}
        elif k == "executor":   # --executor KIND keeps the config's resources (partition, time, ...)
            ex = d.get("executor") or {}
            d["executor"] = {**({"kind": ex} if isinstance(ex, str) else ex), "kind": v}
        else:
            d[k] = v
    unknown = set(d) - TOP_KEYS
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    if d.get("dataset") in (None, ""):
        raise ExperimentError(f"{path}: no dataset; set \"dataset\" in the config or pass --dataset")
    _check_types(d, path)
    bad_budget = set(d.get("budget", {})) - set(BUDGET_KEYS)
    if bad_budget:
        raise ExperimentError(f"{path}: unknown budget keys {sorted(bad_budget)}; known: {sorted(BUDGET_KEYS)}")
    bad_eval = set(d.get("evaluation", {})) - EVALUATION_KEYS
    if bad_eval:
        raise ExperimentError(f"{path}: unknown evaluation keys {sorted(bad_eval)}; known: {sorted(EVALUATION_KEYS)}")
    if d.get("evaluation", {}).get("paired_cases", "defined") not in ("defined", "with_class"):
        raise ExperimentError(f"{path}: evaluation.paired_cases must be \"defined\" or \"with_class\"")
    bad_predict = set(d.get("predict", {})) - PREDICT_KEYS
    if bad_predict:
        raise ExperimentError(f"{path}: unknown predict keys {sorted(bad_predict)}; known: {sorted(PREDICT_KEYS)}")
    scarcity = d.get("scarcity")
    if scarcity is not None:
        if not isinstance(scarcity, dict) or set(scarcity) - SCARCITY_KEYS or not {"class", "keep_carriers"} <= set(scarcity):
            raise ExperimentError(f"{path}: \"scarcity\" must be {{\"class\": <lesion class name>, \"keep_carriers\": k, "
                                  f"\"seed\": s}} (seed optional), got {scarcity}")
        if not isinstance(scarcity["keep_carriers"], int) or scarcity["keep_carriers"] < 0:
            raise ExperimentError(f"{path}: scarcity.keep_carriers must be an integer >= 0")
        scarcity = {"class": str(scarcity["class"]), "keep_carriers": int(scarcity["keep_carriers"]),
                    "seed": int(scarcity.get("seed", 0))}
    if not d.get("arms"):
        raise ExperimentError(f"{path}: no arms")
    arms = []
    for i, a in enumerate(d["arms"]):
        if not isinstance(a, dict) or "name" not in a or "trainer" not in a:
            raise ExperimentError(f"{path}: arm #{i} needs a \"name\" and a \"trainer\"")
        extra = set(a) - ARM_KEYS
        if extra:
            raise ExperimentError(f"{path}: arm '{a['name']}' has unknown keys {sorted(extra)}; known: {sorted(ARM_KEYS)}")
        if a.get("role", "arm") not in ROLES:
            raise ExperimentError(f"{path}: arm '{a['name']}': role must be one of {list(ROLES)}, got '{a['role']}'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", a["name"]):
            raise ExperimentError(f"{path}: arm name '{a['name']}' may only hold letters, digits, '_', '-', '.'")
        settings, src = a.get("settings"), None
        if isinstance(settings, str):
            sp = Path(settings) if Path(settings).is_absolute() else path.parent / settings
            if not sp.is_file():
                raise ExperimentError(f"{path}: arm '{a['name']}': settings file {sp} not found")
            try:
                settings, src = json.loads(sp.read_text()), str(sp)
            except json.JSONDecodeError as e:
                raise ExperimentError(f"{path}: arm '{a['name']}': settings file {sp} is not valid JSON: {e}") from None
            if not isinstance(settings, dict):
                raise ExperimentError(f"{sp}: arm '{a['name']}': the settings must be a JSON object, got "
                                      f"{type(settings).__name__}")
        elif settings is not None and not isinstance(settings, dict):
            raise ExperimentError(f"{path}: arm '{a['name']}': settings must be a dict or a JSON file path")
        arms.append(Arm(a["name"], a["trainer"], settings, src, a.get("role", "arm"), a.get("optional"),
                        a.get("description", "")))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ExperimentError(f"{path}: arm names must be unique: {names}")
    for role in ("baseline", "ceiling"):
        if sum(a.role == role for a in arms) > 1:
            raise ExperimentError(f"{path}: at most one arm may have role \"{role}\"")
    baseline = next((a for a in arms if a.role == "baseline"), None)
    ceiling = next((a for a in arms if a.role == "ceiling"), None)
    ref = d.get("reference_arm")
    if ref is not None and ref not in names:
        raise ExperimentError(f"{path}: reference_arm '{ref}' is not an arm ({names})")
    if baseline is not None:
        if ref is not None and ref != baseline.name:
            raise ExperimentError(f"{path}: reference_arm '{ref}' differs from the baseline arm '{baseline.name}'; "
                                  "drop reference_arm (the baseline is the reference)")
        ref = baseline.name
    if ceiling is not None:
        if scarcity is None:
            raise ExperimentError(f"{path}: arm '{ceiling.name}' is a ceiling but there is no \"scarcity\": without it "
                                  "the ceiling would train on the baseline's data; add \"scarcity\" (see docs/evaluation.md)")
        if baseline is None:
            raise ExperimentError(f"{path}: a ceiling arm needs a baseline arm (role \"baseline\")")
        if (ceiling.trainer, ceiling.settings) != (baseline.trainer, baseline.settings):
            raise ExperimentError(f"{path}: the ceiling '{ceiling.name}' must use the baseline's trainer and settings "
                                  f"({baseline.trainer}, {baseline.settings}); only its training data differ")
    if int(d.get("repeats", 3)) < 1:
        raise ExperimentError(f"{path}: repeats must be >= 1")
    jobs = d.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ExperimentError(f"{path}: jobs must be an integer >= 1, got {jobs!r}")
    folds = [str(f) for f in d.get("folds", [0])]
    postprocessing = d.get("postprocessing", False)
    if not isinstance(postprocessing, bool):
        raise ExperimentError(f"{path}: postprocessing must be true or false, got {postprocessing!r}")
    if postprocessing and d.get("budget", {}).get("final_validation", True) is False:
        raise ExperimentError(f"{path}: \"postprocessing\" is decided on nnU-Net's validation predictions, which the "
                              "budget's \"final_validation\": false skips; set it true (or drop postprocessing)")
    if postprocessing and "all" in folds:
        raise ExperimentError(f"{path}: \"postprocessing\" must be decided on held-out validation cases, but fold "
                              "\"all\" validates on its own training cases; use numeric folds (or drop postprocessing)")
    for k in ("test_images", "test_labels"):
        if d.get(k) and not Path(d[k]).is_absolute():
            d[k] = str((path.parent / d[k]).resolve())
    executor = None
    if d.get("executor") is not None:
        from .executors import check_executor
        executor = check_executor(d["executor"], str(path))
        if executor.get("kind", "local") == "local" and set(executor) == {"kind"}:
            executor = None   # the default, said explicitly
    prepare = d.get("prepare")
    if prepare is not None:
        from .prepare import PrepareError, check_prepare
        try:
            check_prepare(prepare, str(path))
        except PrepareError as e:
            raise ExperimentError(str(e)) from None
    return ExperimentConfig(dataset=str(d["dataset"]), arms=arms, name=d.get("name", path.stem),
                            configuration=d.get("configuration", "3d_fullres"), plans=d.get("plans", "nnUNetPlans"),
                            folds=folds, repeats=int(d.get("repeats", 3)), seed=int(d.get("seed", 0)),
                            device=d.get("device", "cuda"), jobs=jobs, budget=dict(d.get("budget", {})),
                            checkpoint=d.get("checkpoint", "checkpoint_best.pth"), reference_arm=ref,
                            test_images=d.get("test_images"), test_labels=d.get("test_labels"),
                            predict=dict(d.get("predict", {})), evaluation=dict(d.get("evaluation", {})),
                            env={k: str(v) for k, v in d.get("env", {}).items()}, scarcity=scarcity,
                            postprocessing=postprocessing,
                            description=d.get("description", ""), source=str(path), prepare=prepare,
                            executor=executor)


def _expand(value: Any, arm: str) -> Any:
    """Replace ${VAR} in strings (recursively) by environment variables; a missing one is an error."""
    if isinstance(value, dict):
        return {k: _expand(v, arm) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, arm) for v in value]
    if isinstance(value, str):
        def sub(m):
            var = m.group(1)
            if var not in os.environ:
                raise ExperimentError(f"arm '{arm}': settings value '{value}' needs the environment variable {var} "
                                      "(see docs/evaluation.md for what it should point to)")
            return os.environ[var]
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)
    return value


def _digest(obj: Any) -> str:
    """Short sha256 of bytes or of a JSON-able object (canonical: sorted keys)."""
    import hashlib

    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


_CONTENT_DIGESTS: dict[tuple, str] = {}


def _content_digest(path: Path) -> str:
    """sha256 of a file's content (a folder: of its manifest.json, or of its file names and sizes); "missing" when
    there is nothing. Cached per (path, size, mtime) within the process: a generator checkpoint is read once."""
    import hashlib

    try:
        st = path.stat()
    except OSError:
        return "missing"
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            return _digest(manifest.read_bytes())
        return _digest(sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file()))
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
        _CONTENT_DIGESTS[key] = "sha256:" + h.hexdigest()[:16]
    return _CONTENT_DIGESTS[key]


def _read_record(path: Path) -> dict | None:
    """The "inputs" of a step record file; None when it is missing or unreadable (a torn or foreign file)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("inputs") if isinstance(rec, dict) and isinstance(rec.get("inputs"), dict) else None


def _read_record_text(text: str) -> dict | None:
    """The JSON stamp in a predictions/.complete marker ("<time> {json}"); None for an older version's stamp."""
    try:
        rec = json.loads(text[text.index("{"):])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):   # an empty dict adds no key: {} and a missing budget read alike
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _describe_changes(old: dict | None, new: dict) -> str:
    """'budget.epochs 1 -> 3; settings.synthetic_fraction 0.5 -> 1.0' (digests: 'data_digest changed')."""
    if old is None:
        return "no readable record of what it was made from (an older version's or a torn record)"
    a, b = _flatten(old), _flatten(new)
    unset = object()

    def show(v: Any) -> str:
        return "unset" if v is unset else json.dumps(v)[:80]

    parts = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, unset) == b.get(k, unset):
            continue
        if k == "models":
            parts.append("the models changed (retrained)")
        elif k == "predictions":
            parts.append("the predictions changed (redone)")
        elif k == "decision":
            parts.append("the postprocessing decision changed (redone)")
        elif k.endswith("digest") or k.startswith("synthesis_files."):   # digests say only that it changed
            parts.append(f"{k} changed")
        else:
            parts.append(f"{k} {show(a.get(k, unset))} -> {show(b.get(k, unset))}")
    return "; ".join(parts) or "record differs"


class ExperimentRunner:
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
        self.cfg = cfg
        self.retrain_changed = retrain_changed
        self._inputs_cache: dict[tuple, dict] = {}
        self.out = Path(out_dir).resolve()
        self.print = _one_line_at_a_time(log or (lambda s: print(s, flush=True)))
        self.show = tuple(show)
        self.class_notes = dict(class_notes or {})
        if arms:
            unknown = set(arms) - {a.name for a in cfg.arms}
            if unknown:
                raise ExperimentError(f"--arms names unknown arm(s) {sorted(unknown)}; arms: {[a.name for a in cfg.arms]}")
            cfg.arms = [a for a in cfg.arms if a.name in arms]
        else:
            cfg.arms = [a for a in cfg.arms if a.optional is None or a.optional in (include or ())]
        self.scarcity: list[dict] | None = None   # one record per base fold, set by prepare()
        self.t0 = time.time()
        self._children: set[subprocess.Popen] = set()   # running nnU-Net commands (several with jobs > 1)
        self._halt = threading.Event()                    # parallel runs: start no further step
        self._evaluate_lock = threading.Lock()            # evaluation writes matplotlib figures (not thread-safe)
        self._promptlesion_arms: set[str] = set()   # arms whose trainer reads PROMPTLESION_SETTINGS (set by check)
        for var in ("nnUNet_raw", "nnUNet_preprocessed"):
            if not os.environ.get(var):
                raise ExperimentError(f"environment variable {var} is not set; nnU-Net needs nnUNet_raw and "
                                      "nnUNet_preprocessed (see nnU-Net's setting_up_paths documentation)")
        self.raw = Path(os.environ["nnUNet_raw"])
        self.pre = Path(os.environ["nnUNet_preprocessed"])
        self.dataset_name = self._dataset_name(cfg.dataset)
        self.images = Path(cfg.test_images) if cfg.test_images else self.raw / self.dataset_name / "imagesTs"
        self.labels = Path(cfg.test_labels) if cfg.test_labels else self.raw / self.dataset_name / "labelsTs"

    # ------------------------------------------------------------------ checks
    def _dataset_name(self, dataset: str) -> str:
        if dataset.startswith("Dataset"):
            return dataset
        try:
            did = int(dataset)
        except ValueError:
            raise ExperimentError(f"dataset must be an id or DatasetXXX_Name, got '{dataset}'") from None
        for base in (self.pre, self.raw):
            hits = sorted(base.glob(f"Dataset{did:03d}_*")) if base.is_dir() else []
            if hits:
                return hits[0].name
        raise ExperimentError(f"dataset {did} not found in nnUNet_preprocessed ({self.pre}) or nnUNet_raw ({self.raw})")

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
                info.append(_scarcity_line(rec))
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        from ..trainers.early_stopping import honours_experiment_controls
        from ..trainers.promptlesion_trainer import PromptLesionTrainer
        from ..trainers.settings import PromptLesionSettings
        import contextlib

        errors = []
        self._promptlesion_arms = set()
        for arm in self.cfg.arms:
            try:
                with contextlib.redirect_stdout(io.StringIO()):   # nnU-Net prints its search path
                    cls = recursive_find_trainer_class_by_name(arm.trainer)
            except (RuntimeError, AssertionError) as e:
                errors.append(f"arm '{arm.name}': trainer '{arm.trainer}' not found by nnU-Net: {e}")
                continue
            if not honours_experiment_controls(cls):
                errors.append(f"arm '{arm.name}': trainer '{arm.trainer}' ignores the experiment budget, seed and early "
                              "stopping (it does not derive from EarlyStoppingMixin): use nnUNetTrainer_earlyStopping "
                              "for a plain nnU-Net arm, or add nnunet_promptlesion.trainers.early_stopping."
                              "EarlyStoppingMixin to the trainer's bases")
                continue
            if issubclass(cls, PromptLesionTrainer):
                self._promptlesion_arms.add(arm.name)
                try:
                    settings = _expand(arm.settings or {}, arm.name)
                    s = PromptLesionSettings.from_dict(settings, f"arm '{arm.name}' settings")
                except ExperimentError as e:
                    errors.append(str(e))
                    continue
                except Exception as e:   # SettingsError and friends: the message names the bad key
                    errors.append(f"arm '{arm.name}': settings cannot run: {e}")
                    continue
                missing = [f"{k}={settings[k]}" for k in _PATH_SETTINGS
                           if isinstance(settings.get(k), str) and not Path(settings[k]).exists()]
                if missing:
                    errors.append(f"arm '{arm.name}': settings point to missing files: {missing}")
                    continue
                n = s.n_synthetic(cm.batch_size)
                warn = ""
                if n == 0:
                    warn = "  WARNING: no synthetic sample per batch at this batch size"
                elif abs(n / cm.batch_size - float(s.synthetic_fraction)) > 1e-6:
                    warn = (f"  WARNING: synthetic_fraction {s.synthetic_fraction} is {n}/{cm.batch_size} at this batch "
                            "size; raise the batch size (plans) to get the requested ratio")
                info.append(f"arm {arm.name}: {arm.trainer}, synthesizer {s.synthesizer}, batch {cm.batch_size} = "
                            f"{cm.batch_size - n} real + {n} synthetic{warn}")
            else:
                if arm.settings:
                    errors.append(f"arm '{arm.name}': trainer '{arm.trainer}' is not a PromptLesionTrainer and does not "
                                  "read PromptLesion settings; remove \"settings\" or use a PromptLesion trainer")
                    continue
                info.append(f"arm {arm.name}: {arm.trainer} (real data only)")
        if errors:
            raise ExperimentError("these arms cannot run:\n  " + "\n  ".join(errors))
        return info

    # ------------------------------------------------------------------ scarcity
    def _data_id(self) -> str:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = json.loads((self.pre / self.dataset_name / f"{self.cfg.plans}.json").read_text())
        return PlansManager(plans).get_configuration(self.cfg.configuration).data_identifier

    def _derive_scarcity(self, write: bool) -> list[dict]:
        from .scarcity import ScarcityError, derive_scarcity_folds

        sc = self.cfg.scarcity
        dj = json.loads((self.pre / self.dataset_name / "dataset.json").read_text())
        try:
            return [derive_scarcity_folds(self.pre / self.dataset_name, self._data_id(), dj, sc["class"],
                                          sc["keep_carriers"], sc["seed"], base, write=write)
                    for base in self.cfg.folds]
        except ScarcityError as e:
            raise ExperimentError(f"scarcity: {e}") from None

    def prepare(self) -> None:
        """Derive the scarce and full folds (appended to splits_final.json). run() records them in scarcity.json once
        the folder's steps are known to match this config (a refused re-run leaves the old record)."""
        if not self.cfg.scarcity:
            self.scarcity = None
            return
        self.scarcity = self._derive_scarcity(write=True)

    def arm_folds(self, arm: Arm) -> list[str]:
        """The nnU-Net folds an arm trains on: the base folds, or with scarcity their scarce/full derivation."""
        if not self.cfg.scarcity:
            return list(self.cfg.folds)
        if self.scarcity is None:
            self.prepare()
        key = "full_fold" if arm.role == "ceiling" else "scarce_fold"
        return [rec[key] for rec in self.scarcity]

    def _base_index(self, fold: str | None) -> int:
        """Seed offset of a fold: the base fold's number (0 for "all"), the same for scarce and full folds."""
        if fold is None:
            return 0
        for rec in self.scarcity or []:
            if fold in (rec["scarce_fold"], rec["full_fold"]):
                fold = rec["base_fold"]
                break
        return 0 if fold == "all" else int(fold)

    # ------------------------------------------------------------------ steps
    def run_dir(self, arm: str, repeat: int) -> Path:
        return self.out / "runs" / arm / f"repeat_{repeat}"

    def fold_dir(self, arm: Arm, repeat: int, fold: str) -> Path:
        return (self.run_dir(arm.name, repeat) / "nnUNet_results" / self.dataset_name /
                f"{arm.trainer}__{self.cfg.plans}__{self.cfg.configuration}" / f"fold_{fold}")

    def _env(self, arm: Arm, repeat: int, fold: str | None) -> dict:
        env = dict(os.environ)
        env.update(self.cfg.env)
        env["nnUNet_results"] = str(self.run_dir(arm.name, repeat) / "nnUNet_results")
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
        env.pop("PROMPTLESION_SETTINGS", None)
        settings_file = self.run_dir(arm.name, repeat) / "settings.json"
        if settings_file.is_file():
            env["PROMPTLESION_SETTINGS"] = str(settings_file)
        env["PROMPTLESION_SEED"] = str(self.cfg.seed + 1000 * repeat + self._base_index(fold))
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

    def _progress(self, i: int, n: int, msg: str) -> None:
        el = int(time.time() - self.t0)
        line = f"[experiment {i}/{n} {el // 3600:d}:{el // 60 % 60:02d}:{el % 60:02d}] {msg}"
        self.print(line)
        with open(self.out / "experiment.log", "a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    def _train_marker(self, arm: Arm, repeat: int, fold: str) -> Path:
        return self.run_dir(arm.name, repeat) / f"train_fold{fold}{DONE_MARKER}"

    def _train_record(self, arm: Arm, repeat: int, fold: str) -> Path:
        return self.run_dir(arm.name, repeat) / f"train_fold{fold}{TRAIN_RECORD}"

    def train_inputs(self, arm: Arm, repeat: int, fold: str) -> dict:
        """What a training is made from: trainer, settings, budget, seed, fold, plans and configuration, data.

        Written to train_fold<f>.inputs.json before the training starts and compared on every later run, so a
        folder never holds a model under a config it was not trained with (see :meth:`changed_steps`). The
        device, "jobs" and "env" are left out: they change how fast a model is made, not what it is trained on."""
        key = (arm.name, repeat, fold)
        if key not in self._inputs_cache:   # the data fingerprint lists the fold's files: once per run
            self._inputs_cache[key] = {
                "trainer": arm.trainer, "settings": _expand(arm.settings, arm.name) if arm.settings else None,
                "budget": dict(sorted(self.cfg.budget.items())),
                "seed": self.cfg.seed + 1000 * repeat + self._base_index(fold), "fold": fold,
                "plans": self.cfg.plans, "configuration": self.cfg.configuration,
                **self._data_fingerprint(fold), **self._synthesis_files(arm)}
            # as it reads back from the record file (tuples become lists), so that equal inputs compare equal
            self._inputs_cache[key] = json.loads(json.dumps(self._inputs_cache[key], default=str))
        return self._inputs_cache[key]

    def _synthesis_files(self, arm: Arm) -> dict:
        """Digests of the files a PromptLesion arm synthesizes from: every path in its settings (generator checkpoints,
        a lesion cache, a lesion spec) and else the dataset's lesion_spec.json (where the trainer finds it). A path
        that now holds other content (a generator retrained into the same file, an edited spec) changes the inputs
        like a changed setting. An arm without settings whose trainer name does not start with "PromptLesion"
        synthesizes nothing and gets none (the trainer class is not imported here: this runs on every re-run)."""
        if arm.settings is None and not arm.trainer.startswith("PromptLesion"):
            return {}
        settings = _expand(arm.settings or {}, arm.name)
        files = {k: settings[k] for k in _PATH_SETTINGS if isinstance(settings.get(k), str)}
        if "lesion_spec" not in files:
            from ..lesions.spec import LESION_SPEC_FILENAME

            for c in (self.pre / self.dataset_name / LESION_SPEC_FILENAME, self.raw / self.dataset_name / LESION_SPEC_FILENAME):
                if c.is_file():
                    files["lesion_spec"] = str(c)
                    break
        return {"synthesis_files": {k: _content_digest(Path(p)) for k, p in sorted(files.items())}}

    def _data_fingerprint(self, fold: str) -> dict:
        """Digests of the plans (the configuration as nnU-Net resolves it), dataset.json, the fold's training and
        validation cases, and the names and sizes of their preprocessed files (sizes, not contents: reading every
        case would cost minutes on a real dataset; re-preprocessing the same data gives the same sizes)."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        ds = self.pre / self.dataset_name
        if not (ds / f"{self.cfg.plans}.json").is_file():
            raise ExperimentError(f"{ds / (self.cfg.plans + '.json')} not found: the trainings in {self.out} cannot be "
                                  f"compared with this config; plan and preprocess first, e.g. nnUNetv2_plan_and_preprocess "
                                  f"-d {self.dataset_name} -c {self.cfg.configuration}")
        plans = json.loads((ds / f"{self.cfg.plans}.json").read_text())
        if self.cfg.configuration not in plans.get("configurations", {}):
            raise ExperimentError(f"{ds / (self.cfg.plans + '.json')} has no configuration '{self.cfg.configuration}'")
        cm = PlansManager(plans).get_configuration(self.cfg.configuration)
        plans_part = {"configuration": cm.configuration, **{k: v for k, v in plans.items() if k != "configurations"}}
        data = ds / cm.data_identifier
        files: dict[str, list] = {}
        if data.is_dir():
            for e in os.scandir(data):
                if e.name.endswith(".npy"):   # unpacked copies of .npz cases that older nnU-Net writes while training
                    continue
                case = e.name.split(".")[0]
                files.setdefault(case[:-4] if case.endswith("_seg") else case, []).append((e.name, e.stat().st_size))
        split = self._fold_split(fold, sorted(files))
        used = sorted(f for c in sorted(set(split["train"]) | set(split["val"])) for f in files.get(c, []))
        return {"plans_digest": _digest(plans_part), "dataset_json_digest": _digest((ds / "dataset.json").read_bytes()),
                "split_digest": _digest(split), "n_train": len(split["train"]), "n_val": len(split["val"]),
                "data_digest": _digest(used)}

    def _fold_split(self, fold: str, cases: list[str]) -> dict:
        """{"train": [...], "val": [...]} of ``fold`` as nnU-Net's trainer will use it: fold "all" trains and validates
        on every case; other folds come from splits_final.json, or (not written yet: nnU-Net writes it at its first
        training) from the same function and seed nnU-Net uses, so the record does not change once it exists."""
        if fold == "all":
            return {"train": sorted(cases), "val": sorted(cases)}
        sf = self.pre / self.dataset_name / "splits_final.json"
        if sf.is_file():
            splits = json.loads(sf.read_text())
        else:
            from nnunetv2.utilities.crossval_split import generate_crossval_split

            splits = generate_crossval_split(sorted(cases), seed=12345, n_splits=5)
        if not 0 <= int(fold) < len(splits):
            raise ExperimentError(f"fold {fold} is not in {sf} ({len(splits)} folds)")
        return {k: sorted(splits[int(fold)][k]) for k in ("train", "val")}

    def _train_finished(self, arm: Arm, repeat: int, fold: str) -> bool:
        # Finished: nnUNetv2_train returned 0 here before (marker) from the inputs the config gives now (record).
        # A training without a record (an older version's, or one run by hand) is a changed step, see changed_steps.
        fd = self.fold_dir(arm, repeat, fold)
        return ((fd / "checkpoint_final.pth").is_file() and self._train_marker(arm, repeat, fold).is_file()
                and _read_record(self._train_record(arm, repeat, fold)) == self.train_inputs(arm, repeat, fold))

    def _predict_stamp(self, arm: Arm, repeat: int = 0) -> str:
        """What a prediction is made from, one line of JSON: the models (their training records' digests), the
        checkpoint, the test images and the predict options."""
        folds = self.arm_folds(arm)
        return json.dumps({"folds": folds, "checkpoint": self.cfg.checkpoint, "images": str(self.images),
                           "predict": dict(sorted(self.cfg.predict.items())),
                           "models": [_digest(self.train_inputs(arm, repeat, f)) for f in folds]}, sort_keys=True)

    def _predict_finished(self, arm: Arm, repeat: int) -> bool:
        done = self.run_dir(arm.name, repeat) / "predictions" / DONE_MARKER
        return done.is_file() and self._predict_stamp(arm, repeat) in done.read_text()

    def _evaluate_inputs(self, arm: Arm, repeat: int) -> dict:
        return {"predictions": _digest(self._predict_stamp(arm, repeat)), "labels": str(self.labels),
                "evaluation": dict(sorted(self.cfg.evaluation.items()))}

    def _evaluate_finished(self, arm: Arm, repeat: int) -> bool:
        ev = self.run_dir(arm.name, repeat) / "evaluation"
        return (ev / "evaluation.json").is_file() and _read_record(ev / EVALUATE_RECORD) == self._evaluate_inputs(arm, repeat)

    def changed_steps(self) -> list[tuple[str, Arm, int, str | None, str]]:
        """Steps that ran (or started) in this folder from other inputs than the config gives now:
        [(kind, arm, repeat, fold or None, what changed)]. A changed training makes its prediction and evaluation
        changed too (their records hold the models' digests)."""
        out = []
        for r in range(self.cfg.repeats):
            for arm in self.cfg.arms:
                rd = self.run_dir(arm.name, r)
                for fold in self.arm_folds(arm):
                    fd = self.fold_dir(arm, r, fold)
                    rec_file = self._train_record(arm, r, fold)
                    started = rec_file.is_file() or self._train_marker(arm, r, fold).is_file() or any(
                        (fd / c).is_file() for c in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"))
                    if not started:
                        continue
                    old = _read_record(rec_file)
                    now = self.train_inputs(arm, r, fold)
                    if old is None:
                        out.append(("train", arm, r, fold, f"no record of what it was trained from ({rec_file} "
                                                           "missing: an older version's or a hand-run training)"))
                    elif old != now:
                        out.append(("train", arm, r, fold, _describe_changes(old, now)))
                done = rd / "predictions" / DONE_MARKER
                if done.is_file():
                    stamp = self._predict_stamp(arm, r)
                    text = done.read_text()
                    if stamp not in text:
                        out.append(("predict", arm, r, None, _describe_changes(_read_record_text(text),
                                                                               json.loads(stamp))))
                ev = rd / "evaluation"
                if (ev / "evaluation.json").is_file():
                    old = _read_record(ev / EVALUATE_RECORD)
                    now = self._evaluate_inputs(arm, r)
                    if old != now:
                        out.append(("evaluate", arm, r, None, _describe_changes(old, now)))
                if self.cfg.postprocessing:
                    out += self._changed_pp_steps(arm, r)
        return out

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
        for kind, arm, r, fold, _ in changed:
            rd = self.run_dir(arm.name, r)
            if kind == "train":
                fd = self.fold_dir(arm, r, fold)
                if fd.exists():
                    shutil.rmtree(fd)
                for f in (self._train_marker(arm, r, fold), self._train_record(arm, r, fold)):
                    f.unlink(missing_ok=True)
            if kind in ("train", "predict"):
                (rd / "predictions" / DONE_MARKER).unlink(missing_ok=True)
            if kind in ("train", "predict", "evaluate") and (rd / "evaluation").exists():
                shutil.rmtree(rd / "evaluation")
            # postprocessing outputs downstream of the changed step (all three follow a changed training)
            for folder, kinds in (("postprocessing", ("train", "postprocess")),
                                  ("predictions_pp", ("train", "predict", "postprocess")),
                                  ("evaluation_pp", ("train", "predict", "postprocess", "evaluate_pp"))):
                if kind in kinds and (rd / folder).exists():
                    shutil.rmtree(rd / folder)

    def _finished_before(self) -> bool:
        """True when this same config ran here before (experiment.json) and every one of its steps finished:
        a re-run then has nothing to check or run (the check imports every arm's trainer, i.e. nnU-Net and
        torch, seconds of CPU spent on a report that is already written)."""
        try:
            last = json.loads((self.out / "experiment.json").read_text())
        except (OSError, ValueError):
            return False
        now = json.loads(json.dumps(self.cfg.to_dict()))
        info = ("source", "executor")   # where it was read from and where it ran change nothing made
        if {k: v for k, v in last.items() if k not in info} != {k: v for k, v in now.items() if k not in info}:
            return False   # another config
        if not (self.pre / self.dataset_name / f"{self.cfg.plans}.json").is_file():
            return False   # the data moved: check() says what is missing (the scarce folds below read the plans)
        return all(all(self._train_finished(arm, r, f) for f in self.arm_folds(arm))
                   and self._predict_finished(arm, r) and self._evaluate_finished(arm, r)
                   and self._pp_finished(arm, r)
                   for r in range(self.cfg.repeats) for arm in self.cfg.arms)

    def chain_finished(self, arm: Arm, repeat: int) -> bool:
        """Every step of the (arm, repeat) chain finished from the inputs the config gives now (an executor
        submits no job for such a chain)."""
        return (all(self._train_finished(arm, repeat, f) for f in self.arm_folds(arm))
                and self._predict_finished(arm, repeat) and self._evaluate_finished(arm, repeat)
                and self._pp_finished(arm, repeat))

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
        if resume:
            cmd.append("--c")
        log = self.run_dir(arm.name, repeat) / "logs" / f"train_fold{fold}.log"
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
        from ..evaluation.transfer import transfer_verdicts
        from ..trainers.synthetic_validation import load_gauges, synthetic_summary

        epoch = "best" if self.cfg.checkpoint == "checkpoint_best.pth" else "last"
        syn = [synthetic_summary(g, epoch=epoch) for g in
               (load_gauges(self.fold_dir(arm, repeat, f)) for f in self.arm_folds(arm)) if g is not None]
        syn = [x for x in syn if x]
        synthetic = _mean_dicts(syn) if syn else None
        return {"real": {"summary": real}, "synthetic": synthetic, "synthetic_epoch": epoch,
                "verdicts": transfer_verdicts(real, synthetic)}

    # ------------------------------------------------------------------ nnU-Net's postprocessing ("postprocessing")
    # Per (arm, repeat): nnUNetv2_determine_postprocessing decides on the training's validation predictions (nnU-Net's
    # final validation of cases held out of it) against nnUNet_preprocessed/<dataset>/gt_segmentations, into
    # postprocessing/; nnUNetv2_apply_postprocessing applies that to the test predictions, into predictions_pp/;
    # evaluate_pp scores them into evaluation_pp/. Every folder is written whole (atomic_dir) with an inputs.json
    # record, so a killed step leaves nothing that reads as finished and a re-run redoes exactly what changed.
    def _pp_decision_inputs(self, arm: Arm, repeat: int) -> dict:
        """What the decision is made from: the trainings (their validation predictions) and the reference labels."""
        folds = self.arm_folds(arm)
        return {"folds": folds, "models": [_digest(self.train_inputs(arm, repeat, f)) for f in folds],
                "reference": str(self.pre / self.dataset_name / "gt_segmentations")}

    def _pp_apply_inputs(self, arm: Arm, repeat: int) -> dict:
        return {"predictions": _digest(self._predict_stamp(arm, repeat)),
                "decision": _digest(self._pp_decision_inputs(arm, repeat))}

    def _pp_evaluate_inputs(self, arm: Arm, repeat: int) -> dict:
        return {"predictions": _digest(self._pp_apply_inputs(arm, repeat)), "labels": str(self.labels),
                "evaluation": dict(sorted(self.cfg.evaluation.items()))}

    def _pp_records(self, arm: Arm, repeat: int) -> list[tuple[str, str, str, Callable[[Arm, int], dict]]]:
        """(step kind, folder, the file that makes it finished, its inputs) of the three postprocessing outputs."""
        return [("postprocess", "postprocessing", "postprocessing.pkl", self._pp_decision_inputs),
                ("postprocess", "predictions_pp", EVALUATE_RECORD, self._pp_apply_inputs),
                ("evaluate_pp", "evaluation_pp", "evaluation.json", self._pp_evaluate_inputs)]

    def _pp_done(self, arm: Arm, repeat: int, folder: str) -> bool:
        _, _, product, inputs = next(x for x in self._pp_records(arm, repeat) if x[1] == folder)
        d = self.run_dir(arm.name, repeat) / folder
        return (d / product).is_file() and _read_record(d / EVALUATE_RECORD) == inputs(arm, repeat)

    def _pp_finished(self, arm: Arm, repeat: int) -> bool:
        return not self.cfg.postprocessing or all(self._pp_done(arm, repeat, folder)
                                                  for _, folder, _, _ in self._pp_records(arm, repeat))

    def _changed_pp_steps(self, arm: Arm, r: int) -> list[tuple[str, Arm, int, str | None, str]]:
        out = []
        for kind, folder, _, inputs in self._pp_records(arm, r):
            rec = self.run_dir(arm.name, r) / folder / EVALUATE_RECORD
            if rec.is_file() and (old := _read_record(rec)) != (now := inputs(arm, r)):
                if not any(k == kind for k, *_ in out):   # a changed decision redoes its application too
                    out.append((kind, arm, r, None, _describe_changes(old, now)))
        return out

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
        _remove_partials(rd, "postprocessing")
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
        _remove_partials(rd, "predictions_pp")
        log = rd / "logs" / "postprocessing.log"
        with atomic_dir(rd / "predictions_pp", overwrite=True) as tmp:
            cmd = [self._pp_command("nnUNetv2_apply_postprocessing"), "-i", str(rd / "predictions"), "-o", str(tmp),
                   "-pp_pkl_file", str(rd / "postprocessing" / "postprocessing.pkl"), "-np", "1",
                   "-plans_json", str(ds / f"{self.cfg.plans}.json"), "-dataset_json", str(ds / "dataset.json")]
            if self._run(cmd, self._env(arm, repeat, None), log) != 0:
                self._fail(f"applying the postprocessing arm '{arm.name}' repeat {repeat}", log)
            write_json_atomic({"inputs": self._pp_apply_inputs(arm, repeat)}, tmp / EVALUATE_RECORD)

    def _pp_decision_text(self, arm_name: str, repeat: int) -> str:
        """'largest component of: foreground, <class>', or 'none' (nnU-Net found no gain on validation)."""
        try:
            pj = json.loads((self.run_dir(arm_name, repeat) / "postprocessing" / "postprocessing.json").read_text())
            labels = json.loads((self.pre / self.dataset_name / "dataset.json").read_text())["labels"]
        except (OSError, ValueError, KeyError):
            return "n/a"
        names = {json.dumps(v): k for k, v in labels.items()}
        kept = []
        for kw in pj.get("postprocessing_kwargs") or []:
            lr = kw.get("labels_or_regions")
            if isinstance(lr, list) and len(lr) > 1:
                kept.append("foreground")
            else:
                lr = lr[0] if isinstance(lr, list) else lr
                kept.append(names.get(json.dumps(lr), str(lr)))
        return "largest component of " + ", ".join(kept) if kept else "none"

    def evaluate_pp(self, arm: Arm, repeat: int) -> str:
        from ..evaluation.evaluate import evaluate_folders, write_outputs

        if self._pp_done(arm, repeat, "evaluation_pp"):
            return "skipped (finished)"
        rd = self.run_dir(arm.name, repeat)
        e = self.cfg.evaluation
        kwargs = {k: e[k] for k in ("nsd_tolerance_mm", "detection_min_dice", "early_radius_mm") if k in e}
        results = evaluate_folders(rd / "predictions_pp", self.labels,
                                   dataset_json=self.pre / self.dataset_name / "dataset.json", **kwargs)
        _remove_partials(rd, "evaluation_pp")
        with atomic_dir(rd / "evaluation_pp", overwrite=True) as tmp:
            write_outputs(results, tmp, title=f"{arm.name} repeat {repeat}, after nnU-Net postprocessing")
            write_json_atomic({"inputs": self._pp_evaluate_inputs(arm, repeat)}, Path(tmp) / EVALUATE_RECORD)
        dice = {k: v["Dice"] for k, v in results["summary"].items()}
        return "evaluated after postprocessing: Dice " + ", ".join(
            f"{k} {'n/a' if v is None else format(v, '.3f')}" for k, v in dice.items())

    def _postprocessed_comparison(self, notes: dict) -> tuple[dict | None, str]:
        """(the comparison of the postprocessed predictions, its report block); same tables as the raw one."""
        from ..evaluation.statistics import format_comparison_text

        evals = self.collect("evaluation_pp")
        head = ("\n" + "=" * 100 + "\nAfter nnU-Net postprocessing: decided per training by "
                "nnUNetv2_determine_postprocessing on its validation cases\n(held out of the training, never the test "
                "set), applied to its test predictions by nnUNetv2_apply_postprocessing.\nThe tables above are the raw "
                "predictions.\n")
        if not evals:
            return None, head + "Nothing postprocessed and evaluated yet.\n"
        comp, missing = self._compare(evals)
        comp["missing"] = missing
        comp["decisions"] = {a: {str(r): self._pp_decision_text(a, r) for r in reps} for a, reps in evals.items()}
        text = head + "\n" + format_comparison_text(comp, title=f"{self.cfg.name}: {self.dataset_name}, after nnU-Net "
                                                     "postprocessing", class_notes=notes)
        text += "Postprocessing decided on validation: " + "; ".join(
            f"{a} repeat {r}: {d}" for a, ds in comp["decisions"].items() for r, d in ds.items()) + ".\n"
        if comp["missing"]:
            text += f"Not yet postprocessed and evaluated: {', '.join(comp['missing'])}.\n"
        return comp, text

    def run(self, report: bool = True) -> dict | None:
        """Every step (skipping finished ones), then the report. Returns the comparison dict (or None).

        SIGTERM is handled like Ctrl-C while the steps run: every running nnU-Net command and every process it
        started are stopped (see :func:`run_command`), finished steps stay, and the same call resumes."""
        executor = (self.cfg.executor or {}).get("kind", "local")
        if executor != "local":   # before the checks: without submitit, say how to install it at once
            from .executors import import_submitit
            import_submitit()
        self.out.mkdir(parents=True, exist_ok=True)
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
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
                self.print(f"[experiment] {_scarcity_line(rec)} (recorded in {self.out / 'scarcity.json'})")
            # one chain per (arm, repeat): its folds' trainings, then prediction and evaluation, in that order
            chains, n = [], 0
            for r in range(self.cfg.repeats):
                for arm in self.cfg.arms:
                    kinds = [("train", f) for f in self.arm_folds(arm)] + [("predict", None), ("evaluate", None)]
                    if self.cfg.postprocessing:
                        kinds += [("postprocess", None), ("evaluate_pp", None)]
                    chains.append((arm, r, [(n + k + 1, kind, fold) for k, (kind, fold) in enumerate(kinds)]))
                    n += len(kinds)
            self._halt.clear()
            if executor != "local":   # one submitit job per chain (slurm, submitit_local): see .executors
                from .executors import run_chains
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

    def _write_settings(self, arm: Arm, repeat: int) -> None:
        path = self.run_dir(arm.name, repeat) / "settings.json"
        settings = _expand(arm.settings or {}, arm.name)
        if not path.is_file() or json.loads(path.read_text()) != settings:
            write_json_atomic(settings, path)

    # ------------------------------------------------------------------ report
    def collect(self, folder: str = "evaluation") -> dict[str, dict[int, dict]]:
        from ..evaluation.evaluate import load_results

        out = {}
        for arm in self.cfg.arms:
            reps = {}
            for r in range(self.cfg.repeats):
                f = self.run_dir(arm.name, r) / folder / "evaluation.json"
                if f.is_file():
                    reps[r] = load_results(f)
            if reps:
                out[arm.name] = reps
        return out

    def gauges(self) -> dict:
        """{class: {arm: {max_softmax, mean_softmax, synthetic_pseudo_dice, verdict, repeats}}} over the
        evaluated repeats: medians over real test lesions of the max / mean softmax of their class, averaged
        over repeats; the synthetic pseudo-Dice averaged over repeats; the verdict of those averages."""
        out: dict = {}
        for arm in self.cfg.arms:
            files = [self.run_dir(arm.name, r) / "evaluation" / "transfer.json" for r in range(self.cfg.repeats)]
            recs = [json.loads(f.read_text()) for f in files if f.is_file()]
            recs = [t for t in recs if "real" in t]
            if not recs:
                continue
            real = _mean_dicts([t["real"]["summary"] for t in recs])
            syns = [t["synthetic"] for t in recs if t.get("synthetic")]
            syn = _mean_dicts(syns) if syns else None
            try:
                from ..evaluation.transfer import transfer_verdicts

                verdicts = transfer_verdicts(real, syn)
            except Exception as e:  # noqa: BLE001 - a report without verdicts is still a report
                verdicts = {c: {"verdict": f"n/a ({type(e).__name__})"} for c in real}
            for cls, v in real.items():
                out.setdefault(cls, {})[arm.name] = {
                    "max_softmax": v.get("max_prob_median"), "mean_softmax": v.get("mean_prob_median"),
                    "outside_ratio": v.get("outside_ratio"),
                    "synthetic_pseudo_dice": (syn or {}).get(cls, {}).get("pseudo_dice"),
                    "verdict": (verdicts.get(cls) or {}).get("verdict"), "repeats": len(recs)}
        return out

    def recorded_models(self) -> tuple[dict[str, list[dict]], list[str]]:
        """({arm: [inputs of every finished training of the arm, from its record]}, lines naming where the config
        now differs from them). The report states what the models are from these, never from the config alone."""
        models: dict[str, list[dict]] = {}
        drift = []
        for arm in self.cfg.arms:
            for r in range(self.cfg.repeats):
                for f in sorted(self.run_dir(arm.name, r).glob(f"train_fold*{TRAIN_RECORD}")):
                    fold = f.name[len("train_fold"):-len(TRAIN_RECORD)]
                    rec = _read_record(f)
                    if rec is None or not self._train_marker(arm, r, fold).is_file():
                        continue
                    models.setdefault(arm.name, []).append({**rec, "repeat": r})
                    try:
                        now = self.train_inputs(arm, r, fold)
                    except Exception as e:  # noqa: BLE001 - data moved: the report still says what the models are
                        drift.append(f"arm={arm.name} repeat={r} fold={fold}: cannot compare ({e})")
                        continue
                    if now != rec:
                        drift.append(f"arm={arm.name} repeat={r} fold={fold}: {_describe_changes(rec, now)}")
        return models, drift

    def _compare(self, evals: dict) -> tuple[dict, list[str]]:
        """compare_arms on ``evals`` with this config's baseline, ceiling and bootstrap, and the (arm, repeat)
        pairs not evaluated yet (raw and postprocessed reports alike)."""
        from ..evaluation.statistics import compare_arms

        ref = self.cfg.reference_arm if self.cfg.reference_arm in evals else None
        ceiling = self.cfg.arm_with_role("ceiling")
        ceil = ceiling.name if ceiling is not None and ceiling.name in evals and ref else None
        boot = self.cfg.evaluation.get("bootstrap", {})
        comp = compare_arms(evals, reference=ref, ceiling=ceil,
                            paired_cases=self.cfg.evaluation.get("paired_cases", "defined"),
                            n_boot=int(boot.get("n", 2000)), seed=int(boot.get("seed", 0)))
        missing = [f"{a.name}/repeat_{r}" for a in self.cfg.arms for r in range(self.cfg.repeats)
                   if r not in evals.get(a.name, {})]
        return comp, missing

    def report(self) -> dict | None:
        from ..evaluation.statistics import format_comparison_text, plot_comparison

        evals = self.collect()
        if not evals:
            self.print("[experiment] nothing evaluated yet: no report")
            if (self.out / "jobs" / "jobs.json").is_file():   # submitit jobs (.executors): where they stand
                from .executors import jobs_note
                self.print("[experiment] " + jobs_note(self.out).rstrip())
            return None
        comp, missing = self._compare(evals)
        comp["missing"] = missing
        comp["config"] = self.cfg.to_dict()
        sc_file = self.out / "scarcity.json"
        comp["scarcity"] = json.loads(sc_file.read_text())["records"] if sc_file.is_file() else None
        comp["gauges"] = self.gauges()
        comp["models"], drift = self.recorded_models()
        notes = dict(self.class_notes)
        for rec in comp["scarcity"] or []:
            for cls, n in rec["carriers_per_class"].items():
                extra = f"training cases with the class: scarce {n['scarce']}, full {n['full']}"
                notes[cls] = f"{notes[cls]}; {extra}" if cls in notes else extra
        pp_text = ""
        if self.cfg.postprocessing:   # a second block after the raw one, which stays as it is
            comp["postprocessed"], pp_text = self._postprocessed_comparison(notes)
        res = self.out / "results"
        res.mkdir(parents=True, exist_ok=True)
        write_json_atomic(comp, res / "comparison.json")
        # the budget the evaluated models were trained with (their records), not what the config says now
        budgets = {json.dumps(m["budget"], sort_keys=True) for ms in comp["models"].values() for m in ms}
        b = json.loads(budgets.pop()) if len(budgets) == 1 else self.cfg.budget
        title = f"{self.cfg.name}: {self.dataset_name}"
        text = format_comparison_text(comp, title=title, class_notes=notes, gauges=comp["gauges"])
        text += (f"\nBudget: {b.get('epochs', 'trainer default')} epochs x {b.get('iterations_per_epoch', 'default')} "
                 f"iterations, early stopping patience {b.get('early_stopping_patience')}, {self.cfg.checkpoint}, "
                 f"{self.cfg.plans}/{self.cfg.configuration}, folds {self.cfg.folds}, device {self.cfg.device}.\n")
        for rec in comp["scarcity"] or []:
            text += _scarcity_line(rec) + ".\n"
        text += ("Models (from their training records): " + "; ".join(
            f"{arm}: " + ", ".join(_model_line(m) for m in ms) for arm, ms in comp["models"].items()) + ".\n"
            if comp["models"] else "Models: no training record here (trained by an older version or by hand): what "
            "they were trained with is unknown; the budget above is the config's.\n")
        if drift:
            text += ("NOTE: the config now differs from the models reported here (a run without --report-only "
                     "refuses or, with --retrain-changed, retrains them):\n  " + "\n  ".join(drift) + "\n")
        if comp["gauges"]:
            text += ("Transfer gauges: max sm / mean sm = median over real test lesions of the max / mean softmax of "
                     "their class; outside = voxels painted with the class outside its real lesions, per lesion voxel; "
                     "syn pDice = pseudo-Dice on held-back synthetic samples during training; verdict: transfers / "
                     "non-specific (scores the lesions by painting the class everywhere) / realism gap (learns "
                     "synthetic, not real) / budget gap (learns neither).\n")
        if missing:
            text += f"Not yet evaluated: {', '.join(missing)}.\n"
        if (self.out / "jobs" / "jobs.json").is_file():   # run through submitit (.executors): the jobs' states
            from .executors import jobs_note
            text += jobs_note(self.out)
        text += pp_text
        write_text_atomic(text, res / "report.txt")
        write_text_atomic(f"# {title}\n\n```\n{text}```\n\n![Dice](dice_by_arm.png)\n\n"
                          "![Lesion-wise sensitivity](sensitivity_by_arm.png)\n", res / "results.md")
        for cls, rows in comp["table"].items():
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            w.writerow(["arm", "role", "repeats", "dice_mean", "dice_sd", "nsd_mean", "nsd_sd", "sensitivity_mean",
                        "sensitivity_sd", "fp_per_case_mean", "fp_per_case_sd", "lesion_dice_mean", "lesion_dice_sd",
                        "case_dice", "case_sensitivity", "dice_diff_vs_baseline", "ci_low", "ci_high", "cases",
                        "p_ttest", "p_wilcoxon", "gap_closed_dice", "gap_ci_low", "gap_ci_high",
                        "gap_closed_sensitivity"])
            for arm, row in rows.items():
                t = row["test"] or {}
                g = row["gap_closed"] or {}
                gd, gs = g.get("Dice") or {}, g.get("sensitivity") or {}
                role = next((a.role for a in self.cfg.arms if a.name == arm), "")
                w.writerow([arm, role, row["Dice"]["n"]] + [_blank(row[m][k]) for m in ("Dice", "NSD", "sensitivity",
                            "fp_per_case", "lesion_dice") for k in ("mean", "sd")] +
                           [_blank(row["case_level"]["Dice"]), _blank(row["case_level"]["sensitivity"]),
                            _blank(t.get("mean_diff")), *(_blank(x) for x in (t.get("ci") or [None, None])),
                            _blank(t.get("n")), _blank(t.get("p_ttest")), _blank(t.get("p_wilcoxon")),
                            _blank(gd.get("value")), *(_blank(x) for x in (gd.get("ci") or [None, None])),
                            _blank(gs.get("value"))])
            write_text_atomic(buf.getvalue(), res / f"per_class_{cls}.csv")
        plot_comparison(comp, res / "dice_by_arm.png", "Dice", title=f"{self.cfg.name}: Dice per class")
        plot_comparison(comp, res / "sensitivity_by_arm.png", "sensitivity",
                        title=f"{self.cfg.name}: lesion-wise sensitivity per class")
        plot_comparison(comp, res / "nsd_by_arm.png", "NSD", title=f"{self.cfg.name}: NSD per class")
        self.print(text)
        self.print(f"[experiment] results in {res}")
        return comp


def _remove_partials(parent: Path, name: str) -> None:
    """The temporary folders of an atomic_dir(parent / name) that a killed run left behind."""
    for p in parent.glob(f".{name}.*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def _model_line(m: dict) -> str:
    b = m.get("budget") or {}
    s = f" settings {json.dumps(m['settings'], sort_keys=True)}" if m.get("settings") else ""
    return (f"repeat {m.get('repeat')} fold {m.get('fold')} {m.get('trainer')} {b.get('epochs', 'default')} epochs x "
            f"{b.get('iterations_per_epoch', 'default')} iterations, seed {m.get('seed')}{s}")


def _blank(v):
    return "" if v is None else v


def _mean_dicts(dicts: list[dict]) -> dict:
    """{class: {key: mean over dicts of the numeric values}} (None where no dict has a number)."""
    out: dict = {}
    for d in dicts:
        for cls, vals in (d or {}).items():
            for k, v in (vals or {}).items():
                out.setdefault(cls, {}).setdefault(k, [])
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and v == v:
                    out[cls][k].append(float(v))
    return {cls: {k: (sum(v) / len(v) if v else None) for k, v in vals.items()} for cls, vals in out.items()}


def _scarcity_line(rec: dict) -> str:
    where = (f"folds {rec['scarce_fold']} (scarce) / {rec['full_fold']} (full) of splits_final.json"
             if rec.get("scarce_fold") is not None else "folds not written yet")
    return (f"scarcity: '{rec['class']}' in base fold {rec['base_fold']}: kept {len(rec['kept'])} of "
            f"{len(rec['carriers'])} training cases carrying it ({', '.join(rec['kept']) or 'none'}; seed "
            f"{rec['seed']}), dropped {len(rec['dropped'])}; {rec['n_train_scarce']} vs {rec['n_train_full']} "
            f"training cases; {where}")


def _one_line_at_a_time(out: Callable[[str], None]) -> Callable[[str], None]:
    """``out`` behind a lock: parallel chains print whole lines (print writes text and newline separately)."""
    lock = threading.Lock()

    def locked(line: str) -> None:
        with lock:
            out(line)
    return locked


def run_command(cmd: list[str], env: dict, log: Path, show: tuple[str, ...] = (),
                echo: Callable[[str], None] | None = None, running: set | None = None) -> int:
    """Run ``cmd`` with its output appended to ``log``; return its exit status. Never leaves a process behind.

    The child stays in our process group (Ctrl-C or a kill of the group reaches it directly) and gets SIGTERM
    from the kernel when we die (Linux parent-death signal). When we are interrupted (KeyboardInterrupt, or
    SIGTERM turned into one by the runner), the child and every process it started (nnU-Net's data
    augmentation workers, a synthesis producer) are stopped: SIGTERM first so that they release shared memory,
    SIGKILL for what is left after a grace period. Its descendants are listed before the child is signalled,
    because once it is gone they are re-parented and no longer traceable to it. ``running``, when given, holds
    the child while it runs (for a caller that must stop it from another thread).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE if show else f, stderr=subprocess.STDOUT, env=env,
                                 preexec_fn=_die_with_parent, text=bool(show), errors="replace" if show else None)
        if running is not None:
            running.add(child)
        try:
            if show:
                for line in child.stdout:
                    f.write(line)
                    f.flush()
                    if any(s in line for s in show):
                        (echo or print)("    " + line.rstrip())
            return child.wait()
        finally:
            if child.poll() is None:
                stop_process_tree(child)
            if child.stdout is not None:
                child.stdout.close()
            if running is not None:
                running.discard(child)


def _proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every live process (Linux /proc; empty elsewhere)."""
    out = {}
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            rest = stat[stat.rindex(")") + 2:].split()   # fields after "(comm)": state ppid ... starttime (22nd)
            out[int(d.name)] = (int(rest[1]), rest[19])
    return out


def descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below ``pid`` (children, grandchildren, ...)."""
    table = _proc_table()
    kids: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = {}, [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out[k] = table[k][1]
                todo.append(k)
    return out


def _alive(pids: dict[int, str]) -> dict[int, str]:
    table = _proc_table()
    return {p: t for p, t in pids.items() if p in table and table[p][1] == t}   # same start time: not a reused pid


def stop_process_tree(child: subprocess.Popen, grace_s: float = 30.0, orphan_wait_s: float = 10.0) -> None:
    """SIGTERM ``child`` and, after it ended (or ``grace_s``), its remaining descendants; SIGKILL stragglers.

    Descendants get ``orphan_wait_s`` to end by themselves once the child is gone (nnU-Net's workers notice
    their parent's death) before they are signalled."""
    tree = descendants(child.pid)
    child.terminate()
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    deadline = time.time() + orphan_wait_s
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = _alive(tree)
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        end = time.time() + 5.0
        while _alive(tree) and time.time() < end:
            time.sleep(0.1)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the runner dies (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_budget(items: list[str] | None, error: Callable[[str], Any]) -> dict | None:
    """``--budget KEY=VALUE ...`` items -> budget dict (integers; true/false for switches such as mirroring)."""
    if not items:
        return None
    out: dict = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            error(f"--budget expects KEY=VALUE, got '{item}'")
        if v.lower() in ("true", "false") or (k in ("mirroring", "final_validation") and v in ("0", "1")):
            # the switches are JSON booleans in the config; on the command line 0/1 (documented) mean the same
            out[k] = v.lower() in ("true", "1")
            continue
        try:
            out[k] = int(v)
        except ValueError:
            error(f"--budget {k}: '{v}' is not an integer (or true/false)")
    return out


def run_as_command(prog: str, body: Callable[[], Any]) -> Any:
    """Run ``body`` as a console command: SIGTERM stops it like Ctrl-C (the runner then takes its nnU-Net child's
    whole process tree down), an ExperimentError exits 2 with its message, an interruption exits 130."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
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
