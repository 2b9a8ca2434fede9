"""An experiment's config: the JSON file, its checks and defaults (:func:`load_config`), ``${VAR}`` in arm settings
(:func:`expand_env`) and ``--budget KEY=VALUE`` (:func:`parse_budget`). Only the file is read here; whether the
dataset, the test folders and the arms' trainers can run it is checked by
:meth:`nnunet_promptlesion.experiments.runner.ExperimentRunner.check`.

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
        {"name": "synthetic_pretrain", "trainer": "nnUNetTrainer_earlyStopping",   # stage 2: real only
         "pretrain": {"trainer": "PromptLesionTrainer", "settings": {"synthesizer": "rule_based"},
                      "fraction": 0.5}},   # stage 1: synthetic only, half the epochs (or "epochs": N)
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

Synthetic pretraining (an arm with ``"pretrain"``): per fold two nnU-Net trainings in a row, one arm in the
report. Stage 1 trains ``pretrain.trainer`` (a PromptLesion trainer, default PromptLesionTrainer) with
``pretrain.settings`` on synthetic samples only (``synthetic_fraction`` defaults to 1.0 there: healthy real carrier
patches with painted lesions; a setting names another share); stage 2 fine-tunes the arm's own ``trainer`` (real data
only: a plain trainer such as the baseline's, no settings) from stage 1's checkpoint_final.pth through nnU-Net's
``-pretrained_weights`` (network weights only, without the segmentation head; a fresh optimizer and learning-rate
schedule). The budget's epochs are split: ``pretrain.epochs`` (N) or ``pretrain.fraction`` (round(fraction x
epochs)) for stage 1, the rest for stage 2, each at the budget's iterations per epoch, so the arm trains as many
iterations as every other arm. The arm's result is stage 2's prediction of the test cases; stage 1 lives in
``runs/<arm>/repeat_<r>/pretrain/`` (see :mod:`.layout`).

Executor (``"executor"``; where the chains run, see :mod:`.executors`): its keys are checked here, against
:class:`ExecutorSpec`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..utils.env_names import (ENV_EPOCHS, ENV_FINAL_VALIDATION, ENV_ITERATIONS, ENV_MIRRORING, ENV_PATIENCE,
                               ENV_SAVE_EVERY, ENV_VAL_ITERATIONS)
from ..utils.schema import SchemaError, bounds, check_value, choices, fields_of, validate
from .prepare import PrepareError, check_prepare

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
#: PromptLesion settings whose value is a file: checked to exist, and their content is part of a training's inputs
PATH_SETTINGS = ("cache", "diffusion", "vqgan", "quality_model", "lesion_spec")


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
    # synthetic pretraining: {"trainer", "settings", "settings_source", "epochs" or "fraction"} (see the module doc)
    pretrain: dict | None = None
    stage: str | None = None        # "pretrain": the stage-1 training of a pretrain arm (ExperimentLayout.pretrain_stage)


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
                      **({"optional": a.optional} if a.optional else {}),
                      **({"pretrain": {k: v for k, v in a.pretrain.items() if k != "settings_source"}}
                         if a.pretrain else {})} for a in self.arms]
        return d

    def arm_with_role(self, role: str) -> Arm | None:
        return next((a for a in self.arms if a.role == role), None)


# budget key -> the environment variable it reaches the trainer (or nnU-Net's entry point) as
BUDGET_KEYS = {"epochs": ENV_EPOCHS, "iterations_per_epoch": ENV_ITERATIONS, "val_iterations_per_epoch": ENV_VAL_ITERATIONS,
               "save_every": ENV_SAVE_EVERY, "early_stopping_patience": ENV_PATIENCE, "mirroring": ENV_MIRRORING,
               "final_validation": ENV_FINAL_VALIDATION}
EVALUATION_KEYS = {"nsd_tolerance_mm", "detection_min_dice", "early_radius_mm", "paired_cases", "bootstrap"}
PREDICT_KEYS = {"disable_tta", "save_probabilities", "npp", "nps"}
SCARCITY_KEYS = {"class", "keep_carriers", "seed"}
TOP_KEYS = {"name", "dataset", "configuration", "plans", "folds", "repeats", "seed", "device", "jobs", "budget",
            "checkpoint", "reference_arm", "test_images", "test_labels", "predict", "evaluation", "env", "arms",
            "postprocessing", "executor",
            "description", "scarcity", "source", "prepare"}   # "source": where OUT/experiment.json's config came from (informational)
ARM_KEYS = {"name", "trainer", "settings", "description", "role", "optional", "pretrain"}
PRETRAIN_KEYS = {"trainer", "settings", "epochs", "fraction"}


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
    pretrain: dict | None = None


@dataclass
class _PretrainTypes:
    trainer: str = "PromptLesionTrainer"
    settings: dict | str | None = None
    epochs: int = field(default=1, metadata=bounds(1))
    fraction: float = field(default=0.5, metadata=bounds(0.0, 1.0, lo_open=True, hi_open=True))


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


EXECUTOR_KINDS = ("local", "slurm", "submitit_local")


@dataclass
class ExecutorSpec:
    """The ``"executor"`` section of a config: where the chains run (:mod:`.executors`); None: its default there."""
    kind: str = field(default="local", metadata=choices(*EXECUTOR_KINDS))
    partition: str | None = None            # SLURM partition (--partition)
    # default: 1 for device "cuda", else 0; at most 1: the runner trains one GPU per training
    gpus_per_job: int | None = field(default=None, metadata=bounds(0, 1))
    cpus_per_task: int | None = field(default=None, metadata=bounds(1))
    mem_gb: float | None = field(default=None, metadata=bounds(0.0, lo_open=True))
    time_min: int | None = field(default=None, metadata=bounds(1))   # per job; submitit requeues at the limit
    max_jobs: int | None = field(default=None, metadata=bounds(1))   # jobs submitted and not finished at a time
    poll_s: float | None = field(default=None, metadata=bounds(0.1))  # how often the jobs are asked about
    setup: list[str] = field(default_factory=list)   # shell lines run in the job before Python (module load ...)
    slurm_additional: dict[str, str | int | float | bool] = field(default_factory=dict)   # any other sbatch flag


def check_executor(d: Any, source: str) -> dict:
    """The ``"executor"`` object of a config, checked (types, ranges, known keys); returns it as given."""
    if isinstance(d, str):   # "executor": "slurm" is short for {"kind": "slurm"}
        d = {"kind": d}
    return validate(ExecutorSpec, d, source, prefix="executor", error=ExperimentError)


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
            if isinstance(a.get("pretrain"), dict):
                typed(_PretrainTypes, a["pretrain"], f"arms[{i}].pretrain.")
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
        settings, src = _arm_settings(a.get("settings"), path, a["name"])
        pretrain = _check_pretrain(a, path, d.get("budget", {})) if "pretrain" in a else None
        arms.append(Arm(a["name"], a["trainer"], settings, src, a.get("role", "arm"), a.get("optional"),
                        a.get("description", ""), pretrain))
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
        executor = check_executor(d["executor"], str(path))
        if executor.get("kind", "local") == "local" and set(executor) == {"kind"}:
            executor = None   # the default, said explicitly
    prepare = d.get("prepare")
    if prepare is not None:
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


def _arm_settings(settings: Any, path: Path, arm: str, what: str = "settings") -> tuple[dict | None, str | None]:
    """(settings, the file they were read from): a dict as given, or a JSON file path relative to the config."""
    if isinstance(settings, str):
        sp = Path(settings) if Path(settings).is_absolute() else path.parent / settings
        if not sp.is_file():
            raise ExperimentError(f"{path}: arm '{arm}': {what} file {sp} not found")
        try:
            loaded = json.loads(sp.read_text())
        except json.JSONDecodeError as e:
            raise ExperimentError(f"{path}: arm '{arm}': {what} file {sp} is not valid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ExperimentError(f"{sp}: arm '{arm}': the {what} must be a JSON object, got {type(loaded).__name__}")
        return loaded, str(sp)
    if settings is not None and not isinstance(settings, dict):
        raise ExperimentError(f"{path}: arm '{arm}': {what} must be a dict or a JSON file path")
    return settings, None


def _check_pretrain(a: dict, path: Path, budget: dict) -> dict:
    """The ``"pretrain"`` object of arm ``a`` resolved: trainer, settings (synthetic_fraction 1.0 unless given),
    settings_source, and exactly one of epochs / fraction, checked against the budget's epochs."""
    name, pre = a["name"], a["pretrain"]
    where = f"{path}: arm '{name}'"
    if not isinstance(pre, dict):
        raise ExperimentError(f"{where}: \"pretrain\" must be an object such as {{\"trainer\": \"PromptLesionTrainer\", "
                              f"\"settings\": {{...}}, \"fraction\": 0.5}}, got {json.dumps(pre)}")
    unknown = set(pre) - PRETRAIN_KEYS
    if unknown:
        raise ExperimentError(f"{where}: unknown pretrain keys {sorted(unknown)}; known: {sorted(PRETRAIN_KEYS)}")
    if ("epochs" in pre) == ("fraction" in pre):
        raise ExperimentError(f"{where}: \"pretrain\" needs exactly one of \"epochs\" (synthetic-only epochs, an "
                              "integer) or \"fraction\" (their share of the budget's epochs, in (0, 1)) to split the "
                              f"budget between pretraining and fine-tuning; got {sorted(set(pre) & {'epochs', 'fraction'})}")
    if a.get("role", "arm") != "arm":
        raise ExperimentError(f"{where}: a pretrain arm must have role \"arm\" (the baseline and the ceiling train on "
                              f"real data only), got \"{a['role']}\"")
    if a.get("settings") is not None:
        raise ExperimentError(f"{where}: the arm's \"settings\" would apply to its fine-tuning, which trains on real "
                              "data only; put the synthesis settings in \"pretrain\": {\"settings\": ...}")
    settings, src = _arm_settings(pre.get("settings"), path, name, "pretrain settings")
    out = {"trainer": pre.get("trainer", "PromptLesionTrainer"),
           "settings": {"synthetic_fraction": 1.0, **(settings or {})}, "settings_source": src,
           **{k: pre[k] for k in ("epochs", "fraction") if k in pre}}
    stage_epochs(out, budget, where)   # refuses a split the budget cannot hold
    return out


