"""Each source: fake official release -> promptlesion_convert -> nnU-Net's integrity check and planning.

One module-scoped fixture converts every fake release (KiTS19/21/23, LiTS, MSD liver, pancreas and
a 4D two-channel task, CCTA with NIfTI/TIFF/slice-folder cases, and a staged multi-organ merge)
and runs a single ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` over all of them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from fake_releases import (CCTA_SPACING_XYZ, KITS_LESIONS, LITS_LESIONS, fake_ccta, fake_kits, fake_lits,  # noqa: E402
                           fake_msd)

from nnunet_promptlesion.cli.convert import main as convert_main  # noqa: E402
from nnunet_promptlesion.lesions.spec import LesionSpec  # noqa: E402

IDS = {"kits19": 801, "kits21": 802, "kits23": 803, "lits": 804, "liver": 805, "pancreas": 806, "twochannel": 807,
       "ccta": 808, "merge": 809}


# nnU-Net's own plan_and_preprocess entry point (integrity check, fingerprint, planning,
# preprocessing), with two speed-ups that change no check: worker pools fork instead of spawn
# (each spawn re-imports torch, three pools per dataset), and the fingerprint samples 1e5 instead
# of 1e8 foreground intensities per dataset (~7 s CPU per dataset otherwise, whatever its size).
# PROMPTLESION_TEST_UNPATCHED_NNUNET=1 runs the plain nnUNetv2_plan_and_preprocess command instead.
FAST_PLAN_AND_PREPROCESS = """
import multiprocessing, sys
_get_context = multiprocessing.get_context
multiprocessing.get_context = lambda method=None: _get_context("fork")
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
_init = DatasetFingerprintExtractor.__init__
def _fast_init(self, *a, **k):
    _init(self, *a, **k)
    self.num_foreground_voxels_for_intensitystats = 1e5
