"""Plain NIfTI pairs (CT + lesion mask, no organ labels) -> a PromptLesion dataset with a derived parent structure.

Layout::

    images/<case>.nii.gz   (or <case>_0000.nii.gz, .nii, .mha, .nrrd): CT in HU
    masks/<case>.nii.gz    lesion mask on the image's voxel grid: 0 background, lesion values (``--lesion``)

PromptLesionTrainer places synthetic lesions at voxels of a *parent* label (nnU-Net's ``class_locations`` list only
labelled voxels, never background), so a dataset that has only lesion masks needs a parent structure. This source
derives one per case:

* ``body-window`` (default), from the CT alone: the body is the largest connected component above ``air_hu`` (plus
  any component holding a lesion voxel), its holes filled slice by slice and in 3D; the parent is the part of the
  body inside the tissue window ``[lo, hi]`` HU, minus the lesions, without components smaller than
  ``min_component_mm3``. The window decides where synthetic lesions can go: it should hold the tissue real lesions
  grow in and look like. The default -30..150 HU is muscle-like soft tissue (fat, air, lung and bone excluded):
  right for soft-tissue tumours such as sarcomas (median ~30 HU). A wider body window (-200..250 HU) lets lesions be
  painted into fat and across tissue boundaries; on the sarcoma data that taught the network false positives.
* ``masks``: from an organ label folder the user already has (e.g. TotalSegmentator's ``--ml`` output, one
  multi-label file per case, same names and grid as the images), with the source values that form each parent.
  Lesion voxels win over parent voxels; other organ values are written as background.

Written labels: the parent(s) 1, 2, ... in the order given, then the lesions. Every lesion's parents are all
parent labels unless given (``NAME=VALUE:PARENT``). ``lesion_spec.json`` gets the equivalent radii of the real
(training) lesions and their intensity relative to the surrounding parent (``contrast_hu``: interior mean minus the
mean of the parent within 5 mm around the lesion, ``texture_hu``: interior standard deviation; 10th-90th
percentile over lesions), the prior rule-based synthesis uses for a class without real lesions in a fold.
``test_cases`` holds a seeded random set of cases out into imagesTs/labelsTs (recorded in conversion.json).
All inputs are checked, and all parents derived, before anything is written.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from ..lesions.components import label_components
from .core import ConversionError, ConversionResult, ConvertOptions, LabelScheme, LesionDef, SourceCase, \
    _case_problems, convert_dataset, sanitize_case_part, target_folder
from .raw_writer import FILE_ENDING
from .validation import check_readable, geometry_problems, is_hidden, read_info, read_volume, strip_image_suffix

DEFAULT_PARENT_NAME = "soft_tissue"
DEFAULT_AIR_HU = -500.0
#: muscle-like soft tissue; fat (about -100 HU), air, lung and bone fall outside
DEFAULT_TISSUE_HU = (-30.0, 150.0)
DEFAULT_MIN_COMPONENT_MM3 = 100.0
#: width of the parent ring around a lesion whose mean is the lesion's contrast reference
RING_MM = 5.0
_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


# ---------------------------------------------------------------------------------------------- arguments
def _parse_values(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConversionError([f"{what}: values must be integers, got '{text}'"], header="invalid argument") from None
    if any(v <= 0 for v in vals):
        raise ConversionError([f"{what}: values must be > 0 (0 is background)"], header="invalid argument")
    return vals


@dataclass
class LesionMapping:
    """A lesion class: its name, the mask values forming it and (optionally) the parent names it lies in."""

    name: str
    values: list[int]
    parents: list[str] | None = None

    @classmethod
    def parse(cls, text: str) -> "LesionMapping":
        """``NAME=VALUE[,VALUE...][:PARENT[,PARENT...]]``, e.g. ``sarcoma=1`` or ``liver_tumour=2:liver``."""
        head, _, parents = text.partition(":")
        name, sep, vals = head.partition("=")
        if not sep or not name.strip() or not vals.strip():
            raise ConversionError([f"--lesion {text}: expected NAME=VALUE[,VALUE][:PARENT[,PARENT]], e.g. sarcoma=1"],
                                  header="invalid argument")
        return cls(name.strip(), _parse_values(vals, f"--lesion {text}"),
                   [p.strip() for p in parents.split(",")] if parents.strip() else None)


#: min_parent_fraction written for the lesions: a parent derived from a HU window (or organ masks) is ragged, and
#: tumours are masses that displace the fat and septa around them (docs/results.md, sarcoma experiment)
DEFAULT_MASS_FRACTION = 0.8


@dataclass
class BodyWindowParent:
    """Derive the parent from the CT: body (largest component above ``air_hu``, holes filled) within
    ``tissue_hu`` = (lo, hi) HU, minus the lesions, without components under ``min_component_mm3``."""

    name: str = DEFAULT_PARENT_NAME
    air_hu: float = DEFAULT_AIR_HU
    tissue_hu: tuple[float, float] = DEFAULT_TISSUE_HU
    min_component_mm3: float = DEFAULT_MIN_COMPONENT_MM3
    mode: str = field(default="body-window", init=False)

    def problems(self) -> list[str]:
        out = []
        lo, hi = (float(v) for v in self.tissue_hu)
        if not lo < hi:
            out.append(f"--tissue-hu {lo:g} {hi:g}: the window's low end must be below its high end")
        if hi <= self.air_hu:
            out.append(f"--tissue-hu {lo:g} {hi:g} lies entirely below --air-hu {self.air_hu:g}: no body voxel can be "
                       "parent")
        if self.min_component_mm3 < 0:
            out.append("--min-component-mm3 must be >= 0")
        if not _NAME_RE.fullmatch(self.name) or self.name == "background":
            out.append(f"--parent-name '{self.name}': use letters, digits, '_' or '-' (and not 'background')")
        return out

    @property
    def names(self) -> list[str]:
        return [self.name]


@dataclass
class MaskParent:
    """Parents from an organ label folder: ``labels`` maps each parent name to the source values forming it;
    files are ``folder/<case><suffix>.nii.gz`` on the image's grid."""

    folder: Path
    labels: dict[str, list[int]]
    suffix: str = ""
    mode: str = field(default="masks", init=False)

    @classmethod
    def from_cli(cls, folder: Path, label_args: Sequence[str], suffix: str = "") -> "MaskParent":
        labels: dict[str, list[int]] = {}
        for a in label_args:
            name, sep, vals = a.partition("=")
            if not sep or not name.strip() or not vals.strip():
                raise ConversionError([f"--parent-label {a}: expected NAME=VALUE[,VALUE], e.g. liver=5"],
                                      header="invalid argument")
            if name.strip() in labels:
                raise ConversionError([f"--parent-label {a}: parent '{name.strip()}' given twice"], header="invalid argument")
            labels[name.strip()] = _parse_values(vals, f"--parent-label {a}")
        return cls(Path(folder), labels, suffix)

    def problems(self) -> list[str]:
        out = []
        if not self.labels:
            out.append("--parent masks needs at least one --parent-label NAME=VALUE[,VALUE] (the organ mask values "
                       "that form the parent structure)")
        seen: dict[int, str] = {}
        for n, vals in self.labels.items():
            if not _NAME_RE.fullmatch(n) or n == "background":
                out.append(f"parent name '{n}': use letters, digits, '_' or '-' (and not 'background')")
            for v in vals:
                if v in seen:
                    out.append(f"--parent-label: value {v} is used by both '{seen[v]}' and '{n}'")
                seen[v] = n
        if not Path(self.folder).is_dir():
            out.append(f"{self.folder}: parent mask folder not found (--parent-masks)")
        return out

    @property
    def names(self) -> list[str]:
        return list(self.labels)


