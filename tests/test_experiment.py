"""promptlesion_experiment: config and arm checks, scarcity folds, repeats' seeds, process-tree stops.

The runner end to end (scarcity, ceiling, a kill and a resume) is tested through promptlesion_demo, which drives it:
tests/test_demo.py::test_demo_end_to_end_scarcity_ceiling_killed_twice_and_resumed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_promptlesion.experiments.config import ExperimentError, load_config
from nnunet_promptlesion.experiments.runner import ExperimentRunner


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
    with pytest.raises(ExperimentError, match=r"key 'arms\[0\]\.role' must be one of"):
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
    # the derived folds of a numeric base fold (written here into a copy of the preprocessed dataset): scarce =
    # fold 0's training cases without the dropped carriers, full = fold 0's; both validate on fold 0's cases
    pre_copy = tmp_path / "pre"
    shutil.copytree(splits.parent, pre_copy / splits.parent.name)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre_copy))
    runner = ExperimentRunner(load_config(str(_config(tmp_path, did, "nnUNetPlans", [base, ceil], scarcity=sc))),
                              tmp_path / "o")
    runner.prepare()
    rec = runner.scarcity[0]
    new_splits = json.loads((pre_copy / splits.parent.name / "splits_final.json").read_text())
    fold0, scarce, full = new_splits[0], new_splits[int(rec["scarce_fold"])], new_splits[int(rec["full_fold"])]
    # the full fold has fold 0's cases: nnU-Net's fold 0 itself is reused; the scarce one is appended
    assert rec["base_fold"] == "0" and rec["full_fold"] == "0" and int(rec["scarce_fold"]) >= 5
    assert len(rec["carriers"]) >= 2 and len(rec["kept"]) == 1 and sorted(rec["kept"] + rec["dropped"]) == rec["carriers"]
    assert sorted(full["train"]) == sorted(fold0["train"]) and scarce["val"] == full["val"] == sorted(fold0["val"])
    assert sorted(scarce["train"]) == sorted(set(fold0["train"]) - set(rec["dropped"]))
    assert rec["carriers_per_class"]["noncalcified_plaque"] == {"scarce": 1, "full": len(rec["carriers"])}
    assert (splits.read_text() if splits.is_file() else None) == before       # the shared dataset is untouched
    # repeats: each its own nnU-Net results folder and seed (seed + 1000 * repeat + base fold); scarce and full
    # folds share their base fold's seed, so baseline and ceiling of one repeat start alike
    arm_base, arm_ceil = runner.cfg.arms
    envs = {(a.name, r): runner._env(a, r, f) for a, f in ((arm_base, rec["scarce_fold"]), (arm_ceil, rec["full_fold"]))
            for r in (0, 1)}
    assert {k: e["PROMPTLESION_SEED"] for k, e in envs.items()} == {("real_only", 0): "0", ("real_only", 1): "1000",
                                                                   ("ceil", 0): "0", ("ceil", 1): "1000"}
    assert len({e["nnUNet_results"] for e in envs.values()}) == 4
    # an optional arm runs only when included
    opt = {"name": "extra", "trainer": "PromptLesionTrainer", "optional": "diffusion"}
    cfg_path = _config(tmp_path, did, "nnUNetPlans", [base, opt])
    assert [a.name for a in ExperimentRunner(load_config(str(cfg_path)), tmp_path / "o").cfg.arms] == ["real_only"]
    assert [a.name for a in ExperimentRunner(load_config(str(cfg_path)), tmp_path / "o", include=["diffusion"]).cfg.arms] \
        == ["real_only", "extra"]


def test_stop_process_tree_ends_grandchildren_that_ignore_sigterm(tmp_path):
    from nnunet_promptlesion.experiments.processes import descendants, stop_process_tree

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


# The runner's scheduling with jobs > 1, on steps that are real child processes (sleeps that record when they ran)
# instead of nnU-Net commands: what is checked here is the order, the overlap, the failure policy and the stop of
# every running child. The same runner with real nnU-Net trainings in parallel: test_demo.py (the demo runs 2 jobs).
SCRIPTED = r'''
import json, os, sys, time
from pathlib import Path
from nnunet_promptlesion.experiments.config import load_config
from nnunet_promptlesion.experiments.runner import ExperimentRunner

STEP = """import json, sys, time
rec = {"what": sys.argv[1], "start": time.time()}
time.sleep(float(sys.argv[2]))
rec["end"] = time.time()
open(sys.argv[3], "a").write(json.dumps(rec) + "\\n")
sys.exit(int(sys.argv[4]))
"""

class Scripted(ExperimentRunner):
    """Every step is a child process sleeping ``SLEEP`` s (arm "bad" fails its training after 0.2 s)."""
    def check(self):
        return []
    def prepare(self):
        self.scarcity = None
    def _step(self, what, arm, r, fail=False):
        record = self.out / "steps.jsonl"
        rc = self._run([sys.executable, "-c", STEP, f"{what} {arm.name} {r}", "0.2" if fail else os.environ["SLEEP"],
                        str(record), "1" if fail else "0"], dict(os.environ), self.run_dir(arm.name, r) / "logs" / f"{what}.log")
        if rc != 0:
            self._fail(f"{what} arm '{arm.name}' repeat {r}", self.run_dir(arm.name, r) / "logs" / f"{what}.log")
        return what
    def train(self, arm, r, fold):
        return self._step("train", arm, r, fail=arm.name == "bad")
    def predict(self, arm, r):
        return self._step("predict", arm, r)
    def evaluate(self, arm, r):
        # in-process, as the real evaluation; record when it ran
        t0 = time.time()
        time.sleep(0.2)
        with open(self.out / "steps.jsonl", "a") as f:
            f.write(json.dumps({"what": f"evaluate {arm.name} {r}", "start": t0, "end": time.time()}) + "\n")
        return "evaluated"

if __name__ == "__main__":
    from nnunet_promptlesion.experiments.runner import run_as_command
    cfg = load_config(sys.argv[1])
    run_as_command("scripted", lambda: Scripted(cfg, sys.argv[2]).run(report=False))
'''


def _scripted_experiment(tmp_path: Path, arms: list[str], jobs: int, repeats: int = 2) -> tuple[Path, dict]:
    (tmp_path / "raw").mkdir(exist_ok=True)
    (tmp_path / "pre").mkdir(exist_ok=True)
    cfg = {"name": "scripted", "dataset": "Dataset999_Scripted", "folds": ["0"], "repeats": repeats, "jobs": jobs,
           "device": "cpu", "arms": [{"name": a, "trainer": "nnUNetTrainer_earlyStopping"} for a in arms]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "scripted.py").write_text(SCRIPTED)
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               PYTHONPATH=str(tmp_path))
    return tmp_path / "config.json", env


def _steps(out: Path) -> list[dict]:
    f = out / "steps.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines()] if f.is_file() else []


def _max_overlap(steps: list[dict]) -> int:
    events = sorted([(s["start"], 1) for s in steps] + [(s["end"], -1) for s in steps])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def test_parallel_jobs_overlap_chains_keep_their_order_and_a_failure_starts_nothing_new(tmp_path):
    cfg_path, env = _scripted_experiment(tmp_path, ["a", "b", "c"], jobs=2)
    r = subprocess.run([sys.executable, str(tmp_path / "scripted.py"), str(cfg_path), str(tmp_path / "out")],
                       env=dict(env, SLEEP="1.0"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = _steps(tmp_path / "out")
    assert len(steps) == 3 * 2 * 3                                       # 3 arms x 2 repeats x (train, predict, evaluate)
    assert _max_overlap(steps) == 2, "jobs=2 must run two chains at a time, never more"
    assert _max_overlap([s for s in steps if s["what"].startswith("evaluate")]) == 1   # evaluations one at a time
    for arm in "abc":
        for rep in range(2):
            mine = [s for s in steps if s["what"].endswith(f" {arm} {rep}")]
            assert [s["what"].split()[0] for s in sorted(mine, key=lambda s: s["start"])] == ["train", "predict", "evaluate"]
    assert "6 (arm, repeat) chains, up to 2 at a time" in r.stdout
    progress = [l for l in r.stdout.splitlines() if "[experiment " in l]
    assert len(progress) == 2 * 18 and all(l.count("[experiment") == 1 for l in progress), "lines of two chains mixed"

    # chains a0 and bad0 start together; "bad" fails its training after 0.2 s while "a" trains (2 s) beside it:
    # "a" finishes its running step, nothing starts after the failure, the error names the failed step, exit 2
    cfg_path, env = _scripted_experiment(tmp_path, ["a", "bad"], jobs=2, repeats=2)
    r = subprocess.run([sys.executable, str(tmp_path / "scripted.py"), str(cfg_path), str(tmp_path / "out2")],
                       env=dict(env, SLEEP="2.0"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "train arm 'bad' repeat 0 failed" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    steps = _steps(tmp_path / "out2")
    failed_at = max(s["end"] for s in steps if s["what"] == "train bad 0")
    assert [s["what"] for s in steps if s["start"] > failed_at] == [], "a step started after the failure"
    assert "train a 0" in [s["what"] for s in steps], "the step running beside the failure was not let finish"


def test_sigterm_to_a_parallel_experiment_stops_every_running_step(tmp_path):
    from nnunet_promptlesion.experiments.processes import descendants

    cfg_path, env = _scripted_experiment(tmp_path, ["a", "b", "c"], jobs=2)
    p = subprocess.Popen([sys.executable, str(tmp_path / "scripted.py"), str(cfg_path), str(tmp_path / "out")],
                         env=dict(env, SLEEP="300"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(kids := descendants(p.pid)) < 2:
            assert time.time() < deadline and p.poll() is None, "the two steps never started"
            time.sleep(0.1)
        time.sleep(0.5)
        t0 = time.time()
        p.terminate()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "interrupted; run the same command again to resume" in err, out[-2000:] + err[-2000:]
    assert time.time() - t0 < 60
    left = [pid for pid in kids if Path(f"/proc/{pid}").exists()
            and not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")]
    assert left == [], "a step outlived the SIGTERM of the experiment"
    assert _steps(tmp_path / "out") == [], "no step may have completed"


def test_parallel_cpu_jobs_cap_torch_threads_in_nnunet_entry_points(tmp_path, monkeypatch):
    """nnU-Net's train/predict entry points set torch's threads to every core; side by side (jobs 2 on a CPU) the
    runner's entry points cap that call at cores // jobs (PROMPTLESION_TORCH_THREADS)."""
    from nnunet_promptlesion.experiments.torch_threads import ENV_TORCH_THREADS

    code = ("import torch\nfrom nnunet_promptlesion.experiments.torch_threads import cap_torch_threads\n"
            "cap_torch_threads()\ntorch.set_num_threads(8)   # what nnU-Net's entry point does on an 8-core CPU\n"
            "print(torch.get_num_threads())\n")
    for cap, expected in (("1", 1), ("3", 3), ("", 8)):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV_TORCH_THREADS: cap},
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == [str(expected)], r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV_TORCH_THREADS: "two"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"{ENV_TORCH_THREADS}='two' must be a positive integer" in r.stderr

    # the runner sets it for CPU experiments with jobs > 1 only, and never over the user's own value
    cfg_path, env = _scripted_experiment(tmp_path, ["a"], jobs=2)
    monkeypatch.setenv("nnUNet_raw", env["nnUNet_raw"])
    monkeypatch.setenv("nnUNet_preprocessed", env["nnUNet_preprocessed"])
    monkeypatch.delenv(ENV_TORCH_THREADS, raising=False)
    runner = ExperimentRunner(load_config(str(cfg_path)), tmp_path / "o")
    arm = runner.cfg.arms[0]
    assert runner._env(arm, 0, "0")[ENV_TORCH_THREADS] == str(max(1, (os.cpu_count() or 1) // 2))
    runner.cfg.device = "cuda"
    assert ENV_TORCH_THREADS not in runner._env(arm, 0, "0")
    runner.cfg.device, runner.cfg.jobs = "cpu", 1
    assert ENV_TORCH_THREADS not in runner._env(arm, 0, "0")
    runner.cfg.jobs = 2
    monkeypatch.setenv(ENV_TORCH_THREADS, "5")
    assert runner._env(arm, 0, "0")[ENV_TORCH_THREADS] == "5"


def test_the_resolved_experiment_json_loads_again_for_report_only(tmp_path):
    """OUT/experiment.json (what the runner writes) is a config the documented `--report-only` call accepts."""
    cfg_path, _ = _scripted_experiment(tmp_path, ["a", "b"], jobs=2)
    cfg = load_config(str(cfg_path))
    written = tmp_path / "out" / "experiment.json"
    written.parent.mkdir()
    written.write_text(json.dumps(cfg.to_dict()))
    again = load_config(str(written))
    assert {k: v for k, v in again.to_dict().items() if k != "source"} == \
        {k: v for k, v in cfg.to_dict().items() if k != "source"}


def test_report_tables_and_csv_carry_overlap_and_surface_distances_beside_older_evaluations(tmp_path, monkeypatch):
    """The per-arm report of evaluations holding IoU, voxel precision / recall and HD95 / ASSD (mm): a second table per
    class and extra CSV columns after the existing ones; an evaluation written before these metrics existed is
    reported as before, its new cells n/a (text) or empty (CSV)."""
    import csv

    cfg_path, env = _scripted_experiment(tmp_path, ["base", "syn", "old"], jobs=1, repeats=1)
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "reference_arm": "base"}))
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(k, env[k])

    def evaluation(dice: list[float], hd95: list[float | None], new_metrics: bool = True) -> dict:
        cases = []
        for i, (d, h) in enumerate(zip(dice, hd95)):
            m = {"Dice": d, "n_ref": 10, "lesions": 1, "detected": 1}
            if new_metrics:
                m.update(IoU=d / (2 - d), voxel_precision=0.9, voxel_recall=0.8, HD95_mm=h,
                         ASSD_mm=None if h is None else h / 4)
            cases.append({"case": f"c{i}", "metrics": {"lesion": m}})
        summary = {"Dice": sum(dice) / len(dice), "NSD": None, "sensitivity": 1.0, "fp_per_case": 0.0, "lesion_dice": 0.5}
        if new_metrics:
            hs = [h for h in hd95 if h is not None]
            summary.update(IoU=sum(d / (2 - d) for d in dice) / len(dice), voxel_precision=0.9, voxel_recall=0.8,
                           HD95_mm=sum(hs) / len(hs), ASSD_mm=sum(hs) / len(hs) / 4)
        return {"classes": [{"name": "lesion", "lesion": True}], "cases": cases, "summary": {"lesion": summary},
                "lesions": [], "false_positives": []}

    out = tmp_path / "out"
    runner = ExperimentRunner(load_config(str(cfg_path)), out, log=lambda s: None)
    for arm, ev in (("base", evaluation([0.4, 0.5, 0.6], [8.0, 6.0, None])),
                    ("syn", evaluation([0.6, 0.75, 0.8], [4.0, 3.0, 2.0])),
                    ("old", evaluation([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], new_metrics=False))):
        (runner.run_dir(arm, 0) / "evaluation").mkdir(parents=True)
        (runner.run_dir(arm, 0) / "evaluation" / "evaluation.json").write_text(json.dumps(ev))
    runner.report()
    text = (out / "results" / "report.txt").read_text()
    lines = text.splitlines()
    second = lines.index("  lesion: voxel overlap and surface distances")
    assert "HD95 mm" in lines[second + 1] and "dHD95 mm (p W)" in lines[second + 1]
    rows = {l.split()[0]: l for l in lines[second + 3: second + 6]}
    # HD95 means over the defined cases: base 7, syn 3; paired where both are defined (c0, c1): -3.5 mm
    assert "7.00" in rows["base"] and "3.00" in rows["syn"] and "-3.50 (" in rows["syn"]
    assert rows["old"].split()[1:6] == ["n/a"] * 5
    with open(out / "results" / "per_class_lesion.csv") as f:
        table = list(csv.DictReader(f))
    header = list(table[0])
    assert header[:25] == ["arm", "role", "repeats", "dice_mean", "dice_sd", "nsd_mean", "nsd_sd", "sensitivity_mean",
                           "sensitivity_sd", "fp_per_case_mean", "fp_per_case_sd", "lesion_dice_mean", "lesion_dice_sd",
                           "case_dice", "case_sensitivity", "dice_diff_vs_baseline", "ci_low", "ci_high", "cases",
                           "p_ttest", "p_wilcoxon", "gap_closed_dice", "gap_ci_low", "gap_ci_high",
                           "gap_closed_sensitivity"]
    by_arm = {r["arm"]: r for r in table}
    assert float(by_arm["syn"]["hd95_mm_mean"]) == 3.0 and float(by_arm["syn"]["hd95_mm_diff_vs_baseline"]) == -3.5
    assert float(by_arm["syn"]["assd_mm_mean"]) == 0.75 and by_arm["base"]["hd95_mm_diff_vs_baseline"] == ""
    assert by_arm["old"]["hd95_mm_mean"] == "" and by_arm["old"]["dice_mean"] == "0.5"


