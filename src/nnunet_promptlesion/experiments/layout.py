"""The output folder of an experiment: where every (arm, repeat) keeps its trainings, predictions and evaluations,
the records that say what each step was made from, and the folds each arm trains on.

A step counts as finished only when its product is there *and* its record matches what the config gives now
(:meth:`ExperimentLayout.changed_steps` names the steps where it does not). Only the runner's own processes
write here; nothing in this module starts a process.

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
        pretrain/              a pretrain arm's stage 1 (synthetic only), laid out as above: settings.json,
                               train_fold<f>.inputs.json and .complete, nnUNet_results/, logs/; the arm's own
                               nnUNet_results/ holds stage 2 (fine-tuned on real data from its checkpoint_final.pth)
    results/                   comparison.json, report.txt, results.md, per-class CSVs, dice_by_arm.png,
                               sensitivity_by_arm.png, nsd_by_arm.png
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..lesions.spec import find_lesion_spec
from .config import PATH_SETTINGS, Arm, ExperimentConfig, ExperimentError, expand_env, stage_epochs

DONE_MARKER = ".complete"
TRAIN_RECORD = ".inputs.json"      # runs/<arm>/repeat_<r>/train_fold<f>.inputs.json: what the training is made from
EVALUATE_RECORD = "inputs.json"    # runs/<arm>/repeat_<r>/evaluation/inputs.json: what the evaluation scored


def remove_partials(parent: Path, name: str) -> None:
    """The temporary folders of an atomic_dir(parent / name) that a killed run left behind."""
    for p in parent.glob(f".{name}.*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def digest(obj: Any) -> str:
    """Short sha256 of bytes or of a JSON-able object (canonical: sorted keys)."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


_CONTENT_DIGESTS: dict[tuple, str] = {}


def content_digest(path: Path) -> str:
    """sha256 of a file's content (a folder: of its manifest.json, or of its file names and sizes); "missing" when
    there is nothing. Cached per (path, size, mtime) within the process: a generator checkpoint is read once."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            return digest(manifest.read_bytes())
        return digest(sorted((str(f.relative_to(path)), f.stat().st_size) for f in path.rglob("*") if f.is_file()))
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CONTENT_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                h.update(block)
        _CONTENT_DIGESTS[key] = "sha256:" + h.hexdigest()[:16]
    return _CONTENT_DIGESTS[key]


def read_record(path: Path) -> dict | None:
    """The "inputs" of a step record file; None when it is missing or unreadable (a torn or foreign file)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec.get("inputs") if isinstance(rec, dict) and isinstance(rec.get("inputs"), dict) else None


def read_record_text(text: str) -> dict | None:
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


def describe_changes(old: dict | None, new: dict) -> str:
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


