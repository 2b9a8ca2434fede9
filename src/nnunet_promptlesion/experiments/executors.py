"""Where an experiment's (arm, repeat) chains run: here (``"local"``, the default) or as cluster jobs through submitit.

The runner (:mod:`.runner`, its records in :mod:`.layout`) keeps every piece of bookkeeping: the folds (scarce/full),
seeds, settings, step records and markers, ``--retrain-changed``, the report. An executor only decides *where* a
chain's steps run:

* ``local``: child processes of ``promptlesion_experiment`` (``"jobs": N`` chains at a time), as always.
* ``slurm``: one SLURM job per (arm, repeat) chain, submitted with submitit's ``AutoExecutor``; the job runs the
  same :meth:`ExperimentRunner._run_steps` on the node (its trainings, then prediction, evaluation and, with
  ``"postprocessing"``, the postprocessing steps), so a step makes and records exactly what it makes locally.
* ``submitit_local``: the same jobs through submitit's ``LocalExecutor`` (real local processes): a cluster
  config tried on one machine, and what the tests run.

Why one job per chain and not dependent jobs (train -> predict -> evaluate with ``--dependency=afterok``): every
step already skips itself when its record says it is finished, so re-running a chain *is* resuming it. A chain job
that dies (time limit, node failure, scancel) is resubmitted whole and continues at its first unfinished step: a
killed training resumes from its checkpoint (``nnUNetv2_train --c``), a finished one is skipped. Dependent jobs
would leave a dependency that never clears (``DependencyNeverSatisfied``) after any failure, to be found and
cancelled before a resume could resubmit, and put each minutes-long prediction or evaluation through the queue
again. The cost: the folds of one repeat train one after another in its job (the shipped configs train one fold).
A job that reaches its time limit is requeued by submitit (the callable is checkpointable: it resubmits itself,
and the steps resume as above) up to 3 times.

Config (``"executor"`` in the experiment config, checked against :class:`.config.ExecutorSpec`; ``--executor KIND``
overrides ``kind``)::

    "executor": {"kind": "slurm", "partition": "gpu", "gpus_per_job": 1, "cpus_per_task": 8, "mem_gb": 64,
                 "time_min": 2880, "max_jobs": null, "poll_s": 60,
                 "setup": ["module load cuda/12.1", "source /path/to/venv/bin/activate"],
                 "slurm_additional": {"account": "my_lab", "qos": "normal"}}

Record (``OUT/jobs/jobs.json``): per chain ``<arm>/repeat_<r>`` the job id, its state as last seen, its log files
(submitit's ``OUT/jobs/submitit/<id>_0_log.out``/``.err``) and the ids of earlier jobs of the chain. A re-run
asks SLURM (sacct) about the recorded jobs: one still pending or running is waited for, not submitted again; a
chain whose steps are all finished is not submitted. A failed job stops the submission of new jobs and the
command exits with the job's log tail; the jobs still running go on (a re-run waits for them; ``scancel`` stops
them). SIGTERM or Ctrl-C cancels every job the command submitted or waits for, and says which.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..utils.atomic import write_json_atomic
from .config import Arm, ExecutorSpec, ExperimentError
from .processes import descendants, end_orphans

if TYPE_CHECKING:   # annotations only: the runner imports this module to run its chains
    from .runner import ExperimentRunner

INSTALL_HINT = 'pip install "nnunet_promptlesion[cluster]"   (or: pip install "submitit>=1.5")'
JOBS_DIR = "jobs"
#: SLURM job states (sacct) of a job that is still to run or running: found on a re-run, it is waited for
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
                 "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "READY")
UNKNOWN_GRACE_S = 600.0   # a job just submitted may not be in sacct yet; unknown for longer is a failure


def executor_spec(cfg) -> ExecutorSpec:
    return ExecutorSpec(**(cfg.executor or {}))


def import_submitit():
    """submitit, or an ExperimentError saying how to install it."""
    try:
        import submitit  # optional (extra [cluster]): only the slurm / submitit_local executors need it
    except ImportError:
        raise ExperimentError("the slurm and submitit_local executors need submitit, which is not installed; "
                              f"install it with\n  {INSTALL_HINT}\nor run here without it: --executor local") from None
    return submitit


# ------------------------------------------------------------------------------------------------ the job side
class ChainJob:
    """What a submitit job runs: the steps of one (arm, repeat) chain, by the runner's own code, on the node.

    Picklable (submitit pickles it with cloudpickle): the config, the output folder, the chain and what the
    submitting runner derived before submission (the scarcity folds, which arms read PromptLesion settings).
    ``checkpoint`` makes submitit requeue it at the time limit: the same chain again, resuming its steps."""

    def __init__(self, runner_cls: type, cfg, out: str, arm: str, repeat: int,
                 steps: list[tuple[int, str, str | None]], n: int, scarcity: list[dict] | None,
                 promptlesion_arms: set[str], show: tuple[str, ...]):
        self.runner_cls, self.cfg, self.out, self.arm, self.repeat = runner_cls, cfg, out, arm, repeat
        self.steps, self.n, self.scarcity, self.promptlesion_arms, self.show = steps, n, scarcity, \
            set(promptlesion_arms), tuple(show)

    def __call__(self) -> list[str]:
        lines: list[str] = []

        def log(line: str) -> None:
            lines.append(line)
            print(line, flush=True)

        runner = self.runner_cls(self.cfg, self.out, arms=[self.arm], log=log, show=self.show)
        runner.scarcity = self.scarcity
        runner._promptlesion_arms = set(self.promptlesion_arms)
        arm = next(a for a in runner.cfg.arms if a.name == self.arm)
        runner._run_steps(arm, self.repeat, self.steps, self.n)
        return lines

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission  # optional (extra [cluster]), see import_submitit

        return DelayedSubmission(self, *args, **kwargs)


# ------------------------------------------------------------------------------------------ the submitting side
def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time) of a live process, None when there is none."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return rest[0], rest[19]


@dataclass
class _Job:
    """One submitted job as the runner tracks it (submitted by this command or found in jobs.json)."""
    key: str
    arm: Arm
    repeat: int
    job_id: str
    folder: Path
    kind: str
    submitted_at: float
    mine: bool                     # submitted by this command (else: found running from an earlier one)
    job: Any = None                # the submitit job object
    start_time: str | None = None  # submitit_local: the controller's start time (a reused pid is not it)
    state: str = "SUBMITTED"
    seen_completed: float | None = None

    def paths(self):
        from submitit.core.utils import JobPaths  # optional (extra [cluster]), see import_submitit

        return JobPaths(self.folder, job_id=self.job_id, task_id=0)


def _squeue_state(job_id: str) -> str | None:
    """The job's state as squeue shows it (jobs in the queue or running), None when it shows none."""

    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    states = r.stdout.split() if r.returncode == 0 else []
    return states[0].upper() if states else None


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


