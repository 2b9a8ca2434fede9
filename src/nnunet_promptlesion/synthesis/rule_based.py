"""Rule-based lesion synthesis (SynTumor-style textured intensity change).

Per-class intensity statistics are *estimated from the real lesions of the training set* in the
data's own intensity space (nnU-Net CT-normalised values), so the synthesizer works on any dataset
without hand-set HU: a lesion's contrast is its mean minus the mean of the surrounding parent
structure, its texture the standard deviation inside it. A class without real lesions in the
training cases uses the lesion spec's intensity prior (``contrast_hu``, ``texture_hu``, relative to
the parent), mapped from HU to the data's z-scores with the plans' CTNormalization properties.

:class:`RuleBasedSource` is the ``"rule_based"`` sample source (see :mod:`.sources`): the placer
(:mod:`nnunet_promptlesion.placement`) places, this source paints the placement it is handed, both in the loader
worker.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..lesions.blending import blend
from ..lesions.intensity_stats import LesionIntensityStats
from ..lesions.spec import LesionClass
from ..placement.placement import Placement
from ..utils.errors import PromptLesionConfigError
from .sources import SampleSource, SourceContext, register_source


#: "synthetic": SynTumor's recipe, the lesion's texture replaces the carrier; "carrier_noise": the carrier's
#: fine-scale noise is kept and smooth heterogeneity added; "matched_noise": a homogeneous lesion whose texture is
#: noise with the carrier's grain at the real lesions' std (see RuleBasedSynthesizer.paint)
TEXTURES = ("synthetic", "carrier_noise", "matched_noise")
#: Gaussian sigma (voxels) separating a carrier's fine noise from its smooth level
NOISE_SIGMA_VOXELS = 1.5
#: Gaussian sigma (voxels) of the smooth heterogeneity added by "carrier_noise"
HETEROGENEITY_SIGMA_VOXELS = 2.0


@dataclass
class IntensityPrior:
    """A lesion class's intensity from the spec, in the data's units (z-scores per channel).

    contrast: (C, 2) [min, max] change relative to the parent; texture: (C, 2) [min, max] texture std.
    """

    contrast: np.ndarray
    texture: np.ndarray

    @classmethod
    def from_hu(cls, lesion: LesionClass, intensity: list[dict]) -> "IntensityPrior":
        """Map the spec's HU ranges to z-scores: CTNormalization divides by the foreground std."""
        std = np.array([float(p["std"]) for p in intensity])[:, None]
        return cls(contrast=np.asarray(lesion.contrast_hu, float)[None] / std,
                   texture=np.asarray(lesion.texture_hu, float)[None] / std)


