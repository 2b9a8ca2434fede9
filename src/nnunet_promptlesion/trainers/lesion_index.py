"""One start-up pass over the training cases: what PromptLesionTrainer needs to synthesize.

For every lesion class of the spec it collects the real lesions' intensity statistics (rule-based
synthesis), their masks (the real-mask bank) and their number (class-balanced sampling), and for
every parent label the voxels around which a *healthy* carrier patch can be cut: parent voxels
(from nnU-Net's ``class_locations``) whose central box holds no lesion voxel of any class.

Arrays follow nnU-Net's preprocessed layout: data (C, X, Y, Z), seg (1, X, Y, Z), voxel coordinates
(x, y, z) in that grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from ..synthesis.lesion_spec import LesionClass, LesionSpec
from ..synthesis.masks import MaskBank
from ..synthesis.rule_based import LesionIntensityStats, measure_lesions


class NoHealthyRegionError(RuntimeError):
    pass


@dataclass
class LesionIndex:
    spec: LesionSpec
    counts: dict[int, int]
    stats: dict[int, LesionIntensityStats]
    bank: MaskBank
    #: parent label -> list of (case identifier, (N, 3) int array of healthy centre voxels)
    carriers: dict[int, list[tuple[str, np.ndarray]]] = field(default_factory=dict)

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
    """Side lengths (voxels, odd) of the central region of a patch that must be lesion-free."""
    return np.maximum(1, (np.round(np.asarray(patch_size) * centre_fraction) // 2) * 2 + 1).astype(int)


def build_lesion_index(dataset, identifiers: Sequence[str], spec: LesionSpec, spacing: Sequence[float],
                       patch_size: Sequence[int], centre_fraction: float, max_cases: int | None = None,
                       rng: np.random.Generator | None = None, progress: bool = True) -> LesionIndex:
    """Scan ``identifiers`` of an nnU-Net dataset (``dataset.load_case``) once.

    spacing: mm per voxel in the preprocessed array order; patch_size: final patch size (voxels).
    Raises :class:`NoHealthyRegionError` naming the lesion classes that have no healthy carrier.
    """
    rng = rng or np.random.default_rng(0)
    ids = list(identifiers)
    if max_cases is not None and len(ids) > max_cases:
        ids = sorted(rng.choice(ids, size=max_cases, replace=False).tolist())
    box = centre_box(patch_size, centre_fraction)
    lesion_labels = spec.labels
    stats = {l.label: LesionIntensityStats() for l in spec.lesions}
    counts = {l.label: 0 for l in spec.lesions}
    bank = MaskBank.empty(spacing)
    carriers: dict[int, list[tuple[str, np.ndarray]]] = {p: [] for p in spec.parent_labels}

    for ident in tqdm(ids, desc="PromptLesion: scanning training cases", disable=not progress):
        data, seg, _, props = dataset.load_case(ident)
        seg = np.asarray(seg[0])
        present = set(np.unique(seg).tolist())
        lesion_any = np.isin(seg, lesion_labels)
        if any(l in present for l in lesion_labels):
            img = np.asarray(data[:])
            for l in spec.lesions:
                if l.label in present:
                    comps = measure_lesions(img, seg, l, stats[l.label])
                    counts[l.label] += len(comps)
                    bank.masks.setdefault(l.label, []).extend(comps[:20])
            near_lesion = ndimage.maximum_filter(lesion_any.astype(np.uint8), size=tuple(box), mode="constant") > 0
        else:
            near_lesion = None
        locs = props.get("class_locations", {})
        for p in spec.parent_labels:
            pts = locs.get(p)
            if pts is None or len(pts) == 0:
                continue
            xyz = np.asarray(pts)[:, 1:].astype(np.int64)
            if near_lesion is not None:
                xyz = xyz[~near_lesion[tuple(xyz.T)]]
            if len(xyz):
                carriers[p].append((ident, xyz))

    index = LesionIndex(spec=spec, counts=counts, stats=stats, bank=bank, carriers=carriers)
    missing = [l.name for l in spec.lesions if not index.carrier_pool(l)]
    if missing:
        raise NoHealthyRegionError(
            f"no healthy region for lesion class(es) {missing}: none of the {len(ids)} scanned training cases has a "
            f"voxel of their parent label(s) whose central {tuple(box)}-voxel box is free of lesions. Add healthy "
            "cases, lower 'centre_fraction' in promptlesion_settings.json, or fix the 'parents' in lesion_spec.json."
        )
    return index


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
