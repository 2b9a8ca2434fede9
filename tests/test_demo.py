"""promptlesion_demo: the plan edit, and the demo as an experiment (SIGTERM leaves nothing behind, a re-run resumes)."""
from __future__ import annotations

import json
import os
import re
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
    # same preprocessed data (no data_identifier of its own), 32 x 32 in-plane patches of the slices, 2-D network
    assert d == cfg and d["inherits_from"] == "3d_fullres" and "data_identifier" not in d
    assert d["patch_size"] == [32, 32] and d["spacing"] == [0.5, 0.5] and d["batch_dice"] is True
    assert d["median_image_size_in_voxels"] == [48, 48]
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
    from nnunet_promptlesion.experiments.config import load_config, stage_epochs

    cfg = load_config("demo", {"dataset": "501"})
    roles = {a.name: a.role for a in cfg.arms}
    assert list(roles.values()).count("baseline") == 1 and list(roles.values()).count("ceiling") == 1
    assert cfg.scarcity["class"] == "calcified_plaque" and cfg.configuration == demo.DEMO_CONFIGURATION
    assert cfg.reference_arm == next(a.name for a in cfg.arms if a.role == "baseline")
    assert {a.name: a.optional for a in cfg.arms if a.optional} == {"diffusion": "diffusion",
                                                                    "synthetic_pretrain": "pretrain"}
    # the synthetic-pretraining arm splits the demo's 7 epochs 4 + 3 and fine-tunes with the baseline's trainer
    pre = next(a for a in cfg.arms if a.pretrain)
    assert pre.trainer == next(a.trainer for a in cfg.arms if a.role == "baseline") and pre.settings is None
    assert pre.pretrain["settings"]["synthetic_fraction"] == 1.0 and pre.pretrain["trainer"] == "PromptLesionTrainer"
    assert stage_epochs(pre.pretrain, cfg.budget) == (4, 3)
    assert cfg.predict.get("save_probabilities") is True


def _processes_using(folder: Path) -> list[str]:
    """Command lines of live processes whose arguments or environment mention ``folder`` (Linux /proc)."""
    return list(_pids_using(folder).values())


def _freeze(folder: Path, keep: int | None = None) -> list[int]:
    """SIGSTOP every live process of ``folder`` but ``keep``; returns the pids stopped.

    The trainings here run one iteration per epoch, so on an idle machine a few epochs pass between "epoch 1 is
    in the log" and the kill; a frozen training cannot finish meanwhile, which makes the kill point deterministic.
    """
    frozen = []
    for pid in _pids_using(folder):
        if pid != keep:
            try:
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
            except ProcessLookupError:
                pass
    return frozen


