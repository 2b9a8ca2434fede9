"""LiTS (Liver Tumor Segmentation challenge, 2017) -> nnU-Net raw dataset.

Official layout: uncompressed NIfTI pairs ``volume-N.nii`` / ``segmentation-N.nii`` (N = 0..130)
split over "Training Batch 1" and "Training Batch 2" folders, test volumes ``test-volume-N.nii``
(N = 0..69). The source folder is searched recursively, so either batch folder or their common
parent can be given. Labels: 0 background, 1 liver, 2 tumour. Cases are named ``lits_NNNN``.
"""
from __future__ import annotations

import re
from pathlib import Path

from .core import ConversionResult, ConvertOptions, LabelScheme, LesionDef, SourceCase, convert_dataset
from .validation import is_hidden

_VOL_RE = re.compile(r"volume-(\d+)\.nii(\.gz)?")
_SEG_RE = re.compile(r"segmentation-(\d+)\.nii(\.gz)?")
_TEST_RE = re.compile(r"test-volume-(\d+)\.nii(\.gz)?")


def lits_label_scheme() -> LabelScheme:
    return LabelScheme({0: 0, 1: 1, 2: 2}, {"background": 0, "liver": 1, "liver_tumor": 2},
                       [LesionDef("liver_tumor", 2, [1], may_leave_parent=False, stageable=True)])


def find_lits_cases(source: Path, include_test: bool = False) -> tuple[list[SourceCase], list[str]]:
    """Training pairs (and with ``include_test`` the unlabelled test volumes) with layout problems."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder; give the folder holding volume-N.nii / segmentation-N.nii")
    vols: dict[int, list[Path]] = {}
    segs: dict[int, list[Path]] = {}
    tests: dict[int, list[Path]] = {}
    for p in sorted(source.rglob("*.nii*")):
        if is_hidden(p) or not p.is_file():
            continue
        for rx, store in ((_TEST_RE, tests), (_VOL_RE, vols), (_SEG_RE, segs)):
            m = rx.fullmatch(p.name)
            if m:
                store.setdefault(int(m.group(1)), []).append(p)
                break
    problems = []
    for store, what in ((vols, "volume"), (segs, "segmentation"), (tests, "test-volume")):
        for n, ps in store.items():
            if len(ps) > 1:
                problems.append(f"{what}-{n} appears more than once: {', '.join(map(str, ps))}")
    for n in sorted(set(vols) - set(segs)):
        problems.append(f"{vols[n][0]}: no matching segmentation-{n}.nii")
    for n in sorted(set(segs) - set(vols)):
        problems.append(f"{segs[n][0]}: no matching volume-{n}.nii")
    cases = [SourceCase(f"lits_{n:04d}", [vols[n][0]], segs[n][0]) for n in sorted(set(vols) & set(segs))]
    if include_test:
        cases += [SourceCase(f"litstest_{n:04d}", [ps[0]], None) for n, ps in sorted(tests.items())]
    return cases, problems


def convert_lits(source: str | Path, options: ConvertOptions, include_test: bool = False) -> ConversionResult:
    """Convert LiTS (see module docstring) into ``nnUNet_raw/DatasetXXX_Name``."""
    cases, problems = find_lits_cases(Path(source), include_test)
    extra = {"description": f"LiTS liver tumour segmentation, converted from {source}",
             "reference": "https://competitions.codalab.org/competitions/17094"}
    return convert_dataset(cases, lits_label_scheme(), options, converter="lits", source=str(source),
                           extra_problems=problems, dataset_json_extra=extra)
