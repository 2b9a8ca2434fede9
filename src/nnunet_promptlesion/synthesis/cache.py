"""Sharded cache of diffusion-rendered lesions for ``"synthesizer": "diffusion_cache"``.

Layout of a cache folder::

    manifest.json            format, fingerprint (dataset/plans/configuration/fold/training cases, the state of
                             every training case's preprocessed files, dataset.json labels, the lesion spec),
                             generator identity, build settings, per-class counts, acceptance of the quality filter
    shards/shard_000000.npz  one shard = ``shard_size`` consecutive work items (compressed, no pickle): the unit
                             of writing and resumption
    packed/*.npy             all shards concatenated, uncompressed, written when the build completes: what training
                             reads, memory-mapped (the page cache is shared by every loader worker; a sample's
                             masks are unpacked per draw)

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
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..utils.atomic import write_json_atomic
from .diffusion_render import RenderedLesion

FORMAT = "promptlesion_lesion_cache"
VERSION = 2
MANIFEST = "manifest.json"
PACKED = "packed"
_PACKED_ARRAYS = ("case_idx", "label", "seed", "item", "box_lo", "box_shape", "centre", "mask_bits", "mask_off",
                  "support_bits", "support_off", "values", "values_off")


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, corrupt or made for another run; the message says what to do."""


# ---------------------------------------------------------------------------------------------- fingerprint
def case_file_state(data_folder: str | os.PathLike, ids: Iterable[str]) -> dict[str, str]:
    """case id -> a digest of (name, size, mtime_ns) of the case's preprocessed files (image, seg, properties).

    Cheap (stat only, no reading): re-preprocessing rewrites the files (new mtimes) and an edited label rewrites
    the seg, so a cache built before either no longer matches. A copy that keeps mtimes (``cp -a``, rsync -a)
    still matches."""
    folder = Path(data_folder)
    out = {}
    for c in sorted(str(i) for i in ids):
        parts = []
        for suffix in (".b2nd", "_seg.b2nd", ".pkl", ".npz", ".npy", "_seg.npy"):
            f = folder / f"{c}{suffix}"
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        out[c] = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else "missing"
    return out


def run_fingerprint(plans: dict, configuration: str, fold, train_ids: Iterable[str], dataset_name: str,
                    data_folder: str | os.PathLike | None = None, labels: dict | None = None,
                    lesion_spec: dict | None = None) -> dict:
    """What a cache must match to be used by a training run.

    Covers the preprocessed grid and intensities (the configuration's plans entry, the global transpose and
    foreground intensity properties), the fold and its training cases, the state of those cases' preprocessed
    files (:func:`case_file_state`, when ``data_folder`` is given), dataset.json's ``labels`` and the lesion spec
    (``LesionSpec.to_dict()``). ``sha256`` is over all of it. The generator is part of the cache's identity
    (``manifest["generator"]``, compared when a build resumes), not of the run's.
    """
    # deferred: nnU-Net loads torch (~1.4 s CPU at import); settings validation imports this module (see .space)
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
        "case_files": case_file_state(data_folder, train_ids) if data_folder is not None else None,
        "labels": labels,
        "lesion_spec": lesion_spec,
    }
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return body


