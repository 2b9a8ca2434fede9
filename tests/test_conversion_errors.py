"""Corrupt or inconsistent inputs: clear errors naming the file, and no output folder left behind."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_releases import fake_ccta, fake_kits, fake_lits, fake_msd, lits_affine  # noqa: E402

from nnunet_promptlesion.cli.convert import main as convert_main  # noqa: E402
from nnunet_promptlesion.dataset_conversion import core  # noqa: E402
from nnunet_promptlesion.dataset_conversion.core import ConversionError, ConvertOptions  # noqa: E402
from nnunet_promptlesion.dataset_conversion.lits import convert_lits  # noqa: E402
from nnunet_promptlesion.dataset_conversion.merge import merge_datasets  # noqa: E402


@pytest.fixture
def raw(tmp_path):
    p = tmp_path / "raw"
    p.mkdir()
    return p


def _nothing_written(raw: Path):
    assert list(raw.iterdir()) == [], [p.name for p in raw.iterdir()]


def _opts(raw, did=600, **kw):
    return ConvertOptions(dataset_id=did, name="T", raw_dir=raw, progress=False, **kw)


def test_corrupt_and_inconsistent_files_are_all_named(tmp_path, raw):
    src = fake_lits(tmp_path / "LiTS", n_cases=5)
    b1, b2 = src / "Training Batch 1", src / "Training Batch 2"
    # 0: truncated file
    (b1 / "volume-0.nii").write_bytes((b1 / "volume-0.nii").read_bytes()[:1000])
    # 1: label on another grid
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), lits_affine()), str(b1 / "segmentation-1.nii"))
    # 2: unexpected label value
    seg = nib.load(str(b2 / "segmentation-2.nii"), mmap=False)
    arr = np.asarray(seg.dataobj).copy()
    arr[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(arr, seg.affine, seg.header), str(b2 / "segmentation-2.nii"))
    # 3: missing segmentation
    (b2 / "segmentation-3.nii").unlink()
    # 4: label with a shifted origin
    seg = nib.load(str(b2 / "segmentation-4.nii"), mmap=False)
    aff = seg.affine.copy()
    aff[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj).copy(), aff), str(b2 / "segmentation-4.nii"))
    with pytest.raises(ConversionError) as ei:
        convert_lits(src, _opts(raw))
    msg = str(ei.value)
    assert "volume-0.nii: cannot read" in msg
    assert "segmentation-1.nii: size (10, 10, 10)" in msg
    assert "segmentation-2.nii: unexpected label value(s) [5]" in msg
    assert "volume-3.nii: no matching segmentation-3.nii" in msg
    assert "segmentation-4.nii: origin" in msg
    assert len(ei.value.problems) == 5
    _nothing_written(raw)


def test_duplicated_case_refused(tmp_path, raw):
    src = fake_lits(tmp_path / "LiTS", n_cases=3)
    dup = src / "Training Batch 2" / "volume-0.nii"
    shutil.copy(src / "Training Batch 1" / "volume-0.nii", dup)
    with pytest.raises(ConversionError, match=r"volume-0 appears more than once: .*Training Batch 1/volume-0.nii"):
        convert_lits(src, _opts(raw))
    _nothing_written(raw)


def test_interrupted_write_leaves_nothing(tmp_path, raw, monkeypatch):
    src = fake_lits(tmp_path / "LiTS", n_cases=3)
    calls = []
    real = core._write_label

    def flaky(arr, info, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle of the second case
        real(arr, info, path)

    monkeypatch.setattr(core, "_write_label", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert_lits(src, _opts(raw))
    _nothing_written(raw)  # no DatasetXXX folder and no hidden temporary folder


def test_existing_dataset_needs_overwrite(tmp_path, raw):
    src = fake_lits(tmp_path / "LiTS", n_cases=2)
    convert_lits(src, _opts(raw))
    target = raw / "Dataset600_T"
    marker = target / "user_file.txt"
    marker.write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_lits(src, _opts(raw))
    assert marker.exists()
    # a failing --overwrite run keeps the old dataset untouched
    (src / "Training Batch 1" / "segmentation-1.nii").unlink()
    with pytest.raises(ConversionError):
        convert_lits(src, _opts(raw, overwrite=True))
    assert marker.exists()
    fake_lits(tmp_path / "LiTS", n_cases=2)
    res = convert_lits(src, _opts(raw, overwrite=True))
    assert res.num_training == 2 and not marker.exists()
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset600_T"]
    with pytest.raises(FileExistsError, match="already used by"):
        convert_lits(src, ConvertOptions(dataset_id=600, name="Other", raw_dir=raw, progress=False))


def test_kits_missing_segmentation_and_wrong_version(tmp_path, raw):
    base = fake_kits(tmp_path / "kits23", "kits23", n_cases=2)
    (base / "case_00001" / "segmentation.nii.gz").unlink()
    rc = convert_main(["kits", str(base), "--version", "kits23", "-d", "601", "--raw-dir", str(raw), "--no-progress"])
    assert rc == 1
    _nothing_written(raw)
    fake_kits(tmp_path / "kits23", "kits23", n_cases=2)
    # KiTS23 has cysts (3): converting it as KiTS19 must fail on the label values
    with pytest.raises(ConversionError, match=r"segmentation.nii.gz: unexpected label value\(s\) \[3\]"):
        from nnunet_promptlesion.dataset_conversion.kits import convert_kits

        convert_kits(base, "kits19", _opts(raw))
    _nothing_written(raw)


def test_cli_error_message_names_file(tmp_path, raw, capsys):
    task = fake_msd(tmp_path, "Task07_Pancreas", "pancreas", n_cases=2)
    (task / "labelsTr" / "pancreas_1.nii.gz").write_bytes(b"not a nifti")
    img = task / "imagesTr" / "pancreas_0.nii.gz"
    img.write_bytes(img.read_bytes()[:-200])  # truncated gzip stream: header intact, voxels cut
    rc = convert_main(["msd", str(task), "-d", "602", "--raw-dir", str(raw), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "pancreas_1.nii.gz: cannot read label header" in err and "nothing was written" in err
    assert "imagesTr/pancreas_0.nii.gz: cannot read image voxels" in err
    _nothing_written(raw)


def test_msd_unlisted_image_and_4d_channel_mismatch(tmp_path, raw):
    task = fake_msd(tmp_path, "Task98_Two", "liver", n_cases=2, n_test=0, channels=("CT", "CT2"))
    shutil.copy(task / "imagesTr" / "liver_0.nii.gz", task / "imagesTr" / "liver_77.nii.gz")
    ds = json.loads((task / "dataset.json").read_text())
    ds["modality"] = {"0": "CT", "1": "CT2", "2": "CT3"}
    (task / "dataset.json").write_text(json.dumps(ds))
    from nnunet_promptlesion.dataset_conversion.msd import convert_msd

    with pytest.raises(ConversionError) as ei:
        convert_msd(task, _opts(raw))
    msg = str(ei.value)
    assert "liver_77.nii.gz: in imagesTr but not listed" in msg
    assert "liver_0.nii.gz: 4D image with 2 channels, dataset.json lists 3" in msg
    _nothing_written(raw)


def test_ccta_bad_mapping_and_missing_spacing(tmp_path, raw):
    images, labels = fake_ccta(tmp_path / "ccta")
    base = ["ccta", "--images", str(images), "--labels", str(labels), "-d", "603", "--raw-dir", str(raw),
            "--no-progress"]
    # without --spacing the TIFF cases cannot be converted; without value 7 mapped, case 1 is refused
    with pytest.raises(ConversionError) as ei:
        from nnunet_promptlesion.dataset_conversion.ccta import LabelMapping, convert_folder

        convert_folder(images, labels, LabelMapping.from_cli(["wall=1", "calcified_plaque=2",
                                                              "noncalcified_plaque=3"]), _opts(raw, 603))
    msg = str(ei.value)
    assert "patient2.tif: cannot read image header (TIFF files and slice folders carry no reliable voxel spacing" in msg
    assert "patient1.nii.gz: unexpected label value(s) [7]" in msg
    assert convert_main(base + ["--label", "wall=1", "--label", "plaque=1"]) == 1  # value mapped twice
    assert convert_main(base + ["--label", "wall"]) == 1
    (images / "patient9.nii.gz").write_bytes((images / "patient1.nii.gz").read_bytes())
    with pytest.raises(ConversionError, match="patient9.nii.gz: image without a label map"):
        convert_folder(images, labels, LabelMapping.from_cli(["wall=1"], ignore=[2, 3, 7]), _opts(raw, 603),
                       spacing=(0.4, 0.4, 0.5))
    _nothing_written(raw)


def test_merge_refuses_region_datasets_and_missing_inputs(tmp_path, raw):
    base = fake_kits(tmp_path / "kits23", "kits23", n_cases=2)
    from nnunet_promptlesion.dataset_conversion.kits import convert_kits

    convert_kits(base, "kits23", _opts(raw, 610), region_labels=True)
    convert_lits(fake_lits(tmp_path / "LiTS", n_cases=2), _opts(raw, 611))
    before = sorted(p.name for p in raw.iterdir())
    with pytest.raises(ConversionError, match="region-based labels cannot be merged"):
        merge_datasets([610, 611], _opts(raw, 612))
    with pytest.raises(ConversionError, match="input dataset '699' not found"):
        merge_datasets([611, 699], _opts(raw, 612))
    assert sorted(p.name for p in raw.iterdir()) == before
