"""The conversion engine shared by every source converter (KiTS, LiTS, MSD, CCTA).

A converter only lists its cases (:class:`SourceCase`) and describes its labels
(:class:`LabelScheme`); :func:`convert_dataset` then

1. refuses an existing ``DatasetXXX_Name`` (unless ``overwrite``) or a dataset id taken by
   another name,
2. validates every case before writing anything (readable files, 3D or 4D as expected, image
   and label on the same voxel grid, only the expected label values, no missing or duplicated
   cases) and raises one :class:`~.validation.ConversionError` naming every problem and its file,
3. writes images and relabelled (optionally reoriented and tumour-staged) label maps into a
   hidden temporary folder next to the target and renames it into place at the end
   (:func:`~nnunet_promptlesion.utils.atomic.atomic_dir`), so an interrupted or failed run leaves
   no ``DatasetXXX`` folder behind,
4. writes ``dataset.json``, ``lesion_spec.json`` (lesion labels, their parent structures, the
   equivalent radii seen in the data) and ``conversion.json`` (provenance of every case).

Images and labels are read and written with SimpleITK, nnU-Net's default reader, so spacing,
origin and direction round-trip exactly; label maps are written with the image's header.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from ..lesions.spec import LesionClass, LesionSpec
from ..utils.atomic import atomic_dir, write_json_atomic
from ..utils.jsonlog import JsonlLogger
from .raw_writer import FILE_ENDING, dataset_folder_name, existing_dataset_with_id, make_dataset_json, \
    nnunet_raw_dir, write_dataset_metadata
from .staging import component_radii_mm, radius_ranges, stage_components
from .validation import ConversionError, VolumeInfo, check_readable, duplicate_problems, geometry_problems, label_value_problems, \
    read_info, read_volume

CONVERSION_INFO_FILENAME = "conversion.json"
CONVERSION_LOG_FILENAME = "conversion_log.jsonl"
STAGE_SUFFIXES = ("_early", "_late")


@dataclass
class LesionDef:
    """A lesion label of a dataset.

    value: label value written in the segmentation file (for region datasets: the file value).
    parents: label values of the structure(s) it lies in (organ, vessel wall).
    stageable: split into early/late by size when staging is requested (tumours: yes, cysts: no).
    stage: None, "early" or "late" once staged.
    """

    name: str
    value: int
    parents: list[int]
    may_leave_parent: bool = False
    stageable: bool = True
    stage: str | None = None


@dataclass
class LabelScheme:
    """How source label values become the written ones and what they mean.

    value_map: every allowed source value -> value written (0 -> 0 included).
    labels: dataset.json "labels" (name -> value, or a list of values for nnU-Net regions).
    regions_class_order: nnU-Net's regions_class_order for region datasets, else None.
    """

    value_map: dict[int, int]
    labels: dict[str, int | list[int]]
    lesions: list[LesionDef] = field(default_factory=list)
    regions_class_order: list[int] | None = None

    @property
    def is_region_based(self) -> bool:
        return self.regions_class_order is not None

    def output_values(self) -> list[int]:
        vals = set(self.value_map.values())
        for v in self.labels.values():
            vals.update(v if isinstance(v, (list, tuple)) else [v])
        return sorted(int(v) for v in vals)

    def lut(self) -> np.ndarray:
        lut = np.zeros(max(self.value_map) + 1, dtype=np.int64)
        for s, d in self.value_map.items():
            lut[int(s)] = int(d)
        return lut

    def staged(self) -> tuple["LabelScheme", list[tuple[int, int]]]:
        """The scheme with every stageable lesion split into ``<name>_early`` (its value) and
        ``<name>_late`` (a new value appended after the highest one, keeping labels consecutive).

        Returns (new scheme, [(early value, late value), ...]).
        """
        labels: dict[str, int | list[int]] = {}
        order = list(self.regions_class_order) if self.regions_class_order is not None else None
        lesions: list[LesionDef] = []
        pairs: list[tuple[int, int]] = []
        next_value = max(self.output_values()) + 1
        late_of: dict[int, int] = {}
        for les in self.lesions:
            if les.stageable and les.stage is None:
                late_of[les.value] = next_value
                pairs.append((les.value, next_value))
                lesions += [dataclasses.replace(les, name=les.name + "_early", stage="early"),
                            dataclasses.replace(les, name=les.name + "_late", value=next_value, stage="late")]
                next_value += 1
            else:
                lesions.append(les)
        lesion_by_value = {l.value: l for l in self.lesions}
        fg_names = [n for n in self.labels if n != "background"]
        for name, v in self.labels.items():
            if isinstance(v, (list, tuple)):
                vals = [int(x) for x in v]
                if len(vals) == 1 and vals[0] in late_of and lesion_by_value[vals[0]].name == name:
                    v = vals[0]
                else:
                    labels[name] = vals + [late_of[x] for x in vals if x in late_of]
                    continue
            v = int(v)
            les = lesion_by_value.get(v)
            if v in late_of and les is not None and les.name == name:
                labels[name + "_early"] = v
                labels[name + "_late"] = late_of[v]
                if order is not None:
                    order.insert(order.index(self.regions_class_order[fg_names.index(name)]) + 1, late_of[v])
            else:
                labels[name] = v
        return LabelScheme(value_map=dict(self.value_map), labels=labels, lesions=lesions,
                           regions_class_order=order), pairs


@dataclass
class SourceCase:
    """One case of a source release.

    case_id: nnU-Net case name ``{prefix}_{id}`` (e.g. ``kits23_00012``).
    images: one file per channel, or a single 4D file holding all channels (MSD).
    label: label map, or None for an unlabelled case (written to imagesTs).
    spacing: voxel size (mm, x y z) for TIFF/slice-folder inputs, which carry none.
    value_map: per-case source -> written label values (merges: one map per input dataset);
        None uses the scheme's.
    copy_images: copy the (already .nii.gz, 3D) channel files byte for byte instead of rewriting them.
    test: a labelled case held out of training: written to imagesTs + labelsTs, not counted in numTraining and
        not used for the lesion spec's radii or priors.
    provenance: extra entries for this case's record in conversion.json (e.g. derived-label statistics).
    """

    case_id: str
    images: list[Path]
    label: Path | None
    spacing: tuple[float, float, float] | None = None
    value_map: dict[int, int] | None = None
    copy_images: bool = False
    test: bool = False
    provenance: dict | None = None


@dataclass
class ConvertOptions:
    """Options common to every converter.

    reorient: a DICOM orientation code such as "LPS" (SimpleITK identity direction: array axes
        (z, y, x) along the patient axes) to resample-free reorient images and labels, or None.
    rtol: relative tolerance for image/label spacing, origin and direction agreement.
    use_nnunet_4d_split: write images with nnU-Net's own MSD ``split_4d_nifti`` (3D files are
        copied byte for byte, 4D files split into ``_0000``, ``_0001`` ... channel files).
    """

    dataset_id: int
    name: str
    overwrite: bool = False
    stage_tumours: bool = False
    reorient: str | None = None
    rtol: float = 1e-5
    raw_dir: Path | None = None
    channel_names: dict[str, str] = field(default_factory=lambda: {"0": "CT"})
    use_nnunet_4d_split: bool = False
    progress: bool = True


@dataclass
class ConversionResult:
    folder: Path
    num_training: int
    num_test: int
    labels: dict
    spec: LesionSpec | None
    radii_mm: dict[str, list[float]]


def target_folder(options: ConvertOptions) -> Path:
    """The DatasetXXX_Name folder; refuses an existing one (without ``overwrite``) or an id used by another name."""
    raw = Path(options.raw_dir) if options.raw_dir is not None else nnunet_raw_dir()
    target = raw / dataset_folder_name(options.dataset_id, options.name)
    others = [p for p in existing_dataset_with_id(raw, options.dataset_id) if p.name != target.name]
    if others:
        raise FileExistsError(f"dataset id {options.dataset_id} is already used by {others[0]}; choose another "
                              f"--dataset-id (nnU-Net needs ids to be unique) or delete that folder")
    if target.exists() and not options.overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    return target


def _case_problems(case: SourceCase, scheme: LabelScheme, n_channels: int, allow_4d: bool, rtol: float
                   ) -> list[str]:
    problems: list[str] = []
    infos: list[VolumeInfo] = []
    for img in case.images:
        if not Path(img).exists():
            problems.append(f"{img}: image file missing (case '{case.case_id}')")
            continue
        try:
            infos.append(read_info(Path(img), case.spacing))
        except Exception as e:  # any reader error: name the file, keep validating the others
            problems.append(f"{img}: cannot read image header ({e})")
    if problems:
        return problems
    if len(case.images) == 1 and infos[0].dimension == 4:
        if not allow_4d:
            problems.append(f"{case.images[0]}: 4D image where a 3D volume was expected")
        elif infos[0].size[3] != n_channels:
            problems.append(f"{case.images[0]}: 4D image with {infos[0].size[3]} channels, dataset.json "
                            f"lists {n_channels}")
        infos = [infos[0].spatial()]
    else:
        if len(case.images) != n_channels:
            problems.append(f"case '{case.case_id}': {len(case.images)} image file(s), expected {n_channels} "
                            f"channel(s): {[str(p) for p in case.images]}")
        for img, info in zip(case.images, infos):
            if info.dimension != 3:
                problems.append(f"{img}: {info.dimension}D image, expected a 3D volume")
            if info.components != 1:
                problems.append(f"{img}: {info.components} components per voxel (RGB?), expected grey values")
        for img, info in zip(case.images[1:], infos[1:]):
            problems += geometry_problems(infos[0], info, str(case.images[0]), str(img), rtol=rtol)
    if problems:
        return problems
    for img in case.images:
        # headers can be intact while the voxel data is truncated: decode everything once
        try:
            check_readable(Path(img), case.spacing)
        except Exception as e:
            problems.append(f"{img}: cannot read image voxels ({e})")
    if case.label is None or problems:
        return problems
    lab = Path(case.label)
    if not lab.exists():
        return [f"{lab}: label file missing (case '{case.case_id}', image {case.images[0]})"]
    try:
        linfo = read_info(lab, case.spacing)
    except Exception as e:
        return [f"{lab}: cannot read label header ({e})"]
    if linfo.dimension != 3:
        return [f"{lab}: {linfo.dimension}D label map, expected 3D"]
    problems += geometry_problems(infos[0], linfo, f"image {case.images[0]}", str(lab), rtol=rtol)
    if problems:
        return problems
    try:
        check_readable(lab, case.spacing)
        arr = sitk.GetArrayFromImage(read_volume(lab, case.spacing))
    except Exception as e:
        return [f"{lab}: cannot read label voxels ({e})"]
    return label_value_problems(arr, (case.value_map or scheme.value_map).keys(), str(lab))


def validate_cases(cases: Sequence[SourceCase], scheme: LabelScheme, options: ConvertOptions,
                   extra_problems: Sequence[str] = ()) -> None:
    """Check every case (see module docstring); raise :class:`ConversionError` listing all problems."""
    problems = list(extra_problems)
    if not cases:
        problems.append("no cases found; check the source folder and its layout (see --help)")
    by_id: dict[str, list[str]] = {}
    for c in cases:
        by_id.setdefault(c.case_id, []).append(str(c.images[0]) if c.images else "?")
    problems += duplicate_problems(by_id)
    if not any(c.label is not None for c in cases) and cases:
        problems.append("no case has a label map; nnU-Net needs labelled training cases")
    n_channels = len(options.channel_names)
    for c in tqdm(cases, desc="validating", unit="case", disable=not options.progress, file=sys.stderr):
        problems += _case_problems(c, scheme, n_channels, options.use_nnunet_4d_split, options.rtol)
    if problems:
        raise ConversionError(problems)


def _write_label(arr: np.ndarray, info: VolumeInfo, path: Path) -> None:
    dtype = np.uint8 if arr.max(initial=0) < 256 else np.uint16
    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(info.spacing)
    img.SetOrigin(info.origin)
    img.SetDirection(info.direction)
    sitk.WriteImage(img, str(path), useCompression=True)


def _write_images(case: SourceCase, folder: Path, options: ConvertOptions) -> VolumeInfo:
    """Write the channel files of a case; returns the written header (geometry for its label)."""
    if options.use_nnunet_4d_split:
        # deferred: nnU-Net loads torch (~1.4 s CPU at import); promptlesion_convert --help imports this module
        from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti

        src = Path(case.images[0])
        if len(case.images) != 1 or not src.name.endswith(".nii.gz") or src.name[:-7] != case.case_id:
            raise ValueError(f"{src}: nnU-Net's MSD split needs one .nii.gz file named '{case.case_id}.nii.gz'")
        split_4d_nifti(str(src), str(folder))
        return read_info(folder / f"{case.case_id}_0000{FILE_ENDING}")
    first = None
    for ch, src in enumerate(case.images):
        out = folder / f"{case.case_id}_{ch:04d}{FILE_ENDING}"
        if case.copy_images and not options.reorient and str(src).endswith(FILE_ENDING):
            shutil.copyfile(src, out)
            first = first or read_info(out)
            continue
        img = read_volume(Path(src), case.spacing)
        if options.reorient:
            img = sitk.DICOMOrient(img, options.reorient)
        sitk.WriteImage(img, str(out), useCompression=True)
        if first is None:
            first = read_info(out)
    return first


def _scheme_summary(scheme: LabelScheme) -> list[dict]:
    return [dataclasses.asdict(l) for l in scheme.lesions]


def build_lesion_spec(scheme: LabelScheme, radii: dict[int, list[float]],
                      priors: dict[int, dict] | None = None) -> LesionSpec | None:
    """Lesion spec from the scheme's lesion labels and the equivalent radii (mm) seen per label value.

    ``priors``: per label value, extra :class:`LesionClass` fields (e.g. ``contrast_hu``, ``texture_hu``)."""
    lesions = []
    for l in scheme.lesions:
        if not l.parents:
            warnings.warn(f"lesion '{l.name}' has no parent structure label; it is left out of lesion_spec.json")
            continue
        lesions.append(LesionClass(name=l.name, label=l.value, parents=list(l.parents),
                                   radius_mm=radius_ranges(radii.get(l.value, []), l.stage), shape="mixed",
                                   may_leave_parent=l.may_leave_parent, **(priors or {}).get(l.value, {})))
    return LesionSpec(lesions=lesions) if lesions else None


def convert_dataset(cases: Sequence[SourceCase], scheme: LabelScheme, options: ConvertOptions, *,
                    converter: str, source: str, extra_problems: Sequence[str] = (),
                    dataset_json_extra: dict | None = None,
                    stage_pairs: Sequence[tuple[int, int]] | None = None,
                    lesion_priors: dict[int, dict] | None = None,
                    conversion_extra: dict | None = None) -> ConversionResult:
    """Validate and convert ``cases`` into ``nnUNet_raw/DatasetXXX_Name`` (see module docstring).

    ``stage_pairs`` [(early value, late value)] stages with a scheme that already holds the
    staged labels (merges); otherwise ``options.stage_tumours`` stages via :meth:`LabelScheme.staged`.
    ``lesion_priors``: extra lesion spec fields per written lesion value (see :func:`build_lesion_spec`);
    ``conversion_extra``: extra top-level entries of conversion.json.
    """
    target = target_folder(options)
    validate_cases(cases, scheme, options, extra_problems)
    if stage_pairs is not None:
        out_scheme = scheme
    else:
        out_scheme, stage_pairs = scheme.staged() if options.stage_tumours else (scheme, [])
    luts: dict[int, np.ndarray] = {}
    radii: dict[int, list[float]] = {l.value: [] for l in out_scheme.lesions}
    provenance: dict[str, dict] = {}
    n_tr = n_ts = 0
    with atomic_dir(target, overwrite=options.overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr"):
            (tmp / sub).mkdir()
        log = JsonlLogger(tmp / CONVERSION_LOG_FILENAME)
        log.log(event="start", converter=converter, source=source, target=str(target), staged=options.stage_tumours,
                reorient=options.reorient, n_cases=len(cases))
        for case in tqdm(cases, desc=f"converting {converter}", unit="case", disable=not options.progress,
                         file=sys.stderr):
            labelled = case.label is not None
            img_dir = tmp / ("imagesTr" if labelled and not case.test else "imagesTs")
            img_dir.mkdir(exist_ok=True)
            try:
                info = _write_images(case, img_dir, options)
            except Exception as e:
                raise ConversionError([f"{case.images[0]}: cannot convert image ({e})"]) from e
            provenance[case.case_id] = {"images": [str(p) for p in case.images],
                                        "label": str(case.label) if labelled else None,
                                        **({"split": "test"} if case.test else {}), **(case.provenance or {})}
            if not labelled:
                n_ts += 1
                log.log(event="case", case=case.case_id, split="test")
                continue
            try:
                lab = read_volume(Path(case.label), case.spacing)
                if options.reorient:
                    lab = sitk.DICOMOrient(lab, options.reorient)
                vm = case.value_map or scheme.value_map
                lut = luts.setdefault(id(vm), LabelScheme(vm, {}).lut())
                arr = lut[sitk.GetArrayFromImage(lab).astype(np.int64)]
            except Exception as e:
                raise ConversionError([f"{case.label}: cannot convert label map ({e})"]) from e
            if tuple(arr.shape[::-1]) != tuple(info.size):
                raise ConversionError([f"{case.label}: label grid {arr.shape[::-1]} does not match the written "
                                       f"image {info.size} after reorientation"])
            for early_v, late_v in stage_pairs:
                stage_components(arr, early_v, late_v, info.spacing)
            if case.test:
                (tmp / "labelsTs").mkdir(exist_ok=True)
                _write_label(arr, info, tmp / "labelsTs" / f"{case.case_id}{FILE_ENDING}")
                n_ts += 1
                log.log(event="case", case=case.case_id, split="test", labelled=True)
                continue
            case_radii = {}
            for v in radii:
                r = component_radii_mm(arr, v, info.spacing)
                radii[v] += r
                case_radii[v] = [round(x, 2) for x in r]
            _write_label(arr, info, tmp / "labelsTr" / f"{case.case_id}{FILE_ENDING}")
            n_tr += 1
            log.log(event="case", case=case.case_id, split="train", lesion_radii_mm=case_radii)
        extra = dict(dataset_json_extra or {})
        if out_scheme.regions_class_order is not None:
            extra["regions_class_order"] = list(out_scheme.regions_class_order)
        extra.setdefault("name", options.name)
        extra["converted_by"] = f"promptlesion_convert {converter}"
        ds_json = make_dataset_json(out_scheme.labels, n_tr, channel_names=options.channel_names, **extra)
        spec = build_lesion_spec(out_scheme, radii, lesion_priors)
        write_dataset_metadata(tmp, ds_json, spec)
        write_json_atomic({"converter": converter, "source": source, "dataset": target.name,
                           "stage_tumours": bool(stage_pairs), "reorient": options.reorient,
                           "source_to_written_values": {str(k): int(v) for k, v in scheme.value_map.items()},
                           "lesions": _scheme_summary(out_scheme), **(conversion_extra or {}), "cases": provenance},
                          tmp / CONVERSION_INFO_FILENAME)
        log.log(event="done", num_training=n_tr, num_test=n_ts)
    names = {l.value: l.name for l in out_scheme.lesions}
    return ConversionResult(target, n_tr, n_ts, out_scheme.labels, spec,
                            {names[v]: r for v, r in radii.items()})


def load_json_file(path: Path, what: str) -> dict:
    """Read a JSON file with an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError([f"{path}: {what} not found"])
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError([f"{path}: {what} is not valid JSON ({e})"]) from e


def sanitize_case_part(s: str) -> str:
    """Characters allowed in nnU-Net case names (letters, digits, '-', '_')."""
    return re.sub(r"[^A-Za-z0-9\-_]+", "-", s).strip("-") or "case"


__all__ = ["LesionDef", "LabelScheme", "SourceCase", "ConvertOptions", "ConversionResult", "ConversionError",
           "convert_dataset", "validate_cases", "build_lesion_spec", "target_folder"]
