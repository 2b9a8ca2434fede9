"""Lesion attributes for attribute prompts: measured per lesion, binned per class, requested as mixes.

Attributes (:data:`ATTRIBUTES`), measured on one lesion by :func:`measure_lesion`:

``radius``
    Equivalent radius in mm: of the sphere with the lesion's volume (3D), of the disc with its area (2D
    cross-section; the 2D mask sampler draws ellipses of that circle-equivalent radius).
``contrast``
    Mean intensity inside the lesion minus the mean intensity of its parent structure in a ring around it
    (parent voxels of the lesion dilated by round(:data:`RING_MM` / finest spacing) voxels, full 3^d neighbourhood,
    lesion excluded: about 3 mm in plane, more along a coarser axis; non-lesion voxels of the ring when the parent is
    absent there). In the units of the image given: the diffusion model's intensity space [-1, 1]
    everywhere in this package (training crops, the benchmark), so "hypo / iso / hyper" bins are relative to the
    parent in the space the generator sees.

:class:`AttributeBins` holds, per lesion class (prompt name) and attribute, ``n + 1`` edges: the lowest measured
value, the quantiles at 1/n .. (n-1)/n (tertiles for 3 bins) and the highest. :meth:`AttributeBins.to_bins` maps
values to bin indices 1..n (values outside the range go to the first / last bin); index 0 is the *null* value
(unknown / not requested, the classifier-free-guidance null of that attribute). The bins are computed on the
generator's training lesions and stored in its checkpoint metadata (JSON) so every sampler uses the training bins.

An *attribute mix* requests bins per class: ``{"calcified": {"radius": [0.6, 0.3, 0.1]}}`` = probabilities of bins
1..n of that attribute for that class; an attribute not named is null (unconditioned). :func:`check_mix` validates
its form (names, probabilities summing to 1), :func:`check_mix_against_bins` the bin counts against a checkpoint's
bins, :func:`draw_bins` draws one lesion's bins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .components import equivalent_radius_mm, label_components

#: attribute names, in the order a model's attribute vector uses when it enables several
ATTRIBUTES = ("radius", "contrast")
#: width (mm) of the ring of parent voxels around a lesion that its contrast is measured against
RING_MM = 3.0
#: tolerance on the sum of a mix's probabilities
MIX_SUM_TOL = 1e-3


class AttributeRequestError(ValueError):
    """An attribute request or bin table that does not fit; the message says what to change."""


def _ring(lesion: np.ndarray, spacing: Sequence[float], ring_mm: float) -> np.ndarray:
    from scipy import ndimage  # deferred: scipy.ndimage costs ~0.35 s at import; spec validation imports this module

    k = max(1, int(round(ring_mm / min(float(s) for s in spacing))))
    return ndimage.binary_dilation(lesion, structure=np.ones((3,) * lesion.ndim, bool), iterations=k) & ~lesion


def measure_lesion(image: np.ndarray, lesion: np.ndarray, parent: np.ndarray | None, spacing: Sequence[float],
                   valid: np.ndarray | None = None, ring_mm: float = RING_MM) -> dict[str, float]:
    """{"radius": mm, "contrast": image units} of one lesion.

    image, lesion, parent, valid: arrays of one shape (2D or 3D, any axis order; ``spacing`` in mm in that order).
    ``valid`` marks voxels inside the image (padding excluded from the ring). The arrays should hold the lesion with
    a margin of at least ``ring_mm``; callers crop to the lesion's box plus the ring. ``contrast`` is NaN for an
    empty lesion or an empty ring.
    """
    lesion = np.asarray(lesion, bool)
    n = int(lesion.sum())
    out = {"radius": equivalent_radius_mm(n, spacing), "contrast": float("nan")}
    if n == 0:
        return out
    ring = _ring(lesion, spacing, ring_mm)
    if valid is not None:
        ring &= np.asarray(valid, bool)
    around = ring & np.asarray(parent, bool) if parent is not None else ring
    if not around.any():
        around = ring
    if around.any():
        out["contrast"] = float(np.mean(image[lesion], dtype=np.float64) - np.mean(image[around], dtype=np.float64))
    return out


def measure_components(image: np.ndarray, seg: np.ndarray, label: int, parents: Sequence[int],
                       spacing: Sequence[float], slices: bool = False, ring_mm: float = RING_MM
                       ) -> tuple[np.ndarray, list[dict[str, float]]]:
    """(component map, measurements) of every lesion of ``label`` in a case.

    image (*spatial) float, seg (*spatial) int (-1 = outside the image), both 3D in the case's axis order; spacing mm
    in that order (2 entries, in-plane, with ``slices``). ``slices``: every 2D cross-section (a connected component
    of one slice along axis 0) is a lesion of its own, as a 2D generator sees them. Returns an int32 map (0 = none,
    i = the i-th measurement) and the measurements (:func:`measure_lesion`).
    """
    # deferred, as in _ring: scipy.ndimage (~0.35 s at import); the lesion spec (settings validation) imports this module
    from scipy import ndimage

    seg = np.asarray(seg)
    comp = np.zeros(seg.shape, np.int32)
    out: list[dict[str, float]] = []
    parent = np.isin(seg, list(parents))
    pieces = [(np.s_[z], 2) for z in range(seg.shape[0])] if slices else [(np.s_[:], 3)]
    for where, dims in pieces:
        s = seg[where]
        mask = s == label
        if not mask.any():
            continue
        labels, n = label_components(mask)
        sp = list(spacing)[-dims:]
        k = [max(1, int(round(ring_mm / min(sp)))) + 1] * dims
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            box = tuple(slice(max(a.start - m, 0), min(a.stop + m, size)) for a, m, size in zip(sl, k, s.shape))
            les = labels[box] == i
            img = np.asarray(image[where][box], dtype=np.float32)
            out.append(measure_lesion(img, les, parent[where][box], sp, valid=s[box] >= 0, ring_mm=ring_mm))
            comp[where][box][les] = len(out)
    return comp, out


@dataclass
class AttributeBins:
    """Bin edges per lesion class (prompt name) and attribute; see the module docstring.

    names: the attributes, in the model's order; n_bins: bins per attribute (same for all), index 0 = null;
    edges: {class: {attribute: [n_bins + 1 ascending values]}}; units: {attribute: unit}; counts: {class: number of
    lesions measured}. Classes without a measured lesion have no edges (their attributes can only be null).
    """

    names: tuple[str, ...]
    n_bins: int
    edges: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.names = tuple(str(n) for n in self.names)
        self.n_bins = int(self.n_bins)
        bad = [n for n in self.names if n not in ATTRIBUTES]
        if bad or not self.names or len(set(self.names)) != len(self.names):
            raise AttributeRequestError(f"attributes must be distinct names out of {list(ATTRIBUTES)}, got {list(self.names)}")
        if self.n_bins < 2:
            raise AttributeRequestError(f"attribute bins must be >= 2 per attribute, got {self.n_bins}")
        for cls, per in self.edges.items():
            for a, e in per.items():
                if len(e) != self.n_bins + 1:
                    raise AttributeRequestError(f"class '{cls}' attribute '{a}': {len(e)} edges for {self.n_bins} bins")

    @classmethod
    def from_measurements(cls, names: Sequence[str], n_bins: int, measured: Mapping[str, Sequence[Mapping[str, float]]],
                          units: Mapping[str, str] | None = None) -> "AttributeBins":
        """Quantile bins of ``measured`` ({class: [measurement dicts]}); NaN values are left out."""
        out = cls(tuple(names), n_bins, units=dict(units or {}))
        q = np.linspace(0.0, 1.0, out.n_bins + 1)
        for c, rows in measured.items():
            out.counts[str(c)] = len(rows)
            per = {}
            for a in out.names:
                v = np.asarray([r[a] for r in rows], float)
                v = v[np.isfinite(v)]
                if v.size:
                    per[a] = [float(x) for x in np.quantile(v, q)]
            if per:
                out.edges[str(c)] = per
        return out

    def range_of(self, cls: str, attribute: str, b: int) -> tuple[float, float]:
        """(lo, hi) of bin ``b`` (1..n) of ``attribute`` for class ``cls`` (the measured range's part)."""
        e = self.edges.get(cls, {}).get(attribute)
        if e is None:
            raise AttributeRequestError(f"no '{attribute}' bins for class '{cls}' (no training lesion of it was measured)")
        if not 1 <= b <= self.n_bins:
            raise AttributeRequestError(f"bin {b} of '{attribute}' is outside 1..{self.n_bins}")
        return float(e[b - 1]), float(e[b])

    def to_bin(self, cls: str, attribute: str, value: float) -> int:
        """Bin index 1..n of ``value``; 0 (null) for NaN or a class/attribute without bins."""
        e = self.edges.get(cls, {}).get(attribute)
        if e is None or not np.isfinite(value):
            return 0
        return int(np.clip(np.searchsorted(np.asarray(e[1:-1]), value, side="right") + 1, 1, self.n_bins))

    def to_bins(self, cls: str, measurement: Mapping[str, float]) -> tuple[int, ...]:
        """One bin index per attribute (model order) of a :func:`measure_lesion` result."""
        return tuple(self.to_bin(cls, a, float(measurement.get(a, float("nan")))) for a in self.names)

    def as_dict(self) -> dict:
        return {"names": list(self.names), "n_bins": self.n_bins, "edges": self.edges, "units": self.units,
                "counts": self.counts}

    @classmethod
    def from_dict(cls, d: Mapping) -> "AttributeBins":
        return cls(tuple(d["names"]), int(d["n_bins"]), {str(k): {str(a): [float(x) for x in e] for a, e in v.items()}
                                                           for k, v in d.get("edges", {}).items()},
                   dict(d.get("units", {})), {str(k): int(v) for k, v in d.get("counts", {}).items()})


# ---------------------------------------------------------------------------------------------- mixes
def check_mix(mix, where: str = "attribute_mix", classes: Sequence[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """A validated copy of an attribute mix ``{class: {attribute: [p_1, ..., p_n]}}``.

    Refused (AttributeRequestError, naming ``where``): a non-dict, an unknown attribute, a class not in ``classes`` (when
    given), negative probabilities or probabilities not summing to 1, fewer than 2 bins.
    """
    if not isinstance(mix, Mapping):
        raise AttributeRequestError(f"{where}: an attribute mix is {{class: {{attribute: [p_1, ..., p_n]}}}}, got {mix!r}")
    out: dict[str, dict[str, list[float]]] = {}
    for c, per in mix.items():
        if classes is not None and str(c) not in classes:
            raise AttributeRequestError(f"{where}: unknown lesion class '{c}' (the lesion spec's classes: {list(classes)})")
        if not isinstance(per, Mapping):
            raise AttributeRequestError(f"{where}['{c}']: {{attribute: [p_1, ..., p_n]}} expected, got {per!r}")
        out[str(c)] = {}
        for a, p in per.items():
            if a not in ATTRIBUTES:
                raise AttributeRequestError(f"{where}['{c}']: unknown attribute '{a}' (known: {list(ATTRIBUTES)})")
            if (not isinstance(p, (list, tuple)) or len(p) < 2
                    or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in p)):
                raise AttributeRequestError(f"{where}['{c}']['{a}']: a list of one probability per bin (>= 2) expected, "
                                      f"got {p!r}")
            p = [float(x) for x in p]
            if min(p) < 0 or abs(sum(p) - 1.0) > MIX_SUM_TOL:
                raise AttributeRequestError(f"{where}['{c}']['{a}']: probabilities must be >= 0 and sum to 1, got {p} "
                                      f"(sum {sum(p):.4g})")
            out[str(c)][str(a)] = p
    return out


def check_mix_against_bins(mix: Mapping[str, Mapping[str, Sequence[float]]], bins: AttributeBins | None,
                           where: str, checkpoint: str = "the diffusion checkpoint") -> None:
    """Refuse a mix that the checkpoint cannot honour: a model without attributes, an attribute it was not trained
    with, another bin count, or a class without bins."""
    if not any(mix.values()):
        return
    if bins is None:
        raise AttributeRequestError(f"{where} requests attributes, but {checkpoint} was trained without attribute prompts "
                              "(promptlesion_train_diffusion --attributes radius,contrast)")
    for c, per in mix.items():
        for a, p in per.items():
            if a not in bins.names:
                raise AttributeRequestError(f"{where}['{c}']: attribute '{a}' is not one of {checkpoint}'s "
                                      f"{list(bins.names)}")
            if len(p) != bins.n_bins:
                raise AttributeRequestError(f"{where}['{c}']['{a}'] has {len(p)} probabilities but {checkpoint} has "
                                      f"{bins.n_bins} bins per attribute")
            if a not in bins.edges.get(c, {}):
                raise AttributeRequestError(f"{where}['{c}']: {checkpoint} has no '{a}' bins for class '{c}' (none of its "
                                      "training lesions was measured)")


def draw_bins(mix: Mapping[str, Mapping[str, Sequence[float]]] | None, cls: str, names: Sequence[str],
              rng: np.random.Generator) -> tuple[int, ...]:
    """One lesion's bins (model order ``names``): drawn from the class's mix, 0 (null) for attributes not in it."""
    per = (mix or {}).get(cls, {})
    return tuple(int(rng.choice(len(per[a]), p=np.asarray(per[a]) / np.sum(per[a]))) + 1 if a in per else 0
                 for a in names)


def radius_range(bins: AttributeBins | None, cls: str, requested: Sequence[int]) -> tuple[float, float] | None:
    """(lo, hi) mm of the requested radius bin, or None when radius is null / not an attribute."""
    if bins is None or "radius" not in bins.names:
        return None
    b = int(requested[bins.names.index("radius")])
    return None if b == 0 else bins.range_of(cls, "radius", b)


def parse_assignment(text: str, names: Sequence[str], n_bins: int) -> tuple[int, ...]:
    """``"radius=1,contrast=3"`` -> bins in model order (unnamed attributes null); refused with a message."""
    out = dict.fromkeys(names, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        if k not in out or not v.strip().isdigit() or not 0 <= int(v) <= n_bins:
            raise AttributeRequestError(f"--attributes '{text}': each item is NAME=BIN with NAME in {list(names)} and BIN in "
                                  f"0..{n_bins} (0 = null)")
        out[k] = int(v)
    return tuple(out[n] for n in names)
