"""A real user's path: `pip install .` into a fresh virtual environment, then nnU-Net's own CLI.

No nnUNet_extTrainer is set by hand: the wheel's .pth file must make `-tr PromptLesionTrainer_smoke`
resolvable, training must run on the CPU, and nnUNetv2_predict must work with the result.

The fresh venv borrows this environment's third-party packages (a path line appended after its own
site-packages) instead of unpacking another ~6 GB torch stack: that took 519 s of a 34-minute suite on
a 2-core machine, and dependency resolution itself is what `make install` already did. Only the package
is installed into the fresh site-packages, from a wheel pip builds, and it must be the copy that loads.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, run
from tiny_plans import write_tiny_plans

pytestmark = pytest.mark.slow

# nnU-Net's console scripts live in the borrowed environment's bin/; run the same entry points with the
# fresh interpreter so that its site-packages (and the wheel's .pth) decide what is imported.
NNUNET_ENTRY_POINTS = {"nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
                       "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point"}


def nnunet_cli(vbin: Path, name: str) -> list:
    module, func = NNUNET_ENTRY_POINTS[name].split(":")
    return [vbin / "python", "-c", f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"]


def test_fresh_venv_pip_install_then_nnunet_train_and_predict(ccta_dataset, tmp_path):
    root, did, env = ccta_dataset
    env = dict(env)
    env.pop("nnUNet_extTrainer", None)
    env.pop("PYTHONPATH", None)
    env.update(nnUNet_n_proc_DA="0", nnUNet_results=str(tmp_path / "results"))

    # a clean copy of the sources, so nothing from the developer's tree (build dirs, .venv, downloads) leaks in:
    # what git would check out (tracked and not-ignored files), else the tree without the usual build outputs
    src = tmp_path / "src_copy"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True) if (REPO / ".git").exists() and shutil.which("git") else None
    if files is not None and files.returncode == 0 and files.stdout:
        for rel in files.stdout.decode().split("\0"):
            if rel and (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
    else:
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", ".whl", "demo_output", "__pycache__",
                                                                  "*.egg-info", "build", "dist"))
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    vbin = fresh / "bin"
    fresh_site = Path(run([vbin / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          env).stdout.strip())
    # A plain path line: the borrowed folder is not a site dir, so its own .pth files (this checkout's
    # editable install, its extTrainer hook) are NOT processed; only the wheel's .pth can register trainers.
    borrowed = Path(np.__file__).resolve().parents[1]
    (fresh_site / "zz_borrowed_site_packages.pth").write_text(f"{borrowed}\n")
    run([vbin / "python", "-m", "pip", "install", "-q", str(src)], env, timeout=1500)
    # pip must have resolved every declared dependency from what the fresh interpreter sees
    run([vbin / "python", "-m", "pip", "check"], env)
    # it is a real (non-editable) install: the package lives in the fresh site-packages
    out = run([vbin / "python", "-c", "import nnunet_promptlesion, os; print(nnunet_promptlesion.__file__); "
               "print(os.environ.get('nnUNet_extTrainer', ''))"], env)
    pkg_file, ext = out.stdout.strip().splitlines()
    assert str(fresh) in pkg_file and str(fresh) in ext

    # nnU-Net's own small-network plans mechanism (-p): what is installed is checked, not the size of the network
    plans = write_tiny_plans(Path(env["nnUNet_preprocessed"]) / "Dataset601_PhantomCCTA")
    run(nnunet_cli(vbin, "nnUNetv2_train") + [did, "3d_fullres", "0", "-tr", "PromptLesionTrainer_smoke", "-p", plans,
                                              "-device", "cpu"], env)
    fold = tmp_path / "results" / "Dataset601_PhantomCCTA" / f"PromptLesionTrainer_smoke__{plans}__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "PromptLesion: batch 2 = 1 real + 1 synthetic" in log

    # one test case is enough to show that prediction works with the installed trainer
    images = tmp_path / "imagesTs"
    images.mkdir()
    first = sorted((Path(env["nnUNet_raw"]) / "Dataset601_PhantomCCTA" / "imagesTs").glob("*_0000.nii.gz"))[0]
    shutil.copy2(first, images / first.name)
    pred = tmp_path / "pred"
    run(nnunet_cli(vbin, "nnUNetv2_predict") + ["-i", images, "-o", pred, "-d", did, "-c", "3d_fullres", "-f", "0",
         "-tr", "PromptLesionTrainer_smoke", "-p", plans, "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"],
        env)  # nnU-Net's sequential mode: its worker pools are nnU-Net's (the final validation above spawns one)
    inputs = sorted(images.glob("*_0000.nii.gz"))
    outputs = sorted(pred.glob("*.nii.gz"))
    assert [p.name.replace("_0000", "") for p in inputs] == [p.name for p in outputs]
    for i, o in zip(inputs, outputs):
        seg = np.asarray(nib.load(o).dataobj)
        assert seg.shape == nib.load(i).shape
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
