"""Intensity statistics of the real lesions of a training set, measured once by the start-up scan.

Per lesion class, one sample per real lesion component: its contrast to the surrounding parent structure
(lesion mean - parent mean) and its texture (std inside it), per channel, in the data's own intensity units
(z-scores for nnU-Net CT-normalised data). The carrier index (:mod:`nnunet_promptlesion.placement.index`)
collects them; the rule-based source paints with them. Arrays: image (C, X, Y, Z), seg (X, Y, Z), voxels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .blending import dilate
from .spec import LesionClass


@dataclass
class LesionIntensityStats:
    """Per-channel contrast to the parent (lesion mean - parent mean) and lesion texture std.

    Values are in the data's intensity units (z-scores for nnU-Net CT-normalised data). Each
    list holds one sample per real lesion component; synthesis draws one at random.
    """

    contrast: list[list[float]] = field(default_factory=list)  # [component][channel]
    texture_std: list[list[float]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.contrast)

    def add(self, contrast, texture_std) -> None:
        self.contrast.append([float(c) for c in np.atleast_1d(contrast)])
        self.texture_std.append([float(s) for s in np.atleast_1d(texture_std)])

    def summary(self) -> dict:
        c = np.asarray(self.contrast)
        return {"n": self.n, "contrast_median": np.median(c, 0).tolist() if self.n else None,
                "texture_std_median": np.median(np.asarray(self.texture_std), 0).tolist() if self.n else None}


def measure_lesions(image: np.ndarray, seg: np.ndarray, lesion: LesionClass, stats: LesionIntensityStats,
                    ring_voxels: int = 3, min_voxels: int = 2, min_interior_voxels: int = 4) -> list[np.ndarray]:
    """Add the contrast/texture of every component of ``lesion.label`` in one case to ``stats``.

    image: (C, X, Y, Z); seg: (X, Y, Z). The parent reference is the parent-labelled voxels in a
    ring of ``ring_voxels`` around the component. The lesion's own mean and std are taken on its
    interior (the component without its one-voxel rim) when that holds ``min_interior_voxels``, else on
    the whole component. Returns the component crops (for a mask bank).
    """
    # Why the interior: the rim voxels mix lesion and surroundings (partial volume, the scanner's blur). Their
    # spread is an edge, not a texture, and painting makes its own soft edge (blending). Measured with the rim,
    # a small bright lesion gets a mean well below its core and a "texture" std that is mostly that edge, so
    # painted lesions came out darker and noisier than the real ones (docs/results.md, false positives).
    labelled, _ = ndimage.label(seg == lesion.label, structure=np.ones((3,) * seg.ndim, bool))
    parent = np.isin(seg, lesion.parents)
    rim_structure = ndimage.generate_binary_structure(seg.ndim, 1)
    comps = []
    for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
        if sl is None:
            continue
        grown = tuple(slice(max(s.start - ring_voxels, 0), s.stop + ring_voxels) for s in sl)
        grown_l = labelled[grown]
        comp = grown_l == i
        if comp.sum() < min_voxels:
            continue
        ring = dilate(comp, ring_voxels) & ~comp & parent[grown]
        if ring.sum() < 3:
            continue
        crop = image[(slice(None),) + grown]
        core = ndimage.binary_erosion(comp, structure=rim_structure)
        inside, around = crop[:, core if core.sum() >= min_interior_voxels else comp], crop[:, ring]
        stats.add(inside.mean(1) - around.mean(1), inside.std(1))
        comps.append(labelled[sl] == i)
    return comps
