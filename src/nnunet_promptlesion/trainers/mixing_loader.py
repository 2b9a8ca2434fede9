"""nnU-Net's training data loader, extended with synthetic samples.

Every batch holds ``n_real`` samples drawn by nnU-Net's own logic (the parent class, with
probabilistic foreground oversampling so the real share keeps nnU-Net's oversampling rate) followed
by ``n_synthetic`` samples made here: a healthy carrier patch cut around a parent-structure voxel, a
class-balanced lesion class, a lesion painted in by the synthesizer and its label written into the
segmentation. Synthetic samples then go through the same nnU-Net transforms as real ones, so
augmentation, deep-supervision targets and region handling are identical. ``batch['synthetic']``
(bool tensor, one per sample) marks which samples are synthetic.

Runs inside nnU-Net's (forked, CPU) data-augmentation workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from ..synthesis.synthesizer import SynthesisError, Synthesizer
from .lesion_index import LesionIndex, centre_box


@dataclass
class SyntheticSample:
    """One synthetic sample before nnU-Net's transforms.

    data: (C, X, Y, Z) float32; seg: (1, X, Y, Z) int16; bbox: [[lo, hi], ...] of the crop in the case's
    voxel grid; mask: (X, Y, Z) bool, the painted lesion.
    """

    data: torch.Tensor
    seg: torch.Tensor
    case: str
    label: int
    bbox: list
    mask: np.ndarray


class PromptLesionDataLoader(nnUNetDataLoader):
    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 index: LesionIndex, synthesizer: Synthesizer, class_probs: np.ndarray, n_synthetic: int,
                 centre_fraction: float, oversample_foreground_percent: float = 0.33, transforms=None,
                 max_tries: int = 20):
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
        self.synthesizer = synthesizer
        self.class_probs = np.asarray(class_probs, dtype=float)
        self.centre_fraction = centre_fraction
        self.max_tries = max_tries
        self._rng = None
        self._rng_pid = None

    @property
    def n_real(self) -> int:
        return self.total_batch_size - self.n_synthetic

    @property
    def rng(self) -> np.random.Generator:
        # Each forked worker needs its own stream: derive it from np.random, which batchgenerators
        # seeds per worker, the first time this process asks.
        if self._rng is None or self._rng_pid != os.getpid():
            self._rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
            self._rng_pid = os.getpid()
        return self._rng

    def sample_class(self) -> int:
        """Index into ``index.spec.lesions`` drawn with the configured class probabilities."""
        return int(self.rng.choice(len(self.class_probs), p=self.class_probs))

    def _carrier_bbox(self, centre_xyz):
        lbs = [int(c) - p // 2 for c, p in zip(centre_xyz, self.patch_size)]
        return [[lb, lb + p] for lb, p in zip(lbs, self.patch_size)]

    def make_synthetic(self, class_idx: int | None = None) -> SyntheticSample:
        """One untransformed synthetic sample.

        ``class_idx`` (index into the spec's lesions) forces the class; by default it is drawn.
        """
        rng = self.rng
        lesion = self.index.spec.lesions[self.sample_class() if class_idx is None else class_idx]
        pool = self.index.carrier_pool(lesion)
        # The lesion centre must land inside the final patch's central region of the (larger) initial patch.
        box = centre_box(self.final_patch_size, self.centre_fraction)
        starts = [(p - b) // 2 for p, b in zip(self.patch_size, box)]
        centre_region = tuple(slice(s, s + b) for s, b in zip(starts, box))
        for _ in range(self.max_tries):
            ident, centres = pool[rng.integers(len(pool))]
            centre = centres[rng.integers(len(centres))]
            data, seg, _, _ = self._data.load_case(ident)
            bbox = self._carrier_bbox(centre)
            data_c = crop_and_pad_nd(data, bbox, 0).astype(np.float32, copy=False)
            seg_c = crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)
            parent = np.isin(seg_c[0], lesion.parents)
            try:
                result = self.synthesizer.synthesize(data_c, parent, lesion, rng, centre_region)
            except SynthesisError:
                continue
            seg_c = seg_c.copy()
            seg_c[0][result.mask] = lesion.label
            return SyntheticSample(torch.from_numpy(np.ascontiguousarray(result.image)), torch.from_numpy(seg_c),
                                   ident, lesion.label, bbox, result.mask)
        raise SynthesisError(f"no '{lesion.name}' lesion could be placed in {self.max_tries} carrier patches")

    def _transform(self, data: torch.Tensor, seg: torch.Tensor):
        if self.transforms is None:
            return data, seg
        out = self.transforms(**{"image": data, "segmentation": seg})
        return out["image"], out["segmentation"]

    def generate_train_batch(self):
        parts = []
        if self.n_real > 0:
            real = super().generate_train_batch()
            parts.append((real["data"], real["target"], list(real["keys"])))
        if self.n_synthetic > 0:
            datas, segs, keys = [], [], []
            with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
                for _ in range(self.n_synthetic):
                    sample = self.make_synthetic()
                    d, s = self._transform(sample.data, sample.seg)
                    datas.append(d)
                    segs.append(s)
                    keys.append(f"synthetic:{sample.case}:label{sample.label}")
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
        return {"data": data, "target": target, "keys": keys, "synthetic": synthetic}
