"""promptlesion_convert nifti: CT + lesion-mask pairs without organ labels, with a derived parent structure.

Tiny synthetic NIfTI pairs check the derivation and every refusal; 3 real sarcoma CTs from ../shared/data/ibsi_sts
(PROMPTLESION_IBSI_STS overrides the path) check that nnU-Net's planning accepts the output."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BIN, REPO, nnunet_env, run
from nnunet_promptlesion.cli.convert import main as convert_main
from nnunet_promptlesion.dataset_conversion.nifti_pairs import (BodyWindowParent, body_mask, convert_nifti_pairs,
                                                                derive_body_window_parent, fill_holes,
                                                                split_test_cases, LesionMapping)
from nnunet_promptlesion.dataset_conversion.core import ConvertOptions
from nnunet_promptlesion.dataset_conversion.validation import ConversionError
from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpec, LesionSpecError

IBSI_STS = Path(os.environ.get("PROMPTLESION_IBSI_STS", REPO.parent / "shared" / "data" / "ibsi_sts"))
SPACING = (1.0, 1.0, 2.5)   # x, y, z (mm)
SHAPE = (10, 40, 44)        # z, y, x


def _write(arr: np.ndarray, path: Path, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def phantom(seed: int = 0):
    """(ct int16, lesion uint8, regions): air around an elliptic body of fat (-100 HU) holding muscle (40 HU), a
    bone (700 HU), a gas pocket (-900 HU) and a lesion (30 HU, value 1); a table (200 HU) apart from the body."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    body = ((y - 18) / 15.0) ** 2 + ((x - 22) / 19.0) ** 2 <= 1
    muscle = body & (((y - 18) / 10.0) ** 2 + ((x - 22) / 13.0) ** 2 <= 1)
    bone = ((y - 18) ** 2 + (x - 15) ** 2) <= 6
    gas = ((y - 18) ** 2 + (x - 38) ** 2) <= 3          # inside the fat, through every slice
    lesion = ((z - 5) / 2.0) ** 2 + ((y - 18) / 4.0) ** 2 + ((x - 25) / 4.0) ** 2 <= 1
    table = (y >= 36) & (y <= 38)
    ct = np.full(SHAPE, -1000.0)
    ct[body] = -100
    ct[muscle] = 40
    ct[bone] = 700
    ct[gas] = -900
    ct[lesion] = 30
    ct[table] = 200
    ct += rng.normal(0, 3, SHAPE)
    return ct.astype(np.int16), lesion.astype(np.uint8), dict(body=body, muscle=muscle, bone=bone, gas=gas,
                                                             lesion=lesion, table=table)


