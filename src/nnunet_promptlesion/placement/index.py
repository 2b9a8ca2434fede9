"""The carrier index: one start-up pass over the training cases, what every placement draws from.

For every lesion class of the spec it collects the real lesions' intensity statistics (rule-based
synthesis), their masks (the real-mask bank) and their number (class-balanced sampling), and for
every parent label the voxels around which a *healthy* carrier patch can be cut: parent voxels
(from nnU-Net's ``class_locations``) whose central box holds no lesion voxel of any class.

The scan reads nnU-Net's ``class_locations`` (label or region keys) first: a case in which some
key containing a lesion label is empty holds no voxel of that label, and its carriers come straight
from the locations, without decompressing the volume. Only cases that may hold lesions (or whose
parent is only known through a region shared with other labels) load the segmentation, and all
per-voxel work is done on the crop around the lesions. No whole-volume sort, no whole-volume filter.

The result is cached next to the preprocessed data (``DatasetXXX/promptlesion_index/``, never inside
the configuration folder that nnU-Net wipes) under a fingerprint of everything it depends on;
restarts and other DDP ranks load it. Carrier coordinates are stored as uint16 (int32 for volumes
with an axis >= 65535) and capped per case, so the index pickles cheaply to spawned workers.

Arrays follow nnU-Net's preprocessed layout: data (C, X, Y, Z), seg (1, X, Y, Z), voxel coordinates
(x, y, z) in that grid. 2D configurations use the same 3D volumes; their patch and centre box have
extent 1 along axis 0 and their mask bank holds 2D masks (one slice of each real lesion).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch.distributed as dist
from scipy import ndimage
from tqdm import tqdm

from ..lesions.intensity_stats import LesionIntensityStats, measure_lesions
from ..lesions.masks import MaskBank
from ..lesions.spec import LesionClass, LesionSpec
from ..utils.atomic import atomic_path

#: 4: the index moved to nnunet_promptlesion.placement (pickles name the classes' modules)
INDEX_VERSION = 4
INDEX_DIRNAME = "promptlesion_index"
#: carrier centres kept per (case, parent label); nnU-Net's class_locations hold up to 10,000
MAX_CENTRES_PER_CASE = 2000
#: real lesion masks kept per case and per class for the bank, and in total per class
BANK_PER_CASE, BANK_PER_CLASS = 20, 500


class NoHealthyRegionError(RuntimeError):
    pass


@dataclass
class LesionIndex:
    spec: LesionSpec
    counts: dict[int, int]
    stats: dict[int, LesionIntensityStats]
    bank: MaskBank
    #: parent label -> list of (case identifier, (N, 3) uint16/int32 array of healthy centre voxels)
    carriers: dict[int, list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    #: scan facts for the log: cases scanned, cases whose segmentation had to be loaded, seconds
    scan_info: dict = field(default_factory=dict)

    def carrier_pool(self, lesion: LesionClass) -> list[tuple[str, np.ndarray]]:
        return [entry for p in lesion.parents for entry in self.carriers.get(p, [])]

    def summary(self) -> dict:
        return {
            l.name: {"label": l.label, "real_lesions": self.counts.get(l.label, 0),
                     "bank_masks": self.bank.count(l.label),
                     "carrier_centres": int(sum(len(v) for _, v in self.carrier_pool(l))),
                     **self.stats[l.label].summary()}
            for l in self.spec.lesions
        }


def centre_box(patch_size: Sequence[int], centre_fraction: float) -> np.ndarray:
    """Side lengths (voxels, odd) of the central region of a patch that must be lesion-free.

    An axis of extent 1 (the slice axis of 2D configurations) gets side 1.
    """
    return np.maximum(1, (np.round(np.asarray(patch_size) * centre_fraction) // 2) * 2 + 1).astype(int)


def centre_slices(patch_size: Sequence[int], box: Sequence[int]) -> tuple[slice, ...]:
    """The central region of a patch whose carrier centre voxel sits at index ``patch_size // 2``.

    The one definition shared by the scan (a carrier centre c is healthy when [c - box // 2, c + box // 2]
    holds no lesion) and the loader (lesions are centred inside this region of the carrier patch).
    ``box`` sides are odd, so the region is symmetric about the centre voxel for even and odd patches.
    """
    box = [int(b) for b in box]
    if any(b % 2 == 0 for b in box):
        raise ValueError(f"centre box sides must be odd, got {box}")
    return tuple(slice(int(p) // 2 - b // 2, int(p) // 2 - b // 2 + b) for p, b in zip(patch_size, box))


def _key_labels(key) -> frozenset:
    return frozenset(int(v) for v in key) if isinstance(key, (tuple, list)) else frozenset([int(key)])


def _absent_labels(locations: dict, labels: Sequence[int]) -> set[int]:
    """Labels certainly absent from a case: some class_locations key holding them is empty.

    nnU-Net samples at least one location of every label or region present in a case, so an empty
    key means none of its labels occurs.
    """
    empty = [_key_labels(k) for k, v in locations.items() if len(v) == 0]
    return {l for l in labels if any(l in e for e in empty)}


def _parent_locations(locations: dict, parent: int, absent: set[int]) -> tuple[np.ndarray | None, bool]:
    """(x, y, z) locations of ``parent`` from class_locations and whether they are exact.

    Exact when a key holds only the parent once absent labels are removed (label-based datasets: the
    parent's own key); otherwise the union of a region containing the parent (the smallest), which the
    caller filters by segmentation value.
    """
    if any(parent in _key_labels(k) and len(v) == 0 for k, v in locations.items()):
        return None, True  # the parent does not occur in this case
    best = None
    for k, v in locations.items():
        labs = _key_labels(k)
        if parent not in labs or len(v) == 0:
            continue
        rest = labs - absent
        if rest == {parent}:
            return np.asarray(v)[:, 1:], True
        if best is None or len(labs) < len(_key_labels(best)):
            best = k
    if best is None:
        return None, True
    return np.asarray(locations[best])[:, 1:], False


def _compact(xyz: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    dtype = np.uint16 if max(shape) < np.iinfo(np.uint16).max else np.int32
    return np.ascontiguousarray(xyz, dtype=dtype)


def _largest_slice(mask: np.ndarray) -> np.ndarray:
    """The axis-0 slice of a 3D component with the most voxels (2D configurations' bank)."""
    k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    return mask[k]


def build_lesion_index(dataset, identifiers: Sequence[str], spec: LesionSpec, spacing: Sequence[float],
                       patch_size: Sequence[int], centre_fraction: float, max_cases: int | None = None,
                       rng: np.random.Generator | None = None, progress: bool = True) -> LesionIndex:
    """Scan ``identifiers`` of an nnU-Net dataset (``dataset.load_case``) once.

    spacing: mm per voxel of the configuration (3 values, or 2 for 2D configurations: the in-plane
    spacing of axes 1, 2); patch_size: final patch size (voxels; 2 values for 2D configurations).
    Raises :class:`NoHealthyRegionError` naming the lesion classes that have no healthy carrier.
    """
    t0 = time.perf_counter()
    rng = rng or np.random.default_rng(0)
    ids = list(identifiers)
    if max_cases is not None and len(ids) > max_cases:
        ids = sorted(rng.choice(ids, size=max_cases, replace=False).tolist())
    two_d = len(patch_size) == 2
    box = centre_box((1, *patch_size) if two_d else patch_size, centre_fraction)
    half = box // 2
    lesion_labels = spec.labels
    stats = {l.label: LesionIntensityStats() for l in spec.lesions}
    counts = {l.label: 0 for l in spec.lesions}
    bank = MaskBank.empty(spacing)
    carriers: dict[int, list[tuple[str, np.ndarray]]] = {p: [] for p in spec.parent_labels}
    seg_loaded = 0

    for ident in tqdm(ids, desc="PromptLesion: scanning training cases", disable=not progress):
        data_arr, seg_arr, _, props = dataset.load_case(ident)
        shape = tuple(int(s) for s in seg_arr.shape[1:])
        locs = props.get("class_locations", {}) or {}
        absent = _absent_labels(locs, lesion_labels)
        maybe_lesion = [l for l in lesion_labels if l not in absent]
        parent_locs = {p: _parent_locations(locs, p, absent) for p in spec.parent_labels}
        need_seg = bool(maybe_lesion) or any(xyz is not None and not exact for xyz, exact in parent_locs.values())
        seg = near = None
        crop_lo = crop_hi = None
        if need_seg:
            seg_loaded += 1
            seg = np.asarray(seg_arr[0])
            lesion_any = np.isin(seg, maybe_lesion) if maybe_lesion else None
            if lesion_any is not None and lesion_any.any():
                # All per-voxel work happens around the lesions: their bounding box, grown by the centre box
                # (healthy test) and by the measurement ring (statistics).
                nz = [np.flatnonzero(lesion_any.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
                lo = np.array([n[0] for n in nz])
                hi = np.array([n[-1] + 1 for n in nz])
                crop_lo = np.maximum(lo - half, 0)
                crop_hi = np.minimum(hi + half, shape)
                crop = tuple(slice(a, b) for a, b in zip(crop_lo, crop_hi))
                near = ndimage.maximum_filter(lesion_any[crop].astype(np.uint8), size=tuple(box), mode="constant") > 0
                ring = 3
                m_lo, m_hi = np.maximum(lo - ring, 0), np.minimum(hi + ring, shape)
                mcrop = tuple(slice(a, b) for a, b in zip(m_lo, m_hi))
                seg_m = seg[mcrop]
                present = set(np.unique(seg_m[lesion_any[mcrop]]).tolist())
                img = np.asarray(data_arr[(slice(None),) + mcrop])
                for l in spec.lesions:
                    if l.label in present:
                        comps = measure_lesions(img, seg_m, l, stats[l.label])
                        counts[l.label] += len(comps)
                        room = BANK_PER_CLASS - bank.count(l.label)
                        if room > 0:
                            keep = comps[:min(BANK_PER_CASE, room)]
                            bank.masks.setdefault(l.label, []).extend(_largest_slice(c) if two_d else c for c in keep)
        for p, (xyz, exact) in parent_locs.items():
            if xyz is None or len(xyz) == 0:
                continue
            xyz = np.asarray(xyz, dtype=np.int64)
            if not exact:
                xyz = xyz[seg[tuple(xyz.T)] == p]
            if near is not None and len(xyz):
                inside = np.all((xyz >= crop_lo) & (xyz < crop_hi), axis=1)
                rel = xyz[inside] - crop_lo
                bad = np.zeros(len(xyz), dtype=bool)
                bad[np.flatnonzero(inside)] = near[tuple(rel.T)]
                xyz = xyz[~bad]
            if len(xyz) > MAX_CENTRES_PER_CASE:
                xyz = xyz[np.sort(rng.choice(len(xyz), MAX_CENTRES_PER_CASE, replace=False))]
            if len(xyz):
                carriers[p].append((ident, _compact(xyz, shape)))

    index = LesionIndex(spec=spec, counts=counts, stats=stats, bank=bank, carriers=carriers,
                        scan_info={"cases": len(ids), "segmentations_loaded": seg_loaded,
                                   "seconds": round(time.perf_counter() - t0, 3)})
    missing = [l.name for l in spec.lesions if not index.carrier_pool(l)]
    if missing:
        raise NoHealthyRegionError(
            f"no healthy region for lesion class(es) {missing}: none of the {len(ids)} scanned training cases has a "
            f"voxel of their parent label(s) whose central {tuple(int(b) for b in box)}-voxel box is free of lesions. "
            "Add healthy cases, lower 'centre_fraction' in promptlesion_settings.json, or fix the 'parents' in "
            "lesion_spec.json.")
    return index


# ---------------------------------------------------------------------------------------------- cache
def _case_files_state(folder: str | os.PathLike, ident: str) -> list:
    out = []
    for suffix in (".pkl", "_seg.b2nd", ".npz", "_seg.npy"):
        p = Path(folder) / f"{ident}{suffix}"
        if p.is_file():
            st = p.stat()
            out.append([suffix, st.st_size, st.st_mtime_ns])
    return out


def index_fingerprint(source_folder: str | os.PathLike, identifiers: Sequence[str], spec: LesionSpec,
                      spacing: Sequence[float], patch_size: Sequence[int], centre_fraction: float,
                      max_cases: int | None) -> str:
    """sha256 over everything the index depends on: scan code version, spec, geometry, settings, and the
    size and modification time of every training case's files (re-preprocessing changes them)."""
    payload = {"version": INDEX_VERSION, "spec": spec.to_dict(), "spacing": [float(s) for s in spacing],
               "patch_size": [int(p) for p in patch_size], "centre_fraction": float(centre_fraction),
               "max_cases": max_cases, "max_centres": MAX_CENTRES_PER_CASE,
               "cases": {i: _case_files_state(source_folder, i) for i in sorted(identifiers)}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_cached_index(path: str | os.PathLike, fingerprint: str) -> LesionIndex | None:
    """The cached index at ``path`` if its fingerprint matches, else None (also for unreadable files)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except Exception:  # a cache written by another version of the package: rebuild it
        return None
    if not isinstance(obj, dict) or obj.get("fingerprint") != fingerprint or obj.get("version") != INDEX_VERSION:
        return None
    return obj["index"]


def save_index(path: str | os.PathLike, fingerprint: str, index: LesionIndex) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            pickle.dump({"version": INDEX_VERSION, "fingerprint": fingerprint, "index": index}, f,
                        protocol=pickle.HIGHEST_PROTOCOL)


def load_or_build_index(path: str | os.PathLike | None, fingerprint: str, build: Callable[[], LesionIndex],
                        rank: int = 0, world_size: int = 1) -> tuple[LesionIndex, str]:
    """(index, how it was obtained: "cache", "built", "built (not cached)" or "rank 0").

    Without DDP: load the cache when the fingerprint matches, else build and save it. With DDP
    (torch.distributed initialised, ``world_size`` > 1): rank 0 does that and broadcasts whether it
    worked; the other ranks then load the file (or raise rank 0's error) instead of scanning again.
    """
    if world_size <= 1 or path is None:
        if path is not None:
            cached = load_cached_index(path, fingerprint)
            if cached is not None:
                return cached, "cache"
        index = build()
        if path is None:
            return index, "built (not cached)"
        save_index(path, fingerprint, index)
        return index, "built"

    status = [None]
    index, how = None, "rank 0"
    if rank == 0:
        try:
            index, how = load_or_build_index(path, fingerprint, build)
            status = ["ok"]
        except Exception as e:  # other ranks must not wait forever for a file that will not come
            status = [f"{type(e).__name__}: {e}"]
            dist.broadcast_object_list(status, src=0)
            raise
    dist.broadcast_object_list(status, src=0)
    if rank != 0:
        if status[0] != "ok":
            raise RuntimeError(f"rank 0 could not build the lesion index: {status[0]}")
        index = load_cached_index(path, fingerprint)
        if index is None:
            raise RuntimeError(f"rank 0 built the lesion index but {path} does not hold it (is the preprocessed "
                               "folder on a file system all ranks share?)")
    return index, how


def class_probabilities(spec: LesionSpec, counts: dict[int, int], weights: str | dict) -> np.ndarray:
    """Sampling probability per lesion class (order of ``spec.lesions``).

    "inverse_frequency": proportional to 1 / (number of real lesions, at least 1); "uniform";
    or a dict mapping class name or label (as str or int) to a non-negative weight.
    """
    if weights == "uniform":
        w = np.ones(len(spec.lesions))
    elif weights == "inverse_frequency":
        w = np.array([1.0 / max(counts.get(l.label, 0), 1) for l in spec.lesions])
    elif isinstance(weights, dict):
        w = []
        for l in spec.lesions:
            keys = [l.name, str(l.label), l.label]
            v = next((weights[k] for k in keys if k in weights), None)
            if v is None:
                raise ValueError(f"class_weights gives no weight for lesion '{l.name}' (label {l.label})")
            w.append(float(v))
        unknown = set(map(str, weights)) - {str(k) for l in spec.lesions for k in (l.name, l.label)}
        if unknown:
            raise ValueError(f"class_weights names unknown classes {sorted(unknown)}")
        w = np.asarray(w)
    else:
        raise ValueError(f"unknown class_weights {weights!r}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"class weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()
