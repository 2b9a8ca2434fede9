"""promptlesion_experiment: statistics, config checks, and a real end-to-end run with a kill and a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_plans import write_tiny_plans

from nnunet_promptlesion.experiments.runner import ExperimentError, ExperimentRunner, load_config

BIN = Path(sys.executable).parent


def _config(tmp_path: Path, did: int, plans: str, arms: list[dict], **kw) -> Path:
    cfg = {"name": "tiny", "dataset": did, "configuration": "3d_fullres", "plans": plans, "folds": [0], "repeats": 2,
           "seed": 0, "device": "cpu", "reference_arm": "real_only", "checkpoint": "checkpoint_best.pth",
           "budget": {"epochs": 2, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1,
                      "early_stopping_patience": 25, "mirroring": False, "save_every": 1},
           "predict": {"disable_tta": True}, "env": {"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}, "arms": arms, **kw}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p


def test_config_and_arm_checks(nnunet_paths, tmp_path, monkeypatch):
    root, did, env = nnunet_paths
    monkeypatch.delenv("PROMPTLESION_TEST_DIFFUSION", raising=False)
    arms = [{"name": "real_only", "trainer": "nnUNetTrainer_earlyStopping"},
            {"name": "plain", "trainer": "nnUNetTrainer"},
            {"name": "typo", "trainer": "PromptLesionTrainerr"},
            {"name": "bad_synth", "trainer": "PromptLesionTrainer", "settings": {"synthesizer": "gan"}},
            {"name": "diffusion", "trainer": "PromptLesionTrainer",
             "settings": {"synthesizer": "diffusion_online", "diffusion": "${PROMPTLESION_TEST_DIFFUSION}"}},
            {"name": "missing_ckpt", "trainer": "PromptLesionTrainer",
             "settings": {"synthesizer": "diffusion_online", "diffusion": str(tmp_path / "nope.pt")}},
            {"name": "ok", "trainer": "PromptLesionTrainer", "settings": {"synthetic_fraction": 0.75}}]
    runner = ExperimentRunner(load_config(str(_config(tmp_path, did, "nnUNetPlans", arms))), tmp_path / "out")
    with pytest.raises(ExperimentError) as e:
        runner.check()
    msg = str(e.value)
    assert "arm 'plain': trainer 'nnUNetTrainer' ignores the experiment budget" in msg
    assert "arm 'typo': trainer 'PromptLesionTrainerr' not found by nnU-Net" in msg
    assert "arm 'bad_synth'" in msg and "unknown synthesizer 'gan'" in msg
    assert "arm 'diffusion'" in msg and "needs the environment variable PROMPTLESION_TEST_DIFFUSION" in msg
    assert "arm 'missing_ckpt': settings point to missing files" in msg
    assert "real_only" not in msg and "'ok'" not in msg
    # the two good arms pass; a ratio the batch size cannot express is flagged
    info = ExperimentRunner(load_config(str(_config(tmp_path, did, "nnUNetPlans", [arms[0], arms[-1]]))),
                            tmp_path / "out").check()
    assert any("arm ok:" in line and "WARNING: synthetic_fraction 0.75 is 1/2" in line for line in info)
    with pytest.raises(ExperimentError, match="reference_arm 'nope' is not an arm"):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", arms[:1], reference_arm="nope")))
    with pytest.raises(ExperimentError, match="unknown budget keys"):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", arms[:1], budget={"epoch": 3})))
    with pytest.raises(ExperimentError, match="plan and preprocess first"):
        ExperimentRunner(load_config(str(_config(tmp_path, did, "nnUNetPlans_nope", arms[:1]))), tmp_path / "o").check()
    # shipped configs parse and name the paper's arms
    cfg = load_config("paper_ablation", {"dataset": did})
    assert [a.name for a in cfg.arms] == ["real_only", "rule_based", "diffusion_onehot", "diffusion_mask",
                                          "diffusion_noprompt", "diffusion_onehot_1to3"]
    assert cfg.budget["early_stopping_patience"] == 25 and cfg.checkpoint == "checkpoint_best.pth"
    assert [a.name for a in load_config("rule_based_vs_real", {"dataset": did}).arms][:2] == ["real_only", "rule_based"]

    # roles and scarcity
    base = {"name": "real_only", "role": "baseline", "trainer": "nnUNetTrainer_earlyStopping"}
    ceil = {"name": "ceil", "role": "ceiling", "trainer": "nnUNetTrainer_earlyStopping"}
    sc = {"class": "noncalcified_plaque", "keep_carriers": 1}
    with pytest.raises(ExperimentError, match="is a ceiling but there is no \"scarcity\""):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, ceil])))
    with pytest.raises(ExperimentError, match="must use the baseline's trainer"):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, {**ceil, "trainer": "PromptLesionTrainer"}],
                                scarcity=sc)))
    with pytest.raises(ExperimentError, match="at most one arm may have role \"baseline\""):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, {**base, "name": "b2"}])))
    with pytest.raises(ExperimentError, match="role must be one of"):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", [{**base, "role": "reference"}])))
    with pytest.raises(ExperimentError, match="differs from the baseline arm"):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, {**base, "name": "x", "role": "arm"}],
                                reference_arm="x")))
    with pytest.raises(ExperimentError, match="keep_carriers"):
        load_config(str(_config(tmp_path, did, "nnUNetPlans", [base], scarcity={"class": "x"})))
    for bad, msg in (({**sc, "keep_carriers": 99}, "keep_carriers 99 but the base fold has only"),
                     ({**sc, "class": "tumour"}, "scarcity class 'tumour' is not a label")):
        with pytest.raises(ExperimentError, match=msg):
            ExperimentRunner(load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, ceil], scarcity=bad))),
                             tmp_path / "o").check()
    splits = root / "preprocessed" / next((root / "raw").glob(f"Dataset{did:03d}_*")).name / "splits_final.json"
    before = splits.read_text() if splits.is_file() else None
    runner = ExperimentRunner(load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, ceil], scarcity=sc))),
                              tmp_path / "o")
    assert any(l.startswith("scarcity: 'noncalcified_plaque' in base fold 0: kept 1 of") for l in runner.check())
    assert (splits.read_text() if splits.is_file() else None) == before       # --check writes nothing
    # an optional arm runs only when included
    opt = {"name": "extra", "trainer": "PromptLesionTrainer", "optional": "diffusion"}
    cfg_path = _config(tmp_path, did, "nnUNetPlans", [base, opt])
    assert [a.name for a in ExperimentRunner(load_config(str(cfg_path)), tmp_path / "o").cfg.arms] == ["real_only"]
    assert [a.name for a in ExperimentRunner(load_config(str(cfg_path)), tmp_path / "o", include=["diffusion"]).cfg.arms] \
        == ["real_only", "extra"]


def _processes_using(folder: Path) -> list[str]:
    """Command lines of live processes whose arguments or open files mention ``folder``'s experiment (Linux)."""
    out = []
    exp = str(folder).split("/runs/")[0]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = (d / "environ").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if exp in cmd or exp in env:
                out.append(cmd)
    return out