def make_pairs(root: Path, n: int = 4, names=None) -> tuple[Path, Path]:
    names = names or [f"case{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        ct, les, _ = phantom(i)
        _write(ct, root / "images" / f"{name}.nii.gz")
        _write(les, root / "masks" / f"{name}.nii.gz")
    return root / "images", root / "masks"


def _convert(tmp_path, images, masks, *extra, dataset_id=7) -> int:
    return convert_main(["nifti", "--images", str(images), "--masks", str(masks), "--lesion", "tumour=1",
                         "-d", str(dataset_id), "--raw-dir", str(tmp_path / "raw"), "--no-progress", *extra])


def _refused(tmp_path, capsys, images, masks, *extra) -> str:
    assert _convert(tmp_path, images, masks, *extra) == 1
    assert not (tmp_path / "raw").exists() or not list((tmp_path / "raw").iterdir()), "nothing may be written"
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- derivation
def test_body_is_the_largest_component_with_its_holes_filled():
    ct, les, r = phantom()
    body = body_mask(ct, -500.0, les > 0)
    assert body[r["body"]].all(), "the gas pocket (a hole through every slice) is filled slice by slice"
    assert not body[r["table"]].any(), "the table is a separate, smaller component"
    # the gas tube runs through all slices: a 3D fill alone (its ends touch the volume's faces) leaves it open
    tube = r["gas"]
    assert not fill_holes(~tube & r["body"], slicewise=False)[tube].all()
    assert fill_holes(~tube & r["body"], slicewise=True)[tube].all()


def test_body_window_parent_is_muscle_like_tissue_without_the_lesion():
    ct, les, r = phantom()
    parent, _ = derive_body_window_parent(ct, les > 0, SPACING[::-1], BodyWindowParent())
    expect = r["muscle"] & ~r["bone"] & ~r["lesion"]
    assert np.array_equal(parent, expect)      # fat, bone, gas, table, air and the lesion are not parent
    wide, _ = derive_body_window_parent(ct, les > 0, SPACING[::-1], BodyWindowParent(tissue_hu=(-200, 250)))
    assert np.array_equal(wide, r["body"] & ~r["bone"] & ~r["gas"] & ~r["lesion"])   # fat included
    # a speck inside the window far from other tissue is dropped by the component size floor
    ct2 = ct.copy()
    ct2[5, 5, 22] = 40                              # one fat voxel at muscle HU: 2.5 mm^3 < 100 mm^3
    p2, _ = derive_body_window_parent(ct2, les > 0, SPACING[::-1], BodyWindowParent())
    assert not p2[5, 5, 22] and np.array_equal(p2, parent)


def test_split_is_seeded_and_independent_of_order():
    ids = [f"c{i}" for i in range(10)]
    a = split_test_cases(ids, 3, seed=1)
    assert a == split_test_cases(ids[::-1], 3, seed=1) and len(set(a)) == 3
    assert split_test_cases(ids, 0, seed=1) == []


def test_convert_writes_parent_lesion_spec_and_test_split(tmp_path, capsys):
    images, masks = make_pairs(tmp_path, n=5)
    assert _convert(tmp_path, images, masks, "--test-cases", "2", "--split-seed", "3", "--name", "Fake") == 0
    out = capsys.readouterr().out
    assert "parent fraction of the volume" in out and "case00" in out
    ds = tmp_path / "raw" / "Dataset007_Fake"
    dj = json.loads((ds / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "soft_tissue": 1, "tumour": 2}
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3
    conv = json.loads((ds / "conversion.json").read_text())
    test_ids = split_test_cases([f"case{i:02d}" for i in range(5)], 2, 3)
    assert conv["test_split"] == {"n": 2, "seed": 3, "cases": test_ids}
    assert sorted(p.name for p in (ds / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in test_ids]
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in test_ids]
    assert len(list((ds / "imagesTr").iterdir())) == 3 == len(list((ds / "labelsTr").iterdir()))
    assert conv["source_to_written_values"] == {"0": 0, "1": 2}
    assert conv["parent_derivation"] == {"mode": "body-window", "name": "soft_tissue", "air_hu": -500.0,
                                         "tissue_hu": [-30.0, 150.0], "min_component_mm3": 100.0}
    st = conv["cases"]["case00"]
    assert st["label"] == str((masks / "case00.nii.gz").absolute()) and 0 < st["parent_fraction"] < 1
    assert st["lesion_in_window_fraction"] == 1.0
    for sub, cid in (("labelsTr", next(c for c in conv["cases"] if c not in test_ids)), ("labelsTs", test_ids[0])):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / sub / f"{cid}.nii.gz")))
        ct, les, r = phantom(int(cid[-2:]))
        assert np.array_equal(lab == 2, les > 0) and np.array_equal(lab == 1, r["muscle"] & ~r["bone"] & ~r["lesion"])
    spec = LesionSpec.load(ds / "lesion_spec.json")
    (les_cls,) = spec.lesions
    assert les_cls.label == 2 and les_cls.parents == [1]
    lo, hi = les_cls.contrast_hu           # lesion 30 HU in muscle 40 HU
    assert -14 < lo <= hi < -6
    # an ellipsoid of semi-axes 5 (z: 2 slices of 2.5 mm), 4 and 4 mm: equivalent radius (5 * 4 * 4)^(1/3) mm
    assert les_cls.radius_mm[0][0] == pytest.approx((5 * 4 * 4) ** (1 / 3), rel=0.15)


def test_parent_from_organ_masks(tmp_path):
    images, masks = make_pairs(tmp_path, n=2)
    for i in range(2):
        _, _, r = phantom(i)
        org = np.zeros(SHAPE, np.uint8)
        org[r["muscle"]] = 5
        org[r["bone"]] = 9                     # not a parent: becomes background
        _write(org, tmp_path / "organs" / f"case{i:02d}.nii.gz")
    assert _convert(tmp_path, images, masks, "--parent", "masks", "--parent-masks", str(tmp_path / "organs"),
                    "--parent-label", "muscle=5") == 0
    ds = next((tmp_path / "raw").glob("Dataset007_*"))
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {"background": 0, "muscle": 1, "tumour": 2}
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "case00.nii.gz")))
    _, les, r = phantom(0)
    assert np.array_equal(lab == 2, les > 0), "lesion voxels win over parent voxels"
    assert np.array_equal(lab == 1, r["muscle"] & ~r["bone"] & ~r["lesion"]) and set(np.unique(lab)) == {0, 1, 2}
    assert LesionSpec.load(ds / "lesion_spec.json").lesions[0].parents == [1]


def test_image_channel_suffix_and_lesion_parent_syntax():
    assert LesionMapping.parse("liver_tumour=2,3:liver") == LesionMapping("liver_tumour", [2, 3], ["liver"])
    with pytest.raises(ConversionError, match="NAME=VALUE"):
        LesionMapping.parse("sarcoma")


def test_nnunet_channel_suffix_pairs(tmp_path):
    images, masks = make_pairs(tmp_path, n=2)
    for p in images.iterdir():
        p.rename(p.with_name(p.name.replace(".nii.gz", "_0000.nii.gz")))
    res = convert_nifti_pairs(images, masks, [LesionMapping("tumour", [1])],
                              ConvertOptions(dataset_id=8, name="Suffix", raw_dir=tmp_path / "raw", progress=False))
    assert res.num_training == 2 and (res.folder / "imagesTr" / "case00_0000.nii.gz").is_file()


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_a_mask_without_lesion(tmp_path, capsys):
    images, masks = make_pairs(tmp_path, n=3)
    _write(np.zeros(SHAPE, np.uint8), masks / "case01.nii.gz")
    err = _refused(tmp_path, capsys, images, masks)
    assert f"{masks.absolute() / 'case01.nii.gz'}: no lesion voxel" in err and "--allow-healthy" in err
    assert _convert(tmp_path, images, masks, "--allow-healthy") == 0


