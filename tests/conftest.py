"""Shared fixtures: a small CCTA phantom, planned and preprocessed by nnU-Net once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CT_EXAMPLE = Path(os.environ.get("PROMPTLESION_CT_EXAMPLE", REPO.parent / "shared" / "data" / "ct_example"))


def nnunet_env(root: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), PYTHONUNBUFFERED="1", **extra)
    return env


def run(cmd: list, env: dict, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def ccta_dataset(tmp_path_factory):
    """(root folder, dataset id, env) of an 8-case CCTA phantom after nnUNetv2_plan_and_preprocess."""
    root = tmp_path_factory.mktemp("nnunet_ccta")
    env = nnunet_env(root)
    did = 601
    run([BIN / "promptlesion_make_phantoms", "--kind", "ccta", "--dataset-id", did, "--cases", 8,
         "--test-cases", 2, "--seed", 3], env)
    run([BIN / "nnUNetv2_plan_and_preprocess", "-d", did, "-c", "3d_fullres", "--verify_dataset_integrity",
         "-np", 1, "-npfp", 1], env)
    return root, did, env


@pytest.fixture
def nnunet_paths(ccta_dataset, monkeypatch):
    """Point this process's nnU-Net env vars at the session phantom (nnunetv2.paths reads them lazily)."""
    root, did, env = ccta_dataset
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    return ccta_dataset
