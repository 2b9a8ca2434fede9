"""promptlesion_demo: the plan edit, and the demo as an experiment (SIGTERM leaves nothing behind, a re-run resumes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_promptlesion.cli import demo

BIN = Path(sys.executable).parent


def test_add_demo_configuration_inherits_and_is_idempotent(tmp_path):
    plans = {"configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 48, 48], "batch_size": 2,
        "median_image_size_in_voxels": [40.0, 48.0, 48.0],
        "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {"n_stages": 5, "features_per_stage":
                         [32, 64, 128, 256, 320], "strides": [[1, 1, 1]] * 5}, "_kw_requires_import": []}}}}
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(plans))
    cfg = demo.add_demo_configuration(f)
    saved = json.loads(f.read_text())
    assert saved["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]  # parent untouched
    d = saved["configurations"][demo.DEMO_3D_CONFIGURATION]
    assert d == cfg and d["inherits_from"] == "3d_fullres" and d["patch_size"] == [32, 32, 32]
    kw = d["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 4 == len(kw["strides"]) == len(kw["features_per_stage"])
    assert kw["strides"][0] == [1, 1, 1] and kw["strides"][1:] == [[2, 2, 2]] * 3
    mtime = f.stat().st_mtime_ns
    demo.add_demo_configuration(f)
    assert f.stat().st_mtime_ns == mtime  # unchanged plans are not rewritten


def test_add_demo_configuration_2d_trains_slices_of_the_3d_fullres_data(tmp_path):
    plans = {"configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [40, 48, 48], "batch_size": 2, "batch_dice": False,
        "spacing": [0.6, 0.5, 0.5], "median_image_size_in_voxels": [40.0, 48.0, 48.0],
        "architecture": {"network_class_name": "x.PlainConvUNet", "arch_kwargs": {
            "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "strides": [[1, 1, 1]] * 5,
            "conv_op": "torch.nn.modules.conv.Conv3d", "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d"}},
        "_kw_requires_import": []}}}
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(plans))
    cfg = demo.add_demo_configuration_2d(f, name=demo.DEMO_CONFIGURATION)
    saved = json.loads(f.read_text())
    assert saved["configurations"]["3d_fullres"] == plans["configurations"]["3d_fullres"]
    d = saved["configurations"][demo.DEMO_CONFIGURATION]
    # same preprocessed data (no data_identifier of its own), whole in-plane slices, 2-D network
    assert d == cfg and d["inherits_from"] == "3d_fullres" and "data_identifier" not in d
    assert d["patch_size"] == [48, 48] and d["spacing"] == [0.5, 0.5] and d["batch_dice"] is True
    kw = d["architecture"]["arch_kwargs"]
    assert kw["conv_op"].endswith("Conv2d") and kw["norm_op"].endswith("InstanceNorm2d")
    assert kw["strides"] == [[1, 1]] + [[2, 2]] * 3 and kw["kernel_sizes"] == [[3, 3]] * 4
    mtime = f.stat().st_mtime_ns
    demo.add_demo_configuration_2d(f, name=demo.DEMO_CONFIGURATION)
    assert f.stat().st_mtime_ns == mtime


def test_demo_trainers_skip_self_validation_only_for_fold_all():
    from nnunet_promptlesion.trainers.variants import (PromptLesionTrainer_demo, _NoSelfValidationMixin,
                                                       nnUNetTrainer_promptlesionDemo)

    class Parent:
        def perform_actual_validation(self, save_probabilities=False):
            self.validated = True

    class T(_NoSelfValidationMixin, Parent):
        validated = False

        def __init__(self, fold):
            self.fold = fold

        def print_to_log_file(self, *args, **kwargs):
            pass

    t = T("all")
    t.perform_actual_validation()
    assert not t.validated
    t = T(0)
    t.perform_actual_validation()
    assert t.validated
    for cls in (nnUNetTrainer_promptlesionDemo, PromptLesionTrainer_demo):
        assert cls.__mro__[1] is _NoSelfValidationMixin


def test_shipped_demo_config_is_an_experiment_with_baseline_arm_and_ceiling():
    from nnunet_promptlesion.experiments.runner import load_config

    cfg = load_config("demo", {"dataset": "501"})
    roles = {a.name: a.role for a in cfg.arms}
    assert list(roles.values()).count("baseline") == 1 and list(roles.values()).count("ceiling") == 1
    assert cfg.scarcity["class"] == "calcified_plaque" and cfg.configuration == demo.DEMO_CONFIGURATION
    assert cfg.reference_arm == next(a.name for a in cfg.arms if a.role == "baseline")
    assert [a.name for a in cfg.arms if a.optional] == ["diffusion"]
    assert cfg.predict.get("save_probabilities") is True


def _processes_using(folder: Path) -> list[str]:
    """Command lines of live processes whose arguments or environment mention ``folder`` (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = (d / "environ").read_bytes().decode(errors="replace")
                if (d / "stat").read_text().split(") ")[1].startswith("Z"):
                    continue   # a zombie has ended; only its exit status is left for its parent
            except OSError:
                continue
            if str(folder) in cmd or str(folder) in env:
                out.append(cmd)
    return out


def _shm_used_by(folder: Path) -> set[str]:
    """Names in /dev/shm that live processes of ``folder`` have mapped or open (and not yet unlinked)."""
    names = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().decode(errors="replace")
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            if str(folder) not in env and str(folder) not in cmd:
                continue
            for line in (d / "maps").read_text().splitlines():
                if "/dev/shm/" in line and not line.endswith("(deleted)"):
                    names.add(line.split("/dev/shm/", 1)[1].strip())
            for fd in (d / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/") and not target.endswith("(deleted)"):
                    names.add(target[len("/dev/shm/"):])
        except OSError:
            continue
    return names


@pytest.mark.slow
def test_demo_sigterm_leaves_no_process_and_resumes(ccta_dataset, tmp_path):
    """SIGTERM to promptlesion_demo alone (not its group) mid-training: the nnU-Net training child and its data
    augmentation workers end, no shared memory is left, and the same command resumes to the report."""
    root, did, env = ccta_dataset
    work = tmp_path / "demo"
    name = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    # the session phantom stands in for the demo's own (steps 1-2 are skipped); copied, so that the demo's
    # plans edit and splits do not touch the shared fixture
    shutil.copytree(root / "raw" / name, work / "nnUNet_raw" / name)
    shutil.copytree(root / "preprocessed" / name, work / "nnUNet_preprocessed" / name)
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "plan_and_preprocess.complete").write_text("fixture\n")
    env = {k: v for k, v in env.items() if not k.startswith(("PROMPTLESION_", "nnUNet_"))}
    cmd = [str(BIN / "promptlesion_demo"), "--work-dir", str(work), "--dataset-id", str(did), "--repeats", "1",
           "--montage-samples", "1", "--budget", "epochs=4", "iterations_per_epoch=2", "val_iterations_per_epoch=1"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    runs = work / "experiment" / "runs" / "real_scarce" / "repeat_0" / "nnUNet_results"
    try:
        deadline = time.time() + 900
        shm = set()
        while not list(runs.glob("*/*/fold_*/checkpoint_latest.pth")):
            assert p.poll() is None, p.stdout.read()
            assert time.time() < deadline, "no checkpoint after 900 s"
            shm |= _shm_used_by(work)
            time.sleep(0.2)
        fold_dir = next(runs.glob("*/*/fold_*/checkpoint_latest.pth")).parent
        assert [q for q in _processes_using(work) if "nnunet_train" in q], "no training running"
        shm |= _shm_used_by(work)
        os.kill(p.pid, signal.SIGTERM)              # the demo only: it must take its children down itself
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, out[-3000:]
    assert "interrupted; run the same command again to resume" in out
    assert not (fold_dir / "checkpoint_final.pth").exists(), "the training finished before the kill: nothing tested"
    assert _processes_using(work) == [], "a process outlived SIGTERM"
    left = {n for n in shm if (Path("/dev/shm") / n).exists()}
    assert not left, f"shared memory left behind: {left}"

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "train    arm=real_scarce repeat=0 fold=" in r.stdout and ": resumed with --c" in r.stdout
    assert "1/4 phantom dataset exists" in r.stdout and "2/4 preprocessed data exists" in r.stdout
    report = (work / "experiment" / "results" / "report.txt").read_text()
    assert report in r.stdout.replace("\r", "")                       # the report the demo printed
    for word in ("noncalcified_plaque", "real_scarce", "rule_based", "ceiling", "gap Dice", "baseline"):
        assert word in report
    assert "diffusion" not in [a["name"] for a in json.loads((work / "experiment" / "experiment.json").read_text())["arms"]]
    sc = json.loads((work / "experiment" / "scarcity.json").read_text())["records"][0]
    from nnunet_promptlesion.experiments.runner import resolve_config_path
    keep = json.loads(resolve_config_path("demo").read_text())["scarcity"]["keep_carriers"]
    assert len(sc["kept"]) == keep and sc["dropped"] and set(sc["kept"]) <= set(sc["carriers"])
    # the rule-based trainer saw only the scarce training cases
    splits = json.loads((work / "nnUNet_preprocessed" / name / "splits_final.json").read_text())
    assert not set(sc["dropped"]) & set(splits[int(sc["scarce_fold"])]["train"])
    assert (work / "experiment" / "results" / "dice_by_arm.png").is_file()
    # the demo's trainings skip nnU-Net's final validation (it would re-predict the training cases)
    # nnU-Net opens a new training_log_<timestamp>.txt per start: the skip is in the resumed run's log
    logs = sorted(fold_dir.glob("training_log_*.txt"), key=lambda f: f.stat().st_mtime)   # names are not zero-padded
    assert len(logs) == 2, logs
    assert "final validation skipped" in logs[-1].read_text() and not (fold_dir / "validation").exists()
    assert _processes_using(work) == []
