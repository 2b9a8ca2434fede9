"""Patch sources and the two VQGAN commands on a real nnU-Net preprocessed dataset (CPU, small)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from nnunet_promptlesion.dataset_conversion.raw_writer import make_dataset_json, save_nifti
from nnunet_promptlesion.generator.data import NiftiPatchSource, PreprocessedPatchSource
from nnunet_promptlesion.generator.vqgan import load_vqgan
from nnunet_promptlesion.utils.checkpoint import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
from test_vqgan_helpers import synthetic_ct, write_nifti_dataset  # noqa: E402

BIN = Path(sys.executable).parent


def test_nifti_source_resamples_and_oversamples_labels(tmp_path):
    img, lab = write_nifti_dataset(tmp_path, 2, shape=(30, 30, 15), spacing=(1.0, 1.0, 2.0))
    src = NiftiPatchSource(img, (1.0, 1.0, 1.0), hu_window=(-175, 250), label_folder=lab)
    case = src.load_case(src.case_ids[0])
    assert case.image.shape == (1, 30, 30, 30) and case.seg.shape == (1, 30, 30, 30)
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = src.random_patch(rng, (16, 16, 16), {2: 1.0}, oversample_rate=1.0)
        assert p.image.shape == (1, 16, 16, 16) and p.image.dtype == np.float32
        assert -1 <= p.image.min() and p.image.max() <= 1
        assert (p.seg == 2).any(), "oversampled patches must contain the lesion label"
    # a patch larger than the image is padded with -1 (image) and -1 (seg, outside)
    big = src.patch_around(src.case_ids[0], (15, 15, 15), (40, 40, 40))
    assert big.image[0, 0, 0, 0] == -1 and big.seg[0, 0, 0, 0] == -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .nii.gz"):
        NiftiPatchSource(tmp_path / "empty", (1, 1, 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NiftiPatchSource(tmp_path / "missing", (1, 1, 1))


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "OMP_NUM_THREADS": "1"}
    env.pop("nnUNet_n_proc_DA", None)  # 0 breaks planning (torch.set_num_threads(0)); only training uses it
    ds = root / "raw" / "Dataset911_VQTest"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    for i in range(5):
        hu, lab = synthetic_ct((32, 32, 24), seed=i)  # not cubic: axis order matters
        save_nifti(hu, (1.0, 1.0, 1.0), ds / "imagesTr" / f"vq_{i:03d}_0000.nii.gz")
        save_nifti(lab, (1.0, 1.0, 1.0), ds / "labelsTr" / f"vq_{i:03d}.nii.gz", dtype=np.uint8)
    (ds / "dataset.json").write_text(json.dumps(make_dataset_json({"background": 0, "organ": 1, "lesion": 2}, 5)))
    r = subprocess.run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "911", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root, env, ds


def test_preprocessed_source_uses_only_the_folds_training_cases(preprocessed, monkeypatch):
    root, env, ds = preprocessed
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    src = PreprocessedPatchSource(911, "3d_fullres", fold=0)
    ids = sorted(f"vq_{i:03d}" for i in range(5))
    expected = generate_crossval_split(ids, seed=12345, n_splits=5)[0]  # what nnUNetTrainer.do_split uses
    assert src.case_ids == sorted(expected["train"]) and src.val_ids == sorted(expected["val"])
    assert not set(src.case_ids) & set(src.val_ids)
    rng = np.random.default_rng(0)
    seen = {src.random_patch(rng, (16, 16, 16), None, 0.5).case_id for _ in range(40)}
    assert seen <= set(expected["train"]) and len(seen) == 4
    assert src.intensity.kind == "nnunet_ct" and src.spacing == (1.0, 1.0, 1.0)
    # model-space values equal the raw HU passed through nnU-Net's CT normalisation and our window mapping
    cid = src.case_ids[0]
    # nnU-Net reads NIfTI with SimpleITK: its arrays are in (z, y, x) order, the reverse of nibabel's
    raw = nib.load(str(ds / "imagesTr" / f"{cid}_0000.nii.gz")).get_fdata().astype(np.float32).transpose(2, 1, 0)
    case = src.load_case(cid)
    assert tuple(case.image.shape[1:]) == raw.shape
    p = src.patch_around(cid, (16, 16, 16), (16, 16, 16))
    w = src.intensity  # nnU-Net's fp32 z-scores vs our mapping: a few fp32 roundings of |HU| + |mean|, x2 / window
    np.testing.assert_allclose(p.image[0], w.hu_to_model(raw[8:24, 8:24, 8:24]), rtol=0, atol=8 * np.finfo(np.float32).eps
                               * (1 + 2 * (np.abs(raw).max() + abs(w.mean)) / (w.percentile_99_5 - w.percentile_00_5)))
    # a splits_final.json written by the user is respected
    custom = [{"train": ids[:2], "val": ids[2:]}]
    (Path(env["nnUNet_preprocessed"]) / "Dataset911_VQTest" / "splits_final.json").write_text(json.dumps(custom))
    try:
        assert PreprocessedPatchSource(911, fold=0).case_ids == ids[:2]
    finally:
        (Path(env["nnUNet_preprocessed"]) / "Dataset911_VQTest" / "splits_final.json").unlink()


def test_2d_configuration_gives_in_plane_slices(preprocessed, monkeypatch):
    """A 2-D configuration (here promptlesion_demo's, inheriting 3d_fullres's data) is a 2-D source: in-plane
    spacing, (y, x) patches from slices of the same preprocessed arrays; a 3-entry patch stays 3-D."""
    root, env, ds = preprocessed
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    from nnunet_promptlesion.cli.demo import add_demo_configuration_2d

    add_demo_configuration_2d(Path(env["nnUNet_preprocessed"]) / "Dataset911_VQTest" / "nnUNetPlans.json", name="2d_x")
    src = PreprocessedPatchSource(911, "2d_x", fold=0)
    src3 = PreprocessedPatchSource(911, "3d_fullres", fold=0)
    assert src.spatial_dims == 2 and src.spacing == src3.spacing[1:] and src.case_ids == src3.case_ids
    p = src.patch_around(src.case_ids[0], (5, 16, 16), (16, 16))
    assert p.image.shape == (1, 16, 16) and p.start == (5, 8, 8)
    assert np.array_equal(p.image, src3.patch_around(src.case_ids[0], (5, 16, 16), (1, 16, 16)).image[:, 0])


def test_train_and_reconstruct_commands(preprocessed, tmp_path, monkeypatch, capsys):
    root, env, ds = preprocessed
    cmd = [str(BIN / "promptlesion_train_vqgan"), "-d", "911", "-c", "3d_fullres", "-f", "0", "--preset", "tiny",
           "--patch-size", "16", "16", "16", "--steps", "2", "--batch-size", "1", "--disc-start", "1",
           "--checkpoint-every", "1", "--eval-every", "2", "--num-eval-patches", "1", "--num-threads", "1", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = Path(env["nnUNet_results"]) / "Dataset911_VQTest" / "promptlesion_vqgan__tiny__3d_fullres__fold0"
    monkeypatch.setenv("nnUNet_preprocessed", env["nnUNet_preprocessed"])
    src = PreprocessedPatchSource(911, fold=0)
    model, meta = load_vqgan(out / "checkpoint_final.pt", expect_preset="tiny", expect_intensity=src.intensity,
                             expect_spacing=src.spacing)
    assert meta["step"] == 2 and meta["source"]["train"]["fold"] == "0"
    assert meta["source"]["eval"]["subset"] == "val" and meta["source"]["eval_is_held_out"]
    assert meta["intensity"]["kind"] == "nnunet_ct"
    assert (out / "recon_step00000002.png").is_file() and (out / "train.log").is_file()
    # the console scripts' main() in-process from here on (the entry point itself ran above)
    from nnunet_promptlesion.cli import reconstruct as rec_cli
    from nnunet_promptlesion.cli import train_vqgan as train_cli

    for k in ("nnUNet_raw", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    # a second invocation resumes (nothing left to do at step 2 of 2) instead of starting over
    assert train_cli.main(cmd[1:]) == 0
    assert "resumed from" in (out / "train.log").read_text()
    # a HU-window run in the same folder is refused with a clear message
    rc = train_cli.main(["--nifti-folder", str(ds / "imagesTr"), "-o", str(out), "--preset", "tiny", "--steps", "3",
                         "--num-threads", "1", "--no-progress"])
    assert rc == 2 and "intensity space" in capsys.readouterr().err
    # reconstruct a raw CT with the nnU-Net-normalised checkpoint
    rec = tmp_path / "rec.nii.gz"
    assert rec_cli.main(["-i", str(ds / "imagesTr" / "vq_000_0000.nii.gz"), "-m", str(out / "checkpoint_final.pt"),
                         "-o", str(rec), "--num-threads", "1"]) == 0
    rep = json.loads((tmp_path / "rec.json").read_text())
    assert np.isfinite(rep["psnr_db"]) and -1 <= rep["ssim"] <= 1 and rep["checkpoint_id"] == meta["checkpoint_id"]
    assert nib.load(str(rec)).shape == (32, 32, 24)
    assert rec_cli.model_axis_permutation(meta) == [2, 1, 0]  # nibabel (x, y, z) -> nnU-Net (z, y, x)
    with pytest.raises(CheckpointError):
        load_vqgan(out / "checkpoint_final.pt", expect_preset="paper")
