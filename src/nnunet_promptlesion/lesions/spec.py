"""The lesion specification: the single place the trainer learns a dataset's lesion classes.

Written as ``lesion_spec.json`` next to ``dataset.json`` by the phantom and converter commands,
editable by users. Example::

    {
      "version": 1,
      "lesions": [
        {"name": "noncalcified_plaque", "label": 4, "parents": [2],
         "radius_mm": [[0.8, 1.5], [1.5, 2.5]], "radius_weights": [0.5, 0.5],
         "shape": "ellipsoid", "elastic": true, "bank_probability": 0.5,
         "may_leave_parent": false, "prompt": "noncalcified_plaque"},
        {"name": "liver_tumor", "label": 5, "parents": [1], "radius_mm": [[3, 5], [6, 10]],
         "contrast_hu": [-60, -20], "texture_hu": [5, 15]}
      ]
    }

Sizes are equivalent-sphere *radii in mm*; a size class is drawn by ``radius_weights`` and a
radius uniformly inside it. DiffTumor's classes (tiny 3-5, small 6-10, medium 12-20,
large 24-64 mm) are available as :data:`DIFFTUMOR_RADIUS_CLASSES_MM`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..utils.atomic import write_json_atomic
from ..utils.schema import bounds, check_value, choices, validate

LESION_SPEC_FILENAME = "lesion_spec.json"
SPEC_VERSION = 1
SHAPES = ("ellipsoid", "bank", "mixed")

#: DiffTumor's tumour size classes, equivalent radius in mm (1 voxel = 1 mm in their setting).
DIFFTUMOR_RADIUS_CLASSES_MM = {"tiny": (3.0, 5.0), "small": (6.0, 10.0), "medium": (12.0, 20.0), "large": (24.0, 64.0)}
#: Equivalent-sphere radius separating early (<= 10 mm, diameter <= 2 cm) from late tumours.
EARLY_RADIUS_MM = 10.0
#: Largest radius_mm accepted: above DiffTumor's largest class (64 mm). The mask is drawn on a grid of about
#: (3.4 r / spacing)^3 voxels, so a typo such as 500 mm would allocate ~3400^3 voxels at 0.5 mm before failing.
MAX_RADIUS_MM = 100.0


class LesionSpecError(ValueError):
    """A lesion spec that is malformed or does not fit the dataset it is used with."""


@dataclass
class LesionClass:
    """One lesion label and how to synthesize it.

    name: human-readable class name, also the diffusion prompt unless ``prompt`` is given.
    label: integer label written into the segmentation.
    parents: labels of the structure(s) the lesion may be placed in (organ, vessel wall).
    radius_mm: list of (min, max) equivalent-sphere radius ranges in mm.
    radius_weights: probability of each range (normalised on load).
    shape: "ellipsoid" (elastic ellipsoid prior), "bank" (real masks harvested from the
        training labels) or "mixed" (bank with probability ``bank_probability``).
    may_leave_parent: if False the mask is clipped to the parent structure (exophytic lesions: True);
        if True it may also cover background (label 0), never another label or nnU-Net's padding.
    contrast_hu: optional [min, max] intensity change in HU relative to the surrounding parent
        (e.g. [-60, -20] for a hypodense liver tumour). Rule-based synthesis uses it for classes without
        real lesions in the training cases (it needs CT data: CTNormalization maps HU to z-scores).
    texture_hu: optional [min, max] standard deviation of the lesion texture in HU (default [5, 15] when
        ``contrast_hu`` is given).
    min_parent_fraction: None (default): the mask is clipped to the parent voxel by voxel. A number in (0, 1]:
        the lesion is a *mass* - its mask is kept whole (compact, no holes) and must have at least this fraction
        of its voxels in the parent, the rest in background, none in another label or nnU-Net's padding. Why: a
        parent derived from a HU window (soft tissue without fat) is ragged; clipping to it gives fragmented
        synthetic labels unlike real tumours, which displace the fat around them (docs/results.md, sarcoma).
    """

    # the annotations and metadata are the JSON schema of a lesion entry (utils.schema, checked in from_dict)
    name: str
    label: int = field(metadata=bounds(1))
    parents: list[int] | int = field(metadata=bounds(0))
    radius_mm: list[tuple[float, float]] = field(default_factory=lambda: [(3.0, 5.0), (6.0, 10.0)],
                                                 metadata=bounds(0.0, MAX_RADIUS_MM, lo_open=True))
    radius_weights: list[float] | None = field(default=None, metadata=bounds(0.0))
    shape: str = field(default="mixed", metadata=choices(*SHAPES))
    elastic: bool = True
    bank_probability: float = field(default=0.5, metadata=bounds(0.0, 1.0))
    may_leave_parent: bool = False
    prompt: str | None = None
    contrast_hu: list[float] | None = None
    texture_hu: list[float] | None = None
    min_parent_fraction: float | None = None
    attribute_mix: dict[str, list[float]] | None = None

    def __post_init__(self):
        self.label = int(self.label)
        self.parents = [int(p) for p in (self.parents if isinstance(self.parents, (list, tuple)) else [self.parents])]
        self.radius_mm = [tuple(float(v) for v in r) for r in self.radius_mm]
        if not self.parents:
            raise LesionSpecError(f"lesion '{self.name}': 'parents' must name at least one label")
        if self.label in self.parents:
            raise LesionSpecError(f"lesion '{self.name}': its label {self.label} cannot be its own parent")
        if self.label <= 0:
            raise LesionSpecError(f"lesion '{self.name}': label must be > 0 (0 is background)")
        if not self.radius_mm or any(len(r) != 2 or not (0 < r[0] <= r[1] <= MAX_RADIUS_MM) for r in self.radius_mm):
            raise LesionSpecError(f"lesion '{self.name}': radius_mm must be a list of [min, max] with 0 < min <= max "
                                  f"<= {MAX_RADIUS_MM:g} mm, got {self.radius_mm}")
        if self.radius_weights is None:
            self.radius_weights = [1.0] * len(self.radius_mm)
        self.radius_weights = [float(w) for w in self.radius_weights]
        if len(self.radius_weights) != len(self.radius_mm) or min(self.radius_weights) < 0 or sum(self.radius_weights) <= 0:
            raise LesionSpecError(f"lesion '{self.name}': radius_weights must be one non-negative weight per radius range")
        s = sum(self.radius_weights)
        self.radius_weights = [w / s for w in self.radius_weights]
        if self.shape not in SHAPES:
            raise LesionSpecError(f"lesion '{self.name}': shape must be one of {SHAPES}, got '{self.shape}'")
        if not 0.0 <= self.bank_probability <= 1.0:
            raise LesionSpecError(f"lesion '{self.name}': bank_probability must lie in [0, 1]")
        if self.prompt is None:
            self.prompt = self.name
        for key in ("contrast_hu", "texture_hu"):
            v = getattr(self, key)
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or len(v) != 2 or not float(v[0]) <= float(v[1]):
                raise LesionSpecError(f"lesion '{self.name}': {key} must be [min, max] in HU with min <= max, got {v}")
            setattr(self, key, [float(v[0]), float(v[1])])
        if self.texture_hu is not None and self.texture_hu[0] < 0:
            raise LesionSpecError(f"lesion '{self.name}': texture_hu is a standard deviation and cannot be negative")
        if self.texture_hu is not None and self.contrast_hu is None:
            raise LesionSpecError(f"lesion '{self.name}': texture_hu needs contrast_hu")
        if self.contrast_hu is not None and self.texture_hu is None:
            self.texture_hu = [5.0, 15.0]
        if self.min_parent_fraction is not None:
            f = self.min_parent_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
                raise LesionSpecError(f"lesion '{self.name}': min_parent_fraction must be a number in (0, 1] or null, "
                                      f"got {f!r}")
            self.min_parent_fraction = float(f)
        if self.attribute_mix is not None:
            # deferred: .attributes imports numpy, which the experiment runner (importing this module) does not load
            from .attributes import AttributeRequestError, check_mix

            try:
                self.attribute_mix = check_mix({self.name: self.attribute_mix}, "attribute_mix")[self.name]
            except AttributeRequestError as e:
                raise LesionSpecError(f"lesion '{self.name}': {e}") from None


@dataclass
class LesionSpec:
    lesions: list[LesionClass]
    version: int = SPEC_VERSION

    def __post_init__(self):
        if not self.lesions:
            raise LesionSpecError("lesion spec lists no lesions")
        labels = [l.label for l in self.lesions]
        if len(set(labels)) != len(labels):
            raise LesionSpecError(f"lesion spec lists a label twice: {labels}")
        names = [l.name for l in self.lesions]
        if len(set(names)) != len(names):
            raise LesionSpecError(f"lesion spec lists a name twice: {names}")

    @property
    def labels(self) -> list[int]:
        return [l.label for l in self.lesions]

    @property
    def parent_labels(self) -> list[int]:
        return sorted({p for l in self.lesions for p in l.parents})

    def by_label(self, label: int) -> LesionClass:
        for l in self.lesions:
            if l.label == label:
                return l
        raise KeyError(f"no lesion with label {label} in the spec (labels: {self.labels})")

    def by_name(self, name: str) -> LesionClass:
        for l in self.lesions:
            if l.name == name or l.prompt == name:
                return l
        raise KeyError(f"no lesion named '{name}' in the spec (names: {[l.name for l in self.lesions]})")

    def attribute_mix(self) -> dict[str, dict[str, list[float]]]:
        """The classes' attribute mixes, by prompt name (classes without one left out)."""
        return {l.prompt: dict(l.attribute_mix) for l in self.lesions if l.attribute_mix}

    def normalise_mix(self, mix, where: str = "attribute_mix") -> dict[str, dict[str, list[float]]]:
        """A validated attribute mix keyed by the classes' prompt names (the checkpoint's class names); the keys
        of ``mix`` may be lesion names or prompts."""
        # deferred: numpy, see __post_init__ of LesionClass
        from .attributes import AttributeRequestError, check_mix

        names = [n for l in self.lesions for n in {l.name, l.prompt}]
        try:
            checked = check_mix(mix, where, names)
        except AttributeRequestError as e:
            raise LesionSpecError(str(e)) from None
        return {self.by_name(c).prompt: per for c, per in checked.items()}

    def validate_against_dataset(self, dataset_json: dict, source: str = "dataset.json") -> None:
        """Check every lesion and parent label exists in ``dataset_json['labels']``.

        Region-based datasets (label values that are lists) are checked on their member labels.
        """
        values: set[int] = set()
        for v in dataset_json.get("labels", {}).values():
            if isinstance(v, (list, tuple)):
                values.update(int(x) for x in v)
            else:
                values.add(int(v))
        for l in self.lesions:
            if 0 in l.parents:
                # Placement sites come from nnU-Net's class_locations, which never hold background.
                raise LesionSpecError(
                    f"lesion spec: '{l.name}' names background (0) as a parent; lesions are placed at voxels of a "
                    "labelled parent structure and nnU-Net lists no background locations, so placement would fail. "
                    "Label the structure the lesions lie in (e.g. `promptlesion_convert nifti` derives a soft-tissue "
                    "parent from the CT) and name its label; for lesions that may extend into background set "
                    "'may_leave_parent': true.")
        for l in self.lesions:
            for lab, what in [(l.label, "label")] + [(p, "parent") for p in l.parents]:
                if lab not in values:
                    raise LesionSpecError(
                        f"lesion spec: '{l.name}' names {what} {lab}, which {source} does not define "
                        f"(its labels: {dataset_json.get('labels')}). Fix lesion_spec.json or the dataset."
                    )

    def to_dict(self) -> dict:
        # Optional intensity priors are written only when set, so specs without them keep their old form.
        lesions = [{k: v for k, v in dataclasses.asdict(l).items()
                    if not (k in ("contrast_hu", "texture_hu", "min_parent_fraction", "attribute_mix") and v is None)}
                   for l in self.lesions]
        return {"version": self.version, "lesions": lesions}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "LesionSpec":
        if not isinstance(d, dict) or "lesions" not in d:
            raise LesionSpecError(f"{source}: a lesion spec needs a 'lesions' list")
        if d.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise LesionSpecError(f"{source}: unsupported lesion spec version {d.get('version')}")
        try:
            entries = check_value(d["lesions"], list[dict], "lesions", source)
        except ValueError as e:
            raise LesionSpecError(str(e)) from None
        lesions = []
        for i, entry in enumerate(entries):
            # types and ranges of every key (file, key, expected type, value) before the checks between keys
            entry = validate(LesionClass, entry, source, prefix=f"lesions[{i}]", error=LesionSpecError)
            missing = [k for k in ("name", "label", "parents") if k not in entry]
            if missing:
                raise LesionSpecError(f"{source}: lesion #{i} lacks the key(s) {missing}")
            try:
                lesions.append(LesionClass(**entry))
            except TypeError as e:
                raise LesionSpecError(f"{source}: lesion #{i}: {e}") from e
            except LesionSpecError as e:
                raise LesionSpecError(f"{source}: {e}") from e
        return cls(lesions=lesions)

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LesionSpec":
        path = Path(path)
        if not path.is_file():
            raise LesionSpecError(f"lesion spec {path} not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LesionSpecError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d, source=str(path))


def dataset_spec_folders(preprocessed_dataset: str | os.PathLike,
                         raw_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders of an nnU-Net dataset that may hold its lesion spec, in lookup order.

    ``preprocessed_dataset`` is ``nnUNet_preprocessed/DatasetXXX_Name`` (checked first: a spec placed there is
    the one this training copy uses); then ``<raw_root>/DatasetXXX_Name``, where the converters and phantom
    commands write it. ``raw_root`` defaults to the ``nnUNet_raw`` environment variable and is skipped when unset.
    """
    pre = Path(preprocessed_dataset)
    raw = raw_root if raw_root is not None else os.environ.get("nnUNet_raw")
    return [pre] + ([Path(raw) / pre.name] if raw else [])


def find_lesion_spec(folders: Iterable[str | os.PathLike | None], given: str | os.PathLike | None = None,
                     error: type[Exception] | None = None, hint: str = "") -> Path | None:
    """The lesion spec file to use: ``given`` when set, else :data:`LESION_SPEC_FILENAME` in the first of
    ``folders`` that holds one (``None`` entries are skipped).

    Nothing found: None, or with ``error`` that exception, its message naming every path looked at, then ``hint``
    (what the user can do). A ``given`` path that is not a file counts as nothing found: it is not replaced by
    a lookup, since the user asked for that file.
    """
    candidates = [Path(given)] if given else [Path(f) / LESION_SPEC_FILENAME for f in folders if f is not None]
    for c in candidates:
        if c.is_file():
            return c
    if error is None:
        return None
    raise error(f"no lesion spec found (looked at {[str(c) for c in candidates]})" + (f". {hint}" if hint else ""))


def radius_ranges_from_observed(radii_mm: Sequence[float], n_bins: int = 2) -> list[tuple[float, float]]:
    """Radius ranges (mm) covering the observed equivalent radii of real lesions.

    Used by converters to write the size range seen in the data. Returns ``n_bins`` contiguous
    ranges between the 5th and 95th percentile (or the min/max for few lesions), capped at
    :data:`MAX_RADIUS_MM` (a spec above it is refused; a huge tumour, e.g. a 25 cm sarcoma, then gets
    synthetic lesions up to the cap).
    """
    import numpy as np  # deferred: numpy (~0.1 s CPU at import); the experiment runner imports this module, not numpy

    r = np.asarray([x for x in radii_mm if x > 0], dtype=float)
    if r.size == 0:
        return [DIFFTUMOR_RADIUS_CLASSES_MM["tiny"], DIFFTUMOR_RADIUS_CLASSES_MM["small"]]
    lo, hi = (np.percentile(r, 5), np.percentile(r, 95)) if r.size >= 20 else (r.min(), r.max())
    lo = min(max(float(lo), 0.5), MAX_RADIUS_MM / 1.2)
    hi = min(max(float(hi), lo * 1.2), MAX_RADIUS_MM)
    edges = np.geomspace(lo, hi, n_bins + 1)
    return [(round(float(a), 2), round(float(b), 2)) for a, b in zip(edges[:-1], edges[1:])]
