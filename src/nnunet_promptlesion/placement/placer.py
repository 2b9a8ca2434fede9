"""The one placement rule: where a synthetic lesion may go.

:class:`Placer` answers it for PromptLesionTrainer's loader, the cache builder (``promptlesion_build_cache``) and
single-CT synthesis (``promptlesion_synthesize``) alike:

1. a carrier: a case and a centre voxel drawn from the carrier index (healthy parent voxels, see :mod:`.index`);
2. the carrier patch: ``patch_size`` voxels cut with that voxel at index ``patch_size // 2`` (:meth:`carrier_bbox`);
3. the allowed region in the patch (:meth:`allowed_region`): the lesion's parents, plus background when the class
   may leave them or is a mass; never another label, never the -1 padding; a mass also avoids voxels brighter than
   its parent (bone, calcium: a mass displaces fat);
4. a lesion mask from the mask sampler, centred on a parent voxel of the central region (``centre_box``);
5. after rendering, the label written under the mask, inside the allowed region only (:meth:`write_label`).

A carrier can also be cut around a lesion rendered ahead of time (:meth:`place_around`: cache, producer ring).

Cases are read through a small seam, :class:`CaseCrops`: :class:`NnunetCases` over an nnU-Net dataset
(``load_case``), :class:`ArrayCases` over in-memory volumes (one NIfTI CT). Arrays: data (C, X, Y, Z) float32,
seg (1, X, Y, Z) int16 in the case's voxel grid (nnU-Net's preprocessed order; an in-memory case's own order);
2D configurations use the pseudo-3D layout (axis 0 of extent 1), as nnU-Net's loader does.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

from ..lesions.masks import MaskSampler, brighter_than_parent
from ..lesions.spec import LesionClass
from .index import LesionIndex, centre_box, centre_slices
from .placement import Placement

__all__ = ["Placer", "CaseCrops", "NnunetCases", "ArrayCases"]


class CaseCrops:
    """Crops of carrier cases. A subclass says how a whole case is read (:meth:`load`)."""

    def load(self, case: str):
        """(data (C, *spatial), seg (1, *spatial)) of ``case``: arrays or lazily read array-likes."""
        raise NotImplementedError

    def crop(self, case: str, bbox) -> tuple[np.ndarray, np.ndarray]:
        """(data (C, *patch) float32, seg (1, *patch) int16) of ``case`` cut to ``bbox`` (``[[lo, hi], ...]``
        voxels, may extend past the volume: padded with data 0, seg -1)."""
        data, seg = self.load(case)
        bbox = [list(b) for b in bbox]
        data_c = np.ascontiguousarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32)
        seg_c = np.ascontiguousarray(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16), dtype=np.int16)
        return data_c, seg_c


class NnunetCases(CaseCrops):
    """Cases of an nnU-Net preprocessed dataset (``dataset.load_case``; blosc2/npy, read lazily)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def load(self, case: str):
        data, seg, _, _ = self.dataset.load_case(case)
        return data, seg


