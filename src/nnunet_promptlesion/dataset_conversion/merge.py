"""Merge converted nnU-Net raw datasets (e.g. liver, kidney, pancreas) into one multi-organ dataset.

Labels are matched by *name*: the converters write organ-qualified names (``liver``,
``liver_tumor``, ``kidney``, ``kidney_tumor``, ``kidney_cyst``, ``pancreas``, ``pancreas_tumor``),
so the same structure from two sources (LiTS and MSD Task03 livers) becomes one class and
different organs' tumours stay distinct. Written values are consecutive, in order of first
appearance over the inputs; with staging each tumour X becomes ``X_early`` directly followed by
``X_late``. Example (LiTS + KiTS23 + MSD pancreas, staged)::

    background 0, liver 1, liver_tumor_early 2, liver_tumor_late 3, kidney 4, kidney_tumor_early 5,
    kidney_tumor_late 6, kidney_cyst 7, pancreas 8, pancreas_tumor_early 9, pancreas_tumor_late 10

Each input needs a plain-label dataset.json (nnU-Net region datasets cannot be merged: convert
KiTS without ``--region-labels``) and a lesion_spec.json (which every converter writes). Images
are copied byte for byte; case names are kept (``lits_0003``, ``kits23_00012`` already name their
source) and ``conversion.json`` records the source dataset of every case. A label is
background in every case of the datasets that do not annotate it (a LiTS case has no kidney
label even if a kidney is visible); this is inherent to merging partially labelled datasets.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

from ..lesions.spec import LESION_SPEC_FILENAME, LesionSpec, LesionSpecError
from .core import STAGE_SUFFIXES, ConversionError, ConversionResult, ConvertOptions, LabelScheme, LesionDef, \
    SourceCase, convert_dataset, load_json_file
from .raw_writer import FILE_ENDING, nnunet_raw_dir



@dataclasses.dataclass
class MergeInput:
    """One converted dataset: its folder, dataset.json, lesion spec and case names."""

    folder: Path
    dataset_json: dict
    spec: LesionSpec
    cases: list[str]

    @property
    def labels(self) -> dict[str, int]:
        return self.dataset_json["labels"]

    def name_of(self, value: int) -> str:
        return next(n for n, v in self.labels.items() if v == value)


def resolve_dataset(ref: str | int, raw_dir: Path) -> Path:
    """A dataset folder from a path, a dataset id (``501``) or a name (``Dataset501_LiTS``)."""
    p = Path(str(ref))
    if p.is_dir():
        return p
    if (raw_dir / str(ref)).is_dir():
        return raw_dir / str(ref)
    if str(ref).isdigit():
        hits = sorted(raw_dir.glob(f"Dataset{int(ref):03d}_*")) if raw_dir.is_dir() else []
        hits = [h for h in hits if h.is_dir()]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConversionError([f"dataset id {ref} matches several folders: {hits}"])
    raise ConversionError([f"input dataset '{ref}' not found (as a path, or in nnUNet_raw={raw_dir})"])


def load_merge_input(folder: Path) -> MergeInput:
    problems = []
    ds = load_json_file(folder / "dataset.json", "dataset.json")
    labels = ds.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in labels.values()) or "regions_class_order" in ds:
        raise ConversionError([f"{folder / 'dataset.json'}: region-based labels cannot be merged; convert the "
                               f"source with plain labels (e.g. KiTS without --region-labels)"])
    if ds.get("file_ending") != FILE_ENDING:
        problems.append(f"{folder / 'dataset.json'}: file_ending {ds.get('file_ending')!r}, merge needs {FILE_ENDING}")
    try:
        spec = LesionSpec.load(folder / LESION_SPEC_FILENAME)
        spec.validate_against_dataset(ds, str(folder / "dataset.json"))
    except LesionSpecError as e:
        raise ConversionError([f"{folder}: {e}. Convert the dataset with promptlesion_convert (it writes "
                               f"{LESION_SPEC_FILENAME}) or write one by hand"]) from e
    lab_dir = folder / "labelsTr"
    if not lab_dir.is_dir():
        raise ConversionError([f"{lab_dir}: folder missing"])
    cases = sorted(p.name[: -len(FILE_ENDING)] for p in lab_dir.iterdir()
                   if p.name.endswith(FILE_ENDING) and not p.name.startswith("."))
    if len(cases) != ds.get("numTraining"):
        problems.append(f"{lab_dir}: {len(cases)} label files but dataset.json numTraining = {ds.get('numTraining')}")
    if problems:
        raise ConversionError(problems)
    return MergeInput(folder, ds, spec, cases)


def _stage_of(name: str) -> str | None:
    for suf in STAGE_SUFFIXES:
        if name.endswith(suf):
            return suf[1:]
    return None


def merge_label_scheme(inputs: Sequence[MergeInput], stage_tumours: bool = False
                       ) -> tuple[LabelScheme, list[dict[int, int]], list[tuple[int, int]]]:
    """Merged label table: (scheme with dataset.json labels and lesions, per-input value maps,
    stage pairs [(early, late)] of tumours staged during the merge)."""
    problems: list[str] = []
    labels: dict[str, int] = {"background": 0}
    role: dict[str, tuple] = {}  # name -> ("organ",) or ("lesion", parent names, may_leave_parent, stageable)
    staged_here: dict[str, tuple[str, str]] = {}
    value_maps = []
    for inp in inputs:
        lesion_by_label = {l.label: l for l in inp.spec.lesions}
        vm = {0: 0}
        for name, v in sorted(inp.labels.items(), key=lambda kv: kv[1]):
            v = int(v)
            if v == 0:
                continue
            les = lesion_by_label.get(v)
            if les is not None:
                parents = tuple(sorted(inp.name_of(p) for p in les.parents))
                stageable = "cyst" not in name and _stage_of(name) is None
                r = ("lesion", parents, les.may_leave_parent, stageable)
            else:
                r = ("organ",)
            if name in role and role[name][:2] != r[:2]:
                problems.append(f"label '{name}' of {inp.folder.name} means {r[:2]} but {role[name][:2]} in an "
                                f"earlier input; rename it in one of the datasets")
                continue
            role.setdefault(name, r)
            if stage_tumours and r[0] == "lesion" and r[3]:
                early, late = name + "_early", name + "_late"
                staged_here[name] = (early, late)
                for n in (early, late):
                    labels.setdefault(n, len(labels))
                vm[v] = labels[early]
            else:
                labels.setdefault(name, len(labels))
                vm[v] = labels[name]
        value_maps.append(vm)
    if problems:
        raise ConversionError(problems, header="datasets cannot be merged")
    lesions = []
    for name, r in role.items():
        if r[0] != "lesion":
            continue
        parents = [labels[p] for p in r[1]]
        if name in staged_here:
            early, late = staged_here[name]
            lesions += [LesionDef(early, labels[early], parents, r[2], stageable=False, stage="early"),
                        LesionDef(late, labels[late], parents, r[2], stageable=False, stage="late")]
        else:
            lesions.append(LesionDef(name, labels[name], parents, r[2], stageable=False, stage=_stage_of(name)))
    lesions.sort(key=lambda l: l.value)
    pairs = [(labels[e], labels[l]) for e, l in staged_here.values()]
    return LabelScheme({}, labels, lesions), value_maps, pairs


def merge_datasets(inputs: Sequence[str | int | Path], options: ConvertOptions,
                   prefix_cases: bool = False) -> ConversionResult:
    """Merge converted datasets (ids, names or folders) into ``nnUNet_raw/DatasetXXX_Name``."""
    raw = Path(options.raw_dir) if options.raw_dir is not None else nnunet_raw_dir()
    if len(inputs) < 2:
        raise ConversionError(["merge needs at least two input datasets"])
    folders = [resolve_dataset(i, raw) for i in inputs]
    if len({f.resolve() for f in folders}) != len(folders):
        raise ConversionError([f"an input dataset is listed twice: {[str(f) for f in folders]}"])
    loaded = [load_merge_input(f) for f in folders]
    channels = [m.dataset_json.get("channel_names") for m in loaded]
    problems = [f"{m.folder / 'dataset.json'}: channel_names {c} differ from {channels[0]} of {loaded[0].folder.name}"
                for m, c in zip(loaded[1:], channels[1:]) if c != channels[0]]
    scheme, value_maps, pairs = merge_label_scheme(loaded, options.stage_tumours)
    cases, seen = [], {}
    for m, vm in zip(loaded, value_maps):
        did = m.folder.name.split("_")[0].replace("Dataset", "d")
        for c in m.cases:
            cid = f"{did}_{c}" if prefix_cases else c
            if cid in seen:
                problems.append(f"case '{cid}' is in both {seen[cid]} and {m.folder.name}; pass --prefix-cases")
                continue
            seen[cid] = m.folder.name
            imgs = [m.folder / "imagesTr" / f"{c}_{ch:04d}{FILE_ENDING}" for ch in range(len(channels[0]))]
            cases.append(SourceCase(cid, imgs, m.folder / "labelsTr" / f"{c}{FILE_ENDING}", value_map=vm,
                                    copy_images=True))
    scheme = dataclasses.replace(scheme, value_map={0: 0})
    options = dataclasses.replace(options, channel_names=dict(channels[0]), stage_tumours=bool(pairs),
                                  use_nnunet_4d_split=False, reorient=None)
    extra = {"description": "multi-organ merge of " + ", ".join(f.name for f in folders),
             "merged_from": [{"dataset": f.name, "written_values": {str(k): v for k, v in vm.items()}}
                             for f, vm in zip(folders, value_maps)]}
    return convert_dataset(cases, scheme, options, converter="merge", source=json.dumps([str(f) for f in folders]),
                           extra_problems=problems, dataset_json_extra=extra, stage_pairs=pairs)