def _as_json(value):
    """``value`` as it reads back from a manifest: a fingerprint made now holds tuples (radius_mm) where the stored one
    holds lists, and the two must compare equal (else every refusal also blamed an unchanged lesion_spec)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fingerprint_difference(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if k != "sha256" and _as_json(a.get(k)) != _as_json(b.get(k))]


def describe_difference(have: dict, want: dict) -> str:
    """One line per differing fingerprint key, naming what changed (cases, labels, spec classes)."""
    lines = []
    for k in fingerprint_difference(have, want):
        a, b = _as_json(have.get(k)), _as_json(want.get(k))
        if k == "case_files" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(c for c in set(a) & set(b) if a[c] != b[c])
            lines.append(f"case_files: the preprocessed files of {len(changed)} training case(s) changed since the "
                         f"cache was built (re-preprocessed, or labels edited): {changed[:8]}"
                         + (" ..." if len(changed) > 8 else ""))
        elif k == "labels" and isinstance(a, dict) and isinstance(b, dict):
            diff = {n: (a.get(n), b.get(n)) for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)}
            lines.append(f"labels (dataset.json): {{name: (cache, now)}} = {diff}")
        elif k == "lesion_spec" and isinstance(a, dict) and isinstance(b, dict):
            la = {l.get("name"): l for l in a.get("lesions", [])}
            lb = {l.get("name"): l for l in b.get("lesions", [])}
            names = sorted(n for n in set(la) | set(lb) if la.get(n) != lb.get(n))
            lines.append(f"lesion_spec: classes {names} differ" if names else "lesion_spec differs")
        elif k == "train_cases" and isinstance(a, list) and isinstance(b, list):
            lines.append(f"train_cases: only in the cache {sorted(set(a) - set(b))[:8]}, only in this run "
                         f"{sorted(set(b) - set(a))[:8]}")
        else:
            sa, sb = json.dumps(a, sort_keys=True, default=str), json.dumps(b, sort_keys=True, default=str)
            lines.append(f"{k}: cache {sa[:200]}, this run {sb[:200]}")
    return "; ".join(lines)


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
        case=np.array([str(s.case) for s in samples]) if n else np.zeros(0, "U1"),  # sized to the longest id
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


def pack_shards(folder: Path, shard_names: Sequence[str]) -> dict:
    """Concatenate the shards into ``packed/*.npy`` (uncompressed, memory-mappable); returns the manifest entry.

    Written into a temporary folder that replaces ``packed/`` at the end (a kill leaves the old or no pack)."""
    folder = Path(folder)
    parts = [read_shard(folder / "shards" / n) for n in shard_names]
    cases = sorted({str(c) for a in parts for c in a["case"]})
    cidx = {c: i for i, c in enumerate(cases)}
    out: dict[str, np.ndarray] = {}
    out["case_idx"] = np.concatenate([np.array([cidx[str(c)] for c in a["case"]], np.int32) for a in parts]) \
        if parts else np.zeros(0, np.int32)
    for key in ("label", "seed", "item", "box_lo", "box_shape", "centre"):
        out[key] = np.concatenate([a[key] for a in parts]) if parts else np.zeros(0, np.int64)
    for bits, off in (("mask_bits", "mask_off"), ("support_bits", "support_off"), ("values", "values_off")):
        base = 0
        offs = [np.zeros(1, np.int64)]
        for a in parts:
            offs.append(a[off][1:] + base)
            base += int(a[off][-1])
        out[off] = np.concatenate(offs)
        out[bits] = np.concatenate([a[bits] for a in parts]) if parts else np.zeros(0, np.uint8)
    tmp = folder / f".{PACKED}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key in _PACKED_ARRAYS:
        with open(tmp / f"{key}.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(out[key]), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
    final = folder / PACKED
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {"cases": cases, "n": int(len(out["label"]))}


# ---------------------------------------------------------------------------------------------- loading
class LesionCache:
    """A complete cache, memory-mapped (``packed/*.npy``, read-only): nothing is decompressed into the heap.

    Opened once in the trainer's main process before nnU-Net forks its loader workers; the workers share the
    mapping (and the page cache); a pickled cache (spawn/forkserver workers) re-opens the mapping by path.
    :meth:`get` builds one sample per draw (its masks unpacked then). ``check_run`` refuses a cache whose
    fingerprint does not match the training run.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("complete"):
            raise CacheError(f"cache {self.folder} is incomplete (the build was interrupted); re-run the same "
                             "promptlesion_build_cache command to finish it")
        if not self.manifest.get("packed") or not (self.folder / PACKED).is_dir():
            raise CacheError(f"cache {self.folder} has no packed arrays (built by an older version of "
                             "nnunet_promptlesion, or packed/ was deleted); rebuild it with promptlesion_build_cache")
        self._open()

    def _open(self) -> None:
        try:
            self._a = {k: np.load(self.folder / PACKED / f"{k}.npy", mmap_mode="r", allow_pickle=False)
                       for k in _PACKED_ARRAYS}
        except (OSError, ValueError) as e:
            raise CacheError(f"cache {self.folder}: packed arrays unreadable ({e}); rebuild it with "
                             "promptlesion_build_cache") from e
        self._cases = list(self.manifest["packed"]["cases"])
        labels = np.asarray(self._a["label"])
        self._rows = {int(l): np.flatnonzero(labels == l) for l in np.unique(labels)}

    def __getstate__(self):
        return {"folder": self.folder, "manifest": self.manifest}

    def __setstate__(self, state):
        self.folder, self.manifest = state["folder"], state["manifest"]
        self._open()

    def check_run(self, fingerprint: dict) -> None:
        have = self.manifest["fingerprint"]
        if have.get("sha256") != fingerprint.get("sha256"):
            raise CacheError(
                f"lesion cache {self.folder} was built for another run or other data: "
                f"{describe_difference(have, fingerprint)}. Rebuild it for this run with promptlesion_build_cache "
                "(the default cache folder is keyed by the generator only: delete it or pass another -o).")

    def count(self, label: int) -> int:
        return len(self._rows.get(int(label), ()))

    def labels(self) -> list[int]:
        return sorted(self._rows)

    def get(self, label: int, k: int) -> RenderedLesion:
        """Sample ``k`` (0 <= k < count(label)) of class ``label``, built from the mapped arrays."""
        a = self._a
        i = int(self._rows[int(label)][k])
        shape = tuple(int(s) for s in a["box_shape"][i])
        n = int(np.prod(shape))
        mask = np.unpackbits(a["mask_bits"][a["mask_off"][i]:a["mask_off"][i + 1]], count=n).astype(bool)
        sup = np.unpackbits(a["support_bits"][a["support_off"][i]:a["support_off"][i + 1]], count=n).astype(bool)
        return RenderedLesion(case=self._cases[int(a["case_idx"][i])], label=int(a["label"][i]),
                              seed=int(a["seed"][i]), box_lo=np.asarray(a["box_lo"][i]).astype(int),
                              mask=mask.reshape(shape), support=sup.reshape(shape),
                              values=np.asarray(a["values"][a["values_off"][i]:a["values_off"][i + 1]]),
                              centre=np.asarray(a["centre"][i]).astype(int))

    @property
    def samples(self) -> dict[int, list[RenderedLesion]]:
        """Every sample, grouped by label, built now (for inspection, tests and the montage; training uses get)."""
        return {l: [self.get(l, k) for k in range(self.count(l))] for l in self.labels()}

    def nbytes(self) -> int:
        """Bytes of the mapped arrays (on disk; resident only as far as they are read)."""
        return int(sum(v.nbytes for v in self._a.values()))
