"""Procedural CT phantom datasets in nnU-Net raw format: the kinds, the lesion plan and the writer.

Two phantom kinds exist, each in its own module, built on the shared machinery of :mod:`.phantom_base`:

* ``ccta``    (:mod:`.phantoms_ccta`): coronary-CTA-like patches with contrast-filled vessels, a labelled
  vessel wall and calcified / non-calcified plaques.
* ``abdomen`` (:mod:`.phantoms_abdomen`): a miniature abdomen with liver, kidneys, pancreas and their
  tumours (early and late).

This module holds the dataset-level lesion plan (class imbalance, healthy cases) and the writer that produces
``DatasetNNN_Name/{imagesTr,labelsTr,imagesTs,labelsTs}``, ``dataset.json``, ``lesion_spec.json`` and
``phantom_manifest.json`` atomically. Array and spacing conventions: see :mod:`.phantom_base`.

Determinism: every case is generated from its own ``np.random.SeedSequence([seed, split, index])``,
so the same seed gives bit-identical files, and a case does not change when ``--cases`` or
``--test-cases`` changes (only the dataset-level lesion plan depends on the number of cases).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..utils.atomic import atomic_dir, write_json_atomic
from . import phantoms_abdomen, phantoms_ccta
from .phantom_base import PhantomCase, PhantomKind
from .raw_writer import (
    dataset_folder_name,
    existing_dataset_with_id,
    make_dataset_json,
    nnunet_raw_dir,
    save_nifti,
    write_dataset_metadata,
)

logger = logging.getLogger(__name__)

PHANTOM_VERSION = 1
MANIFEST_FILENAME = "phantom_manifest.json"
TRAIN, TEST = 0, 1


# ----------------------------------------------------------------------------------------------
# Dataset-level lesion plan (class imbalance, healthy cases)
# ----------------------------------------------------------------------------------------------
def plan_lesion_presence(n_cases: int, class_fractions: dict[str, float], healthy_fraction: float,
                         rng: np.random.Generator) -> list[set[str]]:
    """Decide which lesion classes each case contains.

    Stratified rather than independent draws, so small datasets still have the intended imbalance:
    ``round(fraction * n)`` cases get each class (at least one when ``n >= 2``, so every class exists
    in the split), ``round(healthy_fraction * n)`` cases (at least one when ``n >= 2``) get none.
    Every diseased case gets at least one class: the most frequent class goes to uncovered cases first
    (it exceeds its share only if the other classes cannot cover the rest).
    """
    n = int(n_cases)
    if n <= 0:
        return []
    order = rng.permutation(n)
    n_healthy = int(round(healthy_fraction * n))
    if n >= 2:
        n_healthy = min(max(n_healthy, 1), n - 1)
    else:
        n_healthy = 0
    diseased = [int(i) for i in order[n_healthy:]]
    plan: list[set[str]] = [set() for _ in range(n)]
    # Rarer classes first (random cases); the most frequent class then goes to uncovered cases first,
    # so that every diseased case has a lesion without inflating the most frequent class.
    names = sorted(class_fractions, key=lambda c: (class_fractions[c], c))
    for j, name in enumerate(names):
        k = int(round(class_fractions[name] * n))
        if n >= 2:
            k = max(k, 1)
        k = min(k, len(diseased))
        if j < len(names) - 1:
            chosen = [int(i) for i in rng.permutation(diseased)[:k]]
        else:
            uncovered = [int(i) for i in rng.permutation(diseased) if not plan[int(i)]]
            covered = [int(i) for i in rng.permutation(diseased) if plan[int(i)]]
            chosen = uncovered + covered[:max(k - len(uncovered), 0)]
        for i in chosen:
            plan[i].add(name)
    return plan


def case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(split), int(index)]))


def plan_rng(seed: int, split: int) -> np.random.Generator:
    # A separate stream (third entry 2**31) from every case stream, so the plan never correlates with geometry.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(split), 2 ** 31]))


# ----------------------------------------------------------------------------------------------
# Phantom kinds and the dataset writer
# ----------------------------------------------------------------------------------------------
#: every phantom kind by name; a new kind is a module built on :mod:`.phantom_base` that defines ``KIND``
PHANTOM_KINDS: dict[str, PhantomKind] = {k.name: k for k in (phantoms_ccta.KIND, phantoms_abdomen.KIND)}


def phantom_kinds() -> dict[str, PhantomKind]:
    """All phantom kinds by name ("ccta", "abdomen")."""
    return dict(PHANTOM_KINDS)


def get_config(kind: str, preset: str = "default", **overrides):
    """The named preset's config dataclass of a kind, with field overrides."""
    k = PHANTOM_KINDS[kind]
    if preset not in k.presets:
        raise ValueError(f"unknown preset '{preset}' for phantom kind '{kind}'; choose from {sorted(k.presets)}")
    cfg = k.presets[preset]
    return dataclasses.replace(cfg, **overrides) if overrides else dataclasses.replace(cfg)


def generate_split(kind: str, n_cases: int, seed: int, split: int = TRAIN, config=None) -> list[PhantomCase]:
    """Generate all cases of one split in memory (used by tests and notebooks)."""
    k = PHANTOM_KINDS[kind]
    cfg = config if config is not None else get_config(kind)
    fractions, healthy = split_fractions(k, cfg, split)
    plan = plan_lesion_presence(n_cases, fractions, healthy, plan_rng(seed, split))
    return [k.generate(cfg, plan[i], case_rng(seed, split, i)) for i in range(n_cases)]


