"""Patch sources for the generator trainings (VQGAN and diffusion).

Two sources with one API:

``PreprocessedPatchSource(dataset, configuration="3d_fullres", fold=0, plans="nnUNetPlans", subset="train")``
    nnU-Net preprocessed cases read with nnU-Net's own dataset classes (``infer_dataset_class``: blosc2 or
    numpy). ``subset="train"`` holds only the training cases of ``fold`` exactly as ``nnUNetTrainer.do_split``
    chooses them (``splits_final.json`` when present, else nnU-Net's seeded 5-fold split or its seeded 80:20
    split for a fold beyond the file; ``fold="all"`` uses every case), so the fold's validation cases never
    reach the generator. ``subset="val"`` gives the validation cases (used for held-out metrics only).
    Arrays are in nnU-Net's axis order: the reader's order (nnU-Net reads NIfTI as (z, y, x), the reverse of
    nibabel) permuted by the plans' ``transpose_forward``. Spacing is the configuration's spacing (mm, that
    array axis order); intensities are nnU-Net's CTNormalization
    z-scores, mapped to [-1, 1] by ``IntensitySpace.from_nnunet_plans``.
``NiftiPatchSource(folder, spacing_mm, hu_window=(-175, 250), label_folder=None, cases=None)``
    CT NIfTI files (``*.nii.gz`` / ``*.nii``; ``case_0000.nii.gz`` or ``case.nii.gz``) resampled to
    ``spacing_mm`` (mm, in the NIfTI array axis order; trilinear for CT, nearest for labels), HU window
    mapped to [-1, 1]. Labels are looked up as ``label_folder/case.nii.gz`` (nnU-Net naming).

``ExtraImagesSource(folder, like, cache_folder=None)``
    Unlabelled CT NIfTIs in HU (any size, spacing, orientation) brought into the space of the nnU-Net configuration of
    ``like`` (a :class:`PreprocessedPatchSource`) by that configuration's own nnU-Net preprocessor
    (``DefaultPreprocessor.run_case``: nnU-Net's reader and axis order, transpose, crop to non-zero, CTNormalization
    with the plans' foreground intensity properties, resampling to the configuration's spacing), so its patches are
    those nnU-Net would have made of these scans. No labels (no oversampling); for the VQGAN, which needs none.
    ``cache_folder`` keeps each preprocessed case as ``.npy`` (preprocessing a CT takes seconds).
    :func:`refuse_test_images` refuses scans of the dataset's ``imagesTs`` (held-out test cases).
``CombinedPatchSource(sources)``
    Several sources of one spacing and intensity space behind one API; a case is drawn uniformly over all their
    cases. The first source keeps its case ids, the others' get a ``extraN:`` prefix.

Common API (``PatchSource``):
    ``case_ids``                     list of case identifiers
    ``spacing``                      voxel spacing in mm, array axis order
    ``intensity``                    :class:`~nnunet_promptlesion.generator.intensity.IntensitySpace`
    ``load_case(case_id)``           ``CaseArrays`` with ``image`` (float32, (C, X, Y, Z), native unit: z-score or HU),
                                     ``seg`` (int16, (1, X, Y, Z) or None) and ``class_locations`` (label -> (N, 3) voxel indices)
    ``random_patch(rng, patch_size, oversample_labels=None, oversample_rate=0.0)`` -> :class:`Patch`
        picks a case uniformly; with probability ``oversample_rate`` the patch is centred on a random voxel of a
        label drawn from ``oversample_labels`` (dict label -> relative weight, restricted to labels present in the
        case; ``None`` = every foreground label of the case, equal weights); otherwise the centre is uniform. The patch stays inside the image when the image is large enough.
    ``patch_around(case_id, center_xyz, patch_size)`` -> :class:`Patch` centred at a voxel (no shifting).
    ``describe()``                   JSON-able dict for checkpoint metadata.
    ``spatial_dims``                 3, or 2 for a 2D nnU-Net configuration (``len(spacing)``)

2D configurations (``PreprocessedPatchSource(dataset, "2d", ...)``, e.g. promptlesion_demo's ``2d_demo``): nnU-Net
keeps their preprocessed arrays 3D, (C, Z, Y, X), and trains on (Y, X) slices. Such a source has the in-plane
``spacing`` (2 entries, mm) and takes 2-entry patch sizes: ``random_patch`` and ``patch_around`` cut a (Y, X) patch
from one slice, chosen exactly as the 3D path chooses a patch centre (a labelled voxel when oversampling, else
uniform; ``patch_around``'s centre is a (z, y, x) voxel, so lesion-centred crops lie on a slice through the lesion).
Every method also accepts 2-entry patch sizes on any source (slices along axis 0).

A :class:`Patch` holds ``image`` (float32, (1, X, Y, Z), model space [-1, 1], padded with -1 outside the image;
(1, Y, X) for a 2-entry patch size), ``seg`` (int16, same shape, -1 outside the image, or None), ``case_id`` and
``start`` (voxel index (3 entries) of the patch corner in the case array, the slice index first for a 2D patch;
negative when padded).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.crossval_split import generate_crossval_split
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from ..utils.atomic import atomic_path
from ..utils.geometry import read_nifti_3d
from .intensity import IntensitySpace

MAX_LOCATIONS_PER_LABEL = 10000


@dataclasses.dataclass
class CaseArrays:
    image: np.ndarray                     # (C, X, Y, Z) float32, native unit
    seg: np.ndarray | None                # (1, X, Y, Z) int16
    class_locations: dict[int, np.ndarray]  # label -> (N, 3) int voxel indices


@dataclasses.dataclass
class Patch:
    image: np.ndarray        # (1, X, Y, Z) float32 in [-1, 1]; (1, Y, X) for a 2D patch
    seg: np.ndarray | None   # same shape, int16, -1 = outside the image
    case_id: str
    start: tuple[int, int, int]


def _crop_padded(arr, start: Sequence[int], size: Sequence[int], pad_value) -> np.ndarray:
    """Crop ``arr`` (C, X, Y, Z) at ``start`` with ``size``; parts outside the array get ``pad_value``."""
    shape = arr.shape[1:]
    lo = [max(0, s) for s in start]
    hi = [min(sh, s + n) for s, n, sh in zip(start, size, shape)]
    dtype = np.float32 if isinstance(pad_value, float) else arr.dtype
    out = np.full((arr.shape[0], *size), pad_value, dtype=dtype)
    if all(h > l for l, h in zip(lo, hi)):
        src = np.asarray(arr[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
        o = [l - s for l, s in zip(lo, start)]
        out[:, o[0]:o[0] + src.shape[1], o[1]:o[1] + src.shape[2], o[2]:o[2] + src.shape[3]] = src
    return out


def _as_3d(patch_size: Sequence[int]) -> tuple[list[int], bool]:
    """(3-entry crop size, is_2d): a 2-entry (Y, X) patch is cut as a one-slice (1, Y, X) crop."""
    ps = [int(p) for p in patch_size]
    if len(ps) == 2:
        return [1, *ps], True
    if len(ps) != 3:
        raise ValueError(f"patch size {ps} needs 3 entries (3D) or 2 (a 2D slice patch)")
    return ps, False


class PatchSource:
    case_ids: list[str]
    spacing: tuple[float, ...]  # mm; 3 entries, or 2 (in-plane) for a 2D configuration
    intensity: IntensitySpace

    @property
    def spatial_dims(self) -> int:
        return len(self.spacing)

    def __init__(self, cache_cases: int = 8):
        self._cache: OrderedDict[str, CaseArrays] = OrderedDict()
        self._cache_size = cache_cases

    # subclasses implement _load_case
    def _load_case(self, case_id: str) -> CaseArrays:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.case_ids)

    def load_case(self, case_id: str) -> CaseArrays:
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        c = self._load_case(case_id)
        self._cache[case_id] = c
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return c

    def _make_patch(self, case_id: str, c: CaseArrays, start, patch_size, is_2d: bool = False) -> Patch:
        img = _crop_padded(c.image[:1], start, patch_size, np.nan).astype(np.float32)
        outside = np.isnan(img)
        img = self.intensity.to_model(np.nan_to_num(img, nan=0.0)).astype(np.float32)
        img[outside] = -1.0
        seg = None
        if c.seg is not None:
            seg = _crop_padded(c.seg, start, patch_size, -1).astype(np.int16)
        if is_2d:  # (1, 1, Y, X) one-slice crop -> (1, Y, X)
            img = img[:, 0]
            seg = None if seg is None else seg[:, 0]
        return Patch(image=img, seg=seg, case_id=case_id, start=tuple(int(s) for s in start))

    def patch_around(self, case_id: str, center_xyz: Sequence[int], patch_size: Sequence[int]) -> Patch:
        """Patch centred at voxel ``center_xyz`` (3 entries, array order); a 2-entry ``patch_size`` cuts a (Y, X)
        patch from slice ``center_xyz[0]``."""
        c = self.load_case(case_id)
        patch_size, is_2d = _as_3d(patch_size)
        start = [int(ct) - int(p) // 2 for ct, p in zip(center_xyz, patch_size)]
        return self._make_patch(case_id, c, start, patch_size, is_2d)

    def random_patch(self, rng: np.random.Generator, patch_size: Sequence[int],
                     oversample_labels: dict[int, float] | None = None, oversample_rate: float = 0.0) -> Patch:
        if not self.case_ids:
            raise RuntimeError(f"{type(self).__name__} has no cases to sample from ({self.describe()})")
        case_id = self.case_ids[int(rng.integers(len(self.case_ids)))]
        c = self.load_case(case_id)
        shape = c.image.shape[1:]
        patch_size, is_2d = _as_3d(patch_size)
        center = None
        if oversample_rate > 0 and rng.random() < oversample_rate:
            weights = oversample_labels if oversample_labels is not None else {l: 1.0 for l in c.class_locations}
            present = [(int(l), float(w)) for l, w in weights.items()
                       if w > 0 and int(l) in c.class_locations and len(c.class_locations[int(l)]) > 0]
            if present:
                w = np.array([p[1] for p in present])
                lab = present[int(rng.choice(len(present), p=w / w.sum()))][0]
                locs = c.class_locations[lab]
                center = [int(v) for v in locs[int(rng.integers(len(locs)))]]
        if center is None:
            center = [int(rng.integers(0, s)) for s in shape]
        start = []
        for ct, p, s in zip(center, patch_size, shape):
            st = ct - p // 2
            # keep the patch inside the image when it fits; centre it (padding both sides) when it does not
            st = min(max(st, 0), s - p) if s >= p else (s - p) // 2
            start.append(st)
        return self._make_patch(case_id, c, start, patch_size, is_2d)


# ------------------------------------------------------------------------------------------------
# nnU-Net preprocessed data
# ------------------------------------------------------------------------------------------------
def _env_dir(var: str) -> Path:
    p = os.environ.get(var)
    if not p:
        raise RuntimeError(f"{var} is not set. export {var}=/path/to/{var} (see nnU-Net's setting_up_paths.md)")
    return Path(p)


def resolve_preprocessed_dataset(dataset: str | int) -> Path:
    """``nnUNet_preprocessed/DatasetXXX_Name`` from an id (``4``, ``"004"``) or a full name."""
    base = _env_dir("nnUNet_preprocessed")
    s = str(dataset)
    if re.fullmatch(r"\d+", s):
        hits = sorted(p for p in base.glob(f"Dataset{int(s):03d}_*") if p.is_dir())
        if len(hits) != 1:
            raise FileNotFoundError(
                f"{'no' if not hits else 'several'} preprocessed dataset(s) with id {int(s)} in {base}"
                f"{(': ' + ', '.join(h.name for h in hits)) if hits else ''}. Run nnUNetv2_plan_and_preprocess -d {int(s)} first.")
        return hits[0]
    p = base / s
    if not p.is_dir():
        raise FileNotFoundError(f"{p} does not exist. Run nnUNetv2_plan_and_preprocess for this dataset first.")
    return p


def nnunet_fold_split(preprocessed_dataset_folder: Path, identifiers: Sequence[str], fold: int | str) -> tuple[list[str], list[str]]:
    """Training and validation case ids of ``fold``: the same result as ``nnUNetTrainer.do_split``.

    Unlike the trainer this never writes ``splits_final.json``; nnU-Net creates the identical seeded split.
    """
    if str(fold) == "all":
        ids = sorted(identifiers)
        return ids, ids
    fold = int(fold)
    splits_file = Path(preprocessed_dataset_folder) / "splits_final.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        splits = generate_crossval_split(list(np.sort(list(identifiers))), seed=12345, n_splits=5)
    if fold < len(splits):
        return [str(k) for k in splits[fold]["train"]], [str(k) for k in splits[fold]["val"]]
    rnd = np.random.RandomState(seed=12345 + fold)
    keys = np.sort(list(identifiers))
    idx_tr = rnd.choice(len(keys), int(len(keys) * 0.8), replace=False)
    idx_val = [i for i in range(len(keys)) if i not in idx_tr]
    return [str(keys[i]) for i in idx_tr], [str(keys[i]) for i in idx_val]


def configuration_spatial_dims(dataset: str | int, configuration: str, plans: str = "nnUNetPlans") -> int:
    """2 or 3: the dimensionality of an nnU-Net configuration (the length of its spacing in the plans)."""
    plans_file = resolve_preprocessed_dataset(dataset) / f"{plans}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found; pass the plans identifier used for preprocessing (-p).")
    pm = PlansManager(json.loads(plans_file.read_text()))
    if configuration not in pm.available_configurations:
        raise ValueError(f"configuration '{configuration}' is not in {plans_file} "
                         f"(available: {', '.join(pm.available_configurations)})")
    return len(pm.get_configuration(configuration).spacing)


class PreprocessedPatchSource(PatchSource):
    def __init__(self, dataset: str | int, configuration: str = "3d_fullres", fold: int | str = 0,
                 plans: str = "nnUNetPlans", subset: str = "train", cache_cases: int = 8):
        super().__init__(cache_cases)
        if subset not in ("train", "val"):
            raise ValueError(f"subset must be 'train' or 'val', got '{subset}'")
        self.dataset_folder = resolve_preprocessed_dataset(dataset)
        plans_file = self.dataset_folder / f"{plans}.json"
        if not plans_file.is_file():
            raise FileNotFoundError(f"{plans_file} not found; pass the plans identifier used for preprocessing (-p).")
        self.plans = json.loads(plans_file.read_text())
        pm = PlansManager(self.plans)
        cm = pm.get_configuration(configuration)
        if len(cm.spacing) not in (2, 3):
            raise ValueError(f"configuration '{configuration}' has spacing {list(cm.spacing)}: neither 2-D nor 3-D")
        # A 2-D configuration's preprocessed arrays are 3-D (C, Z, Y, X) like a 3-D one's; its spacing is the
        # in-plane (Y, X) one, and its patches are slices (see the module docstring).
        self.data_folder = self.dataset_folder / cm.data_identifier
        if not self.data_folder.is_dir():
            raise FileNotFoundError(
                f"{self.data_folder} not found: configuration '{configuration}' has not been preprocessed. "
                f"Run nnUNetv2_preprocess -d {self.dataset_folder.name} -c {configuration}.")
        self.configuration = configuration
        self.plans_name = plans
        self.fold = fold
        self.subset = subset
        self.spacing = tuple(float(s) for s in cm.spacing)
        self.intensity = IntensitySpace.from_nnunet_plans(self.plans, configuration)
        self._dataset_class = infer_dataset_class(str(self.data_folder))
        all_ids = self._dataset_class.get_identifiers(str(self.data_folder))
        tr, val = nnunet_fold_split(self.dataset_folder, all_ids, fold)
        self.train_ids, self.val_ids = sorted(tr), sorted(val)
        self.case_ids = self.train_ids if subset == "train" else self.val_ids
        self._ds = self._dataset_class(str(self.data_folder), list(self.case_ids))

    def _load_case(self, case_id: str) -> CaseArrays:
        data, seg, _, props = self._ds.load_case(case_id)
        locs = {}
        for lab, arr in (props.get("class_locations") or {}).items():
            arr = np.asarray(arr)
            if arr.size:
                locs[int(lab)] = arr[:, 1:4].astype(np.int64)  # stored as [c, x, y, z]
        # blosc2/np memmaps: slicing reads only the patch, so keep them lazy
        return CaseArrays(image=data, seg=seg, class_locations=locs)

    def describe(self) -> dict:
        return {"type": "nnunet_preprocessed", "dataset": self.dataset_folder.name, "configuration": self.configuration,
                "plans": self.plans_name, "fold": str(self.fold), "subset": self.subset,
                "num_cases": len(self.case_ids),
                # arrays are in nnU-Net's order: reader order (z, y, x for NIfTI) permuted by transpose_forward
                "axis_order": "nnunet", "transpose_forward": list(self.plans.get("transpose_forward", [0, 1, 2])),
                "image_reader_writer": self.plans.get("image_reader_writer")}


# ------------------------------------------------------------------------------------------------
# NIfTI folder
# ------------------------------------------------------------------------------------------------
def _case_name(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return re.sub(r"_0000$", "", name)


def list_nifti(folder: Path) -> list[Path]:
    return sorted([p for p in Path(folder).iterdir() if p.name.endswith((".nii.gz", ".nii")) and not p.name.startswith(".")])


#: data and generator spacings further apart than this factor on some axis are worth a warning (see below)
SPACING_WARN_FACTOR = 2.0


def spacing_mismatch(data_spacing: Sequence[float], model_spacing: Sequence[float], shape: Sequence[int] | None = None,
                     what: str = "the CT", factor: float = SPACING_WARN_FACTOR) -> str | None:
    """A warning naming both spacings (mm, same axis order) when they differ by more than ``factor`` on some axis,
    else None. A generator works at its own spacing: a CT far coarser than it gets lesions drawn finer than its
    voxels (a few-voxel lesion in the generator becomes one CT voxel); a CT far finer is resampled up to a grid of
    ``shape`` x ratio voxels (minutes of sliding-window inference)."""
    d = np.asarray([float(s) for s in data_spacing])
    m = np.asarray([float(s) for s in model_spacing])
    ratio = d / m
    if not np.any((ratio > factor) | (ratio < 1.0 / factor)):
        return None
    fmt = lambda v: "(" + ", ".join(f"{x:.3g}" for x in v) + ")"  # noqa: E731
    msg = (f"{what} has spacing {fmt(d)} mm, the generator was trained at {fmt(m)} mm (ratio {fmt(ratio)}, more than "
           f"{factor:g}x on some axis)")
    if shape is not None:
        grid = [max(1, int(round(n * r))) for n, r in zip(shape, ratio)]
        msg += f"; resampled to the generator's spacing its {list(shape)} voxels become {grid}"
    return msg + ": results are unreliable; use a generator trained near this spacing (or resample the input)"


def resample_to_spacing(arr: np.ndarray, spacing_in: Sequence[float], spacing_out: Sequence[float], order: int) -> np.ndarray:
    """Resample an (X, Y, Z) array from ``spacing_in`` to ``spacing_out`` (mm); order 1 trilinear, 0 nearest."""
    size = [max(1, int(round(s * si / so))) for s, si, so in zip(arr.shape, spacing_in, spacing_out)]
    if list(size) == list(arr.shape):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    if order == 0:
        out = F.interpolate(t, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


class NiftiPatchSource(PatchSource):
    def __init__(self, folder: str | os.PathLike, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
                 hu_window: Sequence[float] = (-175.0, 250.0), label_folder: str | os.PathLike | None = None,
                 cases: Sequence[str] | None = None, cache_cases: int = 8):
        super().__init__(cache_cases)
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"NIfTI folder {self.folder} does not exist")
        files = list_nifti(self.folder)
        if not files:
            raise FileNotFoundError(f"no .nii.gz / .nii files in {self.folder}")
        self._files = {_case_name(p): p for p in files}
        if cases is not None:
            missing = [c for c in cases if c not in self._files]
            if missing:
                raise ValueError(f"cases {missing} not found in {self.folder}")
            self._files = {c: self._files[c] for c in cases}
        self.case_ids = sorted(self._files)
        self.label_folder = Path(label_folder) if label_folder else None
        if self.label_folder is not None and not self.label_folder.is_dir():
            raise FileNotFoundError(f"label folder {self.label_folder} does not exist")
        if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be three positive numbers (mm), got {spacing_mm}")
        self.spacing = tuple(float(s) for s in spacing_mm)
        self.intensity = IntensitySpace.hu_window(*hu_window)

    def label_path(self, case_id: str) -> Path | None:
        if self.label_folder is None:
            return None
        for name in (f"{case_id}.nii.gz", f"{case_id}.nii", self._files[case_id].name):
            p = self.label_folder / name
            if p.is_file():
                return p
        return None

    def _load_case(self, case_id: str) -> CaseArrays:
        path = self._files[case_id]
        img, arr = read_nifti_3d(path)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        arr = resample_to_spacing(arr, zooms, self.spacing, order=1)
        seg = None
        locs: dict[int, np.ndarray] = {}
        lp = self.label_path(case_id)
        if lp is not None:
            lab = np.asarray(nib.load(str(lp)).dataobj)
            if lab.shape != img.shape[:3]:
                raise ValueError(f"label {lp} has shape {lab.shape} but image {path} has {img.shape[:3]}")
            lab = resample_to_spacing(lab.astype(np.float32), zooms, self.spacing, order=0).astype(np.int16)
            seg = lab[None]
            rng = np.random.default_rng(1234)
            for l in np.unique(lab):
                if l <= 0:
                    continue
                idx = np.argwhere(lab == l)
                if len(idx) > MAX_LOCATIONS_PER_LABEL:
                    idx = idx[rng.choice(len(idx), MAX_LOCATIONS_PER_LABEL, replace=False)]
                locs[int(l)] = idx
        return CaseArrays(image=arr[None], seg=seg, class_locations=locs)

    def describe(self) -> dict:
        return {"type": "nifti_folder", "folder": str(self.folder.resolve()),
                "label_folder": str(self.label_folder.resolve()) if self.label_folder else None,
                "num_cases": len(self.case_ids), "spacing_mm": list(self.spacing)}


# ------------------------------------------------------------------------------------------------
# extra unlabelled CT, brought into a configuration's space by nnU-Net's preprocessor; several sources in one
# ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refuse_test_images(files: Sequence[Path], dataset_name: str) -> None:
    """ValueError when one of ``files`` is a held-out test scan of the dataset: the same case name as a file in
    ``$nnUNet_raw/<dataset_name>/imagesTs`` or the same bytes. A generator that saw a test scan leaks it into the
    nnU-Net trained with its lesions. Without nnUNet_raw or imagesTs there is nothing to compare (the docs warn)."""
    raw = os.environ.get("nnUNet_raw")
    ts = Path(raw) / dataset_name / "imagesTs" if raw else None
    if ts is None or not ts.is_dir():
        return
    tests = list_nifti(ts)
    names = {_case_name(p) for p in tests}
    by_size: dict[int, list[Path]] = {}
    for t in tests:
        by_size.setdefault(t.stat().st_size, []).append(t)
    for f in files:
        if _case_name(f) in names:
            raise ValueError(f"extra image {f} has the name of a test case of {dataset_name} ({ts}); extra CT for the "
                             "VQGAN must not contain the experiment's held-out test cases (rename it if it is another scan)")
        same = by_size.get(f.stat().st_size, [])
        if same:
            digest = _sha256(f)
            hit = next((t for t in same if _sha256(t) == digest), None)
            if hit is not None:
                raise ValueError(f"extra image {f} is the test scan {hit} of {dataset_name}; extra CT for the VQGAN "
                                 "must not contain the experiment's held-out test cases")


class ExtraImagesSource(PatchSource):
    def __init__(self, folder: str | os.PathLike, like: PreprocessedPatchSource,
                 cache_folder: str | os.PathLike | None = None, cache_cases: int = 8, check_test_images: bool = True):
        super().__init__(cache_cases)
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"extra image folder {self.folder} does not exist")
        files = list_nifti(self.folder)
        if not files:
            raise FileNotFoundError(f"no .nii.gz / .nii CT files in {self.folder}")
        self._files = {_case_name(p): p for p in files}
        self.case_ids = sorted(self._files)
        self.spacing, self.intensity = like.spacing, like.intensity
        self.configuration, self.plans_name = like.configuration, like.plans_name
        self.dataset_name = like.dataset_folder.name
        self._pm = PlansManager(like.plans)
        self._cm = self._pm.get_configuration(like.configuration)
        ds_json = like.dataset_folder / "dataset.json"
        self._dataset_json = json.loads(ds_json.read_text()) if ds_json.is_file() else {}
        channels = self._dataset_json.get("channel_names", self._dataset_json.get("modality", {"0": "CT"}))
        if len(channels) != 1:
            raise ValueError(f"{self.dataset_name} has {len(channels)} input channels; extra images need a "
                             "single-channel (CT) dataset")
        self.cache_folder = Path(cache_folder) if cache_folder else None
        if check_test_images:
            refuse_test_images(files, self.dataset_name)

    def _cache_file(self, case_id: str) -> Path | None:
        if self.cache_folder is None:
            return None
        # keyed by the scan's folder, size and mtime: another folder or a replaced file never reads a stale array
        f = self._files[case_id]
        st = f.stat()
        where = hashlib.sha1(str(f.parent.resolve()).encode()).hexdigest()[:10]
        return (self.cache_folder / f"{self.configuration}__{self.plans_name}" / where
                / f"{case_id}__{st.st_size}_{st.st_mtime_ns}.npy")

    def preprocess(self, case_id: str) -> np.ndarray:
        """(C, X, Y, Z) float32 z-scores in nnU-Net's axis order and the configuration's spacing (nnU-Net's
        preprocessor of this configuration, exactly as ``nnUNetv2_preprocess`` runs it on a training case)."""
        pre = self._cm.preprocessor_class(verbose=False)
        data, _, _ = pre.run_case([str(self._files[case_id])], None, self._pm, self._cm, self._dataset_json)
        return np.ascontiguousarray(data, dtype=np.float32)

    def _load_case(self, case_id: str) -> CaseArrays:
        f = self._cache_file(case_id)
        if f is not None and f.is_file():
            return CaseArrays(image=np.load(f, mmap_mode="r"), seg=None, class_locations={})
        data = self.preprocess(case_id)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(f) as tmp, open(tmp, "wb") as fh:
                np.save(fh, data)
        return CaseArrays(image=data, seg=None, class_locations={})

    def describe(self) -> dict:
        return {"type": "extra_images", "folder": str(self.folder.resolve()), "num_cases": len(self.case_ids),
                "like": {"dataset": self.dataset_name, "configuration": self.configuration, "plans": self.plans_name},
                "preprocessor": self._cm.preprocessor_name, "axis_order": "nnunet"}


class CombinedPatchSource(PatchSource):
    def __init__(self, sources: Sequence[PatchSource]):
        super().__init__(cache_cases=0)  # the parts cache their own cases
        if not sources:
            raise ValueError("CombinedPatchSource needs at least one source")
        first = sources[0]
        for s in sources[1:]:
            if tuple(s.spacing) != tuple(first.spacing) or not s.intensity.same_as(first.intensity):
                raise ValueError(f"cannot combine sources of other spaces: {s.describe()} has spacing {s.spacing} mm "
                                 f"and {s.intensity.describe()}, {first.describe()} {first.spacing} mm and "
                                 f"{first.intensity.describe()}")
        self.parts = list(sources)
        self.spacing, self.intensity = first.spacing, first.intensity
        self.dataset_folder = getattr(first, "dataset_folder", None)
        self._owner: dict[str, tuple[PatchSource, str]] = {}
        for i, s in enumerate(self.parts):
            for c in s.case_ids:
                self._owner[c if i == 0 else f"extra{i}:{c}"] = (s, c)
        self.case_ids = list(self._owner)

    def _load_case(self, case_id: str) -> CaseArrays:
        src, c = self._owner[case_id]
        return src.load_case(c)

    def describe(self) -> dict:
        return {"type": "combined", "num_cases": len(self.case_ids), "parts": [s.describe() for s in self.parts]}
