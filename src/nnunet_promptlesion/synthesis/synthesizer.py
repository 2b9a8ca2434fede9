"""The synthesizer interface shared by the rule-based and the diffusion implementations.

A synthesizer receives a healthy carrier patch, the parent-structure mask, a lesion class and a
random generator, and returns the patch with a lesion painted in and the lesion mask. Mask drawing
(:class:`~nnunet_promptlesion.lesions.masks.MaskSampler`) is shared; implementations only
decide how the lesion looks (:meth:`Synthesizer.paint`).

Axis order: ``carrier`` is (C, X, Y, Z) in the intensity space of the data it came from (nnU-Net
preprocessed, i.e. CT-normalised); masks are (X, Y, Z) bool in the same voxel grid.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..lesions.spec import LesionClass
from ..lesions.masks import MaskSampler


@dataclass
class SynthesisResult:
    image: np.ndarray  # (C, X, Y, Z) float32, carrier with the lesion painted in
    mask: np.ndarray   # (X, Y, Z) bool, where the lesion label is written


class SynthesisError(RuntimeError):
    """No lesion could be placed (e.g. the carrier holds no parent voxel in the centre region)."""


class Synthesizer(ABC):
    def __init__(self, mask_sampler: MaskSampler):
        self.mask_sampler = mask_sampler

    @abstractmethod
    def paint(self, carrier: np.ndarray, mask: np.ndarray, parent: np.ndarray, lesion: LesionClass,
              rng: np.random.Generator) -> np.ndarray:
        """Return a copy of ``carrier`` (C, X, Y, Z) with a lesion of class ``lesion`` under ``mask``."""

    def synthesize(self, carrier: np.ndarray, parent: np.ndarray, lesion: LesionClass, rng: np.random.Generator,
                   centre_region: tuple[slice, ...] | None = None) -> SynthesisResult:
        mask = self.mask_sampler.sample(lesion, parent, rng, centre_region)
        if mask is None:
            raise SynthesisError(f"could not place a '{lesion.name}' lesion: no parent voxel {lesion.parents} in the centre region")
        image = self.paint(carrier, mask, parent, lesion, rng)
        return SynthesisResult(image=image, mask=mask)
