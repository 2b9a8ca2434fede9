"""KiTS19 / KiTS21 / KiTS23 kidney tumour challenge releases -> nnU-Net raw dataset.

Official layouts (one folder per case, five-digit ids)::

    kits19/data/case_00000/imaging.nii.gz, segmentation.nii.gz     labels 1 kidney, 2 tumour
    kits21/kits21/data/case_00000/imaging.nii.gz, aggregated_MAJ_seg.nii.gz
    kits23/dataset/case_00000/imaging.nii.gz, segmentation.nii.gz  labels 1 kidney, 2 tumour, 3 cyst

KiTS19 cases 210-299 (the test set) have no segmentation; they go to imagesTs with
``unlabelled_to_test``, otherwise a missing segmentation is an error.

The KiTS NIfTI files store the voxel axes as (z, y, x) with a permuting affine (the official
repository's quirk). By default images and labels are reoriented without resampling to "LPS"
(SimpleITK identity direction), so the array axes are the same as in other CT datasets (LiTS,
MSD) and merged datasets share one axis convention; world coordinates are unchanged. nnU-Net's own
Dataset220_KiTS2023 converter instead reads with NibabelIOWithReorient.

Written labels: plain (1 kidney, 2 kidney_tumor, 3 kidney_cyst) or nnU-Net regions as in
Dataset220 (kidney = 1|2|3, kidney_masses = 2|3, kidney_tumor = 2, regions_class_order 1, 3, 2);
the file values are the same in both modes.
"""
from __future__ import annotations

import re
from pathlib import Path

from .core import ConversionResult, ConvertOptions, LabelScheme, LesionDef, SourceCase, convert_dataset

KITS_VERSIONS = ("kits19", "kits21", "kits23")
#: Segmentation file names per release, in order of preference.
SEGMENTATION_NAMES = {
    "kits19": ("segmentation.nii.gz",),
    "kits21": ("aggregated_MAJ_seg.nii.gz", "segmentation.nii.gz"),
    "kits23": ("segmentation.nii.gz",),
}
DEFAULT_NAMES = {"kits19": "KiTS19", "kits21": "KiTS21", "kits23": "KiTS23"}
_CASE_RE = re.compile(r"case_(\d+)")


def kits_label_scheme(version: str, region_labels: bool = False) -> LabelScheme:
    """Labels of a KiTS release; the kidney tumour (and cyst) may leave the kidney (exophytic)."""
    if version not in KITS_VERSIONS:
        raise ValueError(f"KiTS version must be one of {KITS_VERSIONS}, got '{version}'")
    has_cyst = version != "kits19"
    values = {0: 0, 1: 1, 2: 2} | ({3: 3} if has_cyst else {})
    lesions = [LesionDef("kidney_tumor", 2, [1], may_leave_parent=True, stageable=True)]
    if has_cyst:
        lesions.append(LesionDef("kidney_cyst", 3, [1], may_leave_parent=True, stageable=False))
    if not region_labels:
        labels = {"background": 0, "kidney": 1, "kidney_tumor": 2} | ({"kidney_cyst": 3} if has_cyst else {})
        return LabelScheme(values, labels, lesions)
    if has_cyst:
        labels = {"background": 0, "kidney": [1, 2, 3], "kidney_masses": [2, 3], "kidney_tumor": 2}
        order = [1, 3, 2]
    else:
        labels = {"background": 0, "kidney": [1, 2], "kidney_tumor": 2}
        order = [1, 2]
    return LabelScheme(values, labels, lesions, regions_class_order=order)


def find_case_root(source: Path) -> Path:
    """The folder holding case_XXXXX subfolders: ``source`` itself, or its data/ or dataset/ subfolder."""
    for cand in (source, source / "data", source / "dataset", source / "kits21" / "data"):
        if cand.is_dir() and any(p.is_dir() and _CASE_RE.fullmatch(p.name) for p in cand.iterdir()):
            return cand
    raise FileNotFoundError(f"{source}: no case_XXXXX folders found (looked in {source}, {source / 'data'}, "
                            f"{source / 'dataset'}); point to the KiTS data folder")


def find_kits_cases(source: Path, version: str, unlabelled_to_test: bool = False
                    ) -> tuple[list[SourceCase], list[str]]:
    """Cases of a KiTS release and the layout problems found while listing them."""
    root = find_case_root(Path(source))
    cases, problems = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = _CASE_RE.fullmatch(d.name)
        if not m:
            continue
        image = d / "imaging.nii.gz"
        if not image.is_file():
            problems.append(f"{image}: missing (every case folder needs imaging.nii.gz)")
            continue
        seg = next((d / n for n in SEGMENTATION_NAMES[version] if (d / n).is_file()), None)
        if seg is None and not unlabelled_to_test:
            problems.append(f"{d}: no {' or '.join(SEGMENTATION_NAMES[version])}; pass --unlabelled-to-test "
                            f"to put unlabelled cases (KiTS19 test cases 210-299) into imagesTs")
            continue
        cases.append(SourceCase(f"{version}_{int(m.group(1)):05d}", [image], seg))
    return cases, problems


def convert_kits(source: str | Path, version: str, options: ConvertOptions, region_labels: bool = False,
                 unlabelled_to_test: bool = False) -> ConversionResult:
    """Convert a KiTS release (see module docstring) into ``nnUNet_raw/DatasetXXX_Name``."""
    scheme = kits_label_scheme(version, region_labels)
    cases, problems = find_kits_cases(Path(source), version, unlabelled_to_test)
    extra = {"description": f"{version.upper()} kidney tumour segmentation, converted from {source}",
             "reference": "https://kits-challenge.org", "labelling": "regions" if region_labels else "plain"}
    return convert_dataset(cases, scheme, options, converter=version, source=str(source), extra_problems=problems,
                           dataset_json_extra=extra)
