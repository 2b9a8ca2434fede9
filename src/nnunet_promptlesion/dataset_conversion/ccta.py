"""Generic converter for a folder of CT volumes and label maps (CCTA plaques and the like).

Layout::

    images/<case>.nii.gz  (or .nii, .mha, .nrrd; or <case>.tif = a 3D multi-page TIFF;
                           or <case>/ = a folder of 2D slices slice000.tif, slice001.tif ...)
    labels/<case><label-suffix>.nii.gz   (same kinds, same grid as the image)

Images and labels are paired by name (``<case>``, after removing the file suffix and the optional
``label_suffix``). TIFF files and slice folders carry no usable voxel spacing: give it as
``spacing=(sx, sy, sz)`` in mm (CLI ``--spacing``), x = columns, y = rows, z = slices; slices are
stacked in natural order (slice2 before slice10).

The label mapping says which source values form which written label, in output order 1, 2, ...::

    {"labels": {"vessel_wall": [1], "calcified_plaque": [2], "noncalcified_plaque": [3, 4]},
     "lesions": {"calcified_plaque": ["vessel_wall"], "noncalcified_plaque": ["vessel_wall"]},
     "ignore": [5]}

"ignore" lists source values written as background; any other unlisted value is an error.
Without "lesions", labels whose names contain plaque, lesion, tumour/tumor, cancer, nodule,
stenosis or calcif are lesions of every other label. Cases are named ``<prefix>_<case>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .core import ConversionError, ConversionResult, ConvertOptions, LabelScheme, LesionDef, SourceCase, \
    convert_dataset, load_json_file, sanitize_case_part
from .validation import SLICE_SUFFIXES, is_hidden, strip_image_suffix

CCTA_LESION_RE = re.compile(r"plaque|lesion|tumou?r|cancer|nodule|stenos|calcif", re.IGNORECASE)
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff")


@dataclass
class LabelMapping:
    """Written label name -> source values (in output order), lesion -> parent names, ignored values."""

    labels: dict[str, list[int]]
    lesions: dict[str, list[str]] | None = None
    ignore: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, path: Path) -> "LabelMapping":
        d = load_json_file(path, "label mapping")
        if not isinstance(d, dict) or not isinstance(d.get("labels"), dict):
            raise ConversionError([f"{path}: a label mapping needs a 'labels' object, e.g. "
                                   '{"labels": {"wall": [1], "calcified_plaque": [2]}}'])
        unknown = set(d) - {"labels", "lesions", "ignore"}
        if unknown:
            raise ConversionError([f"{path}: unknown keys {sorted(unknown)}; allowed: labels, lesions, ignore"])
        try:
            labels = {str(k): [int(x) for x in (v if isinstance(v, list) else [v])] for k, v in d["labels"].items()}
            lesions = None if d.get("lesions") is None else {
                str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in d["lesions"].items()}
            ignore = [int(x) for x in d.get("ignore", [])]
        except (TypeError, ValueError) as e:
            raise ConversionError([f"{path}: label values must be integers ({e})"]) from e
        return cls(labels, lesions, ignore)

    @classmethod
    def from_cli(cls, label_args: Sequence[str], lesion_args: Sequence[str] = (), ignore: Sequence[int] = ()
                 ) -> "LabelMapping":
        """``--label wall=1 --label noncalcified_plaque=3,4 --lesion noncalcified_plaque:wall``."""
        labels, lesions = {}, {}
        for a in label_args:
            name, sep, vals = a.partition("=")
            try:
                labels[name.strip()] = [int(v) for v in vals.split(",")]
            except ValueError:
                sep = ""
            if not sep or not name.strip():
                raise ConversionError([f"--label {a}: expected NAME=VALUE[,VALUE...], e.g. calcified_plaque=2"])
        for a in lesion_args:
            name, sep, parents = a.partition(":")
            if not sep or not parents:
                raise ConversionError([f"--lesion {a}: expected LESION:PARENT[,PARENT...], e.g. calcified_plaque:wall"])
            lesions[name.strip()] = [p.strip() for p in parents.split(",")]
        return cls(labels, lesions or None, [int(i) for i in ignore])

    def scheme(self) -> LabelScheme:
        problems = []
        names = list(self.labels)
        for n in names:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", n) or n == "background":
                problems.append(f"label name '{n}': use letters, digits, '_' or '-' (and not 'background')")
        value_map = {0: 0}
        for out, (n, srcs) in enumerate(self.labels.items(), start=1):
            for s in srcs:
                if s in value_map:
                    problems.append(f"source value {s} is mapped twice (label '{n}')")
                if s <= 0:
                    problems.append(f"label '{n}': source value {s} must be > 0 (0 is background)")
                value_map[s] = out
        for s in self.ignore:
            if s in value_map:
                problems.append(f"ignored source value {s} is also mapped to a label")
            value_map[s] = 0
        lesions = self.lesions
        if lesions is None:
            les = [n for n in names if CCTA_LESION_RE.search(n)]
            lesions = {n: [p for p in names if p not in les] for n in les}
        out_value = {n: i for i, n in enumerate(names, start=1)}
        defs = []
        for l, parents in lesions.items():
            if l not in out_value:
                problems.append(f"lesion '{l}' is not one of the labels {names}")
                continue
            missing = [p for p in parents if p not in out_value]
            if missing:
                problems.append(f"lesion '{l}': parent(s) {missing} are not among the labels {names}")
                continue
            defs.append(LesionDef(l, out_value[l], [out_value[p] for p in parents], stageable="cyst" not in l))
        if not names:
            problems.append("the label mapping lists no labels")
        if problems:
            raise ConversionError(problems, header="invalid label mapping")
        return LabelScheme(value_map, {"background": 0} | out_value, defs)


def _volume_key(p: Path) -> str | None:
    if p.is_dir():
        return p.name
    if p.name.lower().endswith(_VOLUME_SUFFIXES):
        return strip_image_suffix(p.name)
    return None


def _index(folder: Path, what: str) -> tuple[dict[str, Path], list[str]]:
    if not folder.is_dir():
        raise ConversionError([f"{folder}: {what} folder not found"])
    out, problems = {}, []
    for p in sorted(folder.iterdir()):
        if is_hidden(p) or p.name.lower().endswith((".raw", ".zraw")):
            continue
        if p.is_file() and p.suffix.lower() in SLICE_SUFFIXES and p.suffix.lower() == ".png":
            problems.append(f"{p}: single 2D PNG; put the slices of a case in a folder named after the case")
            continue
        k = _volume_key(p)
        if k is None:
            continue
        if k in out:
            problems.append(f"{what} '{k}' appears more than once: {out[k]}, {p}")
        out[k] = p
    return out, problems


def find_folder_cases(images: Path, labels: Path, prefix: str = "ccta", label_suffix: str = "",
                      spacing: Sequence[float] | None = None, unlabelled_to_test: bool = False
                      ) -> tuple[list[SourceCase], list[str]]:
    """Pair images and label maps by name; list missing partners and duplicates as problems."""
    imgs, problems = _index(Path(images), "image")
    labs_raw, p2 = _index(Path(labels), "label")
    problems += p2
    labs = {}
    for k, p in labs_raw.items():
        if label_suffix and not k.endswith(label_suffix):
            problems.append(f"{p}: label file name does not end with '{label_suffix}'")
            continue
        labs[k[: len(k) - len(label_suffix)] if label_suffix else k] = p
    for k in sorted(set(labs) - set(imgs)):
        problems.append(f"{labs[k]}: label map without an image '{k}' in {images}")
    if not unlabelled_to_test:
        for k in sorted(set(imgs) - set(labs)):
            problems.append(f"{imgs[k]}: image without a label map '{k}{label_suffix}' in {labels} "
                            f"(or pass --unlabelled-to-test)")
    sp = tuple(float(s) for s in spacing) if spacing is not None else None
    cases, seen = [], {}
    for k in sorted(imgs):
        if k not in labs and not unlabelled_to_test:
            continue
        cid = f"{prefix}_{sanitize_case_part(k)}"
        if cid in seen:
            problems.append(f"{imgs[k]} and {seen[cid]} both become case '{cid}'; rename one")
        seen[cid] = imgs[k]
        cases.append(SourceCase(cid, [imgs[k]], labs.get(k), sp))
    return cases, problems


def convert_folder(images: str | Path, labels: str | Path, mapping: LabelMapping, options: ConvertOptions,
                   prefix: str = "ccta", label_suffix: str = "", spacing: Sequence[float] | None = None,
                   unlabelled_to_test: bool = False, converter: str = "ccta") -> ConversionResult:
    """Convert an image folder + label folder (see module docstring) into ``nnUNet_raw/DatasetXXX_Name``."""
    if not re.fullmatch(r"[A-Za-z0-9\-]+", prefix):
        raise ValueError(f"--prefix '{prefix}': use letters, digits and '-' only")
    scheme = mapping.scheme()
    cases, problems = find_folder_cases(Path(images), Path(labels), prefix, label_suffix, spacing,
                                        unlabelled_to_test)
    extra = {"description": f"{converter} dataset converted from {images} and {labels}"}
    return convert_dataset(cases, scheme, options, converter=converter, source=f"{images} + {labels}",
                           extra_problems=problems, dataset_json_extra=extra)