class ExperimentLayout:
    """The folders, step records and folds of one experiment config in ``out_dir`` (nnU-Net's data: the
    ``nnUNet_raw`` and ``nnUNet_preprocessed`` environment variables). The runner builds on it; on its own it
    starts nothing and writes only splits_final.json's derived folds (:meth:`prepare`) and what
    :meth:`_clear_steps` deletes."""

    def __init__(self, cfg: ExperimentConfig, out_dir: str | os.PathLike):
        self.cfg = cfg
        self._inputs_cache: dict[tuple, dict] = {}
        self.out = Path(out_dir).resolve()
        self.scarcity: list[dict] | None = None   # one record per base fold, set by prepare()
        for var in ("nnUNet_raw", "nnUNet_preprocessed"):
            if not os.environ.get(var):
                raise ExperimentError(f"environment variable {var} is not set; nnU-Net needs nnUNet_raw and "
                                      "nnUNet_preprocessed (see nnU-Net's setting_up_paths documentation)")
        self.raw = Path(os.environ["nnUNet_raw"])
        self.pre = Path(os.environ["nnUNet_preprocessed"])
        self.dataset_name = self._dataset_name(cfg.dataset)
        self.images = Path(cfg.test_images) if cfg.test_images else self.raw / self.dataset_name / "imagesTs"
        self.labels = Path(cfg.test_labels) if cfg.test_labels else self.raw / self.dataset_name / "labelsTs"

    # ------------------------------------------------------------------ the dataset
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

    # ------------------------------------------------------------------ folds (scarcity)
    def _data_id(self) -> str:
        # nnU-Net imports torch (~3 s): only where plans are read, not on every import of the runner
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = json.loads((self.pre / self.dataset_name / f"{self.cfg.plans}.json").read_text())
        return PlansManager(plans).get_configuration(self.cfg.configuration).data_identifier

    def _derive_scarcity(self, write: bool) -> list[dict]:
        # deferred: .scarcity loads nnU-Net and torch (~1.5 s CPU at import, measured here), for configs with
        # "scarcity" only; the runner imports this module on every re-run and --list-configs
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

    # ------------------------------------------------------------------ folders, markers, records
    def run_dir(self, arm: str, repeat: int) -> Path:
        return self.out / "runs" / arm / f"repeat_{repeat}"

    def stage_dir(self, arm: Arm, repeat: int) -> Path:
        """Where a training keeps its settings, records, logs and nnUNet_results: the run folder, or for the stage-1
        training of a pretrain arm its ``pretrain/`` subfolder (own markers: a finished fine-tuning and an unfinished
        pretraining never share one)."""
        rd = self.run_dir(arm.name, repeat)
        return rd / "pretrain" if arm.stage == "pretrain" else rd

    def pretrain_stage(self, arm: Arm) -> Arm:
        """The stage-1 training of a pretrain arm as an Arm of its own: the pretrain trainer and settings."""
        pre = arm.pretrain
        if pre is None or arm.stage is not None:
            raise ExperimentError(f"arm '{arm.name}' has no \"pretrain\"")
        return Arm(arm.name, pre["trainer"], pre["settings"], pre.get("settings_source"), arm.role, arm.optional,
                   arm.description, pretrain=pre, stage="pretrain")

    def training_stages(self, arm: Arm) -> list[Arm]:
        """The trainings of an arm per fold, in order: [stage 1, the arm (stage 2)] for a pretrain arm, else [arm]."""
        return [self.pretrain_stage(arm), arm] if arm.pretrain else [arm]

    def stage_epochs(self, arm: Arm) -> int | None:
        """The epochs a training runs: the budget's, or for a pretrain arm's stage its share of them."""
        if not arm.pretrain:
            return self.cfg.budget.get("epochs")
        n1, n2 = stage_epochs(arm.pretrain, self.cfg.budget, f"arm '{arm.name}'")
        return n1 if arm.stage == "pretrain" else n2

    def fold_dir(self, arm: Arm, repeat: int, fold: str) -> Path:
        return (self.stage_dir(arm, repeat) / "nnUNet_results" / self.dataset_name /
                f"{arm.trainer}__{self.cfg.plans}__{self.cfg.configuration}" / f"fold_{fold}")

    def _train_marker(self, arm: Arm, repeat: int, fold: str) -> Path:
        return self.stage_dir(arm, repeat) / f"train_fold{fold}{DONE_MARKER}"

    def _train_record(self, arm: Arm, repeat: int, fold: str) -> Path:
        return self.stage_dir(arm, repeat) / f"train_fold{fold}{TRAIN_RECORD}"

    def train_inputs(self, arm: Arm, repeat: int, fold: str) -> dict:
        """What a training is made from: trainer, settings, budget, seed, fold, plans and configuration, data.

        Written to train_fold<f>.inputs.json before the training starts and compared on every later run, so a
        folder never holds a model under a config it was not trained with (see :meth:`changed_steps`). The
        device, "jobs" and "env" are left out: they change how fast a model is made, not what it is trained on."""
        key = (arm.name, arm.stage, repeat, fold)
        if key not in self._inputs_cache:   # the data fingerprint lists the fold's files: once per run
            self._inputs_cache[key] = {
                "trainer": arm.trainer, "settings": expand_env(arm.settings, arm.name) if arm.settings else None,
                "budget": dict(sorted(self.cfg.budget.items())),
                "seed": self.cfg.seed + 1000 * repeat + self._base_index(fold), "fold": fold,
                "plans": self.cfg.plans, "configuration": self.cfg.configuration,
                **self._data_fingerprint(fold), **self._synthesis_files(arm), **self._stage_inputs(arm, repeat, fold)}
            # as it reads back from the record file (tuples become lists), so that equal inputs compare equal
            self._inputs_cache[key] = json.loads(json.dumps(self._inputs_cache[key], default=str))
        return self._inputs_cache[key]

    def _stage_inputs(self, arm: Arm, repeat: int, fold: str) -> dict:
        """A pretrain arm's trainings: which stage, its epochs; stage 2 also the digest of stage 1's inputs (a changed
        pretraining changes the fine-tuning made from it)."""
        if not arm.pretrain:
            return {}
        n1, n2 = stage_epochs(arm.pretrain, self.cfg.budget, f"arm '{arm.name}'")
        if arm.stage == "pretrain":
            return {"stage": {"name": "pretrain", "epochs": n1}}
        return {"stage": {"name": "finetune", "epochs": n2, "pretrain_epochs": n1, "pretrain_trainer": arm.pretrain["trainer"],
                          "pretrained_digest": digest(self.train_inputs(self.pretrain_stage(arm), repeat, fold))}}

    def _synthesis_files(self, arm: Arm) -> dict:
        """Digests of the files a PromptLesion arm synthesizes from: every path in its settings (generator checkpoints,
        a lesion cache, a lesion spec) and else the dataset's lesion_spec.json (where the trainer finds it). A path
        that now holds other content (a generator retrained into the same file, an edited spec) changes the inputs
        like a changed setting. An arm without settings whose trainer name does not start with "PromptLesion"
        synthesizes nothing and gets none (the trainer class is not imported here: this runs on every re-run)."""
        if arm.settings is None and not arm.trainer.startswith("PromptLesion"):
            return {}
        settings = expand_env(arm.settings or {}, arm.name)
        files = {k: settings[k] for k in PATH_SETTINGS if isinstance(settings.get(k), str)}
        if "lesion_spec" not in files:
            found = find_lesion_spec([self.pre / self.dataset_name, self.raw / self.dataset_name])
            if found is not None:
                files["lesion_spec"] = str(found)
        return {"synthesis_files": {k: content_digest(Path(p)) for k, p in sorted(files.items())}}

    def _data_fingerprint(self, fold: str) -> dict:
        """Digests of the plans (the configuration as nnU-Net resolves it), dataset.json, the fold's training and
        validation cases, and the names and sizes of their preprocessed files (sizes, not contents: reading every
        case would cost minutes on a real dataset; re-preprocessing the same data gives the same sizes)."""
        # nnU-Net imports torch (~3 s): only where plans are read, not on every import of the runner
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
        return {"plans_digest": digest(plans_part), "dataset_json_digest": digest((ds / "dataset.json").read_bytes()),
                "split_digest": digest(split), "n_train": len(split["train"]), "n_val": len(split["val"]),
                "data_digest": digest(used)}

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
            from nnunetv2.utilities.crossval_split import generate_crossval_split   # deferred: as in _data_id

            splits = generate_crossval_split(sorted(cases), seed=12345, n_splits=5)
        if not 0 <= int(fold) < len(splits):
            raise ExperimentError(f"fold {fold} is not in {sf} ({len(splits)} folds)")
        return {k: sorted(splits[int(fold)][k]) for k in ("train", "val")}

    def _train_finished(self, arm: Arm, repeat: int, fold: str) -> bool:
        # Finished: nnUNetv2_train returned 0 here before (marker) from the inputs the config gives now (record).
        # A training without a record (an older version's, or one run by hand) is a changed step, see changed_steps.
        fd = self.fold_dir(arm, repeat, fold)
        return ((fd / "checkpoint_final.pth").is_file() and self._train_marker(arm, repeat, fold).is_file()
                and read_record(self._train_record(arm, repeat, fold)) == self.train_inputs(arm, repeat, fold))

    def _predict_stamp(self, arm: Arm, repeat: int = 0) -> str:
        """What a prediction is made from, one line of JSON: the models (their training records' digests), the
        checkpoint, the test images and the predict options."""
        folds = self.arm_folds(arm)
        return json.dumps({"folds": folds, "checkpoint": self.cfg.checkpoint, "images": str(self.images),
                           "predict": dict(sorted(self.cfg.predict.items())),
                           "models": [digest(self.train_inputs(arm, repeat, f)) for f in folds]}, sort_keys=True)

    def _predict_finished(self, arm: Arm, repeat: int) -> bool:
        done = self.run_dir(arm.name, repeat) / "predictions" / DONE_MARKER
        return done.is_file() and self._predict_stamp(arm, repeat) in done.read_text()

    def _evaluate_inputs(self, arm: Arm, repeat: int) -> dict:
        return {"predictions": digest(self._predict_stamp(arm, repeat)), "labels": str(self.labels),
                "evaluation": dict(sorted(self.cfg.evaluation.items()))}

    def _evaluate_finished(self, arm: Arm, repeat: int) -> bool:
        ev = self.run_dir(arm.name, repeat) / "evaluation"
        return (ev / "evaluation.json").is_file() and read_record(ev / EVALUATE_RECORD) == self._evaluate_inputs(arm, repeat)

    def changed_steps(self) -> list[tuple[str, Arm, int, str | None, str]]:
        """Steps that ran (or started) in this folder from other inputs than the config gives now:
        [(kind, arm, repeat, fold or None, what changed)]. A changed training makes its prediction and evaluation
        changed too (their records hold the models' digests). Kind "pretrain" is a pretrain arm's stage 1 (``arm`` is
        then the stage, :meth:`pretrain_stage`); a changed stage 1 changes its stage 2 ("train") as well."""
        out = []
        for r in range(self.cfg.repeats):
            for arm in self.cfg.arms:
                rd = self.run_dir(arm.name, r)
                for fold, stage in ((f, s) for f in self.arm_folds(arm) for s in self.training_stages(arm)):
                    kind = "pretrain" if stage.stage == "pretrain" else "train"
                    fd = self.fold_dir(stage, r, fold)
                    rec_file = self._train_record(stage, r, fold)
                    started = rec_file.is_file() or self._train_marker(stage, r, fold).is_file() or any(
                        (fd / c).is_file() for c in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"))
                    if not started:
                        continue
                    old = read_record(rec_file)
                    now = self.train_inputs(stage, r, fold)
                    if old is None:
                        out.append((kind, stage, r, fold, f"no record of what it was trained from ({rec_file} "
                                                          "missing: an older version's or a hand-run training)"))
                    elif old != now:
                        out.append((kind, stage, r, fold, describe_changes(old, now)))
                done = rd / "predictions" / DONE_MARKER
                if done.is_file():
                    stamp = self._predict_stamp(arm, r)
                    text = done.read_text()
                    if stamp not in text:
                        out.append(("predict", arm, r, None, describe_changes(read_record_text(text),
                                                                               json.loads(stamp))))
                ev = rd / "evaluation"
                if (ev / "evaluation.json").is_file():
                    old = read_record(ev / EVALUATE_RECORD)
                    now = self._evaluate_inputs(arm, r)
                    if old != now:
                        out.append(("evaluate", arm, r, None, describe_changes(old, now)))
                if self.cfg.postprocessing:
                    out += self._changed_pp_steps(arm, r)
        return out

    def _clear_steps(self, changed: list[tuple[str, Arm, int, str | None, str]]) -> None:
        """Delete what the ``changed`` steps (as :meth:`changed_steps` gives them) made, and everything made from it,
        so that they run again from scratch."""
        for kind, arm, r, fold, _ in changed:
            rd = self.run_dir(arm.name, r)
            if kind in ("train", "pretrain"):   # "pretrain": arm is the stage (its fine-tuning is listed as changed too)
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

    # ------------------------------------------------------------------ nnU-Net's postprocessing ("postprocessing")
    # Per (arm, repeat): nnUNetv2_determine_postprocessing decides on the training's validation predictions (nnU-Net's
    # final validation of cases held out of it) against nnUNet_preprocessed/<dataset>/gt_segmentations, into
    # postprocessing/; nnUNetv2_apply_postprocessing applies that to the test predictions, into predictions_pp/;
    # evaluate_pp scores them into evaluation_pp/. Every folder is written whole (atomic_dir) with an inputs.json
    # record, so a killed step leaves nothing that reads as finished and a re-run redoes exactly what changed.
    def _pp_decision_inputs(self, arm: Arm, repeat: int) -> dict:
        """What the decision is made from: the trainings (their validation predictions) and the reference labels."""
        folds = self.arm_folds(arm)
        return {"folds": folds, "models": [digest(self.train_inputs(arm, repeat, f)) for f in folds],
                "reference": str(self.pre / self.dataset_name / "gt_segmentations")}

    def _pp_apply_inputs(self, arm: Arm, repeat: int) -> dict:
        return {"predictions": digest(self._predict_stamp(arm, repeat)),
                "decision": digest(self._pp_decision_inputs(arm, repeat))}

    def _pp_evaluate_inputs(self, arm: Arm, repeat: int) -> dict:
        return {"predictions": digest(self._pp_apply_inputs(arm, repeat)), "labels": str(self.labels),
                "evaluation": dict(sorted(self.cfg.evaluation.items()))}

    def _pp_records(self, arm: Arm, repeat: int) -> list[tuple[str, str, str, Callable[[Arm, int], dict]]]:
        """(step kind, folder, the file that makes it finished, its inputs) of the three postprocessing outputs."""
        return [("postprocess", "postprocessing", "postprocessing.pkl", self._pp_decision_inputs),
                ("postprocess", "predictions_pp", EVALUATE_RECORD, self._pp_apply_inputs),
                ("evaluate_pp", "evaluation_pp", "evaluation.json", self._pp_evaluate_inputs)]

    def _pp_done(self, arm: Arm, repeat: int, folder: str) -> bool:
        _, _, product, inputs = next(x for x in self._pp_records(arm, repeat) if x[1] == folder)
        d = self.run_dir(arm.name, repeat) / folder
        return (d / product).is_file() and read_record(d / EVALUATE_RECORD) == inputs(arm, repeat)

    def _pp_finished(self, arm: Arm, repeat: int) -> bool:
        return not self.cfg.postprocessing or all(self._pp_done(arm, repeat, folder)
                                                  for _, folder, _, _ in self._pp_records(arm, repeat))

    def _changed_pp_steps(self, arm: Arm, r: int) -> list[tuple[str, Arm, int, str | None, str]]:
        out = []
        for kind, folder, _, inputs in self._pp_records(arm, r):
            rec = self.run_dir(arm.name, r) / folder / EVALUATE_RECORD
            if rec.is_file() and (old := read_record(rec)) != (now := inputs(arm, r)):
                if not any(k == kind for k, *_ in out):   # a changed decision redoes its application too
                    out.append((kind, arm, r, None, describe_changes(old, now)))
        return out

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