class SubmititChains:
    """Submits the chains as submitit jobs, watches them to the end, records them in OUT/jobs/jobs.json."""

    def __init__(self, runner: ExperimentRunner, spec: ExecutorSpec):
        self.runner, self.spec = runner, spec
        self.submitit = import_submitit()
        self.dir = runner.out / JOBS_DIR
        self.folder = self.dir / "submitit"
        self.record_file = self.dir / "jobs.json"
        self.cluster = "slurm" if spec.kind == "slurm" else "local"
        self.poll_s = spec.poll_s if spec.poll_s is not None else (60.0 if self.cluster == "slurm" else 1.0)
        self.print = runner.print
        self._executor = None

    # -------------------------------------------------------------- the executor and its sbatch script
    def executor(self):
        """submitit's AutoExecutor with the config's resources (built once)."""
        if self._executor is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            ex = self.submitit.AutoExecutor(folder=str(self.folder), cluster=self.cluster)
            ex.update_parameters(**self.parameters())
            self._executor = ex
        return self._executor

    def parameters(self) -> dict:
        s, cfg = self.spec, self.runner.cfg
        gpus = s.gpus_per_job if s.gpus_per_job is not None else (1 if cfg.device == "cuda" else 0)
        p: dict[str, Any] = {"name": f"{cfg.name}", "nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus,
                             "timeout_min": s.time_min if s.time_min is not None else (
                                 24 * 60 if self.cluster == "slurm" else 365 * 24 * 60)}
        if s.cpus_per_task is not None:
            p["cpus_per_task"] = s.cpus_per_task
        if s.mem_gb is not None:
            p["mem_gb"] = s.mem_gb
        if self.cluster == "slurm":
            if s.partition:
                p["slurm_partition"] = s.partition
            if s.setup:
                p["slurm_setup"] = list(s.setup)
            if s.slurm_additional:
                p["slurm_additional_parameters"] = dict(s.slurm_additional)
        elif s.setup:
            p["local_setup"] = list(s.setup)
        return p

    # -------------------------------------------------------------- record
    def _read_record(self) -> dict:
        try:
            rec = json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            return {"chains": {}}
        return rec if isinstance(rec.get("chains"), dict) else {"chains": {}}

    def _write_record(self, rec: dict) -> None:
        rec["executor"] = {k: v for k, v in self.spec.__dict__.items() if v not in (None, [], {})}
        rec["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_json_atomic(rec, self.record_file)

    def _note(self, rec: dict, j: _Job, **extra) -> None:
        p = j.paths()
        entry = rec["chains"].setdefault(j.key, {})
        if entry.get("job_id") != j.job_id:   # a new job of the chain: the earlier one is kept as history
            earlier = entry.get("earlier_jobs", []) + ([{"job_id": entry["job_id"], "state": entry.get("state")}]
                                                       if entry.get("job_id") else [])
            entry.clear()
            entry.update(arm=j.arm.name, repeat=j.repeat, earlier_jobs=earlier,
                         submitted=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.submitted_at)))
        entry.update(job_id=j.job_id, state=j.state, executor=j.kind, stdout=str(p.stdout), stderr=str(p.stderr),
                     **extra)
        if j.start_time is not None:
            entry["process_start_time"] = j.start_time
        self._write_record(rec)

    # -------------------------------------------------------------- job states
    def _job_object(self, job_id: str):
        if self.cluster == "slurm":
            from submitit.slurm.slurm import SlurmJob  # optional (extra [cluster]), see import_submitit
            return SlurmJob(folder=self.folder, job_id=job_id)
        from submitit.local.local import LocalJob  # optional (extra [cluster]), see import_submitit
        return LocalJob(folder=self.folder, job_id=job_id)

    def _outcome(self, j: _Job) -> str | None:
        """"success" / "error" from the job's result file, None when there is none (yet)."""
        rp = j.paths().result_pickle
        if not rp.is_file():
            return None
        try:
            from submitit.core.utils import pickle_load  # optional (extra [cluster]), see import_submitit
            outcome, _ = pickle_load(rp)
        except Exception:  # noqa: BLE001 - a torn file reads as no result yet
            return None
        return outcome

    def _alive_local(self, j: _Job) -> bool:
        proc = getattr(j.job, "_process", None)
        if proc is not None:
            return proc.poll() is None
        st = _proc_stat(int(j.job_id))
        return st is not None and st[0] != "Z" and st[1] == j.start_time

    def _poll(self, j: _Job) -> str:
        """"active", "success" or "failed"; updates ``j.state``."""
        outcome = self._outcome(j)
        if self.cluster == "local":
            if self._alive_local(j):
                j.state = "RUNNING"
                return "active"
            j.state = {"success": "COMPLETED", "error": "FAILED"}.get(outcome or "", "INTERRUPTED")
            return "success" if outcome == "success" else "failed"
        raw = (j.job.watcher.get_state(j.job_id, mode="cache") or "UNKNOWN").upper()
        if outcome is not None:
            j.state = "COMPLETED" if outcome == "success" else f"FAILED ({raw})" if raw != "UNKNOWN" else "FAILED"
            return "success" if outcome == "success" else "failed"
        if raw == "UNKNOWN" and not j.mine:   # not (or no longer) in sacct: ask squeue before it counts as gone
            raw = _squeue_state(j.job_id) or raw
        j.state = raw
        if raw.split()[0] in ACTIVE_STATES:
            return "active"
        if raw == "UNKNOWN" and j.mine and time.time() - j.submitted_at < UNKNOWN_GRACE_S:
            return "active"   # not in sacct yet
        if raw == "COMPLETED":   # the result file may lag behind on a shared file system
            j.seen_completed = j.seen_completed or time.time()
            if time.time() - j.seen_completed < 120:
                return "active"
        return "failed"

    def _refresh(self) -> None:
        if self.cluster == "slurm":
            from submitit.slurm.slurm import SlurmJob  # optional (extra [cluster]), see import_submitit
            SlurmJob.watcher.update()   # one sacct call for every job

    def _adopt(self, key: str, arm: Arm, r: int, entry: dict) -> _Job | None:
        """The job recorded for a chain, when it is still pending or running; else None."""
        job_id = entry.get("job_id")
        if not job_id or entry.get("executor", self.spec.kind) != self.spec.kind:
            return None
        j = _Job(key, arm, r, str(job_id), self.folder, self.spec.kind, time.time(), mine=False,
                 job=self._job_object(str(job_id)), start_time=entry.get("process_start_time"))
        if self.cluster == "local" and j.start_time is None:
            return None
        self._refresh()
        return j if self._poll(j) == "active" else None

    # -------------------------------------------------------------- submit, cancel
    def _submit(self, arm: Arm, r: int, steps: list, n: int) -> _Job:
        rn = self.runner
        ex = self.executor()
        ex.update_parameters(name=f"{rn.cfg.name}.{arm.name}.r{r}")
        if arm.name in rn._promptlesion_arms:
            rn._write_settings(arm, r)   # here too: visible in the folder from submission on
        job = ex.submit(ChainJob(type(rn), rn.cfg, str(rn.out), arm.name, r, steps, n, rn.scarcity,
                                 rn._promptlesion_arms, rn.show))
        j = _Job(f"{arm.name}/repeat_{r}", arm, r, str(job.job_id), self.folder, self.spec.kind, time.time(),
                 mine=True, job=job)
        if self.cluster == "local":
            st = _proc_stat(int(j.job_id))
            j.start_time = st[1] if st else None
        return j

    def _cancel(self, jobs: list[_Job]) -> list[str]:
        """Cancel ``jobs`` (scancel; locally SIGINT to the job, then its leftover processes). Returns their ids."""
        trees = {}
        for j in jobs:
            if self.cluster == "local":
                trees[j.job_id] = descendants(int(j.job_id)) if self._alive_local(j) else {}
                if self._alive_local(j):
                    try:
                        os.kill(int(j.job_id), signal.SIGINT)   # what LocalJob.cancel does
                    except OSError:
                        pass
            else:
                try:
                    j.job.cancel(check=False)   # scancel <id>
                except OSError as e:
                    self.print(f"[experiment] could not cancel job {j.job_id}: {e}")
            j.state = "CANCELLED"
        if self.cluster == "local":   # the controller stops its task; then whatever the task had started
            deadline = time.time() + 30
            while any(self._alive_local(j) for j in jobs) and time.time() < deadline:
                time.sleep(0.2)
            for j in jobs:
                proc = getattr(j.job, "_process", None)
                if self._alive_local(j):
                    os.kill(int(j.job_id), signal.SIGKILL)
                if proc is not None:
                    proc.wait()
            tree: dict[int, str] = {}
            for t in trees.values():
                tree.update(t)
            end_orphans(tree, 10.0)
        return [j.job_id for j in jobs]

    # -------------------------------------------------------------- the loop
    def run(self, chains: list[tuple[Arm, int, list]], n: int) -> None:
        rec = self._read_record()
        active: dict[str, _Job] = {}
        try:
            failed = self._watch(chains, n, rec, active)
        except KeyboardInterrupt:   # Ctrl-C, or SIGTERM turned into one by the runner: cancel what runs
            running = list(active.values())
            if running:
                ids = self._cancel(running)
                for j in running:
                    self._note(rec, j, cancelled="by promptlesion_experiment (interrupted)")
                self.print(f"[experiment] interrupted: cancelled {len(ids)} job(s): {', '.join(ids)}"
                           + (" (scancel)" if self.cluster == "slurm" else ""))
            raise
        if failed is not None:
            left = [f"{j.job_id} ({j.key})" for j in active.values()]
            p = failed.paths()
            tail = _tail(p.stderr) or _tail(p.stdout)
            raise ExperimentError(
                f"job {failed.job_id} ({failed.key}) ended {failed.state}; nothing new was submitted"
                + (f"; still running (a re-run waits for them, scancel stops them): {', '.join(left)}" if left else "")
                + f"\njob logs: {p.stdout}\n          {p.stderr}\n{tail}")

    def _watch(self, chains: list[tuple[Arm, int, list]], n: int, rec: dict, active: dict[str, _Job]) -> _Job | None:
        """Find the chains' running jobs, submit the others, watch them; ``active`` holds the jobs not ended.
        Returns the first failed job (nothing is submitted after it), or None when every job succeeded."""
        rn = self.runner
        todo: list[tuple[Arm, int, list]] = []
        for arm, r, steps in chains:
            key = f"{arm.name}/repeat_{r}"
            if rn.chain_finished(arm, r):
                continue
            entry = rec["chains"].get(key)
            j = self._adopt(key, arm, r, entry) if entry else None
            if j is not None:
                active[key] = j
                self._note(rec, j)
                self.print(f"[experiment] job {j.job_id} ({key}) from an earlier run is {j.state}: waiting for it "
                           f"(not submitted again); log: {j.paths().stdout}")
            else:
                todo.append((arm, r, steps))
        limit = self.spec.max_jobs or len(chains) or 1
        where = "SLURM" if self.cluster == "slurm" else "submitit's local executor"
        self.print(f"[experiment] {len(chains)} (arm, repeat) chains: {len(chains) - len(todo) - len(active)} "
                   f"finished, {len(active)} running from an earlier run, {len(todo)} to submit to {where}"
                   + (f" (at most {limit} at a time)" if self.spec.max_jobs else "") +
                   f"; jobs recorded in {self.record_file}")
        while todo or active:
            while todo and len(active) < limit:
                arm, r, steps = todo.pop(0)
                j = self._submit(arm, r, steps, n)
                active[j.key] = j
                self._note(rec, j)
                self.print(f"[experiment] submitted job {j.job_id}: {j.key} ({len(steps)} steps); "
                           f"log: {j.paths().stdout}")
            time.sleep(self.poll_s)
            self._refresh()
            for key, j in list(active.items()):
                before = j.state
                outcome = self._poll(j)
                if outcome == "active":
                    if j.state != before:
                        self._note(rec, j)
                        self.print(f"[experiment] job {j.job_id} ({key}): {j.state}")
                    continue
                del active[key]
                if outcome == "success" and not rn.chain_finished(j.arm, j.repeat):
                    outcome, j.state = "failed", "COMPLETED (steps not finished)"
                self._note(rec, j)
                if outcome != "success":
                    return j   # the other jobs go on; the command stops submitting and exits
                self.print(f"[experiment] job {j.job_id} ({key}): {j.state}")
                for line in self._job_lines(j):
                    self.print(f"    {line}")
        return None

    def _job_lines(self, j: _Job) -> list[str]:
        try:
            from submitit.core.utils import pickle_load  # optional (extra [cluster]), see import_submitit
            outcome, lines = pickle_load(j.paths().result_pickle)
        except Exception:  # noqa: BLE001
            return []
        return [l for l in lines if "..." not in l] if outcome == "success" and isinstance(lines, list) else []


