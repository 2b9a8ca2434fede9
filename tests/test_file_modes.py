"""Files and folders the package writes follow the umask like a plain open() / mkdir() (and nnU-Net's own files),
while the writes stay atomic: mkstemp / mkdtemp alone would leave them 0600 / 0700, unreadable to the group on a
shared cluster file system."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_every_writer_gives_the_mode_of_a_plain_open(tmp_path, umask):
    import nibabel as nib
    import torch

    from nnunet_promptlesion.evaluation.evaluate import evaluate_folders, write_outputs
    from nnunet_promptlesion.lesions.spec import LesionClass, LesionSpec
    from nnunet_promptlesion.synthesis.cache import write_manifest
    from nnunet_promptlesion.synthesis.single_ct import save_nifti_atomic
    from nnunet_promptlesion.utils.atomic import (atomic_dir, atomic_path, current_umask, write_json_atomic,
                                                  write_text_atomic)
    from nnunet_promptlesion.utils.checkpoint import save_checkpoint

    assert current_umask() == umask
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    (tmp_path / "plain_dir").mkdir()
    want_file, want_dir = _mode(tmp_path / "plain.txt"), _mode(tmp_path / "plain_dir")
    assert want_file == 0o666 & ~umask and want_dir == 0o777 & ~umask

    out = tmp_path / "out"
    write_json_atomic({"a": 1}, out / "a.json")
    write_text_atomic("text", out / "b.txt")
    with atomic_path(out / "c.bin") as tmp:
        tmp.write_bytes(b"\0")
    save_checkpoint({"meta": {"kind": "x"}, "w": torch.zeros(2)}, out / "model.pt")
    LesionSpec([LesionClass("a", 2, [1])]).save(out / "lesion_spec.json")
    write_manifest(out, {"format": "x"})
    save_nifti_atomic(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), out / "ct.nii.gz")
    with atomic_dir(out / "dataset") as d:
        (d / "imagesTr").mkdir()
        write_json_atomic({}, d / "dataset.json")
    files = [out / n for n in ("a.json", "b.txt", "c.bin", "model.pt", "lesion_spec.json", "manifest.json",
                               "ct.nii.gz")] + [out / "dataset" / "dataset.json"]
    # an evaluation folder: two tiny cases evaluated and written
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    for d in (gt, pred):
        d.mkdir()
        for c in ("c1", "c2"):
            nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(d / f"{c}.nii.gz"))
    written = write_outputs(evaluate_folders(pred, gt, spec=None, dataset_json=None), out / "evaluation", plots=False)
    files += [Path(p) for p in written.values()]
    assert len(files) > 10
    modes = {str(f.relative_to(tmp_path)): oct(_mode(f)) for f in files}
    assert set(modes.values()) == {oct(want_file)}, modes
    folders = [out / "dataset", out / "dataset" / "imagesTr", out / "evaluation"]
    assert {str(d): oct(_mode(d)) for d in folders} == {str(d): oct(want_dir) for d in folders}


def test_phantom_dataset_folder_follows_the_umask(tmp_path, umask):
    from nnunet_promptlesion.dataset_conversion.phantoms import write_phantom_dataset

    if umask != 0o027:   # one umask is enough for the (slower) phantom writer: the others are covered above
        pytest.skip("checked under umask 027")
    root = write_phantom_dataset("ccta", 991, 1, 0, n_test=0, output_root=tmp_path, preset="tiny"
                                 if "tiny" in _presets() else "default", progress=False)
    assert _mode(root) == 0o750, oct(_mode(root))
    for f in [root / "dataset.json", root / "lesion_spec.json", *root.glob("*Tr/*.nii.gz")]:
        assert _mode(f) == 0o640, (f, oct(_mode(f)))


def _presets() -> list[str]:
    from nnunet_promptlesion.dataset_conversion.phantoms_ccta import PRESETS

    return list(PRESETS)
