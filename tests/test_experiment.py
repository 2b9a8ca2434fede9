"""promptlesion_experiment: statistics, config checks, and a real end-to-end run with a kill and a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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
def test_experiment_end_to_end_with_kill_and_resume(ccta_dataset, tmp_path):
    import torch

    root, did, env = ccta_dataset
    name = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    plans = write_tiny_plans(root / "preprocessed" / name)
    arms = [{"name": "real_only", "trainer": "nnUNetTrainer_earlyStopping"},
            {"name": "rule_based", "trainer": "PromptLesionTrainer",
             "settings": {"synthesizer": "rule_based", "synthetic_fraction": 0.5}}]
    config = _config(tmp_path, did, plans, arms)
    out = tmp_path / "exp"
    env = {k: v for k, v in env.items() if not k.startswith("PROMPTLESION_")}
    first_fold = out / "runs" / "real_only" / "repeat_0" / "nnUNet_results" / name / \
        f"nnUNetTrainer_earlyStopping__{plans}__3d_fullres" / "fold_0"

    # 1) start, and kill the whole process group (runner + nnUNetv2_train) once epoch 0 is checkpointed
    p = subprocess.Popen(_runner_cmd(config, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    deadline = time.time() + 600
    while not (first_fold / "checkpoint_latest.pth").is_file():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "no checkpoint after 600 s"
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (first_fold / "validation" / "summary.json").exists()      # the training step was interrupted
    time.sleep(2)
    assert not [q for q in _processes_using(first_fold)], "a training outlived the kill"

    # 2) the same command resumes: --c for the interrupted training, then everything else
    r = subprocess.run(_runner_cmd(config, out), env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith("[experiment ")]
    assert "train    arm=real_only repeat=0 fold=0: resumed with --c" in "\n".join(lines)
    assert sum(": trained" in l for l in lines) == 3 and sum(": predicted" in l for l in lines) == 4
    assert "--c" in (out / "runs" / "real_only" / "repeat_0" / "logs" / "train_fold0.log").read_text()
    final = torch.load(first_fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(final["logging"]["train_losses"]) == 2          # exactly the budget: no epoch lost or repeated
    # independent repeats: own results folders, own seeds
    for arm in ("real_only", "rule_based"):
        for rep, seed in ((0, 0), (1, 1000)):
            log = next((out / "runs" / arm / f"repeat_{rep}" / "nnUNet_results").rglob("training_log_*.txt")).read_text()
            assert f"seed {seed}" in log and "num_epochs 2" in log
    assert "PromptLesion: source" in next((out / "runs" / "rule_based" / "repeat_1" / "nnUNet_results")
                                          .rglob("training_log_*.txt")).read_text()

    # results: per class mean ± sd over 2 repeats, paired tests over 2 test cases x 2 repeats
    comp = json.loads((out / "results" / "comparison.json").read_text())
    assert comp["reference"] == "real_only" and comp["missing"] == [] and comp["cases"] == 2
    for cls in ("vessel_wall", "calcified_plaque", "noncalcified_plaque"):
        row = comp["table"][cls]["rule_based"]
        assert row["Dice"]["n"] in (0, 1, 2) and row["test"]["repeats"] == [0, 1] and row["test"]["n"] <= 4
    assert comp["table"]["vessel_wall"]["rule_based"]["test"]["n"] == 4   # the wall is in every test case
    md = (out / "results" / "results.md").read_text()
    assert "### calcified_plaque" in md and "| real_only |" in md and "p (Wilcoxon)" in md
    for f in ("dice_by_arm.png", "nsd_by_arm.png", "per_class_vessel_wall.csv"):
        assert (out / "results" / f).is_file()
    ev = json.loads((out / "runs" / "rule_based" / "repeat_1" / "evaluation" / "evaluation.json").read_text())
    assert len(ev["cases"]) == 2 and "calcified_plaque" in ev["by_size"]

    # lesion realism of the rule-based arm's synthetic lesions, on the encoder of the trained real-only model
    real_model = first_fold.parent
    model_files = sorted(real_model.rglob("*"))
    r = subprocess.run([str(BIN / "promptlesion_realism"), "-d", str(did), "-p", plans, "--settings",
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
    assert len(done) == 12 and all("skipped (finished)" in l for l in done)
