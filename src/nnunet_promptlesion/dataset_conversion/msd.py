"""Medical Segmentation Decathlon tasks (Task03_Liver, Task07_Pancreas, any other) -> nnU-Net raw.

Official layout::

    Task03_Liver/dataset.json            {"modality": {"0": "CT"}, "labels": {"0": "background", ...},
                                          "training": [{"image": "./imagesTr/liver_0.nii.gz",
                                                        "label": "./labelsTr/liver_0.nii.gz"}, ...],
                                          "test": ["./imagesTs/liver_132.nii.gz", ...]}
    Task03_Liver/imagesTr/liver_0.nii.gz   (3D for CT tasks, 4D for multi-modal MR tasks)
    Task03_Liver/labelsTr/liver_0.nii.gz
    Task03_Liver/imagesTs/...

The tarballs also contain macOS resource forks (``._liver_0.nii.gz``); files starting with '.'
or '_' are ignored, as nnU-Net's own converter does. Images are written with nnU-Net's
``split_4d_nifti`` (3D files copied byte for byte, 4D files split into one file per channel);
the label inversion of dataset.json (value: name -> name: value) and modality -> channel_names
follow nnU-Net's ``convert_msd_dataset``. Case names are the MSD file names (``liver_3``).

Which labels are lesions: names containing cancer, tumour/tumor, lesion, nodule, metastasis or
mass; their parents are the task's other foreground labels. Generic lesion names get the organ
prefixed (Task03 "cancer" -> "liver_tumor") so merged datasets stay unambiguous. Override with
``lesions={"tumour": ["liver"]}`` (CLI ``--lesion NAME:PARENT``) when the heuristic is wrong, e.g.
Task08_HepaticVessel, whose tumours lie in the (unlabelled) liver.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from .core import ConversionError, ConversionResult, ConvertOptions, LabelScheme, LesionDef, SourceCase, \
    convert_dataset, load_json_file
from .validation import is_hidden

LESION_NAME_RE = re.compile(r"cancer|tumou?r|lesion|nodule|metasta|mass", re.IGNORECASE)
GENERIC_LESION_NAMES = {"cancer", "tumor", "tumour", "tumors", "tumours", "lesion", "lesions", "mass"}
_TASK_RE = re.compile(r"Task(\d+)_(.+)")


def normalise_name(name: str) -> str:
    """'Colon cancer primaries' -> 'colon_cancer_primaries'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "label"


def msd_label_scheme(msd_labels: dict, lesions: dict[str, list[str]] | None = None, source: str = "dataset.json"
                     ) -> LabelScheme:
    """Label scheme from an MSD ``labels`` dict ({"0": "background", "1": "liver", "2": "cancer"}).

    ``lesions``: optional {lesion name: [parent names]} (names as in dataset.json or normalised)
    replacing the name heuristic.
    """
    try:
        by_value = {int(k): normalise_name(str(v)) for k, v in msd_labels.items()}
    except (TypeError, ValueError) as e:
        raise ConversionError([f"{source}: 'labels' must map integer values to names ({e})"]) from e
    if by_value.get(0) is None or sorted(by_value) != list(range(len(by_value))):
        raise ConversionError([f"{source}: labels {msd_labels} must be 0 (background), 1, 2, ... without gaps"])
    by_value[0] = "background"
    value_of = {n: v for v, n in by_value.items()}
    if len(value_of) != len(by_value):
        raise ConversionError([f"{source}: two labels share a name after normalisation: {by_value}"])
    if lesions is None:
        lesion_names = [n for v, n in by_value.items() if v and LESION_NAME_RE.search(n)]
        organs = [n for v, n in by_value.items() if v and n not in lesion_names]
        lesions = {n: organs for n in lesion_names}
    defs, rename = [], {}
    for les, parents in lesions.items():
        les_n = normalise_name(les)
        if les_n not in value_of:
            raise ConversionError([f"--lesion {les}: no label named '{les}' in {source} (labels: {by_value})"])
        pv = []
        for p in parents:
            if normalise_name(p) not in value_of:
                raise ConversionError([f"--lesion {les}:{p}: no label named '{p}' in {source} (labels: {by_value})"])
            pv.append(value_of[normalise_name(p)])
        if les_n in GENERIC_LESION_NAMES and len(pv) == 1:
            rename[les_n] = f"{by_value[pv[0]]}_tumor"
        defs.append(LesionDef(rename.get(les_n, les_n), value_of[les_n], pv, may_leave_parent=False,
                              stageable="cyst" not in les_n))
    labels = {rename.get(n, n): v for v, n in sorted(by_value.items())}
    return LabelScheme({v: v for v in by_value}, labels, defs)


def find_msd_cases(source: Path, include_test: bool = True) -> tuple[list[SourceCase], list[str], dict]:
    """Cases listed in the task's dataset.json, layout problems, and the parsed dataset.json."""
    source = Path(source)
    ds = load_json_file(source / "dataset.json", "MSD dataset.json")
    problems = []
    for key in ("labels", "modality", "training"):
        if key not in ds:
            problems.append(f"{source / 'dataset.json'}: key '{key}' missing (is this an MSD task folder?)")
    if problems:
        raise ConversionError(problems)
    cases = []
    listed = set()
    for i, entry in enumerate(ds["training"]):
        try:
            img, lab = source / entry["image"], source / entry["label"]
        except (KeyError, TypeError):
            problems.append(f"{source / 'dataset.json'}: training entry #{i} needs 'image' and 'label': {entry}")
            continue
        if img.parent.name != "imagesTr" or not img.name.endswith(".nii.gz"):
            problems.append(f"{source / 'dataset.json'}: training image {entry['image']} is not imagesTr/*.nii.gz")
            continue
        listed.add(img.name)
        cases.append(SourceCase(img.name[:-7], [img], lab))
    if (source / "imagesTr").is_dir():
        for p in sorted((source / "imagesTr").iterdir()):
            if not is_hidden(p) and p.name.endswith(".nii.gz") and p.name not in listed:
                problems.append(f"{p}: in imagesTr but not listed in dataset.json 'training'")
    else:
        problems.append(f"{source / 'imagesTr'}: folder missing")
    if include_test:
        for entry in ds.get("test", []):
            img = source / entry
            if img.name.endswith(".nii.gz"):
                cases.append(SourceCase(img.name[:-7], [img], None))
    return cases, problems, ds


def convert_msd(source: str | Path, options: ConvertOptions, lesions: dict[str, list[str]] | None = None,
                include_test: bool = True) -> ConversionResult:
    """Convert an MSD task folder (see module docstring) into ``nnUNet_raw/DatasetXXX_Name``."""
    source = Path(source)
    cases, problems, ds = find_msd_cases(source, include_test)
    scheme = msd_label_scheme(ds["labels"], lesions, str(source / "dataset.json"))
    channel_names = {str(k): str(v) for k, v in ds["modality"].items()}
    options = dataclasses.replace(options, channel_names=channel_names,
                                  use_nnunet_4d_split=options.reorient is None)
    extra = {k: ds[k] for k in ("description", "reference", "licence", "release", "tensorImageSize") if k in ds}
    extra["description"] = f"{ds.get('description', '')} (MSD {source.name}, converted from {source})".strip()
    return convert_dataset(cases, scheme, options, converter="msd", source=str(source), extra_problems=problems,
                           dataset_json_extra=extra)


def msd_default_name(source: Path) -> tuple[int | None, str]:
    """(task id, name) from an MSD folder name such as 'Task03_Liver'."""
    m = _TASK_RE.fullmatch(Path(source).resolve().name)
    return (int(m.group(1)), m.group(2)) if m else (None, Path(source).name)