class ArrayCases(CaseCrops):
    """In-memory cases: identifier -> (data (C, *spatial), seg (1, *spatial))."""

    def __init__(self, cases: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.cases = cases

    def load(self, case: str):
        return self.cases[case]


class Placer:
    """Places lesions of the classes of ``index.spec`` on the carriers of ``index`` (see the module docstring).

    cases: where carrier crops come from; mask_sampler: draws lesion shapes (spacing of the grid, mm, same axis
    order); patch_size: the carrier patch (voxels; 2 values for 2D configurations); box: odd sides (voxels, same
    length as ``patch_size``) of the central region that holds lesion centres; tries: carriers tried per
    :meth:`place` call. Counters (``placement_retries``, ``placement_failures``) accumulate until
    :meth:`take_stats`.
    """

    def __init__(self, cases: CaseCrops, index: LesionIndex, mask_sampler: MaskSampler, patch_size: Sequence[int],
                 box: Sequence[int], tries: int = 20):
        self.two_d = len(patch_size) == 2
        # 2D configurations: the pseudo-3D layout of nnU-Net's loader (axis 0 of extent 1)
        self.patch_size = tuple(int(p) for p in ((1, *patch_size) if self.two_d else patch_size))
        self.centre_box = np.asarray((1, *box) if self.two_d else box, dtype=int)
        self.centre_region = centre_slices(self.patch_size, self.centre_box)
        self.cases = cases
        self.index = index
        self.mask_sampler = mask_sampler
        self.tries = int(tries)
        self.pools = [index.carrier_pool(l) for l in index.spec.lesions]
        self.stats: Counter = Counter()

    @classmethod
    def for_training(cls, cases: CaseCrops, index: LesionIndex, mask_sampler: MaskSampler, patch_size,
                     final_patch_size, centre_fraction: float, tries: int = 20) -> "Placer":
        """PromptLesionTrainer's placer: carriers of the initial (pre-augmentation) ``patch_size``, lesion centres
        in the central ``centre_fraction`` of the network patch ``final_patch_size`` (the same central box the
        start-up scan keeps lesion-free)."""
        return cls(cases, index, mask_sampler, patch_size, centre_box(final_patch_size, centre_fraction), tries)

    def take_stats(self) -> Counter:
        """The counters since the last call (the call resets them)."""
        out, self.stats = self.stats, Counter()
        return out

    # ------------------------------------------------------------------ the rule
    def carrier_bbox(self, centre_xyz) -> list[list[int]]:
        """Crop box of the carrier patch with voxel ``centre_xyz`` at index ``patch_size // 2``."""
        lbs = [int(c) - p // 2 for c, p in zip(centre_xyz, self.patch_size)]
        return [[lb, lb + p] for lb, p in zip(lbs, self.patch_size)]

    def load_crop(self, case: str, bbox) -> tuple[np.ndarray, np.ndarray]:
        """(data (C, *patch) float32, seg (1, *patch) int16) of ``case`` cut to ``bbox`` (padding: data 0, seg -1)."""
        return self.cases.crop(case, bbox)

    @staticmethod
    def allowed_region(seg: np.ndarray, lesion: LesionClass) -> np.ndarray:
        """Where a lesion of this class may be written in ``seg`` (*spatial): its parents, plus background
        when it may leave them or is a mass (``min_parent_fraction``); never another label and never nnU-Net's
        -1 padding."""
        allowed = np.isin(seg, lesion.parents)
        if lesion.may_leave_parent or lesion.min_parent_fraction is not None:
            allowed |= seg == 0
        return allowed

    def place(self, class_idx: int, rng: np.random.Generator, region: tuple[slice, ...] | None = None,
              seed: int | None = None, radius_range_mm: tuple[float, float] | None = None,
              attributes: tuple[int, ...] | None = None) -> tuple[Placement, np.ndarray, np.ndarray] | None:
        """A fresh placement of lesion class ``class_idx`` (index into ``index.spec.lesions``) and the carrier
        crops (data (C, *patch), seg (1, *patch)).

        region: where the lesion centre may lie in the patch (spatial slices; default the central region);
        seed: the placement's rendering seed (default: drawn from ``rng`` after the mask). radius_range_mm: (lo, hi)
        equivalent radius of the mask (a requested radius bin, see ``MaskSampler.sample_with_centre``); attributes:
        the requested attribute bins, recorded on the placement for the renderer. Tries up to ``tries``
        carriers (each failure counted as ``placement_retries``); returns None when all fail (counted as
        ``placement_failures``).
        """
        lesion = self.index.spec.lesions[class_idx]
        pool = self.pools[class_idx]
        if not pool:
            self.stats["placement_failures"] += 1
            return None
        two_d = self.two_d
        if region is None:
            region = self.centre_region[1:] if two_d else self.centre_region
        for _ in range(self.tries):
            ident, centres = pool[rng.integers(len(pool))]
            centre = centres[rng.integers(len(centres))]
            bbox = self.carrier_bbox(centre)
            data, seg = self.load_crop(ident, bbox)
            s = seg[0, 0] if two_d else seg[0]
            allowed = self.allowed_region(s, lesion)
            if lesion.min_parent_fraction is not None:
                allowed &= ~brighter_than_parent(data[0, 0] if two_d else data[0], s, lesion.parents)
            out = self.mask_sampler.sample_with_centre(lesion, np.isin(s, lesion.parents), rng, region,
                                                       allowed=allowed, radius_range_mm=radius_range_mm)
            if out is None:
                self.stats["placement_retries"] += 1
                continue
            mask, c = out
            if two_d:
                mask, c = mask[None], (0, *c)
            placement = Placement.from_mask(ident, bbox, class_idx, lesion.label, mask, c,
                                            seed=int(rng.integers(2**31 - 1)) if seed is None else int(seed),
                                            attributes=attributes)
            return placement, data, seg
        self.stats["placement_failures"] += 1
        return None

    def place_around(self, rendered, class_idx: int, rng: np.random.Generator
                     ) -> tuple[Placement, np.ndarray, np.ndarray] | None:
        """A placement around a lesion already rendered into a case (``RenderedLesion``: cache, producer ring)
        and the carrier crops: the patch is cut so that the lesion centre lies at a random position of the
        central region, as for fresh placements. None if no lesion voxel falls inside the patch."""
        shift = np.array([int(rng.integers(-(b // 2), b // 2 + 1)) for b in self.centre_box])
        bbox = self.carrier_bbox(np.asarray(rendered.centre) - shift)
        data, seg = self.load_crop(rendered.case, bbox)
        lo = np.array([b[0] for b in bbox])
        mask = rendered.mask_in(lo, data.shape[1:])
        if not mask.any():
            return None
        placement = Placement.from_mask(rendered.case, bbox, class_idx, rendered.label, mask,
                                        np.asarray(rendered.centre) - lo, rendered.seed, rendered=rendered)
        return placement, data, seg

    def write_label(self, seg: np.ndarray, placement: Placement) -> np.ndarray:
        """A copy of ``seg`` (1, *patch) with the lesion label under the placement's mask.

        Only voxels of the allowed region are written (see :meth:`allowed_region`), so another class's
        label and the -1 padding are never overwritten, whatever the mask says.
        """
        lesion = self.index.spec.lesions[placement.class_idx]
        out = seg.copy()
        sl = (0,) + placement.lesion_slices
        sub = out[sl]
        sub[placement.lesion_mask & self.allowed_region(sub, lesion)] = placement.label
        return out