def _runner_cmd(config: Path, out: Path) -> list[str]:
    return [str(BIN / "promptlesion_experiment"), str(config), "-o", str(out)]


@pytest.mark.slow
def test_experiment_end_to_end_scarcity_ceiling_kill_and_resume(ccta_dataset, tmp_path):
    import torch

    root, did, env = ccta_dataset
    name = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    plans = write_tiny_plans(root / "preprocessed" / name)
    arms = [{"name": "real_only", "role": "baseline", "trainer": "nnUNetTrainer_earlyStopping"},
            {"name": "rule_based", "trainer": "PromptLesionTrainer",
             "settings": {"synthesizer": "rule_based", "synthetic_fraction": 0.5}},
            {"name": "ceiling", "role": "ceiling", "trainer": "nnUNetTrainer_earlyStopping"}]
    config = _config(tmp_path, did, plans, arms, reference_arm=None,
                     scarcity={"class": "noncalcified_plaque", "keep_carriers": 1, "seed": 0})
    out = tmp_path / "exp"
    env = {k: v for k, v in env.items() if not k.startswith("PROMPTLESION_")}
    model = out / "runs" / "real_only" / "repeat_0" / "nnUNet_results" / name / \
        f"nnUNetTrainer_earlyStopping__{plans}__3d_fullres"

    # 1) start, and kill the whole process group (runner + nnUNetv2_train) once epoch 0 is checkpointed
    p = subprocess.Popen(_runner_cmd(config, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 600
    while not list(model.glob("fold_*/checkpoint_latest.pth")):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "no checkpoint after 600 s"
        time.sleep(0.5)
    first_fold = next(model.glob("fold_*/checkpoint_latest.pth")).parent
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (first_fold / "validation" / "summary.json").exists()      # the training step was interrupted
    time.sleep(2)
    assert not [q for q in _processes_using(first_fold)], "a training outlived the kill"

    # what scarcity did: fold 0's training cases without all but one carrier of the class; full = fold 0
    sc = json.loads((out / "scarcity.json").read_text())["records"][0]
    splits = json.loads((root / "preprocessed" / name / "splits_final.json").read_text())
    scarce, full = splits[int(sc["scarce_fold"])], splits[int(sc["full_fold"])]
    assert sc["base_fold"] == "0" and sc["full_fold"] == "0" and first_fold.name == f"fold_{sc['scarce_fold']}"
    assert len(sc["carriers"]) >= 2 and len(sc["kept"]) == 1 and sorted(sc["kept"] + sc["dropped"]) == sc["carriers"]
    assert sorted(scarce["train"]) == sorted(set(full["train"]) - set(sc["dropped"])) and scarce["val"] == full["val"]
    assert sc["carriers_per_class"]["noncalcified_plaque"] == {"scarce": 1, "full": len(sc["carriers"])}

    # 2) the same command resumes: --c for the interrupted training, then everything else
    r = subprocess.run(_runner_cmd(config, out), env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("[experiment ")]
    assert f"train    arm=real_only repeat=0 fold={sc['scarce_fold']}: resumed with --c" in "\n".join(lines)
    assert sum(": trained" in l for l in lines) == 5 and sum(": predicted" in l for l in lines) == 6
    assert f"train    arm=ceiling repeat=0 fold=0: trained" in "\n".join(lines)
    assert "--c" in (out / "runs" / "real_only" / "repeat_0" / "logs" / f"train_fold{sc['scarce_fold']}.log").read_text()
    final = torch.load(first_fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(final["logging"]["train_losses"]) == 2          # exactly the budget: no epoch lost or repeated
    # independent repeats: own results folders, own seeds; the ceiling trains with the baseline's seeds
    for arm in ("real_only", "rule_based", "ceiling"):
        for rep, seed in ((0, 0), (1, 1000)):
            log = next((out / "runs" / arm / f"repeat_{rep}" / "nnUNet_results").rglob("training_log_*.txt")).read_text()
            assert f"seed {seed}" in log and "num_epochs 2" in log
            n_train = len(full["train"]) if arm == "ceiling" else len(scarce["train"])
            assert f"This split has {n_train} training and {len(full['val'])} validation cases" in log
    assert "PromptLesion: source" in next((out / "runs" / "rule_based" / "repeat_1" / "nnUNet_results")
                                          .rglob("training_log_*.txt")).read_text()

    # results: arms between baseline and ceiling, paired over the 2 test cases (repeats averaged)
    comp = json.loads((out / "results" / "comparison.json").read_text())
    assert comp["reference"] == "real_only" and comp["ceiling"] == "ceiling" and comp["missing"] == []
    assert comp["cases"] == 2 and comp["scarcity"][0]["kept"] == sc["kept"]
    for cls in ("vessel_wall", "calcified_plaque", "noncalcified_plaque"):
        row = comp["table"][cls]["rule_based"]
        assert row["Dice"]["n"] in (0, 1, 2) and row["test"]["repeats"] == {"rule_based": 2, "real_only": 2}
        assert row["test"]["n"] <= 2 and set(row["gap_closed"]) == {"Dice", "sensitivity"}
        assert comp["table"][cls]["ceiling"]["gap_closed"] is None
    assert comp["table"]["vessel_wall"]["rule_based"]["test"]["n"] == 2   # the wall is in every test case
    report = (out / "results" / "report.txt").read_text()
    assert report in r.stdout and "gap Dice [CI]" in report and "scarcity: 'noncalcified_plaque'" in report
    order = [l.split()[0] for l in report.splitlines() if l.strip() and l.split()[0] in ("real_only", "rule_based", "ceiling")]
    assert order[:3] == ["real_only", "rule_based", "ceiling"]
    for f in ("dice_by_arm.png", "sensitivity_by_arm.png", "nsd_by_arm.png", "per_class_vessel_wall.csv", "results.md"):
        assert (out / "results" / f).is_file()
    ev = json.loads((out / "runs" / "rule_based" / "repeat_1" / "evaluation" / "evaluation.json").read_text())
    assert len(ev["cases"]) == 2 and "calcified_plaque" in ev["by_size"]
    # transfer gauges: probabilities kept, softmax in the real test lesions, synthetic pseudo-Dice, verdicts
    assert len(list((out / "runs" / "ceiling" / "repeat_1" / "predictions").glob("*.npz"))) == 2
    tr_real = json.loads((out / "runs" / "ceiling" / "repeat_1" / "evaluation" / "transfer.json").read_text())
    tr_syn = json.loads((out / "runs" / "rule_based" / "repeat_1" / "evaluation" / "transfer.json").read_text())
    assert tr_real["synthetic"] is None and tr_syn["synthetic"]["calcified_plaque"]["pseudo_dice"] is not None
    assert tr_real["verdicts"]["calcified_plaque"]["verdict"] in ("transfers", "non-specific", "undetermined")
    assert tr_syn["verdicts"]["calcified_plaque"]["verdict"] in ("transfers", "non-specific", "realism gap", "budget gap")
    g = comp["gauges"]["calcified_plaque"]
    assert set(g) == {"real_only", "rule_based", "ceiling"} and g["rule_based"]["repeats"] == 2
    assert g["real_only"]["synthetic_pseudo_dice"] is None and 0.0 <= g["ceiling"]["max_softmax"] <= 1.0
    assert "syn pDice" in report and "verdict" in report

    # lesion realism of the rule-based arm's synthetic lesions, on the encoder of the trained real-only model
    real_model = first_fold.parent
    model_files = sorted(real_model.rglob("*"))
    r = subprocess.run([str(BIN / "promptlesion_realism"), "-d", str(did), "-p", plans, "-f", str(sc["scarce_fold"]), "--settings",
                        str(out / "runs" / "rule_based" / "repeat_0" / "settings.json"), "--model-folder", str(real_model),
                        "--per-class", "4", "--montage-per-class", "2", "-o", str(tmp_path / "realism")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((tmp_path / "realism" / "realism.json").read_text())
    calc = rep["classes"]["calcified_plaque"]
    assert rep["extractor"].startswith("nnunet_encoder(") and calc["feature_dim"] == 8 + 16 + 32
    assert calc["n_synthetic"] == 4 and calc["n_real"] >= 2 and calc["frechet"] is not None
    assert calc["ks_radius_mm"]["n_real"] == calc["n_real"]
    key = json.loads((tmp_path / "realism" / "answer_key.json").read_text())
    assert {k["source"] for k in key} == {"real", "synthetic"}
    assert (tmp_path / "realism" / "blinded_calcified_plaque.png").is_file()
    assert sorted(real_model.rglob("*")) == model_files, "realism wrote into the model folder"

    # 3) a third run has nothing left to do
    r = subprocess.run(_runner_cmd(config, out), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = [l for l in r.stdout.splitlines() if l.startswith("[experiment ") and "s)" in l]
    assert len(done) == 18 and all("skipped (finished)" in l for l in done)


def test_stop_process_tree_ends_grandchildren_that_ignore_sigterm(tmp_path):
    from nnunet_promptlesion.experiments.runner import descendants, stop_process_tree

    # child -> grandchild; the grandchild ignores SIGTERM and outlives its parent (re-parented on exit)
    grand = tmp_path / "grandchild.py"
    grand.write_text("import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                     "open(sys.argv[1], 'w').close()\ntime.sleep(300)\n")
    code = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(grand)!r}, {str(tmp_path / 'ready')!r}])\n"
            "time.sleep(300)\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ready").exists():
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.05)
        tree = descendants(child.pid)
        assert len(tree) == 1
        stop_process_tree(child, grace_s=5, orphan_wait_s=0.5)
        assert child.poll() is not None
        for pid in tree:
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"), "grandchild survived"
    finally:
        if child.poll() is None:
            child.kill()