def split_fractions(k: PhantomKind, cfg, split: int) -> tuple[dict[str, float], float]:
    """(class fractions, healthy fraction) of a split: the config's ``test_fractions`` (if it has them)
    replace the training fractions on the test split; classes it does not name keep theirs."""
    fractions, healthy = dict(k.class_fractions(cfg)), float(k.healthy_fraction(cfg))
    override = getattr(cfg, "test_fractions", None) if split == TEST else None
    if override:
        unknown = set(override) - set(fractions) - {"healthy"}
        if unknown:
            raise ValueError(f"test_fractions names unknown classes {sorted(unknown)}; known: {sorted(fractions)}")
        healthy = float(override.get("healthy", healthy))
        fractions.update({c: float(v) for c, v in override.items() if c != "healthy"})
    return fractions, healthy


def default_test_cases(n_train: int) -> int:
    return max(2, int(n_train) // 4)


def _case_record(case_id: str, case: PhantomCase, classes: set) -> dict:
    return {
        "case": case_id,
        "planned_classes": sorted(classes),
        "label_voxels": {int(v): int(c) for v, c in zip(*np.unique(case.label, return_counts=True))},
        "lesions": case.lesions,
    }


def write_phantom_dataset(kind: str, dataset_id: int, n_cases: int, seed: int, n_test: int | None = None,
                          name: str | None = None, output_root: str | Path | None = None, overwrite: bool = False,
                          preset: str = "default", config=None, progress: bool = True) -> Path:
    """Write a phantom dataset ``DatasetNNN_Name`` in nnU-Net raw format and return its folder.

    The dataset is assembled in a hidden temporary sibling and renamed into place at the end, so an
    interrupted run leaves nothing behind. An existing ``DatasetNNN_*`` folder with the same id (any
    name) is refused unless ``overwrite`` is set; with ``overwrite`` the target is replaced and other
    folders with the same id are removed, since nnU-Net refuses ambiguous ids.
    """
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind '{kind}'; choose from {sorted(PHANTOM_KINDS)}")
    k = PHANTOM_KINDS[kind]
    if n_cases < 1:
        raise ValueError(f"--cases must be >= 1, got {n_cases}")
    n_test = default_test_cases(n_cases) if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"--test-cases must be >= 0, got {n_test}")
    cfg = config if config is not None else get_config(kind, preset)
    root = Path(output_root) if output_root is not None else nnunet_raw_dir()
    folder_name = dataset_folder_name(dataset_id, name or k.default_dataset_name)
    target = root / folder_name
    clashes = existing_dataset_with_id(root, dataset_id)
    if clashes and not overwrite:
        raise FileExistsError(
            f"{', '.join(str(c) for c in clashes)} already uses dataset id {dataset_id:03d}; "
            "pass --overwrite to replace it or choose another --dataset-id")

    spec = k.lesion_spec(cfg)
    prefix = f"{k.default_dataset_name.lower()}"
    splits = [("Tr", TRAIN, n_cases), ("Ts", TEST, n_test)]
    records: dict[str, list] = {"training": [], "test": []}
    with atomic_dir(target, overwrite=True) as tmp:
        for sub, split, n in splits:
            if n == 0:
                continue
            (tmp / f"images{sub}").mkdir()
            (tmp / f"labels{sub}").mkdir()
            fractions, healthy = split_fractions(k, cfg, split)
            plan = plan_lesion_presence(n, fractions, healthy, plan_rng(seed, split))
            bar = tqdm(range(n), desc=f"{folder_name} {'train' if split == TRAIN else 'test'}", unit="case",
                       disable=not progress)
            for i in bar:
                case_id = f"{prefix}_{'tr' if split == TRAIN else 'ts'}{i:03d}"
                case = k.generate(cfg, plan[i], case_rng(seed, split, i))
                save_nifti(case.image, case.spacing, tmp / f"images{sub}" / f"{case_id}_0000.nii.gz", dtype=np.int16)
                save_nifti(case.label, case.spacing, tmp / f"labels{sub}" / f"{case_id}.nii.gz", dtype=np.uint8)
                records["training" if split == TRAIN else "test"].append(_case_record(case_id, case, plan[i]))
        ds_json = make_dataset_json(
            k.labels, n_cases, channel_names={"0": "CT"},
            name=folder_name,
            description=k.description,
            reference="procedural phantom generated by nnunet_promptlesion (promptlesion_make_phantoms)",
            licence="CC0 (synthetic data)",
            numTest=n_test,
            spacing_mm=list(cfg.spacing),
        )
        write_dataset_metadata(tmp, ds_json, spec)
        write_json_atomic({
            "phantom_version": PHANTOM_VERSION,
            "kind": kind,
            "preset": preset,
            "seed": int(seed),
            "config": dataclasses.asdict(cfg),
            "class_fractions": k.class_fractions(cfg),
            "healthy_fraction": k.healthy_fraction(cfg),
            "test_class_fractions": split_fractions(k, cfg, TEST)[0],
            "test_healthy_fraction": split_fractions(k, cfg, TEST)[1],
            **records,
        }, tmp / MANIFEST_FILENAME)
    for other in clashes:
        if other.resolve() != target.resolve() and other.exists():
            logger.warning("removing %s: it used the same dataset id as the new %s", other, target)
            shutil.rmtree(other)
    return target
