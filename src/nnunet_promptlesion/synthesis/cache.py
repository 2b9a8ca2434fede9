"""Sharded cache of diffusion-rendered lesions for ``"synthesizer": "diffusion_cache"``.

Layout of a cache folder::

    manifest.json            format, fingerprint (dataset/plans/configuration/fold/training cases), generator
                             identity, build settings, per-class counts, acceptance of the quality filter
    shards/shard_000000.npz  one shard = ``shard_size`` consecutive work items (compressed, no pickle)

A sample stores only what changes in the preprocessed case (see
:class:`~nnunet_promptlesion.synthesis.diffusion_render.RenderedLesion`): carrier case, lesion class label,
seed, a box in the case's voxel grid (nnU-Net axis order), the lesion mask and blend support in that box
(bit-packed) and the new z-score values at the support voxels (float32). At train time the sample is
rebuilt by cropping the preprocessed case around the lesion and pasting those values: every voxel outside
the support is the case's own, bit for bit.

Work item ``i`` (0 <= i < per_class * n_classes) renders class ``classes[i % n_classes]`` with placement seeds
derived from ``(seed, i, attempt)``; shard ``k`` holds items ``k*shard_size .. (k+1)*shard_size-1``. A shard is
written to a temporary file, fsynced and renamed, so a kill loses at most the shard being rendered and a
shard file on disk is always complete; a re-run skips every shard that exists and renders the same items
with the same seeds, so a resumed cache equals an uninterrupted one. Under ``torchrun`` rank r renders shards
``k % world_size == r`` (disjoint items, disjoint seeds).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..utils.atomic import write_json_atomic
from .diffusion_render import RenderedLesion

FORMAT = "promptlesion_lesion_cache"
VERSION = 1
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or made for another run; the message says what to do."""


