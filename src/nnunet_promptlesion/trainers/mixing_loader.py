"""nnU-Net's training data loader, extended with synthetic samples.

Every batch holds ``n_real`` samples drawn by nnU-Net's own logic (the parent class, with
probabilistic foreground oversampling so the real share keeps nnU-Net's oversampling rate) followed
by ``n_synthetic`` synthetic samples, each born in one direction (:meth:`PromptLesionDataLoader.synthesize`):
the loader draws a class with the configured class probabilities, makes the
:class:`~nnunet_promptlesion.synthesis.sources.Placement` (a healthy carrier patch cut around a
parent-structure voxel with a lesion mask inside the parent, :meth:`PromptLesionDataLoader.place`; or a
carrier cut around a lesion the source rendered ahead of time, :meth:`PromptLesionDataLoader.place_around`),
hands it to the :class:`~nnunet_promptlesion.synthesis.sources.SampleSource` to render and writes the label
into the segmentation (:meth:`PromptLesionDataLoader.write_label`). The source never calls the loader.
Synthetic samples then go through the same nnU-Net transforms as real ones, so augmentation,
deep-supervision targets and region handling are identical.

A synthetic slot whose draws all fail (no placement after ``placement_tries`` carriers, or the source
has nothing ready) is filled with a real sample; ``batch['promptlesion_stats']`` carries the counts
(summed per epoch by the trainer). ``batch['synthetic']`` (bool tensor, one per sample) marks which
samples are synthetic.

Runs inside nnU-Net's data-augmentation workers (forked, or spawned: the loader pickles cheaply).
Arrays follow nnU-Net's preprocessed layout: data (C, X, Y, Z), seg (1, X, Y, Z); 2D configurations
use the pseudo-3D form (C, 1, X, Y) until just before the transforms, as nnU-Net's loader does.
"""
from __future__ import annotations

import os
from collections import Counter
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from ..lesions.masks import MaskSampler, brighter_than_parent
from ..synthesis.sources import Placement, SampleSource, SynthesisError, SyntheticSample
from .lesion_index import LesionIndex, centre_box, centre_slices

STATS_KEY = "promptlesion_stats"

__all__ = ["PromptLesionDataLoader", "SyntheticSample", "synthetic_slots_per_rank", "STATS_KEY"]