def _thaw(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _pids_using(folder: Path) -> dict[int, str]:
    """{pid: command line} of live processes whose arguments or environment mention ``folder`` (Linux /proc)."""
    out = {}
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
                out[int(d.name)] = cmd
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


def _wait_for_epoch(runs: Path, p: subprocess.Popen, timeout: float, epoch: str = "1", shm: set | None = None,
                    work: Path | None = None, exclude: set | frozenset = frozenset()) -> Path:
    """The fold folder under ``runs`` once a training log (other than ``exclude``) has an "Epoch N" line with N
    matching the regex ``epoch``. "Epoch N >= 1" means checkpoint_latest.pth of an earlier epoch is on disk. The
    kill that follows can land anywhere, a checkpoint save included (seen in CI): the trainers write checkpoints
    atomically, so --c must still work."""
    deadline = time.time() + timeout
    while True:
        for log in runs.glob("*/*/fold_*/training_log_*.txt"):
            if log not in exclude and re.search(rf": Epoch {epoch} *$", log.read_text(), re.M):
                return log.parent
        assert p.poll() is None, p.stdout.read()[-4000:]
        assert time.time() < deadline, f"no training under {runs} reached epoch {epoch} after {timeout} s"
        if shm is not None:
            shm |= _shm_used_by(work)
        time.sleep(0.05)


def _trainings(work: Path) -> set[str]:
    """The -tr trainer of every nnU-Net training running for ``work`` (its data augmentation workers included)."""
    out = set()
    for cmd in _processes_using(work):
        args = cmd.split()
        if any("nnunet_train" in a for a in args) and "-tr" in args:
            out.add(args[args.index("-tr") + 1])
    return out


def _wait_until_no_process(work: Path, timeout: float) -> list[str]:
    deadline = time.time() + timeout
    while (left := _processes_using(work)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def _demo_work_dir(ccta_dataset, tmp_path: Path) -> tuple[Path, str, dict]:
    """(work dir, dataset name, env) for promptlesion_demo on the session phantom: it stands in for the demo's
    own (steps 1-2 are skipped), copied, so that the demo's plans edit and splits do not touch the shared fixture."""
    root, did, env = ccta_dataset
    work = tmp_path / "demo"
    name = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    shutil.copytree(root / "raw" / name, work / "nnUNet_raw" / name)
    shutil.copytree(root / "preprocessed" / name, work / "nnUNet_preprocessed" / name)
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "plan_and_preprocess.complete").write_text("fixture\n")
    return work, name, {k: v for k, v in env.items() if not k.startswith(("PROMPTLESION_", "nnUNet_"))}


@pytest.mark.slow
def test_demo_end_to_end_scarcity_ceiling_killed_twice_and_resumed(ccta_dataset, tmp_path):
    """promptlesion_demo, i.e. the experiment runner with a scarcity setting and a ceiling arm, on a tiny budget,
    two trainings at a time (the demo's "jobs": 2):
    (a) SIGKILL of the whole process group (a cluster kill) while the baseline and the rule-based arm train side
        by side: no training survives;
    (b) the same command resumes with --c; SIGTERM to the demo alone (not its group) once the rule-based arm
        trains again: every training and its data augmentation workers end, no shared memory is left;
    (c) the same command resumes again and finishes: every training has exactly its budget of epochs; scarcity
        folds, seeds, report, gauges, plots;
    (d) once more: nothing left to do."""
    import torch

    _, did, _ = ccta_dataset
    work, name, env = _demo_work_dir(ccta_dataset, tmp_path)
    # kills land at epoch >= 1 of a training; a loaded CI machine has let a 6-epoch baseline finish between "epoch 1
    # is in the log" and the freeze (one iteration per epoch is fast): 10 leaves that window 8 epochs wide
    epochs = 10
    cmd = [str(BIN / "promptlesion_demo"), "--work-dir", str(work), "--dataset-id", str(did), "--repeats", "1",
           "--montage-samples", "1", "--budget", f"epochs={epochs}", "iterations_per_epoch=1",
           "val_iterations_per_epoch=1"]
    exp = work / "experiment"
    runs = {arm: exp / "runs" / arm / "repeat_0" / "nnUNet_results" for arm in ("real_scarce", "rule_based", "ceiling")}
    from nnunet_promptlesion.experiments.config import resolve_config_path
    assert json.loads(resolve_config_path("demo").read_text())["jobs"] == 2

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    # (a) a cluster kill: SIGKILL to the demo's whole process group once the baseline's epoch 0 is saved
    p = start()
    try:
        first_fold = _wait_for_epoch(runs["real_scarce"], p, 900)
        _freeze(work)            # SIGKILL reaches stopped processes; freezing first keeps the baseline unfinished
        assert _trainings(work) == {"nnUNetTrainer_earlyStopping", "PromptLesionTrainer"}, "not two trainings at a time"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert not (first_fold / "checkpoint_final.pth").exists(), "the training finished before the kill: nothing tested"
    assert _wait_until_no_process(work, 15) == [], "a training outlived the SIGKILL of its process group"

    # what scarcity did (fold "all"): every training case but the dropped carriers of the class; full = all cases
    sc = json.loads((exp / "scarcity.json").read_text())["records"][0]
    setting = json.loads(resolve_config_path("demo").read_text())["scarcity"]
    splits = json.loads((work / "nnUNet_preprocessed" / name / "splits_final.json").read_text())
    scarce, full = splits[int(sc["scarce_fold"])], splits[int(sc["full_fold"])]
    assert sc["base_fold"] == "all" and sc["class"] == setting["class"] and first_fold.name == f"fold_{sc['scarce_fold']}"
    assert len(sc["kept"]) == setting["keep_carriers"] and sc["dropped"]
    assert sorted(sc["kept"] + sc["dropped"]) == sc["carriers"]
    cases = sorted(f.name[:-len(".nii.gz")] for f in (work / "nnUNet_raw" / name / "labelsTr").glob("*.nii.gz"))
    assert len(cases) == 8 and sorted(full["train"]) == cases
    assert sorted(scarce["train"]) == sorted(set(full["train"]) - set(sc["dropped"]))
    assert scarce["val"] == scarce["train"] and full["val"] == full["train"]     # nnU-Net's fold-"all" convention
    assert sc["carriers_per_class"][setting["class"]] == {"scarce": setting["keep_carriers"], "full": len(sc["carriers"])}

    # (b) the same command resumes; SIGTERM to the demo alone (not its group) once the rule-based arm's new run is
    # past epoch 0 (so it has a checkpoint to resume from): the demo must take every child down itself
    before = set(runs["rule_based"].rglob("training_log_*.txt"))
    p = start()
    shm = set()
    try:
        second_fold = _wait_for_epoch(runs["rule_based"], p, 900, "[1-9]", shm, work, exclude=before)
        frozen = _freeze(work, keep=p.pid)  # the trainings wait (SIGSTOP) while the checks below read /proc
        assert _trainings(work), "no training running"
        shm |= _shm_used_by(work)
        os.kill(p.pid, signal.SIGTERM)
        _thaw(frozen)            # the demo's own SIGTERMs to its children are delivered as they resume
        out_b, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, out_b[-3000:]
    assert "interrupted; run the same command again to resume" in out_b
    assert _processes_using(work) == [], "a process outlived SIGTERM"
    left = {n for n in shm if (Path("/dev/shm") / n).exists()}
    assert not left, f"shared memory left behind: {left}"

    # (c) the same command resumes what is left and finishes the experiment
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "1/4 phantom dataset exists" in r.stdout and "2/4 preprocessed data exists" in r.stdout
    lines = [l for l in r.stdout.splitlines() if l.startswith("[experiment ") and "s)" in l]
    assert len(lines) == 9, lines           # 3 arms x (train, predict, evaluate), each once
    for arm, fd in (("real_scarce", first_fold), ("rule_based", second_fold), ("ceiling", None)):
        fd = fd or next(runs[arm].glob("*/*/fold_*"))
        final = torch.load(fd / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert len(final["logging"]["train_losses"]) == epochs   # exactly the budget: no epoch lost or repeated
        if arm != "ceiling":
            assert "--c" in (exp / "runs" / arm / "repeat_0" / "logs" / f"train_fold{sc['scarce_fold']}.log").read_text()
            # nnU-Net opens a new training_log_<timestamp>.txt per start; names are not zero-padded
            logs = sorted(fd.glob("training_log_*.txt"), key=lambda f: f.stat().st_mtime)
            assert len(logs) >= 2, logs
            assert "final validation skipped" in logs[-1].read_text() and not (fd / "validation").exists()
    # every arm trains with seed 0 (repeat 0, base fold "all"): the ceiling with the baseline's, on the full fold
    for arm in runs:
        log = "".join(f.read_text() for f in runs[arm].rglob("training_log_*.txt"))
        assert "seed 0" in log and f"num_epochs {epochs}" in log
        n = len(full["train"]) if arm == "ceiling" else len(scarce["train"])
        assert f"This split has {n} training and {n} validation cases" in log
    assert "PromptLesion: source" in "".join(f.read_text() for f in runs["rule_based"].rglob("training_log_*.txt"))

    # results: arms between baseline and ceiling, paired over the 2 test cases
    comp = json.loads((exp / "results" / "comparison.json").read_text())
    assert comp["reference"] == "real_scarce" and comp["ceiling"] == "ceiling" and comp["missing"] == []
    assert comp["cases"] == 2 and comp["scarcity"][0]["kept"] == sc["kept"]
    assert "diffusion" not in [a["name"] for a in json.loads((exp / "experiment.json").read_text())["arms"]]
    for cls in ("vessel_wall", "calcified_plaque", "noncalcified_plaque"):
        row = comp["table"][cls]["rule_based"]
        assert row["Dice"]["n"] in (0, 1) and row["test"]["repeats"] == {"rule_based": 1, "real_scarce": 1}
        assert row["test"]["n"] <= 2 and set(row["gap_closed"]) == {"Dice", "sensitivity"}
        assert comp["table"][cls]["ceiling"]["gap_closed"] is None
    assert comp["table"]["vessel_wall"]["rule_based"]["test"]["n"] == 2   # the wall is in every test case
    report = (exp / "results" / "report.txt").read_text()
    assert report in r.stdout.replace("\r", "")                       # the report the demo printed
    assert "gap Dice [CI]" in report and f"scarcity: '{setting['class']}'" in report and "baseline" in report
    order = [l.split()[0] for l in report.splitlines() if l.strip() and l.split()[0] in runs]
    assert order[:3] == ["real_scarce", "rule_based", "ceiling"]
    for f in ("dice_by_arm.png", "sensitivity_by_arm.png", "nsd_by_arm.png", "per_class_vessel_wall.csv", "results.md"):
        assert (exp / "results" / f).is_file(), f
    ev = json.loads((exp / "runs" / "rule_based" / "repeat_0" / "evaluation" / "evaluation.json").read_text())
    assert len(ev["cases"]) == 2 and "calcified_plaque" in ev["by_size"]
    # transfer gauges: probabilities kept, softmax in the real test lesions, synthetic pseudo-Dice, verdicts
    assert len(list((exp / "runs" / "ceiling" / "repeat_0" / "predictions").glob("*.npz"))) == 2
    tr_real = json.loads((exp / "runs" / "ceiling" / "repeat_0" / "evaluation" / "transfer.json").read_text())
    tr_syn = json.loads((exp / "runs" / "rule_based" / "repeat_0" / "evaluation" / "transfer.json").read_text())
    assert tr_real["synthetic"] is None and tr_syn["synthetic"]["calcified_plaque"]["pseudo_dice"] is not None
    assert tr_real["verdicts"]["calcified_plaque"]["verdict"] in ("transfers", "non-specific", "undetermined")
    assert tr_syn["verdicts"]["calcified_plaque"]["verdict"] in ("transfers", "non-specific", "realism gap", "budget gap")
    g = comp["gauges"]["calcified_plaque"]
    assert set(g) == set(runs) and g["rule_based"]["repeats"] == 1
    assert g["real_scarce"]["synthetic_pseudo_dice"] is None and 0.0 <= g["ceiling"]["max_softmax"] <= 1.0
    assert "syn pDice" in report and "verdict" in report
    assert _processes_using(work) == []

    # (d) a last run has nothing left to do
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    done = [l for l in r.stdout.splitlines() if l.startswith("[experiment ") and "s)" in l]
    assert len(done) == 9 and all("skipped (finished)" in l for l in done), done
    assert "nothing to check or run" in r.stdout     # the arm checks (importing every trainer) skipped too


def test_diffusion_pretrains_generators_of_the_demo_configurations_dimensionality():
    """`--diffusion` on the default 2-D configuration pretrains 2-D generators (cpu2d) and builds their cache; on
    demo_3d 3-D ones (tiny). The step counts are options (default: the preset's recipe)."""
    import argparse

    from nnunet_promptlesion.experiments.config import load_config

    assert load_config("demo_3d", {"dataset": "501"}).configuration == demo.DEMO_3D_CONFIGURATION
    assert load_config("demo", {"dataset": "501"}).configuration == demo.DEMO_CONFIGURATION
    args = argparse.Namespace(diffusion_steps=None, vqgan_steps=None, diffusion_cache=3, device="cpu")
    argv = demo.pretrain_argv(args, 501, demo.DEMO_CONFIGURATION, "0", 2)
    opt = dict(zip(argv[1::2], argv[2::2]))
    assert opt["-c"] == "2d_demo" and opt["--preset"] == "cpu2d" and opt["--cache-per-class"] == "3"
    # the preset's measured recipe (steps, guidance) unless the steps are given
    assert "--vqgan-steps" not in opt and "--diffusion-steps" not in opt and opt["--cache-guidance"] == "5.0"
    args.vqgan_steps, args.diffusion_steps = 5, 7
    argv = demo.pretrain_argv(args, 501, demo.DEMO_3D_CONFIGURATION, "0", 3)
    opt = dict(zip(argv[1::2], argv[2::2]))
    assert opt["--preset"] == "tiny" and opt["--vqgan-steps"] == "5" and opt["--diffusion-steps"] == "7"
    assert opt["--cache-guidance"] == "1.0"
