"""nnU-Net's training data loader, extended with synthetic samples.

Every batch holds ``n_real`` samples drawn by nnU-Net's own logic (the parent class, with
probabilistic foreground oversampling so the real share keeps nnU-Net's oversampling rate) followed
by ``n_synthetic`` synthetic samples. A synthetic sample passes three places: where it goes
(:mod:`nnunet_promptlesion.placement`, the :class:`~nnunet_promptlesion.placement.placer.Placer`), how it looks
(the :class:`~nnunet_promptlesion.synthesis.sources.SampleSource`), how it enters the batch (here). Each is born in
one direction (:meth:`PromptLesionDataLoader.synthesize`): the loader draws a class with the configured class
probabilities, the placer makes the :class:`~nnunet_promptlesion.placement.placement.Placement` (a healthy
carrier patch cut around a parent-structure voxel with a lesion mask inside the parent, or a carrier cut around a
lesion the source rendered ahead of time), the source renders it and the placer writes the label into the
segmentation. The source never calls the loader.
Synthetic samples then go through the same nnU-Net transforms as real ones, so augmentation,
deep-supervision targets and region handling are identical.

A synthetic slot whose draws all fail (no placement after the placer's ``tries`` carriers, or the source
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
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from ..placement.index import LesionIndex
from ..placement.placer import Placer
from ..synthesis.sources import SampleSource, SynthesisError, SyntheticSample

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
    2D configurations). placer: places the synthetic lesions (carriers of ``patch_size``, see
    :meth:`Placer.for_training <nnunet_promptlesion.placement.placer.Placer.for_training>`); source: the sample
    source. n_synthetic: synthetic samples per batch of this rank.
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager,
                 placer: Placer, source: SampleSource, class_probs: np.ndarray, n_synthetic: int,
                 oversample_foreground_percent: float = 0.33, transforms=None, draw_tries: int = 2):
        if not 0 <= n_synthetic <= batch_size:
            raise ValueError(f"n_synthetic={n_synthetic} must lie in [0, batch_size={batch_size}]")
        self.total_batch_size = batch_size
        self.n_synthetic = n_synthetic
        # The parent draws only the real share; probabilistic oversampling keeps nnU-Net's foreground
        # rate on it (the last-33%-of-the-batch rule would round to zero for a single real sample).
        super().__init__(data, max(batch_size - n_synthetic, 1), patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, probabilistic_oversampling=True,
                         transforms=transforms)
        if placer.patch_size != tuple(int(p) for p in self.patch_size):
            raise ValueError(f"the placer cuts carriers of {placer.patch_size} voxels, the loader's patch is "
                             f"{tuple(self.patch_size)}")
        self.placer = placer
        self.source = source
        self.class_probs = np.asarray(class_probs, dtype=float)
        self.draw_tries = int(draw_tries)
        self._owner_pid = os.getpid()
        self._rng = None
        self._rng_pid = None
        self._stats: Counter = Counter()

    # ------------------------------------------------------------------ random streams
    @property
    def index(self) -> LesionIndex:
        """The carrier index the placer draws from (its spec names the classes, its counts weight them)."""
        return self.placer.index

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

    # ------------------------------------------------------------------ batches
    def synthesize(self, class_idx: int, rng: np.random.Generator) -> SyntheticSample | None:
        """One attempt at an untransformed synthetic sample of lesion class ``class_idx`` (index into the spec's
        lesions), in one direction: placement by the placer, rendering by the source, label by the placer. None if
        it fails."""
        placer = self.placer
        fresh = None
        if self.source.wants_placement(class_idx):
            # a source that renders ahead of time gets this fresh placement to render for a later draw
            fresh = placer.place(class_idx, rng, **self.source.placement_options(class_idx, rng))
            if fresh is not None:
                self.source.submit(fresh[0], rng)
        rendered = self.source.pick(class_idx, rng)
        if rendered is not None:
            placed = placer.place_around(rendered, class_idx, rng)
        else:
            placed = fresh if fresh is not None else placer.place(class_idx, rng)
        if placed is None:
            return None
        placement, data, seg = placed
        image = self.source.render(placement, data, seg)
        if image is None:
            return None
        return SyntheticSample(data=np.asarray(image, dtype=np.float32), seg=placer.write_label(seg, placement),
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
        for k, v in self.placer.take_stats().items():
            stats[k] = stats.get(k, 0) + v
        for k, v in self.source.worker_stats().items():
            stats[f"{self.source.name}/{k}"] = stats.get(f"{self.source.name}/{k}", 0) + v
        stats["batches"] = 1
        self._stats.clear()
        return {"data": data, "target": target, "keys": keys, "synthetic": synthetic, STATS_KEY: stats}
