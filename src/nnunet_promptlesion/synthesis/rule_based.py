"""Rule-based lesion synthesis (SynTumor-style textured intensity change).

Per-class intensity statistics are *estimated from the real lesions of the training set* in the
data's own intensity space (nnU-Net CT-normalised values), so the synthesizer works on any dataset
without hand-set HU: a lesion's contrast is its mean minus the mean of the surrounding parent
structure, its texture the standard deviation inside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .blending import blend, dilate
from .lesion_spec import LesionClass
from .masks import MaskSampler, connected_components
from .synthesizer import Synthesizer


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
                    ring_voxels: int = 3, min_voxels: int = 2) -> list[np.ndarray]:
    """Add the contrast/texture of every component of ``lesion.label`` in one case to ``stats``.

    image: (C, X, Y, Z); seg: (X, Y, Z). The parent reference is the parent-labelled voxels in a
    ring of ``ring_voxels`` around the component. Returns the component crops (for a mask bank).
    """
    labelled, _ = ndimage.label(seg == lesion.label, structure=np.ones((3, 3, 3), bool))
    parent = np.isin(seg, lesion.parents)
    comps = []
    for i, sl in enumerate(ndimage.find_objects(labelled), start=1):
        if sl is None:
            continue
        grown = tuple(slice(max(s.start - ring_voxels, 0), s.stop + ring_voxels) for s in sl)
        comp = labelled[grown] == i
        if comp.sum() < min_voxels:
            continue
        ring = dilate(comp, ring_voxels) & ~comp & parent[grown]
        if ring.sum() < 3:
            continue
        crop = image[(slice(None),) + grown]
        inside, around = crop[:, comp], crop[:, ring]
        stats.add(inside.mean(1) - around.mean(1), inside.std(1))
        comps.append(labelled[sl] == i)
    return comps


class RuleBasedSynthesizer(Synthesizer):
    """Textured intensity change relative to the local parent intensity.

    lesion = local parent mean + contrast + texture, where the texture is smoothed uniform noise
    thresholded by a Bernoulli draw and smoothed again (SynTumor's recipe), rescaled to the real
    lesions' std. It replaces the carrier under a Gaussian-blurred mask (sigma drawn from
    ``blend_sigma_voxels``); voxels outside the dilated mask stay bit-identical.
    """

    def __init__(self, mask_sampler: MaskSampler, stats: dict[int, LesionIntensityStats],
                 blend_sigma_voxels: tuple[float, float] = (0.5, 1.5)):
        super().__init__(mask_sampler)
        self.stats = stats
        self.blend_sigma_voxels = tuple(blend_sigma_voxels)

    def _texture(self, shape, rng: np.random.Generator) -> np.ndarray:
        t = ndimage.gaussian_filter(rng.uniform(size=shape).astype(np.float32), 1.0)
        t = ndimage.gaussian_filter((rng.uniform(size=shape) < t).astype(np.float32), 0.7)
        t -= t.mean()
        return t / max(float(t.std()), 1e-6)

    def paint(self, carrier, mask, parent, lesion: LesionClass, rng: np.random.Generator) -> np.ndarray:
        st = self.stats.get(lesion.label)
        if st is None or st.n == 0:
            raise KeyError(f"no intensity statistics for lesion '{lesion.name}' (label {lesion.label}): "
                           "the training set holds no real lesion of that class")
        k = int(rng.integers(st.n))
        contrast = np.asarray(st.contrast[k], dtype=np.float32)
        tex_std = np.asarray(st.texture_std[k], dtype=np.float32)
        # Only the neighbourhood of the mask is touched; work on its bounding box for speed.
        sigma = float(rng.uniform(*self.blend_sigma_voxels))
        margin = int(np.ceil(3 * sigma)) + 2
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - margin, 0)
        hi = np.minimum(idx.max(0) + margin + 1, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        sub_mask, sub_parent = mask[box], parent[box]
        sub = carrier[(slice(None),) + box]
        ref = sub_parent & ~sub_mask
        ref_vals = sub[:, ref] if ref.any() else sub[:, sub_mask]
        local_mean = ref_vals.mean(1)
        tex = self._texture(sub_mask.shape, rng)
        target = (local_mean + contrast)[:, None, None, None] + tex_std[:, None, None, None] * tex[None]
        out = carrier.copy()
        out[(slice(None),) + box] = blend(sub, target.astype(sub.dtype), sub_mask, sigma)
        return out
