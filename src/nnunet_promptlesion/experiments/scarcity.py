"""Scarcity and ceiling as nnU-Net folds: a training set where a lesion class is rare, and one where it is not.

An experiment's question is whether synthesis makes a *rare* class segmentable. To ask it on any dataset, the
runner derives two nnU-Net folds from a base fold (``"all"`` or 0-4):

* **scarce**: every training case of the base fold that does not carry the class, plus ``keep`` of the
  carriers (chosen with ``numpy.random.default_rng(seed)`` from the sorted carrier ids); the other carriers
  are dropped from training. A dropped case is never kept with its lesion relabelled: the lesion would still
  be in the image, teaching the network that it is background.
* **full**: every training case of the base fold. Trained with the baseline's trainer and budget, it is the
  *ceiling*: what abundant real examples teach at this budget.

Validation cases: a numeric base fold keeps its validation cases in both derived folds (they steer
checkpoint_best only); base fold ``"all"`` follows nnU-Net's fold-"all" convention (validation = training).

nnU-Net reads splits only from ``nnUNet_preprocessed/DatasetXXX/splits_final.json``, so the derived folds are
appended there (indices >= 5). When the file does not exist yet, nnU-Net's own seeded 5-fold split is written
first, so folds 0-4 are exactly what ``nnUNetTrainer.do_split`` would have created. Appending is idempotent (a
fold with the same cases is reused) and serialised with a file lock, so experiments can share a dataset.

A *carrier* is a case whose preprocessed label holds the class: nnU-Net's ``<case>.pkl`` lists the class in
``class_locations`` (the voxels its foreground oversampling draws from), so no label volume is read.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split

from ..generator.data import nnunet_fold_split
from ..utils.atomic import write_json_atomic


class ScarcityError(ValueError):
    """The scarcity setting cannot be applied to this dataset; the message says what to change."""


def class_label(dataset_json: dict, name: str) -> int:
    """The integer label of class ``name`` in a dataset.json (region-based datasets are refused)."""
    labels = dataset_json["labels"]
    if name not in labels:
        raise ScarcityError(f"scarcity class '{name}' is not a label of the dataset (labels: "
                            f"{[k for k in labels if k not in ('background', 'ignore')]})")
    v = labels[name]
    if isinstance(v, (list, tuple)):
        if len(v) != 1:
            raise ScarcityError(f"scarcity class '{name}' is a region {v}; scarcity needs a plain label")
        v = v[0]
    return int(v)


def carriers(data_folder: Path, case_ids: Sequence[str], label: int) -> list[str]:
    """The cases among ``case_ids`` whose preprocessed label holds ``label`` (sorted)."""
    out = []
    for c in sorted(case_ids):
        f = Path(data_folder) / f"{c}.pkl"
        if not f.is_file():
            raise ScarcityError(f"{f} not found: the configuration's preprocessed data are incomplete; rerun "
                                "nnUNetv2_preprocess")
        with open(f, "rb") as fh:
            props = pickle.load(fh)
        locs = props.get("class_locations") or {}
        hit = locs.get(label)
        if hit is None:
            hit = locs.get(str(label))
        if hit is not None and len(hit) > 0:
            out.append(c)
    return out


def choose_kept(carrier_ids: Sequence[str], keep: int, seed: int) -> list[str]:
    """``keep`` carriers chosen without replacement by ``default_rng(seed)`` from the sorted ids (sorted)."""
    ids = sorted(carrier_ids)
    if keep > len(ids):
        raise ScarcityError(f"keep_carriers {keep} but the base fold has only {len(ids)} training cases carrying "
                            "the class; lower keep_carriers or choose a dataset where the class is more common")
    idx = np.random.default_rng(seed).choice(len(ids), size=keep, replace=False)
    return sorted(ids[i] for i in idx)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_folds(preprocessed_dataset_dir: Path, identifiers: Sequence[str], folds: list[dict]) -> list[int]:
    """Indices of ``folds`` ({"train": [...], "val": [...]}) in splits_final.json, appending the missing ones."""
    d = Path(preprocessed_dataset_dir)
    f = d / "splits_final.json"
    with _locked(d / "splits_final.json.lock"):
        if f.is_file():
            splits = json.loads(f.read_text())
        else:
            if len(identifiers) < 5:
                raise ScarcityError(f"the derived folds follow nnU-Net's 5-fold split, which needs at least 5 training "
                                    f"cases; {d.name} has {len(identifiers)}")
            # exactly what nnUNetTrainer.do_split writes when the file is missing, so folds 0-4 do not change
            splits = generate_crossval_split(list(np.sort(list(identifiers))), seed=12345, n_splits=5)
        key = [(sorted(map(str, s["train"])), sorted(map(str, s["val"]))) for s in splits]
        out, changed = [], not f.is_file()
        for fold in folds:
            k = (sorted(fold["train"]), sorted(fold["val"]))
            if k in key:
                out.append(key.index(k))
            else:
                splits.append({"train": k[0], "val": k[1]})
                key.append(k)
                out.append(len(splits) - 1)
                changed = True
        if changed:
            write_json_atomic(json.loads(json.dumps(splits, default=str)), f)
    return out


def derive_scarcity_folds(preprocessed_dataset_dir: Path, data_identifier: str, dataset_json: dict, cls: str,
                          keep: int, seed: int = 0, base_fold: str = "all", write: bool = True) -> dict:
    """The scarce and full folds of ``base_fold`` (see the module docstring) and the record of what was kept.

    Returns {class, label, keep_carriers, seed, base_fold, scarce_fold, full_fold, carriers, kept, dropped,
    n_train_scarce, n_train_full, n_val, carriers_per_class: {class: {scarce, full}}}. With ``write=False``
    nothing is written and the fold indices are None (a dry run for ``--check``).
    """
    if keep < 0:
        raise ScarcityError(f"keep_carriers must be >= 0, got {keep}")
    d = Path(preprocessed_dataset_dir)
    data = d / data_identifier
    label = class_label(dataset_json, cls)
    ids = list(infer_dataset_class(str(data)).get_identifiers(str(data)))
    train, val = nnunet_fold_split(d, ids, base_fold)
    car = carriers(data, train, label)
    kept = choose_kept(car, keep, seed)
    dropped = sorted(set(car) - set(kept))
    scarce_train = sorted(set(train) - set(dropped))
    full_train = sorted(train)
    if str(base_fold) == "all":
        scarce, full = {"train": scarce_train, "val": scarce_train}, {"train": full_train, "val": full_train}
    else:
        scarce, full = {"train": scarce_train, "val": sorted(val)}, {"train": full_train, "val": sorted(val)}
    per_class = {}
    for name, v in dataset_json["labels"].items():
        if name in ("background", "ignore") or isinstance(v, (list, tuple)) or int(v) == 0:
            continue
        c = carriers(data, full_train, int(v))
        per_class[name] = {"scarce": len(set(c) - set(dropped)), "full": len(c)}
    idx = ensure_folds(d, ids, [scarce, full]) if write else [None, None]
    return {"class": cls, "label": label, "keep_carriers": keep, "seed": seed, "base_fold": str(base_fold),
            "scarce_fold": None if idx[0] is None else str(idx[0]), "full_fold": None if idx[1] is None else str(idx[1]),
            "carriers": car, "kept": kept, "dropped": dropped, "n_train_scarce": len(scarce_train),
            "n_train_full": len(full_train), "n_val": len(scarce["val"]), "carriers_per_class": per_class}