def test_refuses_a_mask_on_another_grid(tmp_path, capsys):
    images, masks = make_pairs(tmp_path, n=3)
    _, les, _ = phantom(2)
    _write(les, masks / "case02.nii.gz", spacing=(1.0, 1.0, 3.0))
    _write(les[:, :, :40], masks / "case01.nii.gz")
    err = _refused(tmp_path, capsys, images, masks)
    assert "case02.nii.gz: spacing" in err and "case01.nii.gz: size (40, 40, 10)" in err


def test_refuses_an_empty_window_and_a_bad_window(tmp_path, capsys):
    images, masks = make_pairs(tmp_path, n=2)
    err = _refused(tmp_path, capsys, images, masks, "--tissue-hu", "1000", "1200")
    assert f"{images.absolute() / 'case00.nii.gz'}: no parent voxel" in err and "case01.nii.gz: no parent" in err
    err = _refused(tmp_path, capsys, images, masks, "--tissue-hu", "150", "-30")
    assert "--tissue-hu 150 -30" in err


def test_refuses_unknown_values_and_unpaired_files(tmp_path, capsys):
    images, masks = make_pairs(tmp_path, n=3)
    _, les, _ = phantom(0)
    les[0, 0, 0] = 3
    _write(les, masks / "case00.nii.gz")
    (masks / "case02.nii.gz").rename(masks / "orphan.nii.gz")
    err = _refused(tmp_path, capsys, images, masks)
    assert "case00.nii.gz: unexpected label value(s) [3]" in err
    assert "orphan.nii.gz: lesion mask without an image" in err and "case02.nii.gz: image without a lesion mask" in err
    err = _refused(tmp_path, capsys, images, masks, "--test-cases", "3")
    assert "--test-cases 3" in err


def test_refuses_bad_parent_masks(tmp_path, capsys):
    images, masks = make_pairs(tmp_path, n=3)
    org = np.zeros(SHAPE, np.uint8)
    org[2:5, 10:20, 10:20] = 4
    _write(org, tmp_path / "organs" / "case00.nii.gz")                          # no value 5
    _write(org + 1, tmp_path / "organs" / "case01.nii.gz", origin=(5.0, 0, 0))  # another grid
    args = ("--parent", "masks", "--parent-masks", str(tmp_path / "organs"), "--parent-label", "muscle=5")
    err = _refused(tmp_path, capsys, images, masks, *args)
    assert "organs/case00.nii.gz: none of the parent values" in err
    assert "organs/case01.nii.gz: origin" in err and "no parent mask 'case02.nii.gz'" in err
    err = _refused(tmp_path, capsys, images, masks, "--parent", "masks")
    assert "--parent-masks" in err


# ---------------------------------------------------------------------------------------------- lesion spec
def test_spec_naming_background_as_parent_is_refused():
    spec = LesionSpec([LesionClass("sarcoma", 1, parents=[0])])
    with pytest.raises(LesionSpecError, match="background.*promptlesion_convert nifti"):
        spec.validate_against_dataset({"labels": {"background": 0, "sarcoma": 1}})


# ---------------------------------------------------------------------------------------------- real data
def test_real_sarcoma_cases_pass_nnunet_integrity_check(tmp_path):
    """3 real sarcoma CTs -> a dataset nnUNetv2_plan_and_preprocess --verify_dataset_integrity accepts."""
    if not (IBSI_STS / "imagesTr").is_dir():
        pytest.skip(f"real sarcoma data not found at {IBSI_STS} (set PROMPTLESION_IBSI_STS)")
    cases = sorted(p.name for p in (IBSI_STS / "imagesTr").glob("*.nii.gz"))[:3]
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
        for c in cases:
            (tmp_path / sub / c).symlink_to(IBSI_STS / sub / c)
    env = nnunet_env(tmp_path)
    p = run([BIN / "promptlesion_convert", "nifti", "--images", tmp_path / "imagesTr", "--masks", tmp_path / "labelsTr",
             "--lesion", "sarcoma=1", "--test-cases", 1, "-d", 905, "--name", "Sarcoma3", "--no-progress"], env)
    assert "2 training case(s), 1 test case(s)" in p.stdout
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", 905, "-c", "3d_fullres", "--verify_dataset_integrity",
         "-np", 1, "-npfp", 1], env, timeout=1200)
    pre = tmp_path / "preprocessed" / "Dataset905_Sarcoma3"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert len(list((pre / "nnUNetPlans_3d_fullres").glob("*.pkl"))) == 2
    spec = LesionSpec.load(tmp_path / "raw" / "Dataset905_Sarcoma3" / "lesion_spec.json")
    assert spec.lesions[0].parents == [1] and spec.lesions[0].contrast_hu is not None