# ---------------------------------------------------------------------------------------------- fingerprint
def run_fingerprint(plans: dict, configuration: str, fold, train_ids: Iterable[str], dataset_name: str) -> dict:
    """What a cache must match to be used by a training run.

    Covers the preprocessed grid and intensities (the configuration's plans entry, the global transpose and
    foreground intensity properties), the fold and its training cases. ``sha256`` is over all of it.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    body = {
        "dataset": dataset_name,
        "plans_name": plans.get("plans_name"),
        "configuration": configuration,
        "data_identifier": cm.data_identifier,
        "spacing": [float(s) for s in cm.spacing],
        "normalization_schemes": list(cm.normalization_schemes),
        "transpose_forward": list(plans.get("transpose_forward", [0, 1, 2])),
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "fold": str(fold),
        "train_cases": sorted(str(i) for i in train_ids),
    }
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body


def fingerprint_difference(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if k != "sha256" and a.get(k) != b.get(k)]


# ---------------------------------------------------------------------------------------------- shards
def shard_name(k: int) -> str:
    return f"shard_{k:06d}.npz"


def _pack(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    parts = [np.packbits(a.ravel()) for a in arrays]
    off = np.zeros(len(parts) + 1, np.int64)
    off[1:] = np.cumsum([len(p) for p in parts])
    return (np.concatenate(parts) if parts else np.zeros(0, np.uint8)), off


def write_shard(path: Path, samples: Sequence[RenderedLesion], items: Sequence[int], meta: dict) -> None:
    """Atomically write one shard (np.savez_compressed, no object arrays). ``items``: work item per sample."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(samples)
    mask_bits, mask_off = _pack([s.mask for s in samples])
    sup_bits, sup_off = _pack([s.support for s in samples])
    vals = [s.values.astype(np.float32) for s in samples]
    val_off = np.zeros(n + 1, np.int64)
    val_off[1:] = np.cumsum([len(v) for v in vals])
    arrays = dict(
        case=np.array([s.case for s in samples], dtype="U128") if n else np.zeros(0, "U1"),
        label=np.array([s.label for s in samples], np.int32), seed=np.array([s.seed for s in samples], np.int64),
        item=np.asarray(items, np.int64), box_lo=np.array([s.box_lo for s in samples], np.int32).reshape(n, 3),
        box_shape=np.array([s.box_shape for s in samples], np.int32).reshape(n, 3),
        centre=np.array([s.centre for s in samples], np.int32).reshape(n, 3),
        mask_bits=mask_bits, mask_off=mask_off, support_bits=sup_bits, support_off=sup_off,
        values=np.concatenate(vals) if vals else np.zeros(0, np.float32), values_off=val_off,
        meta=np.array(json.dumps(meta)),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_shard(path: Path) -> dict:
    """The arrays of one shard (``allow_pickle=False``). Raises :class:`CacheError` if unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise CacheError(f"cache shard {path} is unreadable ({e}); delete it and re-run promptlesion_build_cache "
                         "to render it again") from e
    out["meta"] = json.loads(str(out["meta"]))
    return out


def shard_samples(arrays: dict) -> list[RenderedLesion]:
    out = []
    for i in range(len(arrays["label"])):
        shape = tuple(int(s) for s in arrays["box_shape"][i])
        n = int(np.prod(shape))
        mask = np.unpackbits(arrays["mask_bits"][arrays["mask_off"][i]:arrays["mask_off"][i + 1]], count=n).astype(bool)
        sup = np.unpackbits(arrays["support_bits"][arrays["support_off"][i]:arrays["support_off"][i + 1]], count=n).astype(bool)
        out.append(RenderedLesion(case=str(arrays["case"][i]), label=int(arrays["label"][i]), seed=int(arrays["seed"][i]),
                                  box_lo=arrays["box_lo"][i].astype(int), mask=mask.reshape(shape),
                                  support=sup.reshape(shape),
                                  values=arrays["values"][arrays["values_off"][i]:arrays["values_off"][i + 1]],
                                  centre=arrays["centre"][i].astype(int)))
    return out


# ---------------------------------------------------------------------------------------------- manifest
@dataclass
class BuildPlan:
    """The work of a cache build: classes (labels), items per class, shard size, base seed."""

    classes: list[int]
    per_class: int
    shard_size: int
    seed: int

    @property
    def n_items(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def n_shards(self) -> int:
        return -(-self.n_items // self.shard_size)

    def shard_items(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.n_items))

    def item_class(self, i: int) -> int:
        return self.classes[i % len(self.classes)]

    def item_seed(self, i: int, attempt: int) -> int:
        """Disjoint across items and attempts: a 63-bit hash of (seed, item, attempt)."""
        ss = np.random.SeedSequence([int(self.seed), int(i), int(attempt)])
        return int(ss.generate_state(2, np.uint64)[0] >> np.uint64(1))

    def as_dict(self) -> dict:
        return {"classes": list(self.classes), "per_class": self.per_class, "shard_size": self.shard_size,
                "seed": self.seed, "n_items": self.n_items, "n_shards": self.n_shards}


def read_manifest(folder: Path) -> dict:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise CacheError(f"{folder} is not a lesion cache (no {MANIFEST}); build one with promptlesion_build_cache")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise CacheError(f"{p} is not a {FORMAT} manifest")
    if int(m.get("version", 0)) > VERSION:
        raise CacheError(f"{p} has format version {m.get('version')}; this package reads up to {VERSION}")
    return m


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json_atomic(manifest, Path(folder) / MANIFEST)


def completed_shards(folder: Path, plan: BuildPlan) -> list[int]:
    d = Path(folder) / "shards"
    return [k for k in range(plan.n_shards) if (d / shard_name(k)).is_file()]


# ---------------------------------------------------------------------------------------------- loading
class LesionCache:
    """All samples of a cache in memory, grouped by class label.

    Loaded once in the trainer's main process before nnU-Net forks its loader workers, so the workers share
    the pages. ``check_run`` refuses a cache whose fingerprint does not match the training run.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("complete"):
            raise CacheError(f"cache {self.folder} is incomplete (the build was interrupted); re-run the same "
                             "promptlesion_build_cache command to finish it")
        self.samples: dict[int, list[RenderedLesion]] = {}
        for name in self.manifest["shards"]:
            for s in shard_samples(read_shard(self.folder / "shards" / name)):
                self.samples.setdefault(s.label, []).append(s)

    def check_run(self, fingerprint: dict) -> None:
        have = self.manifest["fingerprint"]
        if have.get("sha256") != fingerprint.get("sha256"):
            diff = fingerprint_difference(have, fingerprint)
            raise CacheError(
                f"lesion cache {self.folder} was built for another run: it differs in {diff} (cache: dataset "
                f"{have.get('dataset')}, configuration {have.get('configuration')}, fold {have.get('fold')}; this run: "
                f"dataset {fingerprint.get('dataset')}, configuration {fingerprint.get('configuration')}, fold "
                f"{fingerprint.get('fold')}). Rebuild it for this run with promptlesion_build_cache.")

    def count(self, label: int) -> int:
        return len(self.samples.get(int(label), []))

    def nbytes(self) -> int:
        return int(sum(s.values.nbytes + s.mask.nbytes + s.support.nbytes for v in self.samples.values() for s in v))