def ct_window_z(intensity: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per channel: the z-score range CTNormalization can produce (its clip window)."""
    lo = np.array([(p["percentile_00_5"] - p["mean"]) / p["std"] for p in intensity], dtype=np.float32)
    hi = np.array([(p["percentile_99_5"] - p["mean"]) / p["std"] for p in intensity], dtype=np.float32)
    return lo, hi


def _grain_sigma(fine: np.ndarray, where: np.ndarray, lo: float = 0.3, hi: float = 2.0) -> float:
    """Gaussian sigma (voxels) of blurred white noise with the lag-1 correlation of ``fine`` inside ``where``.

    Blurred white noise with sigma s has lag-1 autocorrelation exp(-1 / (4 s^2)); the correlation is averaged
    over the axes longer than one voxel. Clipped to [lo, hi] (a flat or tiny region gives no estimate).
    """
    rhos = []
    for ax, n in enumerate(fine.shape):
        if n < 3:
            continue
        a = np.take(fine, np.arange(n - 1), axis=ax)
        b = np.take(fine, np.arange(1, n), axis=ax)
        m = np.take(where, np.arange(n - 1), axis=ax) & np.take(where, np.arange(1, n), axis=ax)
        if m.sum() < 10:
            continue
        x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
        den = float(np.sqrt((x * x).sum() * (y * y).sum()))
        if den > 0:
            rhos.append(float((x * y).sum()) / den)
    rho = float(np.mean(rhos)) if rhos else 0.0
    if not 0.0 < rho < 1.0:
        return lo
    return float(np.clip(np.sqrt(-1.0 / (4.0 * np.log(rho))), lo, hi))


class RuleBasedSynthesizer:
    """Textured intensity change relative to the local parent intensity.

    lesion = local parent mean + contrast + texture, where the texture is smoothed uniform noise
    thresholded by a Bernoulli draw and smoothed again (SynTumor's recipe), rescaled to the real
    lesions' std. It replaces the carrier under a Gaussian-blurred mask (sigma drawn from
    ``blend_sigma_voxels``); voxels outside the dilated mask stay bit-identical.

    stats: per label, measured on real lesions (preferred); priors: per label, from the spec's HU
    ranges (used when a class has no real lesion); window: per-channel (lo, hi) clip of the painted
    values (CTNormalization's range), or None.

    Only the look is decided here: the mask comes from the placement (the loader draws it with
    :class:`~nnunet_promptlesion.lesions.masks.MaskSampler`).
    """

    def __init__(self, stats: dict[int, LesionIntensityStats], blend_sigma_voxels: tuple[float, float] = (0.5, 1.5),
                 priors: dict[int, IntensityPrior] | None = None,
                 window: tuple[np.ndarray, np.ndarray] | None = None, texture: str = "synthetic"):
        if texture not in TEXTURES:
            raise ValueError(f"rule_texture must be one of {TEXTURES}, got {texture!r}")
        self.stats = stats
        self.priors = priors or {}
        self.window = window
        self.blend_sigma_voxels = tuple(blend_sigma_voxels)
        self.texture = texture

    def can_paint(self, label: int) -> bool:
        st = self.stats.get(label)
        return (st is not None and st.n > 0) or label in self.priors

    def _texture(self, shape, rng: np.random.Generator) -> np.ndarray:
        t = ndimage.gaussian_filter(rng.uniform(size=shape).astype(np.float32), 1.0)
        t = ndimage.gaussian_filter((rng.uniform(size=shape) < t).astype(np.float32), 0.7)
        t -= t.mean()
        return t / max(float(t.std()), 1e-6)

    @staticmethod
    def _noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
        """Unit-std white noise blurred with ``sigma`` voxels along every axis longer than one voxel."""
        t = rng.standard_normal(size=shape).astype(np.float32)
        t = ndimage.gaussian_filter(t, [sigma if n > 1 else 0 for n in shape])
        t -= t.mean()
        return t / max(float(t.std()), 1e-6)

    def _intensity(self, lesion: LesionClass, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        st = self.stats.get(lesion.label)
        if st is not None and st.n > 0:
            k = int(rng.integers(st.n))
            return np.asarray(st.contrast[k], dtype=np.float32), np.asarray(st.texture_std[k], dtype=np.float32)
        prior = self.priors.get(lesion.label)
        if prior is None:
            raise KeyError(f"no intensity for lesion '{lesion.name}' (label {lesion.label}): the training set holds no "
                           "real lesion of that class and its lesion spec entry has no 'contrast_hu'")
        return (rng.uniform(prior.contrast[:, 0], prior.contrast[:, 1]).astype(np.float32),
                rng.uniform(prior.texture[:, 0], prior.texture[:, 1]).astype(np.float32))

    def paint(self, carrier, mask, parent, lesion: LesionClass, rng: np.random.Generator) -> np.ndarray:
        """carrier (C, *spatial) -> a copy with the lesion painted under ``mask`` (*spatial bool)."""
        contrast, tex_std = self._intensity(lesion, rng)
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
        chan = (-1,) + (1,) * mask.ndim
        if self.texture != "synthetic":
            # the carrier's fine component: its CT noise (and fine structure), without its smooth level
            fine = sub - ndimage.gaussian_filter(sub, (0,) + (NOISE_SIGMA_VOXELS,) * mask.ndim)
        if self.texture == "carrier_noise":
            # The carrier's own fine structure (its CT noise) is kept and only its smooth level moves to the
            # lesion's; the real lesions' std beyond that noise becomes smooth heterogeneity. Why: replacing the
            # noise by synthetic speckle gives painted lesions a texture no real tissue has, which the network
            # learns as the cue, and then it finds that cue in noisy healthy tissue (false positives).
            # Heterogeneity beyond the surroundings': the real lesions' std minus the carrier parent's own std
            # (its noise and texture), so a lesion as homogeneous as its tissue gets no blotches.
            around_var = sub[:, ref].var(1) if ref.any() else fine[:, sub_mask].var(1)
            extra = np.sqrt(np.maximum(tex_std.astype(np.float64) ** 2 - around_var, 0.0)).astype(np.float32)
            tex = self._noise(sub_mask.shape, HETEROGENEITY_SIGMA_VOXELS, rng)
            target = (local_mean + contrast).reshape(chan) + fine + extra.reshape(chan) * tex[None]
        elif self.texture == "matched_noise":
            # Homogeneous lesion whose texture is noise with the carrier's own grain: white noise blurred to the
            # lag-1 correlation of the carrier parent's fine component, at the real lesions' std. Unlike
            # "carrier_noise" no structure of the carrier (fascia, fat septa) survives inside the lesion.
            sigma = _grain_sigma(fine[0], ref if ref.any() else sub_mask)
            tex = self._noise(sub_mask.shape, sigma, rng)
            target = (local_mean + contrast).reshape(chan) + tex_std.reshape(chan) * tex[None]
        else:
            tex = self._texture(sub_mask.shape, rng)
            target = (local_mean + contrast).reshape(chan) + tex_std.reshape(chan) * tex[None]
        if self.window is not None:
            target = np.clip(target, self.window[0].reshape(chan), self.window[1].reshape(chan))
        out = carrier.copy()
        out[(slice(None),) + box] = blend(sub, target.astype(sub.dtype), sub_mask, sigma)
        return out


class RuleBasedSource(SampleSource):
    """The ``"rule_based"`` source: placement by the loader, SynTumor-style painting, all in the worker."""

    name = "rule_based"

    def __init__(self, painter: RuleBasedSynthesizer, spec):
        self.painter = painter
        self.spec = spec

    def render(self, placement: Placement, data: np.ndarray, seg: np.ndarray) -> np.ndarray | None:
        """Paint the placement's lesion into a copy of ``data`` (texture seeded with ``placement.seed``)."""
        lesion = self.spec.lesions[placement.class_idx]
        parent = np.isin(seg[0], lesion.parents)
        image = self.painter.paint(data, placement.mask(), parent, lesion, np.random.default_rng(placement.seed))
        return image.astype(np.float32, copy=False)

    def check(self, index, class_probs: np.ndarray) -> None:
        missing = [l.name for l, p in zip(self.spec.lesions, class_probs) if p > 0 and not self.painter.can_paint(l.label)]
        if missing:
            raise PromptLesionConfigError(
                f"rule-based synthesis needs an intensity for every drawn class, but the scanned training cases hold no "
                f"real lesion of {missing} and their lesion spec entries give no 'contrast_hu'. Add an intensity prior "
                "(e.g. \"contrast_hu\": [-60, -20], relative to the parent, in lesion_spec.json), give these classes "
                "weight 0 in 'class_weights' (promptlesion_settings.json), or remove them from lesion_spec.json.")


def build_rule_based_source(ctx: SourceContext) -> RuleBasedSource:
    s = ctx.settings
    priors = {l.label: IntensityPrior.from_hu(l, ctx.intensity) for l in ctx.spec.lesions
              if l.contrast_hu is not None and ctx.intensity}
    window = ct_window_z(ctx.intensity) if ctx.intensity else None
    texture = s.extra.get("rule_texture", RULE_SETTINGS["rule_texture"])
    if texture not in TEXTURES:
        raise PromptLesionConfigError(f"settings: rule_texture must be one of {list(TEXTURES)}, got {texture!r}")
    painter = RuleBasedSynthesizer(ctx.index.stats, blend_sigma_voxels=tuple(s.blend_sigma_voxels),
                                   priors=priors, window=window, texture=texture)
    return RuleBasedSource(painter, ctx.spec)


RULE_SETTINGS = {"rule_texture": "matched_noise"}
register_source("rule_based", build_rule_based_source, settings=RULE_SETTINGS)