def synthetic_slots_per_rank(batch_sizes: Sequence[int], n_synthetic_global: int) -> list[int]:
    """Synthetic samples per rank so that the global batch holds exactly ``n_synthetic_global``.

    batch_sizes: per-rank batch sizes (nnU-Net splits the global batch over DDP ranks). The global
    slots are laid out rank after rank and the synthetic ones spread evenly over them (slot j is
    synthetic when floor((j + 1) f) > floor(j f), f = n_synthetic_global / global batch), so a rank
    holding one sample is either real or synthetic and the global share holds exactly.
    """
    total = int(sum(batch_sizes))
    if not 0 <= n_synthetic_global <= total:
        raise ValueError(f"n_synthetic_global={n_synthetic_global} must lie in [0, {total}]")
    is_syn = [(j + 1) * n_synthetic_global // total > j * n_synthetic_global // total for j in range(total)]
    out, j = [], 0
    for b in batch_sizes:
        out.append(int(sum(is_syn[j:j + b])))
        j += b
    return out


class PromptLesionDataLoader(nnUNetDataLoader):
    """See the module docstring.

    patch_size: initial (pre-augmentation) patch, final_patch_size: network patch (voxels; 2 values for
    2D configurations). source: the sample source; mask_sampler: draws lesion masks (spacing of the
    configuration, mm, same axis order). n_synthetic: synthetic samples per batch of this rank.
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 index: LesionIndex, source: SampleSource, mask_sampler: MaskSampler, class_probs: np.ndarray,
                 n_synthetic: int, centre_fraction: float, oversample_foreground_percent: float = 0.33,
                 transforms=None, placement_tries: int = 20, draw_tries: int = 2):
        if not 0 <= n_synthetic <= batch_size:
            raise ValueError(f"n_synthetic={n_synthetic} must lie in [0, batch_size={batch_size}]")
        self.total_batch_size = batch_size
        self.n_synthetic = n_synthetic
        # The parent draws only the real share; probabilistic oversampling keeps nnU-Net's foreground
        # rate on it (the last-33%-of-the-batch rule would round to zero for a single real sample).
        super().__init__(data, max(batch_size - n_synthetic, 1), patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, probabilistic_oversampling=True,
                         transforms=transforms)
        self.index = index
        self.source = source
        self.mask_sampler = mask_sampler
        self.class_probs = np.asarray(class_probs, dtype=float)
        self.centre_fraction = centre_fraction
        self.placement_tries = int(placement_tries)
        self.draw_tries = int(draw_tries)
        # One definition of the lesion-centre region, shared with the start-up scan (lesion_index).
        self.centre_box = centre_box(self.final_patch_size, centre_fraction)
        self.centre_region = centre_slices(self.patch_size, self.centre_box)
        self._pools = [index.carrier_pool(l) for l in index.spec.lesions]
        self._owner_pid = os.getpid()
        self._rng = None
        self._rng_pid = None
        self._stats: Counter = Counter()

    # ------------------------------------------------------------------ random streams
    @property
    def n_real(self) -> int:
        return self.total_batch_size - self.n_synthetic

    @property
    def rng(self) -> np.random.Generator:
        """This process's generator, derived from np.random (which batchgenerators seeds per worker).

        In a worker (any process other than the one that built the loader) torch is seeded from the
        same draw: forked workers inherit one torch generator state, so nnU-Net's torch-random
        transforms would otherwise repeat across workers.
        """
        pid = os.getpid()
        if self._rng is None or self._rng_pid != pid:
            seed = int(np.random.randint(0, 2**31 - 1))
            self._rng = np.random.default_rng(seed)
            if pid != self._owner_pid:
                torch.manual_seed(seed)
            self._rng_pid = pid
        return self._rng

    def sample_class(self) -> int:
        """Index into ``index.spec.lesions`` drawn with the configured class probabilities."""
        return int(self.rng.choice(len(self.class_probs), p=self.class_probs))

    def count(self, key: str, n: float = 1) -> None:
        """Add to a per-batch counter (reported in ``batch['promptlesion_stats']``, summed per epoch)."""
        self._stats[key] += n

    # ------------------------------------------------------------------ placement
    def carrier_bbox(self, centre_xyz) -> list[list[int]]:
        """Crop box of the initial patch with voxel ``centre_xyz`` at index ``patch_size // 2``."""
        lbs = [int(c) - p // 2 for c, p in zip(centre_xyz, self.patch_size)]
        return [[lb, lb + p] for lb, p in zip(lbs, self.patch_size)]

    def load_crop(self, case: str, bbox) -> tuple[np.ndarray, np.ndarray]:
        """(data (C, *patch) float32, seg (1, *patch) int16) of ``case`` cut to ``bbox`` (padding: data 0, seg -1)."""
        data, seg, _, _ = self._data.load_case(case)
        bbox = [list(b) for b in bbox]
        data_c = np.ascontiguousarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32)
        seg_c = np.ascontiguousarray(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16), dtype=np.int16)
        return data_c, seg_c

    @staticmethod
    def allowed_region(seg: np.ndarray, lesion) -> np.ndarray:
        """Where a lesion of this class may be written in ``seg`` (*spatial): its parents, plus background
        when it may leave them or is a mass (``min_parent_fraction``); never another label and never nnU-Net's
        -1 padding."""
        allowed = np.isin(seg, lesion.parents)
        if lesion.may_leave_parent or lesion.min_parent_fraction is not None:
            allowed |= seg == 0
        return allowed

    def place(self, class_idx: int, rng: np.random.Generator) -> tuple[Placement, np.ndarray, np.ndarray] | None:
        """A placement of lesion class ``class_idx`` and the carrier crops (data (C, *patch), seg (1, *patch)).

        Tries up to ``placement_tries`` carrier patches (each failure counted as ``placement_retries``);
        returns None when all fail (counted as ``placement_failures``).
        """
        lesion = self.index.spec.lesions[class_idx]
        pool = self._pools[class_idx]
        two_d = self.patch_size_was_2d
        region = self.centre_region[1:] if two_d else self.centre_region
        for _ in range(self.placement_tries):
            ident, centres = pool[rng.integers(len(pool))]
            centre = centres[rng.integers(len(centres))]
            bbox = self.carrier_bbox(centre)
            data, seg = self.load_crop(ident, bbox)
            s = seg[0, 0] if two_d else seg[0]
            allowed = self.allowed_region(s, lesion)
            if lesion.min_parent_fraction is not None:
                allowed &= ~brighter_than_parent(data[0, 0] if two_d else data[0], s, lesion.parents)
            out = self.mask_sampler.sample_with_centre(lesion, np.isin(s, lesion.parents), rng, region,
                                                       allowed=allowed)
            if out is None:
                self.count("placement_retries")
                continue
            mask, c = out
            if two_d:
                mask, c = mask[None], (0, *c)
            placement = Placement.from_mask(ident, bbox, class_idx, lesion.label, mask, c,
                                            seed=int(rng.integers(2**31 - 1)))
            return placement, data, seg
        self.count("placement_failures")
        return None

    def place_around(self, rendered, class_idx: int, rng: np.random.Generator
                     ) -> tuple[Placement, np.ndarray, np.ndarray] | None:
        """A placement around a lesion already rendered into a case (``RenderedLesion``: cache, producer ring)
        and the carrier crops: the patch is cut so that the lesion centre lies at a random position of the
        central region, as for fresh placements. None if no lesion voxel falls inside the patch."""
        box = np.asarray(self.centre_box)
        shift = np.array([int(rng.integers(-(b // 2), b // 2 + 1)) for b in box])
        bbox = self.carrier_bbox(np.asarray(rendered.centre) - shift)
        data, seg = self.load_crop(rendered.case, bbox)
        lo = np.array([b[0] for b in bbox])
        mask = rendered.mask_in(lo, data.shape[1:])
        if not mask.any():
            return None
        placement = Placement.from_mask(rendered.case, bbox, class_idx, rendered.label, mask,
                                        np.asarray(rendered.centre) - lo, rendered.seed, rendered=rendered)
        return placement, data, seg

    def offer_placement(self, class_idx: int, rng: np.random.Generator):
        """If the source wants a fresh placement of ``class_idx`` (to render ahead of time), place one and submit
        it. Returns what :meth:`place` returned (None if nothing was placed)."""
        if not self.source.wants_placement(class_idx):
            return None
        placed = self.place(class_idx, rng)
        if placed is not None:
            self.source.submit(placed[0], rng)
        return placed

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

    # ------------------------------------------------------------------ batches
    def synthesize(self, class_idx: int, rng: np.random.Generator) -> SyntheticSample | None:
        """One attempt at an untransformed synthetic sample of lesion class ``class_idx`` (index into the spec's
        lesions), in one direction: placement here, rendering by the source, label here. None if it fails."""
        fresh = self.offer_placement(class_idx, rng)
        rendered = self.source.pick(class_idx, rng)
        if rendered is not None:
            placed = self.place_around(rendered, class_idx, rng)
        else:
            placed = fresh if fresh is not None else self.place(class_idx, rng)
        if placed is None:
            return None
        placement, data, seg = placed
        image = self.source.render(placement, data, seg)
        if image is None:
            return None
        return SyntheticSample(data=np.asarray(image, dtype=np.float32), seg=self.write_label(seg, placement),
                               placement=placement)

    def draw_synthetic(self, class_idx: int | None = None) -> SyntheticSample | None:
        """One untransformed synthetic sample (class drawn unless given), or None after ``draw_tries``."""
        rng = self.rng
        class_idx = self.sample_class() if class_idx is None else class_idx
        for _ in range(self.draw_tries):
            try:
                sample = self.synthesize(class_idx, rng)
            except SynthesisError:
                sample = None
            if sample is not None:
                return sample
            self.count("draw_failures")
        return None

    def make_synthetic(self, class_idx: int | None = None) -> SyntheticSample:
        """Like :meth:`draw_synthetic` but raises :class:`SynthesisError` instead of returning None."""
        sample = self.draw_synthetic(class_idx)
        if sample is None:
            raise SynthesisError(f"no synthetic sample of class {class_idx} after {self.draw_tries} draws")
        return sample

    def _transform(self, data: torch.Tensor, seg: torch.Tensor):
        if self.patch_size_was_2d:
            data, seg = data[:, 0], seg[:, 0]
        if self.transforms is None:
            return data, seg
        out = self.transforms(**{"image": data, "segmentation": seg})
        return out["image"], out["segmentation"]

    @contextmanager
    def _real_batch(self, n: int):
        # nnU-Net's generate_train_batch draws self.batch_size cases; a failed synthetic slot raises the real
        # count of this batch only.
        old = self.batch_size
        self.batch_size = n
        try:
            yield
        finally:
            self.batch_size = old

    def generate_train_batch(self):
        rng = self.rng  # seeds this worker's streams before any transform runs
        del rng
        samples = []
        with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
            for _ in range(self.n_synthetic):
                s = self.draw_synthetic()
                if s is None:
                    self.count("fallback_real")
                else:
                    self.count(f"synthetic/{self.index.spec.lesions[s.placement.class_idx].name}")
                    samples.append(s)
        parts = []
        n_real = self.n_real + self.n_synthetic - len(samples)
        if n_real > 0:
            with self._real_batch(n_real):
                real = super().generate_train_batch()
            parts.append((real["data"], real["target"], list(real["keys"])))
        if samples:
            datas, segs, keys = [], [], []
            with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
                for s in samples:
                    d, t = self._transform(torch.from_numpy(np.ascontiguousarray(s.data, dtype=np.float32)),
                                           torch.from_numpy(np.ascontiguousarray(s.seg, dtype=np.int16)))
                    datas.append(d)
                    segs.append(t)
                    keys.append(f"synthetic:{s.case}:label{s.label}")
            data = torch.stack(datas)
            target = [torch.stack([s[i] for s in segs]) for i in range(len(segs[0]))] if isinstance(segs[0], list) \
                else torch.stack(segs)
            parts.append((data, target, keys))
        data = torch.cat([p[0] for p in parts])
        if isinstance(parts[0][1], list):
            target = [torch.cat([p[1][i] for p in parts]) for i in range(len(parts[0][1]))]
        else:
            target = torch.cat([p[1] for p in parts])
        keys = [k for p in parts for k in p[2]]
        synthetic = torch.tensor([k.startswith("synthetic:") for k in keys])
        stats = dict(self._stats)
        for k, v in self.source.worker_stats().items():
            stats[f"{self.source.name}/{k}"] = stats.get(f"{self.source.name}/{k}", 0) + v
        stats["batches"] = 1
        self._stats.clear()
        return {"data": data, "target": target, "keys": keys, "synthetic": synthetic, STATS_KEY: stats}