DatasetFingerprintExtractor.__init__ = _fast_init
from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import plan_and_preprocess_entry
sys.argv = ["nnUNetv2_plan_and_preprocess"] + sys.argv[1:]
plan_and_preprocess_entry()
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    src, raw, pre, res = root / "src", root / "raw", root / "pre", root / "res"
    for p in (raw, pre, res):
        p.mkdir()
    common = ["--raw-dir", str(raw), "--no-progress"]
    s = {
        "kits19": fake_kits(src / "kits19", "kits19", unlabelled=1),
        "kits21": fake_kits(src / "kits21", "kits21"),
        "kits23": fake_kits(src / "kits23", "kits23"),
        "lits": fake_lits(src / "LiTS", with_test=True),
        "liver": fake_msd(src, "Task03_Liver", "liver"),
        "pancreas": fake_msd(src, "Task07_Pancreas", "pancreas"),
        "twochannel": fake_msd(src, "Task98_TwoChannel", "liver", channels=("CT", "CT2")),
    }
    ccta_images, ccta_labels = fake_ccta(src / "ccta")
    mapping = src / "ccta_mapping.json"
    mapping.write_text(json.dumps({"labels": {"wall": [1], "calcified_plaque": [2], "noncalcified_plaque": [3]},
                                   "lesions": {"calcified_plaque": ["wall"], "noncalcified_plaque": ["wall"]},
                                   "ignore": [7]}))
    cmds = {
        "kits19": ["kits", str(src / "kits19"), "--version", "kits19", "--unlabelled-to-test"],
        "kits21": ["kits", str(src / "kits21"), "--version", "kits21"],
        "kits23": ["kits", str(s["kits23"]), "--version", "kits23", "--region-labels", "--stage-tumours"],
        "lits": ["lits", str(s["lits"]), "--stage-tumours", "--include-test"],
        "liver": ["msd", str(s["liver"])],
        "pancreas": ["msd", str(s["pancreas"])],
        "twochannel": ["msd", str(s["twochannel"])],
        "ccta": ["ccta", "--images", str(ccta_images), "--labels", str(ccta_labels), "--label-map", str(mapping),
                 "--spacing", *map(str, CCTA_SPACING_XYZ)],
        "merge": ["merge", "--inputs", str(IDS["lits"]), str(IDS["kits21"]), str(IDS["pancreas"]), "--stage-tumours",
                  "--name", "AbdomenTumours"],
    }
    folders = {}
    for key, cmd in cmds.items():
        assert convert_main(cmd + ["--dataset-id", str(IDS[key])] + common) == 0, key
        folders[key] = next(raw.glob(f"Dataset{IDS[key]:03d}_*"))
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre), nnUNet_results=str(res))
    args = ["-d", *map(str, IDS.values()), "-c", "3d_fullres", "--verify_dataset_integrity", "-np", "1", "-npfp", "1"]
    if os.environ.get("PROMPTLESION_TEST_UNPATCHED_NNUNET") == "1":
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), *args]
    else:
        cmd = [sys.executable, "-c", FAST_PLAN_AND_PREPROCESS, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return {"src": s, "raw": raw, "pre": pre, "folders": folders, "proc": proc, "ccta": (ccta_images, ccta_labels)}


def _ds(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())


def _same_world_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when the voxel centres of ``a`` and ``b`` are the same set of physical points."""
    if sorted(a.GetSize()) != sorted(b.GetSize()):
        return False
    corners = [tuple(c * (s - 1) for c, s in zip(bits, a.GetSize())) for bits in np.ndindex(2, 2, 2)]
    for idx in corners:
        ci = np.array(b.TransformPhysicalPointToContinuousIndex(a.TransformIndexToPhysicalPoint(idx)))
        if not np.allclose(ci, np.round(ci), atol=1e-3) or (ci < -1e-3).any() or \
                (ci > np.array(b.GetSize()) - 1 + 1e-3).any():
            return False
    return True


def _on_grid(img: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """``img`` sampled at the voxel centres of ``ref`` (nearest neighbour; exact for permuted grids)."""
    return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -12345,
                                                img.GetPixelID()))


def test_nnunet_verify_and_plan_pass_for_every_source(converted):
    proc = converted["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key, did in IDS.items():
        pre = next(converted["pre"].glob(f"Dataset{did:03d}_*"))
        assert (pre / "nnUNetPlans.json").is_file(), key
        assert len(list((pre / "nnUNetPlans_3d_fullres").glob("*.b2nd"))) >= 2 * 3, key


@pytest.mark.parametrize("version", ["kits19", "kits21"])
def test_kits_round_trip_exact(converted, version):
    folder = converted["folders"][version]
    seg_name = "aggregated_MAJ_seg.nii.gz" if version == "kits21" else "segmentation.nii.gz"
    assert _ds(folder)["labels"] == ({"background": 0, "kidney": 1, "kidney_tumor": 2} |
                                     ({"kidney_cyst": 3} if version == "kits21" else {}))
    for i in range(3):
        case = f"{version}_{i:05d}"
        src_img = sitk.ReadImage(str(converted["src"][version] / f"case_{i:05d}" / "imaging.nii.gz"))
        src_lab = sitk.ReadImage(str(converted["src"][version] / f"case_{i:05d}" / seg_name))
        img = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        # reoriented to LPS: identity direction, array axes (z, y, x) with the 3 mm slices first
        assert np.allclose(img.GetDirection(), np.eye(3).ravel())
        assert np.allclose(img.GetSpacing(), (0.8, 0.8, 3.0))
        for a, b in ((img, lab), (src_img, src_lab)):
            assert a.GetSize() == b.GetSize() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
        assert _same_world_grid(src_img, img)
        np.testing.assert_array_equal(_on_grid(img, src_img), sitk.GetArrayFromImage(src_img))
        np.testing.assert_array_equal(_on_grid(lab, src_lab), sitk.GetArrayFromImage(src_lab))
    assert (folder / "imagesTs" / "kits19_00003_0000.nii.gz").is_file() == (version == "kits19")
    spec = LesionSpec.load(folder / "lesion_spec.json")
    tumor = spec.by_name("kidney_tumor")
    assert tumor.label == 2 and tumor.parents == [1] and tumor.may_leave_parent and tumor.shape == "mixed"
    lo, hi = tumor.radius_mm[0][0], tumor.radius_mm[-1][1]
    assert lo == pytest.approx(KITS_LESIONS["small_tumor"], rel=0.1)
    assert hi == pytest.approx(KITS_LESIONS["tumor"], rel=0.1)


def test_kits23_region_labels_staged(converted):
    folder = converted["folders"]["kits23"]
    ds = _ds(folder)
    assert ds["labels"] == {"background": 0, "kidney": [1, 2, 3, 4], "kidney_masses": [2, 3, 4],
                            "kidney_tumor_early": 2, "kidney_tumor_late": 4}
    assert ds["regions_class_order"] == [1, 3, 2, 4]
    spec = LesionSpec.load(folder / "lesion_spec.json")
    assert {l.name: l.label for l in spec.lesions} == {"kidney_tumor_early": 2, "kidney_tumor_late": 4,
                                                         "kidney_cyst": 3}
    assert max(r[1] for r in spec.by_name("kidney_tumor_early").radius_mm) <= 10.0
    assert min(r[0] for r in spec.by_name("kidney_tumor_late").radius_mm) >= 10.0
    # all fake KiTS tumours are early (r <= 5 mm): file values unchanged
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(converted["src"]["kits23"] / "case_00001" / "segmentation.nii.gz")))
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "kits23_00001.nii.gz")))
    assert np.bincount(src.ravel(), minlength=5).tolist() == np.bincount(out.ravel(), minlength=5).tolist()


def test_lits_round_trip_and_staging(converted):
    folder = converted["folders"]["lits"]
    assert _ds(folder)["labels"] == {"background": 0, "liver": 1, "liver_tumor_early": 2, "liver_tumor_late": 3}
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"lits_{i:04d}.nii.gz" for i in range(3)]
    assert (folder / "imagesTs" / "litstest_0000_0000.nii.gz").is_file()
    for i in range(3):
        batch = "Training Batch 1" if i < 2 else "Training Batch 2"
        src_img = sitk.ReadImage(str(converted["src"]["lits"] / batch / f"volume-{i}.nii"))
        src_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(converted["src"]["lits"] / batch / f"segmentation-{i}.nii")))
        img = sitk.ReadImage(str(folder / "imagesTr" / f"lits_{i:04d}_0000.nii.gz"))
        lab_img = sitk.ReadImage(str(folder / "labelsTr" / f"lits_{i:04d}.nii.gz"))
        for a in (img, lab_img):
            assert a.GetSpacing() == src_img.GetSpacing() and a.GetOrigin() == src_img.GetOrigin()
            assert a.GetDirection() == src_img.GetDirection()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(src_img))
        lab = sitk.GetArrayFromImage(lab_img)
        np.testing.assert_array_equal(lab == 1, src_lab == 1)
        np.testing.assert_array_equal(lab >= 2, src_lab == 2)
        # fake_lits: the late (12.5 mm) sphere is centred at x=22, y=22, the early (6 mm) one at x=50, y=48
        z = lab.shape[0] // 2
        assert lab[z, 22, 22] == 3 and lab[z, 48, 50] == 2
    spec = LesionSpec.load(folder / "lesion_spec.json")
    early, late = spec.by_name("liver_tumor_early"), spec.by_name("liver_tumor_late")
    assert (early.label, late.label, early.parents, late.parents) == (2, 3, [1], [1])
    assert early.radius_mm[0][0] == pytest.approx(LITS_LESIONS["early"], rel=0.05)
    assert late.radius_mm[0][0] == pytest.approx(LITS_LESIONS["late"], rel=0.05)


@pytest.mark.parametrize("key,organ,prefix", [("liver", "liver", "liver"), ("pancreas", "pancreas", "pancreas")])
def test_msd_round_trip_hidden_files_and_names(converted, key, organ, prefix):
    folder = converted["folders"][key]
    ds = _ds(folder)
    assert ds["labels"] == {"background": 0, organ: 1, f"{organ}_tumor": 2}
    assert ds["channel_names"] == {"0": "CT"} and ds["numTraining"] == 3
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{prefix}_{i}.nii.gz" for i in range(3)]
    assert not any(p.name.startswith(".") for p in folder.rglob("*"))
    assert (folder / "imagesTs" / f"{prefix}_3_0000.nii.gz").is_file()
    src = converted["src"][key]
    for i in range(3):
        # 3D MSD images are copied byte for byte by nnU-Net's split_4d_nifti
        assert (folder / "imagesTr" / f"{prefix}_{i}_0000.nii.gz").read_bytes() == \
            (src / "imagesTr" / f"{prefix}_{i}.nii.gz").read_bytes()
        a = sitk.ReadImage(str(src / "labelsTr" / f"{prefix}_{i}.nii.gz"))
        b = sitk.ReadImage(str(folder / "labelsTr" / f"{prefix}_{i}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    spec = LesionSpec.load(folder / "lesion_spec.json")
    assert [(l.name, l.label, l.parents) for l in spec.lesions] == [(f"{organ}_tumor", 2, [1])]


def test_msd_4d_split_into_channels(converted):
    folder = converted["folders"]["twochannel"]
    assert _ds(folder)["channel_names"] == {"0": "CT", "1": "CT2"}
    src4d = sitk.GetArrayFromImage(sitk.ReadImage(str(converted["src"]["twochannel"] / "imagesTr" / "liver_1.nii.gz")))
    for ch in range(2):
        out = sitk.ReadImage(str(folder / "imagesTr" / f"liver_1_{ch:04d}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), src4d[ch])
        assert out.GetDimension() == 3


def test_ccta_tiff_slices_and_mapping(converted):
    folder = converted["folders"]["ccta"]
    ds = _ds(folder)
    assert ds["labels"] == {"background": 0, "wall": 1, "calcified_plaque": 2, "noncalcified_plaque": 3}
    images, labels = converted["ccta"]
    import tifffile

    for case, src_lab in (("ccta_patient2", tifffile.imread(labels / "patient2.tif")),
                          ("ccta_patient3", np.stack([tifffile.imread(labels / "patient3" / f"slice{z}.tif")
                                                      for z in range(20)]))):
        lab = sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz"))
        assert np.allclose(lab.GetSpacing(), CCTA_SPACING_XYZ)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), src_lab)
    nifti_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / "patient1.nii.gz")))
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "ccta_patient1.nii.gz")))
    np.testing.assert_array_equal(out, np.where(nifti_lab == 7, 0, nifti_lab))  # ignored marker value 7
    spec = LesionSpec.load(folder / "lesion_spec.json")
    assert [(l.name, l.label, l.parents) for l in spec.lesions] == [("calcified_plaque", 2, [1]),
                                                                      ("noncalcified_plaque", 3, [1])]


def test_merge_label_table_spec_and_provenance(converted):
    folder = converted["folders"]["merge"]
    ds = _ds(folder)
    assert ds["labels"] == {"background": 0, "liver": 1, "liver_tumor_early": 2, "liver_tumor_late": 3,
                            "kidney": 4, "kidney_tumor_early": 5, "kidney_tumor_late": 6, "kidney_cyst": 7,
                            "pancreas": 8, "pancreas_tumor_early": 9, "pancreas_tumor_late": 10}
    spec = LesionSpec.load(folder / "lesion_spec.json")
    assert [(l.name, l.label, l.parents, l.may_leave_parent) for l in spec.lesions] == [
        ("liver_tumor_early", 2, [1], False), ("liver_tumor_late", 3, [1], False),
        ("kidney_tumor_early", 5, [4], True), ("kidney_tumor_late", 6, [4], True), ("kidney_cyst", 7, [4], True),
        ("pancreas_tumor_early", 9, [8], False), ("pancreas_tumor_late", 10, [8], False)]
    cases = sorted(p.name[:-7] for p in (folder / "labelsTr").iterdir())
    assert cases == sorted([f"lits_{i:04d}" for i in range(3)] + [f"kits21_{i:05d}" for i in range(3)] +
                           [f"pancreas_{i}" for i in range(3)])
    info = json.loads((folder / "conversion.json").read_text())
    assert info["cases"]["kits21_00001"]["label"].endswith("Dataset802_KiTS21/labelsTr/kits21_00001.nii.gz")
    # values per source: kidney 1 -> 4, tumour 2 -> 5 (all early), cyst 3 -> 7; images copied byte for byte
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(converted["folders"]["kits21"] / "labelsTr" / "kits21_00001.nii.gz")))
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "kits21_00001.nii.gz")))
    np.testing.assert_array_equal(out, np.array([0, 4, 5, 7])[src])
    assert (folder / "imagesTr" / "lits_0002_0000.nii.gz").read_bytes() == \
        (converted["folders"]["lits"] / "imagesTr" / "lits_0002_0000.nii.gz").read_bytes()
    lits_out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "lits_0001.nii.gz")))
    lits_src = sitk.GetArrayFromImage(sitk.ReadImage(str(converted["folders"]["lits"] / "labelsTr" / "lits_0001.nii.gz")))
    np.testing.assert_array_equal(lits_out, np.array([0, 1, 2, 3])[lits_src])
