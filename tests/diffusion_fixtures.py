"""Shared set-up for the diffusion-in-the-trainer tests (no test functions here).

One tiny trained generator (the session's, from test_diffusion_train.build_trained_run: NIfTI-trained, nibabel
axis order, HU window, so every mapping path runs) and a 6-case abdomen phantom preprocessed by nnU-Net with a
small custom 3d_fullres plan (32^3 patch, narrow UNet) so that real nnUNetv2_train runs stay short on a CPU.
Built once per test run and shared by the pytest-xdist workers (conftest.shared_folder).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import BIN, nnunet_env, run, shared_folder, write_nnunet_splits
from test_diffusion_train import build_trained_run

DID = 903
NAME = f"Dataset{DID}_PhantomAbdomen"
EXT_TRAINERS = Path(__file__).parent / "ext_trainers"


def small_plans(plans_file: Path) -> None:
    """A CPU-sized 3d_fullres plan: 32^3 patches and 8..64 features (same data, same spacing)."""
    d = json.loads(plans_file.read_text())
    c = d["configurations"]["3d_fullres"]
    c["patch_size"] = [32, 32, 32]
    c["batch_size"] = 2
    c["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64, 64]
    plans_file.write_text(json.dumps(d, indent=1))


def diffusion_setup(tmp_path_factory) -> dict:
    """raw + preprocessed phantom and generator shared by the xdist workers (read only; splits written up front);
    env's nnUNet_results is this worker's own."""
    gen = build_trained_run(tmp_path_factory)
    with shared_folder(tmp_path_factory, "pl_diffusion_nnunet") as root:
        # one export process in nnU-Net's final validation (its default 8 spawned workers cost minutes on 2 cores)
        env = nnunet_env(root, OMP_NUM_THREADS="1", nnUNet_def_n_proc="1")
        env.pop("nnUNet_n_proc_DA", None)
        env["nnUNet_extTrainer"] = os.pathsep.join(
            [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p] + [str(EXT_TRAINERS)])
        marker = root / ".ready"
        if not marker.is_file():
            run([BIN / "promptlesion_make_phantoms", "--kind", "abdomen", "--dataset-id", DID, "--cases", 6,
                 "--test-cases", 0, "--seed", 1, "--quiet", "--overwrite"], env)
            run([BIN / "nnUNetv2_plan_and_preprocess", "-d", DID, "-c", "3d_fullres", "-np", 1, "-npfp", 1], env)
            small_plans(root / "preprocessed" / NAME / "nnUNetPlans.json")
            write_nnunet_splits(root / "preprocessed" / NAME)
            marker.write_text("ok")
    env["nnUNet_results"] = str(tmp_path_factory.mktemp("abdomen_results"))
    return {"root": root, "env": env, "did": DID, "name": NAME, "pre": root / "preprocessed" / NAME,
            "checkpoint": gen["checkpoint"], "vqgan": gen["vqgan"]}


def build_cache_cmd(setup: dict, out: Path, per_class=2, shard_size=2, extra=()) -> list:
    return [sys.executable, "-m", "nnunet_promptlesion.cli.build_cache", "-d", setup["did"], "-f", "0",
            "--diffusion", setup["checkpoint"], "--per-class", per_class, "--steps", 2, "--batch", 2,
            "--shard-size", shard_size, "--device", "cpu", "--num-threads", 1, "--no-progress", "-o", out, *extra]


def build_in_process(setup, out: Path, **kw) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of promptlesion_build_cache's main() with build_cache_cmd's arguments, run in
    this process: a new process would pay ~12 CPU-s of torch / MONAI / nnU-Net imports for a few seconds of
    rendering. test_cache runs the console command itself as a process (a killed run, torchrun, --help)."""
    from nnunet_promptlesion.cli.build_cache import main

    argv = [str(a) for a in build_cache_cmd(setup, out, **kw)]
    assert argv[1:3] == ["-m", "nnunet_promptlesion.cli.build_cache"]
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(k, setup["env"][k])
        with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
            code = main(argv[3:])
    return code, out_buf.getvalue(), err_buf.getvalue()