# ---------------------------------------------------------------------------------------------- derivation
_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)


def _keep_components(mask: np.ndarray, keep_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    lut = np.zeros(int(labels.max()) + 1, bool)
    lut[keep_ids] = True
    return lut[labels]


def fill_holes(mask: np.ndarray, slicewise: bool) -> np.ndarray:
    """``mask`` with its holes (background not connected to the array border) filled: in 3D, or in every slice of
    the first axis (the axial slices of a (z, y, x) CT array) when ``slicewise``. Background is 6-connected
    (4-connected in plane), one labelling pass, no iteration."""
    structure = _INPLANE if slicewise else ndimage.generate_binary_structure(3, 1)
    bg, n = ndimage.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    faces = [bg[:, 0, :], bg[:, -1, :], bg[:, :, 0], bg[:, :, -1]]
    if not slicewise:
        faces += [bg[0], bg[-1]]
    outside = np.unique(np.concatenate([f.ravel() for f in faces]))
    return mask | ~_keep_components(bg, outside[outside > 0], bg) & (bg > 0)


def body_mask(ct: np.ndarray, air_hu: float, lesion: np.ndarray | None = None) -> np.ndarray:
    """The body: the largest 26-connected component of ``ct > air_hu`` and every component holding a lesion voxel,
    holes filled slice by slice and then in 3D. ``ct`` (z, y, x) in HU."""
    above = ct > air_hu
    cc, n = label_components(above)
    if n == 0:
        return above
    counts = np.bincount(cc.ravel(), minlength=n + 1)
    counts[0] = 0
    keep = [int(np.argmax(counts))]
    if lesion is not None and lesion.any():
        keep += [int(k) for k in np.unique(cc[lesion]) if k > 0]
    body = _keep_components(above, np.asarray(keep), cc)
    return fill_holes(fill_holes(body, slicewise=True), slicewise=False)


def drop_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without 26-connected components of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask
    cc, n = label_components(mask)
    counts = np.bincount(cc.ravel(), minlength=n + 1)
    keep = np.flatnonzero(counts >= min_voxels)
    return _keep_components(mask, keep[keep > 0], cc)


def derive_body_window_parent(ct: np.ndarray, lesion: np.ndarray, spacing_zyx: Sequence[float],
                              rule: BodyWindowParent) -> tuple[np.ndarray, np.ndarray]:
    """(parent, body) boolean masks of a (z, y, x) HU array; ``lesion``: boolean mask of every lesion voxel."""
    body = body_mask(ct, rule.air_hu, lesion)
    lo, hi = (float(v) for v in rule.tissue_hu)
    parent = body & (ct >= lo) & (ct <= hi) & ~lesion
    min_voxels = int(np.ceil(rule.min_component_mm3 / float(np.prod(spacing_zyx))))
    return drop_small_components(parent, min_voxels), body


def lesion_intensity(ct: np.ndarray, label: np.ndarray, lesion_value: int, parent_values: Sequence[int],
                     spacing_zyx: Sequence[float], ring_mm: float = RING_MM, min_interior_voxels: int = 8
                     ) -> list[dict]:
    """Per lesion component: interior mean and std (HU; the component without its one-voxel rim when that holds
    ``min_interior_voxels``, as rule-based synthesis measures it), and the mean of the parent voxels within
    ``ring_mm`` around it (None when no parent voxel lies there)."""
    cc, n = label_components(label == lesion_value)
    if n == 0:
        return []
    sp = np.asarray(spacing_zyx, float)
    margin = np.ceil(ring_mm / sp).astype(int) + 1
    parent = np.isin(label, parent_values)
    rim = ndimage.generate_binary_structure(3, 1)
    out = []
    for i, sl in enumerate(ndimage.find_objects(cc), start=1):
        if sl is None:
            continue
        grown = tuple(slice(max(s.start - m, 0), s.stop + m) for s, m in zip(sl, margin))
        comp = cc[grown] == i
        core = ndimage.binary_erosion(comp, structure=rim)
        inside = ct[grown][core if core.sum() >= min_interior_voxels else comp].astype(np.float64)
        ring = (ndimage.distance_transform_edt(~comp, sampling=sp) <= ring_mm) & ~comp & parent[grown]
        around = float(ct[grown][ring].mean()) if ring.any() else None
        out.append({"voxels": int(comp.sum()), "mean_hu": float(inside.mean()), "std_hu": float(inside.std()),
                    "parent_ring_hu": around,
                    "contrast_hu": None if around is None else float(inside.mean()) - around})
    return out


def _prior_range(values: Sequence[float]) -> list[float]:
    v = np.asarray(values, float)
    lo, hi = (np.percentile(v, 10), np.percentile(v, 90)) if v.size >= 5 else (v.min(), v.max())
    return [round(float(lo), 1), round(float(hi), 1)]


# ---------------------------------------------------------------------------------------------- cases
def _index(folder: Path, what: str) -> tuple[dict[str, Path], list[str]]:
    if not folder.is_dir():
        return {}, [f"{folder}: {what} folder not found"]
    out: dict[str, Path] = {}
    problems = []
    for p in sorted(folder.iterdir()):
        if is_hidden(p) or not p.is_file() or not p.name.lower().endswith(_VOLUME_SUFFIXES):
            continue
        k = strip_image_suffix(p.name)
        if k in out:
            problems.append(f"{what} '{k}' appears more than once: {out[k]}, {p}")
        out[k] = p
    if not out:
        problems.append(f"{folder}: no {what} files ({', '.join(_VOLUME_SUFFIXES)})")
    return out, problems


def find_pairs(images: Path, masks: Path, prefix: str = "", mask_suffix: str = ""
               ) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """[(case id, image, mask)] paired by name (an image's nnU-Net channel suffix ``_0000`` is ignored), and the
    unpaired files as problems."""
    imgs, problems = _index(Path(images), "image")
    masks_raw, p2 = _index(Path(masks), "lesion mask")
    problems += p2
    labs: dict[str, Path] = {}
    for k, p in masks_raw.items():
        if mask_suffix and not k.endswith(mask_suffix):
            problems.append(f"{p}: mask file name does not end with '{mask_suffix}'")
            continue
        labs[k[: len(k) - len(mask_suffix)] if mask_suffix else k] = p
    keyed: dict[str, Path] = {}
    for k, p in imgs.items():
        key = k[:-5] if k.endswith("_0000") and k not in labs and k[:-5] in labs else k
        keyed[key] = p
    for k in sorted(set(labs) - set(keyed)):
        problems.append(f"{labs[k]}: lesion mask without an image '{k}' in {images}")
    for k in sorted(set(keyed) - set(labs)):
        problems.append(f"{keyed[k]}: image without a lesion mask '{k}{mask_suffix}' in {masks}")
    pairs, seen = [], {}
    for k in sorted(set(keyed) & set(labs)):
        cid = f"{prefix}_{sanitize_case_part(k)}" if prefix else sanitize_case_part(k)
        if cid in seen:
            problems.append(f"{keyed[k]} and {seen[cid]} both become case '{cid}'; rename one")
        seen[cid] = keyed[k]
        pairs.append((cid, keyed[k], labs[k]))
    return pairs, problems


def split_test_cases(case_ids: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded random choice of ``n`` of ``case_ids`` (independent of their order), sorted."""
    ids = sorted(case_ids)
    rng = np.random.default_rng(seed)
    return sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False)) if n else []


def _parent_mask_path(rule: MaskParent, key_case: str, image: Path) -> Path | None:
    stem = strip_image_suffix(image.name)
    stem = stem[:-5] if stem.endswith("_0000") else stem
    for cand in (stem, key_case):
        for suf in _VOLUME_SUFFIXES:
            p = Path(rule.folder) / f"{cand}{rule.suffix}{suf}"
            if p.is_file():
                return p
    return None


def _check_parent_file(path: Path, image: Path, rtol: float) -> list[str]:
    try:
        info = read_info(path)
    except Exception as e:
        return [f"{path}: cannot read parent mask header ({e})"]
    if info.dimension != 3:
        return [f"{path}: {info.dimension}D parent mask, expected 3D"]
    probs = geometry_problems(read_info(image), info, f"image {image}", str(path), rtol=rtol)
    if probs:
        return [p.replace("the label map", "the parent mask") for p in probs]
    try:
        check_readable(path)
    except Exception as e:
        return [f"{path}: cannot read parent mask voxels ({e})"]
    return []


# ---------------------------------------------------------------------------------------------- conversion
def convert_nifti_pairs(images: str | Path, masks: str | Path, lesions: Sequence[LesionMapping],
                        options: ConvertOptions, parent: BodyWindowParent | MaskParent | None = None,
                        test_cases: int = 0, split_seed: int = 0, prefix: str = "", mask_suffix: str = "",
                        allow_healthy: bool = False, mass_fraction: float | None = DEFAULT_MASS_FRACTION
                        ) -> ConversionResult:
    """Convert CT + lesion-mask pairs into ``nnUNet_raw/DatasetXXX_Name`` with a derived parent (module docstring).

    mass_fraction: written as every lesion's ``min_parent_fraction`` in lesion_spec.json (synthetic lesions are
    masses kept whole with at least this share in the parent, see lesions.spec); None: clipped to the parent.

    Raises :class:`ConversionError` listing every problem (each with its file) before anything is written.
    """
    parent = parent or BodyWindowParent()
    images, masks = Path(images).absolute(), Path(masks).absolute()
    if isinstance(parent, MaskParent):
        parent = MaskParent(Path(parent.folder).absolute(), parent.labels, parent.suffix)
    target_folder(options)                       # an existing dataset is refused before any work
    problems = list(parent.problems())
    if prefix and not re.fullmatch(r"[A-Za-z0-9\-]+", prefix):
        problems.append(f"--prefix '{prefix}': use letters, digits and '-' only")
    if not lesions:
        problems.append("no lesion class: give --lesion NAME=VALUE[,VALUE] (repeatable), e.g. --lesion sarcoma=1")
    parent_names = parent.names
    names = list(parent_names) + [l.name for l in lesions]
    for l in lesions:
        if not _NAME_RE.fullmatch(l.name) or l.name == "background":
            problems.append(f"lesion name '{l.name}': use letters, digits, '_' or '-' (and not 'background')")
        for p in l.parents or []:
            if p not in parent_names:
                problems.append(f"lesion '{l.name}': parent '{p}' is not one of the parents {parent_names}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"label name(s) {dup} used more than once (parents and lesions need distinct names)")
    src_vals: dict[int, str] = {}
    for l in lesions:
        for v in l.values:
            if v in src_vals:
                problems.append(f"--lesion: mask value {v} is mapped to both '{src_vals[v]}' and '{l.name}'")
            src_vals[v] = l.name
    if test_cases < 0:
        problems.append(f"--test-cases {test_cases}: must be >= 0")
    if problems:
        raise ConversionError(problems, header="invalid arguments, nothing was written")

    n_par = len(parent_names)
    value_of = {n: i for i, n in enumerate(names, start=1)}
    lesion_value_map = {0: 0} | {v: value_of[l.name] for l in lesions for v in l.values}
    lesion_scheme = LabelScheme(lesion_value_map, {"background": 0} | {l.name: value_of[l.name] for l in lesions})
    pairs, problems = find_pairs(images, masks, prefix, mask_suffix)
    if not pairs and not problems:
        problems.append(f"no image/mask pairs in {images} and {masks}")
    if pairs and test_cases >= len(pairs):
        problems.append(f"--test-cases {test_cases}: only {len(pairs)} case(s); keep at least one for training")
    test_ids = set(split_test_cases([c for c, _, _ in pairs], test_cases, split_seed)) \
        if pairs and 0 <= test_cases < len(pairs) else set()

    lesion_values_written = [value_of[l.name] for l in lesions]
    parent_values_written = list(range(1, n_par + 1))
    lut = lesion_scheme.lut()
    per_lesion: dict[int, list[dict]] = {v: [] for v in lesion_values_written}
    stats: dict[str, dict] = {}
    tmp_dir = tempfile.TemporaryDirectory(prefix="promptlesion_nifti_")
    try:
        derived_dir = Path(tmp_dir.name)
        ok: list[tuple[str, Path, Path, Path]] = []
        for cid, img, msk in tqdm(pairs, desc="checking and deriving parents", unit="case",
                                  disable=not options.progress, file=sys.stderr):
            case_problems = _case_problems(SourceCase(cid, [img], msk), lesion_scheme, 1, False, options.rtol)
            pmask = None
            if isinstance(parent, MaskParent):
                pmask = _parent_mask_path(parent, cid, img)
                if pmask is None:
                    case_problems.append(f"{img}: no parent mask '{strip_image_suffix(img.name)}{parent.suffix}"
                                         f"{FILE_ENDING}' in {parent.folder} (case '{cid}')")
                elif not case_problems:
                    case_problems += _check_parent_file(pmask, img, options.rtol)
            if case_problems:
                problems += case_problems
                continue
            image = read_volume(img)
            ct = sitk.GetArrayFromImage(image)
            spacing_zyx = tuple(float(s) for s in image.GetSpacing()[::-1])
            lab = lut[sitk.GetArrayFromImage(read_volume(msk)).astype(np.int64)]
            lesion_any = lab > 0
            if not lesion_any.any() and not allow_healthy:
                problems.append(f"{msk}: no lesion voxel (values {sorted(src_vals)} absent; case '{cid}'); a lesion "
                                "mask must show its lesion, or pass --allow-healthy to keep lesion-free cases")
                continue
            st: dict = {"split": "test" if cid in test_ids else "train"}
            out = np.zeros(lab.shape, np.uint8)
            if isinstance(parent, BodyWindowParent):
                par, body = derive_body_window_parent(ct, lesion_any, spacing_zyx, parent)
                if not par.any():
                    lo, hi = parent.tissue_hu
                    problems.append(f"{img}: no parent voxel: the tissue window {lo:g}..{hi:g} HU leaves nothing of the "
                                    f"body (> {parent.air_hu:g} HU) once lesions and components under "
                                    f"{parent.min_component_mm3:g} mm^3 are removed (case '{cid}'); widen "
                                    "--tissue-hu or check that the image is in HU")
                    continue
                out[par] = 1
                st["body_fraction"] = round(float(body.mean()), 4)
                if lesion_any.any():
                    lo, hi = parent.tissue_hu
                    les_hu = ct[lesion_any]
                    st["lesion_in_window_fraction"] = round(float(((les_hu >= lo) & (les_hu <= hi)).mean()), 4)
            else:
                org = sitk.GetArrayFromImage(read_volume(pmask))
                if not np.issubdtype(org.dtype, np.integer) and not np.array_equal(org, np.round(org)):
                    problems.append(f"{pmask}: parent mask holds non-integer values (dtype {org.dtype})")
                    continue
                org = org.astype(np.int64)
                for k, vals in enumerate(parent.labels.values(), start=1):
                    out[np.isin(org, vals)] = k
                out[lesion_any] = 0
                if not out.any():
                    problems.append(f"{pmask}: none of the parent values "
                                    f"{ {n: v for n, v in parent.labels.items()} } outside the lesions (case '{cid}'); "
                                    "check --parent-label against this file's values")
                    continue
                st["parent_mask"] = str(pmask)
            out[lesion_any] = lab[lesion_any]
            par_any = (out > 0) & ~lesion_any
            st["parent_fraction"] = round(float(par_any.mean()), 4)
            st["parent_voxels"] = int(par_any.sum())
            st["parent_median_hu"] = round(float(np.median(ct[par_any])), 1)
            st["lesion_voxels"] = int(lesion_any.sum())
            if lesion_any.any():
                p5, p50, p95 = np.percentile(ct[lesion_any], [5, 50, 95])
                st["lesion_hu_p5_median_p95"] = [round(float(x), 1) for x in (p5, p50, p95)]
            les_parents = {value_of[l.name]: [value_of[p] for p in (l.parents or parent_names)] for l in lesions}
            if cid not in test_ids:          # the spec's priors come from training lesions only
                for v in lesion_values_written:
                    per_lesion[v] += lesion_intensity(ct, out, v, les_parents[v], spacing_zyx)
            path = derived_dir / f"{cid}{FILE_ENDING}"
            img_l = sitk.GetImageFromArray(out)
            img_l.CopyInformation(image)
            sitk.WriteImage(img_l, str(path), useCompression=True)
            stats[cid] = st
            ok.append((cid, img, msk, path))
        if problems:
            raise ConversionError(problems)

        lesion_defs = [LesionDef(l.name, value_of[l.name], [value_of[p] for p in (l.parents or parent_names)],
                                 stageable="cyst" not in l.name) for l in lesions]
        scheme = LabelScheme({v: v for v in range(len(names) + 1)}, {"background": 0} | value_of, lesion_defs)
        priors: dict[int, dict] = {}
        for v, comps in per_lesion.items():
            contrast = [c["contrast_hu"] for c in comps if c["contrast_hu"] is not None]
            if contrast:
                priors[v] = {"contrast_hu": _prior_range(contrast),
                             "texture_hu": [max(0.0, x) for x in _prior_range([c["std_hu"] for c in comps])]}
        if mass_fraction is not None:
            for v in per_lesion:
                priors.setdefault(v, {})["min_parent_fraction"] = float(mass_fraction)
        if options.stage_tumours:
            for early, late in scheme.staged()[1]:
                if early in priors:
                    priors[late] = dict(priors[early])
        cases = [SourceCase(cid, [img], path, copy_images=True, test=cid in test_ids,
                            provenance={"label": str(msk), **stats[cid]}) for cid, img, msk, path in ok]
        derivation = {"mode": parent.mode, **{k: v for k, v in asdict(parent).items() if k != "mode"}}
        derivation = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                      for k, v in derivation.items()}
        extra = {"source_to_written_values": {str(k): int(v) for k, v in lesion_value_map.items()},
                 "parent_derivation": derivation,
                 "lesion_source_values": {l.name: l.values for l in lesions},
                 "test_split": {"n": len(test_ids), "seed": int(split_seed), "cases": sorted(test_ids)},
                 "lesion_intensity_hu": {names[v - 1]: {"lesions": len(c), **priors.get(v, {})}
                                         for v, c in per_lesion.items()}}
        src = f"{images} + {masks}" + (f" + {parent.folder}" if isinstance(parent, MaskParent) else "")
        ds_extra = {"description": f"CT + lesion masks from {images} and {masks}; parent "
                                   f"{'/'.join(parent_names)} derived ({parent.mode})"}
        return convert_dataset(cases, scheme, options, converter="nifti", source=src, dataset_json_extra=ds_extra,
                               lesion_priors=priors, conversion_extra=extra)
    finally:
        tmp_dir.cleanup()


def case_summary(folder: Path) -> list[tuple[str, dict]]:
    """(case, statistics) from a converted dataset's conversion.json, for printing."""
    info = json.loads((Path(folder) / "conversion.json").read_text())
    return sorted(info["cases"].items())


__all__ = ["LesionMapping", "BodyWindowParent", "MaskParent", "convert_nifti_pairs", "derive_body_window_parent",
           "body_mask", "fill_holes", "find_pairs", "split_test_cases", "lesion_intensity"]