def run_chains(runner: ExperimentRunner, chains: list, n: int) -> None:
    """Run the chains with the config's submitit executor (slurm or submitit_local)."""
    SubmititChains(runner, executor_spec(runner.cfg)).run(chains, n)


def sbatch_script(runner: ExperimentRunner) -> str:
    """The sbatch script submitit writes for a chain job of this config, made here without a cluster (submitit's
    own parameter conversion and script; only its check for ``srun`` on this machine is skipped)."""
    sc = SubmititChains(runner, ExecutorSpec(**{**(runner.cfg.executor or {}), "kind": "slurm"}))
    sc.cluster = "slurm"
    from submitit.slurm.slurm import SlurmExecutor  # optional (extra [cluster]), see import_submitit

    class _Offline(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    ex = _Offline(sc.folder)
    params = sc.parameters()
    generic = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    specific = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
    ex._internal_update_parameters(**ex._convert_parameters(generic), **specific)
    return ex._make_submission_file_text(ex._submitit_command_str, "check")


__all__ = ["ChainJob", "SubmititChains", "import_submitit", "jobs_note", "run_chains", "sbatch_script", "INSTALL_HINT"]


def jobs_note(out: Path) -> str:
    """A report line on the chains' jobs as OUT/jobs/jobs.json last recorded them ('' when there are none)."""
    try:
        rec = json.loads((Path(out) / JOBS_DIR / "jobs.json").read_text())
        chains = rec["chains"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not chains:
        return ""
    states: dict[str, list[str]] = {}
    for key, e in sorted(chains.items()):
        states.setdefault(str(e.get("state")), []).append(f"{key} (job {e.get('job_id')})")
    return (f"Jobs ({rec.get('executor', {}).get('kind', '?')}, as recorded {rec.get('updated', '?')} in "
            f"{JOBS_DIR}/jobs.json): " + "; ".join(f"{s}: {', '.join(v)}" for s, v in states.items()) + ".\n")