def stage_epochs(pretrain: dict, budget: dict, where: str = "") -> tuple[int, int]:
    """(stage-1 epochs, stage-2 epochs) of a pretrain arm under ``budget``: they sum to the budget's epochs."""
    total = budget.get("epochs")
    if total is None:
        raise ExperimentError(f"{where}: a pretrain arm splits the budget's \"epochs\" between pretraining and "
                              "fine-tuning; set \"budget\": {\"epochs\": N, ...} (or --budget epochs=N)")
    if "epochs" in pretrain:
        n1, asked = int(pretrain["epochs"]), f"pretrain.epochs {pretrain['epochs']}"
    else:   # half up, not Python's round-half-even: 0.5 of 7 epochs is 4 + 3
        n1, asked = int(float(pretrain["fraction"]) * total + 0.5), f"pretrain.fraction {pretrain['fraction']}"
    if not 1 <= n1 <= total - 1:
        raise ExperimentError(f"{where}: {asked} gives {n1} synthetic-only epochs of the budget's {total}; both stages "
                              f"need at least one epoch: pretraining 1 to {total - 1} epochs"
                              + ("" if total > 1 else " (raise budget.epochs to 2 or more)"))
    return n1, total - n1


def expand_env(value: Any, arm: str) -> Any:
    """Replace ${VAR} in strings (recursively) by environment variables; a missing one is an error."""
    if isinstance(value, dict):
        return {k: expand_env(v, arm) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, arm) for v in value]
    if isinstance(value, str):
        def sub(m):
            var = m.group(1)
            if var not in os.environ:
                raise ExperimentError(f"arm '{arm}': settings value '{value}' needs the environment variable {var} "
                                      "(see docs/evaluation.md for what it should point to)")
            return os.environ[var]
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sub, value)
    return value


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