def test_rerun_of_a_finished_experiment_skips_the_checks_unless_the_config_changed(tmp_path, monkeypatch):
    """Every step finished under this same config: a re-run reports without the arm checks (they import every
    trainer: nnU-Net and torch). Another config, or one step not finished, and the checks run again."""
    cfg_path, env = _scripted_experiment(tmp_path, ["a", "b"], jobs=1, repeats=1)
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(k, env[k])

    class Checked(ExperimentRunner):
        checks = 0

        def check(self):
            Checked.checks += 1
            return []

        def _run(self, cmd, env, log):
            raise AssertionError(f"a finished step ran again: {cmd}")

    plans = tmp_path / "pre" / "Dataset999_Scripted" / "nnUNetPlans.json"
    plans.parent.mkdir(parents=True)
    plans_text = json.dumps({"configurations": {"3d_fullres": {"data_identifier": "d", "architecture": {}}}})
    plans.write_text(plans_text)
    (plans.parent / "dataset.json").write_text("{}")
    (plans.parent / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    out = tmp_path / "out"
    cfg = load_config(str(cfg_path))
    runner = Checked(cfg, out, log=lambda s: None)
    for arm in cfg.arms:   # what finished steps leave behind: their outputs and records
        fd = runner.fold_dir(arm, 0, "0")
        fd.mkdir(parents=True)
        (fd / "checkpoint_final.pth").write_bytes(b"")
        runner._train_marker(arm, 0, "0").write_text("done\n")
        runner._train_record(arm, 0, "0").write_text(json.dumps({"inputs": runner.train_inputs(arm, 0, "0")}))
        (runner.run_dir(arm.name, 0) / "predictions").mkdir()
        (runner.run_dir(arm.name, 0) / "predictions" / ".complete").write_text(f"x {runner._predict_stamp(arm)}\n")
        (runner.run_dir(arm.name, 0) / "evaluation").mkdir()
        (runner.run_dir(arm.name, 0) / "evaluation" / "evaluation.json").write_text("{}")
        (runner.run_dir(arm.name, 0) / "evaluation" / "inputs.json").write_text(
            json.dumps({"inputs": runner._evaluate_inputs(arm, 0)}))
    lines = []

    def rerun(config=None) -> list[str]:
        lines.clear()
        Checked(config or load_config(str(cfg_path)), out, log=lines.append).run(report=False)
        return lines

    assert not runner._finished_before()       # no experiment.json yet: never run here
    rerun()
    assert Checked.checks == 1
    assert sum("skipped (finished)" in l for l in rerun()) == 2 * 3 and Checked.checks == 1
    assert any("nothing to check or run" in l for l in lines)
    # another budget: refused (the models were trained with the old one) before the arm checks, naming every step;
    # experiment.json keeps the config the models were made from
    with pytest.raises(ExperimentError) as e:
        rerun(load_config(str(cfg_path), {"budget": {"epochs": 7}}))
    assert Checked.checks == 1
    for arm in ("a", "b"):
        assert f"train arm={arm} repeat=0 fold=0: budget.epochs unset -> 7\n" in str(e.value), str(e.value)
        assert f"predict arm={arm} repeat=0: the models changed (retrained)\n" in str(e.value)
        assert f"evaluate arm={arm} repeat=0: the predictions changed (redone)\n" in str(e.value)
    assert "--retrain-changed" in str(e.value)
    assert "budget" not in json.loads((out / "experiment.json").read_text()) or \
        json.loads((out / "experiment.json").read_text())["budget"] == {}
    rerun()
    assert Checked.checks == 1                                      # still finished under the old config
    assert Checked(load_config(str(cfg_path)), out)._finished_before()
    plans.unlink()                                # the data moved: the checks say what is missing
    assert not Checked(load_config(str(cfg_path)), out)._finished_before()
    plans.write_text(plans_text)
    (runner.run_dir("b", 0) / "evaluation" / "evaluation.json").unlink()   # one step left to do
    assert not Checked(load_config(str(cfg_path)), out)._finished_before()


def test_rerun_with_another_budget_or_settings_refuses_reports_the_models_and_retrains_them(nnunet_paths, tmp_path,
                                                                                            capsys):
    """Real nnU-Net, 1 epoch x 1 iteration: a re-run into the same folder with another budget or arm settings never
    reports the old models under the new config. It refuses (exit 2) naming what changed and every affected step,
    leaving experiment.json and settings.json as they were; --report-only states what the models were trained with;
    --retrain-changed retrains exactly the changed training (and its prediction and evaluation)."""
    import torch

    from nnunet_promptlesion.cli.experiment import main

    root, did, env = nnunet_paths
    arms = [{"name": "rule", "trainer": "PromptLesionTrainer", "settings": {"synthetic_fraction": 0.5}}]
    budget = {"epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "early_stopping_patience": 0,
              "mirroring": False, "save_every": 1, "final_validation": False}
    # npp/nps 0: nnU-Net's pre- and post-processing in the predicting process (no worker start-ups to wait for)
    cfg_path = _config(tmp_path, did, "nnUNetPlans", arms, repeats=1, budget=budget, reference_arm=None,
                       checkpoint="checkpoint_final.pth",
                       predict={"disable_tta": True, "save_probabilities": False, "npp": 0, "nps": 0})
    out = tmp_path / "out"
    cli = [str(cfg_path), "-o", str(out)]
    main(cli)
    rd = out / "runs" / "rule" / "repeat_0"
    rec = json.loads((rd / "train_fold0.inputs.json").read_text())["inputs"]
    assert rec["budget"]["epochs"] == 1 and rec["settings"] == {"synthetic_fraction": 0.5} and rec["seed"] == 0
    assert rec["trainer"] == "PromptLesionTrainer" and rec["fold"] == "0" and rec["data_digest"].startswith("sha256:")
    assert "1 epochs x 1 iterations" in (out / "results" / "report.txt").read_text()
    record_before = {f: (out / f).read_text() for f in ("experiment.json", "runs/rule/repeat_0/settings.json")}

    def refused(changed_cfg: dict, *expected: str) -> None:
        p = tmp_path / "changed.json"
        p.write_text(json.dumps({**json.loads(cfg_path.read_text()), **changed_cfg}))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(p), "-o", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        for s in expected:
            assert s in err, err
        assert {f: (out / f).read_text() for f in record_before} == record_before, "the record was overwritten"

    refused({"budget": {**budget, "epochs": 2}}, "train arm=rule repeat=0 fold=0: budget.epochs 1 -> 2",
            "predict arm=rule repeat=0: the models changed", "evaluate arm=rule repeat=0: the predictions changed",
            "--retrain-changed")
    refused({"arms": [{**arms[0], "settings": {"synthetic_fraction": 1.0}}]},
            "train arm=rule repeat=0 fold=0: settings.synthetic_fraction 0.5 -> 1.0")
    refused({"seed": 5}, "train arm=rule repeat=0 fold=0: seed 0 -> 5")

    # --report-only under the changed budget reports the models as trained, and says that the config differs
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**json.loads(cfg_path.read_text()), "budget": {**budget, "epochs": 2}}))
    main([str(changed), "-o", str(out), "--report-only"])
    report = (out / "results" / "report.txt").read_text()
    assert "Budget: 1 epochs x 1 iterations" in report and "2 epochs" not in report.split("NOTE")[0]
    assert "NOTE: the config now differs" in report and "arm=rule repeat=0 fold=0: budget.epochs 1 -> 2" in report
    assert json.loads((out / "results" / "comparison.json").read_text())["models"]["rule"][0]["budget"]["epochs"] == 1

    # --retrain-changed: the training is redone from scratch with 2 epochs, then its prediction and evaluation
    capsys.readouterr()
    main([str(changed), "-o", str(out), "--retrain-changed"])
    printed = capsys.readouterr().out
    assert "redo (inputs changed): train arm=rule repeat=0 fold=0: budget.epochs 1 -> 2" in printed
    assert "train    arm=rule repeat=0 fold=0: trained" in printed and "resumed" not in printed
    fd = next((rd / "nnUNet_results").glob("*/PromptLesionTrainer__nnUNetPlans__3d_fullres/fold_0"))
    final = torch.load(fd / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(final["logging"]["train_losses"]) == 2
    assert json.loads((rd / "train_fold0.inputs.json").read_text())["inputs"]["budget"]["epochs"] == 2
    assert "Budget: 2 epochs x 1 iterations" in (out / "results" / "report.txt").read_text()
    assert json.loads((out / "experiment.json").read_text())["budget"]["epochs"] == 2
    # the same config once more: every step finished from these inputs
    main([str(changed), "-o", str(out)])
    assert "nothing to check or run" in capsys.readouterr().out


def test_postprocessing_option_decided_on_validation_reported_beside_raw_and_skipped_when_finished(nnunet_paths,
                                                                                                   tmp_path, capsys):
    """Real nnU-Net, 1 epoch x 1 iteration: with "postprocessing": true nnU-Net's own postprocessing is decided on the
    training's validation cases (never the test set), applied to the test predictions (predictions_pp/) and scored
    (evaluation_pp/); the report holds a second block of the same tables after the raw one, which stays first. A
    re-run skips the finished steps; a postprocessing step killed half-way (its temporary folder left) is redone."""
    from nnunet_promptlesion.cli.experiment import main

    root, did, env = nnunet_paths
    arms = [{"name": "real_only", "trainer": "nnUNetTrainer_earlyStopping"}]
    budget = {"epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "early_stopping_patience": 0,
              "mirroring": False, "save_every": 1, "final_validation": True}
    kw = dict(repeats=1, budget=budget, checkpoint="checkpoint_final.pth",
              predict={"disable_tta": True, "save_probabilities": False})
    # refused where the decision could not come from held-out validation cases
    for bad, msg in (({"folds": ["all"]}, "fold \"all\" validates on its own training cases"),
                     ({"budget": {**budget, "final_validation": False}}, "\"final_validation\": false skips"),
                     ({"postprocessing": "yes"}, "postprocessing must be true or false")):
        with pytest.raises(ExperimentError, match=msg):
            load_config(str(_config(tmp_path, did, "nnUNetPlans", arms, **{**kw, "postprocessing": True, **bad})))
    assert "postprocessing" not in load_config(str(_config(tmp_path, did, "nnUNetPlans", arms, **kw))).to_dict()

    cfg_path = _config(tmp_path, did, "nnUNetPlans", arms, postprocessing=True, **kw)
    out = tmp_path / "out"
    main([str(cfg_path), "-o", str(out)])
    rd = out / "runs" / "real_only" / "repeat_0"
    pp = rd / "postprocessing"
    assert (pp / "postprocessing.pkl").is_file() and (pp / "postprocessing.json").is_file()
    assert not (pp / "validation").exists()
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / next((root / "raw").glob(f"Dataset{did:03d}_*")).name /
                         "splits_final.json").read_text())
    # decided on fold 0's validation cases, none of them a test case
    decided_on = json.loads((pp / "inputs.json").read_text())["validation_cases"]
    assert [c[:-len(".nii.gz")] for c in decided_on] == sorted(splits[0]["val"])
    test_cases = sorted(p.name for p in (rd / "predictions").glob("*.nii.gz"))
    assert not set(decided_on) & set(test_cases)
    assert sorted(p.name for p in (rd / "predictions_pp").glob("*.nii.gz")) == test_cases
    assert (rd / "evaluation_pp" / "evaluation.json").is_file() and (rd / "evaluation" / "evaluation.json").is_file()
    report = (out / "results" / "report.txt").read_text()
    raw, sep, after = report.partition("After nnU-Net postprocessing")
    assert sep and "nnUNetv2_determine_postprocessing on its validation cases\n(held out" in after
    assert raw.startswith("tiny: ") and "after nnU-Net postprocessing" not in raw
    for cls in ("vessel_wall", "calcified_plaque", "noncalcified_plaque"):   # every class in both blocks
        assert f"\n{cls}" in raw and f"\n{cls}" in after
    assert "Postprocessing decided on validation: real_only repeat 0: " in after
    assert "After nnU-Net postprocessing" in (out / "results" / "results.md").read_text()
    comp = json.loads((out / "results" / "comparison.json").read_text())
    assert set(comp["postprocessed"]["table"]) == set(comp["table"])
    assert list(comp["postprocessed"]["table"]["vessel_wall"]) == ["real_only"]

    # a re-run: every step, the postprocessing ones included, finished
    capsys.readouterr()
    main([str(cfg_path), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "nothing to check or run" in printed
    for step in ("postprocess arm=real_only repeat=0: skipped (finished)",
                 "evaluate_pp arm=real_only repeat=0: skipped (finished)"):
        assert step in printed, printed
    # the application killed half-way: its output is gone, a temporary folder is left; the decision is kept
    shutil.rmtree(rd / "predictions_pp")
    (rd / ".predictions_pp.x.partial").mkdir()
    pkl_before = (pp / "postprocessing.pkl").stat().st_mtime_ns
    main([str(cfg_path), "-o", str(out)])
    printed = capsys.readouterr().out
    assert "postprocess arm=real_only repeat=0: decision kept (finished)" in printed, printed
    assert sorted(p.name for p in (rd / "predictions_pp").glob("*.nii.gz")) == test_cases
    assert not (rd / ".predictions_pp.x.partial").exists()
    assert (pp / "postprocessing.pkl").stat().st_mtime_ns == pkl_before
