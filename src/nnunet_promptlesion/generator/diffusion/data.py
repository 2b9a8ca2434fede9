"""Training crops for the diffusion model: lesion-centred crops per class and healthy crops.

Built on the generator patch sources (:mod:`nnunet_promptlesion.generator.data`, nnU-Net preprocessed
training cases of one fold or a NIfTI folder). Every crop is ``patch_size`` voxels (array axis order of
the source) with

* ``image`` (1, X, Y, Z) float32 in the VQGAN model space [-1, 1],
* ``mask``  (1, X, Y, Z) float32 in {0, 1}: the region the model has to generate,
* ``parent`` (1, X, Y, Z) float32 in {0, 1}: the parent structure of the lesion class (organ / vessel wall
  labels of the lesion spec), lesion voxels included (they grew inside it); the MaskTransformer reads it,
* ``prompt`` the prompt id (0 = healthy, k = k-th lesion class of the :class:`~.config.PromptVocabulary`).

Lesion crop of class k: a case containing label k, centred on a random voxel of that label (from the
source's ``class_locations``) shifted by up to ``jitter`` x patch size; ``mask`` = that label in the crop.
Healthy crop (the "healthy" identity prompt): a random crop without any lesion label, and a pseudo-lesion
region drawn with the lesion spec's shape prior (:class:`~nnunet_promptlesion.lesions.masks.MaskSampler`)
inside the parent structure of a random lesion class (anywhere in the central half of the crop when the
crop holds no parent voxel), so the model learns to fill a masked region with healthy tissue.
Lesion classes are drawn uniformly (class-balanced): rare classes get as many crops as common ones.
With a 2-entry ``patch_size`` (a 2D source, nnU-Net 2D configuration) every crop is a (1, Y, X) slice: lesion
crops lie on a slice through a voxel of the class (the centre is jittered in plane only, so the lesion stays in
the slice), healthy crops are lesion-free slices with a 2D pseudo-lesion from the same shape prior at the
in-plane spacing.
With attribute prompts (``attributes``, e.g. ("radius", "contrast")) every lesion of the training cases is measured
once at start-up (:func:`~nnunet_promptlesion.lesions.attributes.measure_components` in the model intensity space;
a 2D source measures each slice's cross-sections), the per-class quantile bins are computed
(:class:`~nnunet_promptlesion.lesions.attributes.AttributeBins`, ``attribute_bins``), and a lesion crop carries the
bins of the lesion under its centre voxel (``attributes``, one index per attribute, 1..n); healthy crops carry null
(0).
A healthy crop never holds a lesion voxel: when ``max_tries`` random crops all hold one, the draw is refused
(:class:`NoHealthyCropError`), counted in ``healthy_refused``, and :meth:`LesionCropSampler.sample` uses a
lesion crop instead.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ...lesions.attributes import AttributeBins, measure_components
from ...lesions.spec import LesionSpec
from ...lesions.masks import MaskSampler
from ..data import PatchSource
from .config import PromptVocabulary


@dataclasses.dataclass
class Crop:
    image: np.ndarray  # (1, X, Y, Z) float32, model space [-1, 1]
    mask: np.ndarray   # (1, X, Y, Z) float32 {0, 1}
    prompt: int
    case_id: str
    parent: np.ndarray | None = None  # (1, X, Y, Z) float32 {0, 1}; None = unknown (treated as the mask)
    attributes: tuple[int, ...] | None = None  # attribute bins (0 = null); None = the sampler has no attributes


class NoLesionsError(RuntimeError):
    """The source holds no voxel of any lesion class of the spec."""


class NoHealthyCropError(RuntimeError):
    """No lesion-free crop was found in the allowed number of random tries."""


class LesionCropSampler:
    def __init__(self, source: PatchSource, spec: LesionSpec, vocab: PromptVocabulary, patch_size: Sequence[int],
                 healthy_fraction: float = 0.25, jitter: float = 0.25, max_tries: int = 20,
                 attributes: Sequence[str] = (), attribute_bins: int = 3):
        self.source, self.spec, self.vocab = source, spec, vocab
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != len(source.spacing):
            raise ValueError(f"patch size {list(self.patch_size)} has {len(self.patch_size)} axes but the source is "
                             f"{len(source.spacing)}D (spacing {list(source.spacing)} mm)")
        self.healthy_fraction = float(healthy_fraction)
        self.jitter = float(jitter)
        self.max_tries = int(max_tries)
        self.healthy_refused = 0  # healthy draws refused because every try held a lesion (logged by the trainer)
        self.mask_sampler = MaskSampler(source.spacing)
        self.lesion_labels = set(spec.labels)
        # prompt id -> case ids holding that lesion label
        self.cases_with: dict[int, list[str]] = {i: [] for i in range(1, len(vocab.names))}
        for cid in source.case_ids:
            locs = source.load_case(cid).class_locations
            for pid in self.cases_with:
                lab = vocab.labels[pid]
                if lab in locs and len(locs[lab]):
                    self.cases_with[pid].append(cid)
        self.available = [pid for pid, cs in self.cases_with.items() if cs]
        if not self.available and self.healthy_fraction < 1.0:
            raise NoLesionsError(
                f"no case of {source.describe()} contains a lesion label of the spec "
                f"({dict(zip(vocab.names[1:], vocab.labels[1:]))}); check the lesion spec and the label maps")
        self.attribute_bins: AttributeBins | None = None
        self._loc_bins: dict[tuple[str, int], np.ndarray] = {}
        if attributes:
            self._measure(tuple(attributes), int(attribute_bins))

    def _measure(self, names: tuple[str, ...], n_bins: int) -> None:
        """Measure every training lesion, compute the bins, and the bins of the lesion under every class location."""
        measured: dict[str, list[dict]] = {self.vocab.names[p]: [] for p in self.cases_with}
        at_locs: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
        slices = self.source.spatial_dims == 2
        for pid, cases in self.cases_with.items():
            name, label = self.vocab.names[pid], self.vocab.labels[pid]
            lesion = self.spec.by_label(label)
            for cid in cases:
                c = self.source.load_case(cid)
                image = self.source.intensity.to_model(np.asarray(c.image[0], dtype=np.float32))
                seg = np.asarray(c.seg[0])
                comp, rows = measure_components(image, seg, label, lesion.parents, self.source.spacing, slices=slices)
                locs = np.asarray(c.class_locations[label], int)
                ids = comp[tuple(locs.T)]
                base = len(measured[name])
                at_locs[(cid, label)] = (name, np.where(ids > 0, ids - 1 + base, -1))
                measured[name].extend(rows)
        units = {"radius": "mm", "contrast": "model intensity [-1, 1]"}
        self.attribute_bins = bins = AttributeBins.from_measurements(names, n_bins, measured,
                                                                     {a: units[a] for a in names})
        table = {name: np.array([bins.to_bins(name, r) for r in rows], np.int64).reshape(len(rows), len(names))
                 for name, rows in measured.items()}
        for key, (name, idx) in at_locs.items():
            out = np.zeros((len(idx), len(names)), np.int64)
            out[idx >= 0] = table[name][idx[idx >= 0]]
            self._loc_bins[key] = out

    def counts(self) -> dict[str, int]:
        """Number of cases per prompt name holding that lesion (for the log)."""
        return {self.vocab.names[p]: len(c) for p, c in self.cases_with.items()}

    def lesion_crop(self, rng: np.random.Generator, prompt: int) -> Crop:
        cases = self.cases_with[prompt]
        if not cases:
            raise NoLesionsError(f"no training case contains lesion '{self.vocab.names[prompt]}'")
        label = self.vocab.labels[prompt]
        cid = cases[int(rng.integers(len(cases)))]
        locs = self.source.load_case(cid).class_locations[label]
        j = int(rng.integers(len(locs)))
        centre = np.asarray(locs[j], dtype=int)
        # a 2D crop is one slice: jitter in plane only, so the slice still cuts the lesion
        extent = np.asarray(self.patch_size if len(self.patch_size) == 3 else (0, *self.patch_size))
        shift = np.round(rng.uniform(-self.jitter, self.jitter, 3) * extent).astype(int)
        p = self.source.patch_around(cid, centre + shift, self.patch_size)
        mask = (p.seg == label).astype(np.float32)
        lesion = next((l for l in self.spec.lesions if l.label == label), None)
        parent = np.isin(p.seg, lesion.parents) if lesion is not None else np.zeros_like(mask, bool)
        attrs = None
        if self.attribute_bins is not None:  # the lesion the crop is centred on (before the jitter)
            attrs = tuple(int(v) for v in self._loc_bins[(cid, label)][j])
        return Crop(p.image.astype(np.float32), mask, prompt, cid, (parent | (mask > 0.5)).astype(np.float32), attrs)

    def healthy_crop(self, rng: np.random.Generator, max_tries: int | None = None) -> Crop:
        """A random lesion-free crop with a pseudo-lesion region; NoHealthyCropError after ``max_tries`` misses."""
        tries = int(max_tries or self.max_tries)
        for _ in range(tries):
            p = self.source.random_patch(rng, self.patch_size)
            if p.seg is None or not np.isin(p.seg, list(self.lesion_labels)).any():
                break
        else:
            self.healthy_refused += 1
            raise NoHealthyCropError(
                f"no lesion-free {self.patch_size} crop in {tries} random tries over {self.source.describe()}; "
                "the cases hold lesions almost everywhere at this patch size: add lesion-free cases or use a "
                "smaller patch size")
        seg = p.seg[0] if p.seg is not None else np.zeros(self.patch_size, np.int16)
        lesion = self.spec.lesions[int(rng.integers(len(self.spec.lesions)))]
        parent = np.isin(seg, lesion.parents)
        central = tuple(slice(s // 4, s - s // 4) for s in self.patch_size)
        mask = self.mask_sampler.sample(lesion, parent, rng, central) if parent[central].any() else None
        if mask is None:
            anywhere = np.ones(self.patch_size, bool)
            free = dataclasses.replace(lesion, may_leave_parent=True)
            mask = self.mask_sampler.sample(free, anywhere, rng, central)
        if p.seg is not None:  # never ask for healthy tissue outside the image (padded voxels)
            mask &= p.seg[0] >= 0
        attrs = None if self.attribute_bins is None else (0,) * len(self.attribute_bins.names)
        return Crop(p.image.astype(np.float32), mask[None].astype(np.float32), 0, p.case_id,
                    (parent | mask)[None].astype(np.float32), attrs)

    def sample(self, rng: np.random.Generator) -> Crop:
        if not self.available or rng.random() < self.healthy_fraction:
            try:
                return self.healthy_crop(rng)
            except NoHealthyCropError:
                if not self.available:
                    raise
                # refused (counted in healthy_refused): a lesion crop takes the slot, never a lesion as "healthy"
        return self.lesion_crop(rng, self.available[int(rng.integers(len(self.available)))])

    def batch(self, rng: np.random.Generator, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``n`` crops stacked: image, mask, parent (n, 1, X, Y, Z), prompt (n,) long."""
        crops = [self.sample(rng) for _ in range(n)]
        return stack_crops(crops, device)


def stack_crops(crops: list[Crop], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """image, mask, parent (n, 1, X, Y, Z) float32 and prompt (n,) long on ``device``; ``attributes`` (n, A) long
    when the crops carry attribute bins.

    On CUDA the arrays go through pinned memory with non-blocking copies (a pageable copy waits for the GPU).
    """
    cuda = torch.device(device).type == "cuda"

    def put(a: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

    out = {"image": put(np.stack([c.image for c in crops])),
           "mask": put(np.stack([c.mask for c in crops])),
           "parent": put(np.stack([c.parent if c.parent is not None else c.mask for c in crops])),
           "prompt": put(torch.tensor([c.prompt for c in crops], dtype=torch.long))}
    if crops and crops[0].attributes is not None:
        out["attributes"] = put(torch.tensor([c.attributes for c in crops], dtype=torch.long))
    return out
