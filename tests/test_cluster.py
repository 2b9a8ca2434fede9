"""promptlesion_experiment beyond one machine: the submitit executors (experiments/executors.py).

Without a cluster: the slurm path runs against stand-in sbatch/srun/sacct/scancel commands (what is submitted, one
job per (arm, repeat) chain with the config's resources, the cancel on SIGTERM); submitit's local executor runs the
same jobs as real local processes (a failure, a SIGTERM, and with real nnU-Net a kill, a resume and the layout of
the local executor). The submitit tests skip when submitit is not installed (it is the optional extra "cluster");
the local executor without submitit is tested here in every case."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, processes_with_env, wait_until_gone
from test_experiment import SCRIPTED, _config, _scripted_experiment, _steps

from nnunet_promptlesion.experiments.config import ExperimentError, load_config
from nnunet_promptlesion.experiments.runner import ExperimentRunner

NEEDS_SUBMITIT = pytest.mark.skipif(
    __import__("importlib").util.find_spec("submitit") is None,
    reason='submitit is not installed (optional: pip install "nnunet_promptlesion[cluster]")')

# the scripted runner of test_experiment (steps are sleeping child processes), knowing when a chain is finished
SCRIPTED_CLUSTER = SCRIPTED.replace("\nif __name__", '''
def _chain_finished(self, arm, r):
    f = self.out / "steps.jsonl"
    return f.is_file() and any(json.loads(l)["what"] == f"evaluate {arm.name} {r}" for l in f.read_text().splitlines())
Scripted.chain_finished = _chain_finished

if __name__''', 1)


def _scripted_cluster(tmp_path: Path, arms: list[str], executor: dict, repeats: int = 1) -> tuple[Path, dict]:
    cfg_path, env = _scripted_experiment(tmp_path, arms, jobs=1, repeats=repeats)
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "executor": executor}))
    (tmp_path / "scripted.py").write_text(SCRIPTED_CLUSTER)
    return cfg_path, env


def test_local_executor_needs_no_submitit_and_the_others_say_how_to_install_it(tmp_path):
    """With submitit unimportable: the default (local) executor runs an experiment; --executor slurm and a config's
    "executor": "submitit_local" refuse at once (exit 2), naming the extra to install."""
    block = "import sys; sys.modules['submitit'] = None\n"   # import submitit -> ImportError
    cfg_path, env = _scripted_experiment(tmp_path, ["a"], jobs=1, repeats=1)
    (tmp_path / "scripted.py").write_text(block + SCRIPTED)
    r = subprocess.run([sys.executable, str(tmp_path / "scripted.py"), str(cfg_path), str(tmp_path / "out")],
                       env=dict(env, SLEEP="0.1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [s["what"] for s in _steps(tmp_path / "out")] == ["train a 0", "predict a 0", "evaluate a 0"]
    assert not (tmp_path / "out" / "jobs").exists()
    code = block + ("from nnunet_promptlesion.cli.experiment import main\n"
                    f"main([{str(cfg_path)!r}, '-o', {str(tmp_path / 'out2')!r}] + sys.argv[1:])\n")
    for extra, cfg_executor in ((["--executor", "slurm"], None), ([], "submitit_local")):
        if cfg_executor:
            cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "executor": cfg_executor}))
        r = subprocess.run([sys.executable, "-c", code, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        assert "need submitit, which is not installed" in r.stderr and 'pip install "nnunet_promptlesion[cluster]"' \
            in r.stderr and "--executor local" in r.stderr, r.stderr
        assert not (tmp_path / "out2" / "runs").exists()


def test_executor_config_checked_and_cli_override(tmp_path):
    cfg_path, env = _scripted_experiment(tmp_path, ["a"], jobs=1)
    base = json.loads(cfg_path.read_text())

    def cfg(executor) -> Path:
        p = tmp_path / "c.json"
        p.write_text(json.dumps({**base, "executor": executor}))
        return p

    for bad, msg in (({"kind": "sge"}, "key 'executor.kind' must be one of"),
                     ({"kind": "slurm", "gpus_per_job": 2}, "executor.gpus_per_job' must be an integer in [0, 1]"),
                     ({"kind": "slurm", "mem": 4}, "unknown keys ['executor.mem']"),
                     ({"kind": "slurm", "time_min": "2h"}, "executor.time_min' must be an integer")):
        with pytest.raises(ExperimentError) as e:
            load_config(str(cfg(bad)))
        assert msg in str(e.value)
    slurm = {"kind": "slurm", "partition": "gpu", "time_min": 600}
    assert load_config(str(cfg(slurm))).to_dict()["executor"] == slurm
    # --executor replaces the kind only; the default executor leaves experiment.json as before the option
    assert load_config(str(cfg(slurm)), {"executor": "submitit_local"}).executor == {**slurm, "kind": "submitit_local"}
    assert "executor" not in load_config(str(cfg({"kind": "local"}))).to_dict()
    assert "executor" not in load_config(str(cfg_path)).to_dict()
    assert load_config(str(cfg("slurm"))).executor == {"kind": "slurm"}


# stand-ins for SLURM's commands: sbatch keeps the script and answers a job id; sacct says PENDING; scancel notes it
FAKE_SLURM = {
    "sbatch": 'n=$(ls "$FAKE_SLURM_DIR"/sbatch_*.sh 2>/dev/null | wc -l); id=$((4242 + n))\n'
              'cp "$1" "$FAKE_SLURM_DIR/sbatch_$id.sh"\necho "Submitted batch job $id"\n',
    "srun": 'exit 1\n',
    "sacct": 'echo "JobID|State|NodeList"\nfor a in "$@"; do case $a in -j) next=1;; *) if [ -n "$next" ]; then '
             'echo "$a|PENDING|None assigned"; fi; next=;; esac; done\n',
    "scancel": 'echo "$@" >> "$FAKE_SLURM_DIR/scancel.txt"\n',
}


@NEEDS_SUBMITIT
def test_slurm_executor_submits_one_job_per_chain_with_the_config_resources_and_cancels_them(nnunet_paths, tmp_path):
    """--executor slurm against stand-in SLURM commands: `--check` prints the sbatch script; the run submits one job
    per (arm, repeat) chain, each script with the config's partition, GPUs, CPUs, memory, time and extra flags, and
    records the jobs; --report-only says where they stand; a re-run finds them pending and submits nothing; SIGTERM
    cancels every one (scancel) and says so. Nothing runs: the jobs stay pending."""
    root, did, env = nnunet_paths
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/bin/bash\n" + body)
        (fake / name).chmod(0o755)
    executor = {"kind": "slurm", "partition": "gpu_a100", "gpus_per_job": 1, "cpus_per_task": 12, "mem_gb": 48,
                "time_min": 2880, "poll_s": 0.5, "setup": ["module load cuda/12.1"],
                "slurm_additional": {"account": "lesion_lab", "qos": "long"}}
    arms = [{"name": "real_only", "trainer": "nnUNetTrainer_earlyStopping"},
            {"name": "rule", "trainer": "PromptLesionTrainer", "settings": {"synthetic_fraction": 0.5}}]
    cfg_path = _config(tmp_path, did, "nnUNetPlans", arms, repeats=2, device="cuda", executor=executor)
    out = tmp_path / "out"
    run_env = dict(env, PATH=f"{fake}:{env['PATH']}", FAKE_SLURM_DIR=str(fake))
    cmd = [str(BIN / "promptlesion_experiment"), str(cfg_path), "-o", str(out)]
    r = subprocess.run(cmd + ["--check"], env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "#SBATCH --partition=gpu_a100" in r.stdout and "#SBATCH --time=2880" in r.stdout

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(p: subprocess.Popen, pred, what: str, timeout: float = 180) -> None:
        t0 = time.time()
        while not pred():
            assert p.poll() is None, f"ended before {what}: {p.communicate()}"
            assert time.time() - t0 < timeout, f"no {what}"
            time.sleep(0.2)

    jobs_file = out / "jobs" / "jobs.json"
    p = start()
    try:
        wait_for(p, lambda: jobs_file.is_file() and len(json.loads(jobs_file.read_text())["chains"]) == 4, "4 jobs")
        time.sleep(1.5)   # a few polls: nothing else may be submitted
        scripts = sorted(fake.glob("sbatch_*.sh"))
        assert len(scripts) == 4, "one job per (arm, repeat) chain"
        # the first run is killed without warning (its terminal closed): the jobs stay queued
        p.kill()
        p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
    rec = json.loads(jobs_file.read_text())["chains"]
    assert sorted(rec) == ["real_only/repeat_0", "real_only/repeat_1", "rule/repeat_0", "rule/repeat_1"]
    assert sorted(e["job_id"] for e in rec.values()) == ["4242", "4243", "4244", "4245"]
    for e in rec.values():
        assert e["executor"] == "slurm" and e["stdout"].endswith(f"jobs/submitit/{e['job_id']}_0_log.out")
    for s in scripts:
        text = s.read_text()
        for flag in ("--partition=gpu_a100", "--gpus-per-node=1", "--cpus-per-task=12", "--mem=48GB", "--time=2880",
                     "--account=lesion_lab", "--qos=long", "--nodes=1", "--ntasks-per-node=1", "--job-name=tiny."):
            assert f"#SBATCH {flag}" in text, (flag, text)
        assert "module load cuda/12.1" in text and f"-m submitit.core._submit {out / 'jobs' / 'submitit'}" in text
    # settings of the PromptLesion arm are written at submission, as the local runner writes them
    assert json.loads((out / "runs" / "rule" / "repeat_0" / "settings.json").read_text()) == {"synthetic_fraction": 0.5}
    # --report-only while the jobs wait: nothing evaluated yet, and where the jobs stand as recorded
    r = subprocess.run(cmd + ["--report-only"], env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "nothing evaluated yet" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Jobs (slurm, as recorded" in r.stdout and "real_only/repeat_0 (job 4242)" in r.stdout, r.stdout

    # a re-run finds the four jobs pending (sacct) and waits for them; SIGTERM cancels all of them
    p = start()
    try:
        t0 = time.time()
        lines = []
        while len([l for l in lines if "from an earlier run is PENDING: waiting for it" in l]) < 4:
            assert p.poll() is None and time.time() - t0 < 180, lines
            lines.append(p.stdout.readline())
        p.terminate()
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert len(list(fake.glob("sbatch_*.sh"))) == 4, "a pending job was submitted again"
    assert "interrupted: cancelled 4 job(s): " in stdout and "(scancel)" in stdout
    assert sorted((fake / "scancel.txt").read_text().split()) == ["4242", "4243", "4244", "4245"]
    assert {e["state"] for e in json.loads(jobs_file.read_text())["chains"].values()} == {"CANCELLED"}


@NEEDS_SUBMITIT
def test_submitit_local_failed_job_stops_submissions_and_sigterm_cancels_running_jobs(tmp_path):
    """Scripted steps as submitit jobs (real local processes): a failing job ends the command (exit 2) with the job's
    log tail and nothing submitted after it; SIGTERM while two jobs run cancels both and leaves no process."""
    cfg_path, env = _scripted_cluster(tmp_path, ["bad", "a"], {"kind": "submitit_local", "max_jobs": 1, "poll_s": 0.2})
    r = subprocess.run([sys.executable, str(tmp_path / "scripted.py"), str(cfg_path), str(tmp_path / "out")],
                       env=dict(env, SLEEP="0.2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "(bad/repeat_0) ended FAILED; nothing new was submitted" in r.stderr, r.stderr
    assert "train arm 'bad' repeat 0 failed" in r.stderr and "jobs/submitit/" in r.stderr   # the job's log tail
    assert [s["what"] for s in _steps(tmp_path / "out")] == ["train bad 0"]
    rec = json.loads((tmp_path / "out" / "jobs" / "jobs.json").read_text())["chains"]
    assert list(rec) == ["bad/repeat_0"] and rec["bad/repeat_0"]["state"] == "FAILED"

    tag = f"test_cluster_{os.getpid()}_{time.time_ns()}"
    cfg_path, env = _scripted_cluster(tmp_path, ["a", "b"], {"kind": "submitit_local", "poll_s": 0.2})
    p = subprocess.Popen([sys.executable, str(tmp_path / "scripted.py"), str(cfg_path), str(tmp_path / "out2")],
                         env=dict(env, SLEEP="300", CLUSTER_TEST_TAG=tag), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        # both jobs are in their training step: the step's sleeping process runs
        while sum(f"train {a} 0" in cmd for cmd in processes_with_env("CLUSTER_TEST_TAG", tag).values()
                  for a in "ab") < 2:
            assert p.poll() is None and time.time() - t0 < 180, p.communicate()
            time.sleep(0.2)
        p.terminate()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-3000:] + err[-3000:]
    assert "interrupted: cancelled 2 job(s)" in out and "run the same command again to resume" in err
    assert wait_until_gone("CLUSTER_TEST_TAG", tag, 30) == {}, "a job's process outlived the SIGTERM"
    assert _steps(tmp_path / "out2") == []
    states = {e["state"] for e in json.loads((tmp_path / "out2" / "jobs" / "jobs.json").read_text())["chains"].values()}
    assert states == {"CANCELLED"}


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@NEEDS_SUBMITIT
@pytest.mark.slow
def test_submitit_local_real_nnunet_killed_adopted_cancelled_resumed_like_the_local_executor(nnunet_paths, tmp_path):
    """One tiny experiment (1 arm x 1 repeat, real nnU-Net, 2 epochs x 1 iteration) through submitit's local executor:
    (a) the command is SIGKILLed while its job trains: the job goes on;
    (b) the same command finds the job by its recorded id and waits for it (nothing submitted); SIGTERM cancels it
        and no process of it is left;
    (c) the same command resubmits the chain and finishes: the folder has the local executor's layout, and the local
        executor finds every step finished (the same records and markers); OUT/jobs/ records the jobs."""
    root, did, env = nnunet_paths
    tag = f"test_cluster_{os.getpid()}_{time.time_ns()}"
    arms = [{"name": "real_only", "trainer": "nnUNetTrainer_earlyStopping"}]
    # 2 epochs: the job still trains when the second command looks for it
    budget = {"epochs": 2, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "early_stopping_patience": 0,
              "mirroring": False, "save_every": 1, "final_validation": False}
    cfg_path = _config(tmp_path, did, "nnUNetPlans", arms, repeats=1, budget=budget, checkpoint="checkpoint_final.pth",
                       predict={"disable_tta": True, "save_probabilities": False, "npp": 0, "nps": 0},
                       executor={"kind": "submitit_local", "poll_s": 0.5})
    out = tmp_path / "out"
    cmd = [str(BIN / "promptlesion_experiment"), str(cfg_path), "-o", str(out)]
    run_env = dict(env, CLUSTER_TEST_TAG=tag)
    rd = out / "runs" / "real_only" / "repeat_0"
    jobs_file = out / "jobs" / "jobs.json"

    def start(log: Path) -> subprocess.Popen:
        # output to a file: the job's processes inherit it, and a pipe would stay open while they run
        with open(log, "w") as f:
            return subprocess.Popen(cmd, env=run_env, stdout=f, stderr=subprocess.STDOUT, text=True)

    # (a) SIGKILL once the job's training started (its record is written just before nnU-Net starts)
    p = start(tmp_path / "a.log")
    try:
        t0 = time.time()
        while not (rd / "train_fold0.inputs.json").is_file():
            assert p.poll() is None and time.time() - t0 < 600, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.2)
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    first = json.loads(jobs_file.read_text())["chains"]["real_only/repeat_0"]
    assert processes_with_env("CLUSTER_TEST_TAG", tag), "the job should outlive its submitter"

    # (b) found and waited for, then cancelled by SIGTERM
    p = start(tmp_path / "b.log")
    try:
        t0 = time.time()
        while "from an earlier run is RUNNING: waiting for it" not in (tmp_path / "b.log").read_text():
            assert p.poll() is None and time.time() - t0 < 300, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(0.2)
        p.terminate()
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    printed = (tmp_path / "b.log").read_text()
    assert p.returncode == 130, printed[-3000:]
    assert f"job {first['job_id']} (real_only/repeat_0) from an earlier run is RUNNING" in printed
    assert f"interrupted: cancelled 1 job(s): {first['job_id']}" in printed and "submitted job" not in printed
    assert wait_until_gone("CLUSTER_TEST_TAG", tag, 30) == {}, "a process of the cancelled job is left"
    assert not (rd / "evaluation" / "evaluation.json").exists(), "the job was not stopped"

    # (c) resumed to the end
    p = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "submitted job" in p.stdout and "(real_only/repeat_0): COMPLETED" in p.stdout
    rec = json.loads(jobs_file.read_text())["chains"]["real_only/repeat_0"]
    assert rec["state"] == "COMPLETED" and rec["job_id"] != first["job_id"]
    assert rec["earlier_jobs"] == [{"job_id": first["job_id"], "state": "CANCELLED"}]
    assert Path(rec["stdout"]).is_file() and "train    arm=real_only repeat=0 fold=0" in Path(rec["stdout"]).read_text()
    files = _files(out)
    for f in ("experiment.json", "experiment.log", "runs/real_only/repeat_0/train_fold0.inputs.json",
              "runs/real_only/repeat_0/train_fold0.complete", "runs/real_only/repeat_0/predictions/.complete",
              "runs/real_only/repeat_0/evaluation/evaluation.json", "runs/real_only/repeat_0/evaluation/inputs.json",
              "runs/real_only/repeat_0/logs/train_fold0.log", "runs/real_only/repeat_0/logs/predict.log",
              "results/report.txt", "results/comparison.json", "jobs/jobs.json"):
        assert f in files, (f, sorted(files))
    fold = next((rd / "nnUNet_results").glob("*/nnUNetTrainer_earlyStopping__nnUNetPlans__3d_fullres/fold_0"))
    assert (fold / "checkpoint_final.pth").is_file()
    assert "Jobs (submitit_local, as recorded" in (out / "results" / "report.txt").read_text()
    # the local executor reads the same folder as finished: same records and markers, nothing runs
    local = subprocess.run(cmd + ["--executor", "local"], env=run_env, capture_output=True, text=True, timeout=600)
    assert local.returncode == 0 and "nothing to check or run" in local.stdout, local.stdout[-3000:] + local.stderr
    assert _files(out) == files
    assert wait_until_gone("CLUSTER_TEST_TAG", tag, 30) == {}


def test_runner_chain_finished_is_what_the_local_runner_skips(tmp_path, monkeypatch):
    """chain_finished (what the executors leave unsubmitted) agrees with the local runner's own skip decisions."""
    cfg_path, env = _scripted_experiment(tmp_path, ["a"], jobs=1, repeats=1)
    for k in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(k, env[k])
    runner = ExperimentRunner(load_config(str(cfg_path)), tmp_path / "o")
    plans = tmp_path / "pre" / "Dataset999_Scripted" / "nnUNetPlans.json"
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({"configurations": {"3d_fullres": {"data_identifier": "d", "architecture": {}}}}))
    (plans.parent / "dataset.json").write_text("{}")
    (plans.parent / "splits_final.json").write_text(json.dumps([{"train": ["a"], "val": ["b"]}]))
    arm = runner.cfg.arms[0]
    assert not runner.chain_finished(arm, 0)
    fd = runner.fold_dir(arm, 0, "0")
    fd.mkdir(parents=True)
    (fd / "checkpoint_final.pth").write_bytes(b"")
    runner._train_marker(arm, 0, "0").write_text("done\n")
    runner._train_record(arm, 0, "0").write_text(json.dumps({"inputs": runner.train_inputs(arm, 0, "0")}))
    (runner.run_dir("a", 0) / "predictions").mkdir()
    (runner.run_dir("a", 0) / "predictions" / ".complete").write_text(f"x {runner._predict_stamp(arm)}\n")
    assert not runner.chain_finished(arm, 0)      # evaluation missing
    (runner.run_dir("a", 0) / "evaluation").mkdir()
    (runner.run_dir("a", 0) / "evaluation" / "evaluation.json").write_text("{}")
    (runner.run_dir("a", 0) / "evaluation" / "inputs.json").write_text(
        json.dumps({"inputs": runner._evaluate_inputs(arm, 0)}))
    assert runner.chain_finished(arm, 0)
