"""Shared fixtures: a small CCTA phantom, planned and preprocessed by nnU-Net once per session."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
CT_EXAMPLE = Path(os.environ.get("PROMPTLESION_CT_EXAMPLE", REPO.parent / "shared" / "data" / "ct_example"))

# nnU-Net's export pools (final validation, nnUNetv2_predict's defaults) spawn nnUNet_def_n_proc = 8 workers,
# each importing torch and nnU-Net: ~30 CPU-s per pool on a 2-core machine, for test cases of a few MB. One
# export process changes no result. Set before any test module imports nnunetv2 (it reads the variable then);
# subprocesses inherit it. A test that needs another value sets it in its own env.
os.environ.setdefault("nnUNet_def_n_proc", "1")
# A training's torch threads share the 2 cores with its augmentation workers, producers and other processes of
# the test; OpenMP's default spin-waiting then burns the cores the others need (measured: one demo training
# epoch 255 s spinning vs 29 s passive on a loaded 2-core machine). Passive waiting changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist every worker is one of N concurrent jobs on the machine's cores: one OpenMP thread per process
# (our CLIs, producers, predictions' helpers) instead of one per core in every process. nnU-Net's own train and
# predict entry points still set their torch threads to the core count.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# PROMPTLESION_TEST_DETERMINISTIC=1 runs the tests with torch's deterministic algorithms: a tolerance that only
# holds for one reduction order shows up there (BENCHMARKS.md, "numerics shake-out"). Tests in this process only.
if os.environ.get("PROMPTLESION_TEST_DETERMINISTIC") == "1":
    import torch

    torch.use_deterministic_algorithms(True)


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


@contextlib.contextmanager
def shared_folder(tmp_path_factory, name: str):
    """Yield ``name``, a folder shared by every pytest-xdist worker of this run, while holding its file lock.

    With ``pytest -n N`` each worker is its own session with its own base temp folder; their common parent is the
    run's. Expensive read-only fixtures (a preprocessed phantom, a trained generator) are built there once, by the
    first worker that needs them, while the others wait on the lock instead of building a copy. Without xdist
    it is the session's base temp folder. Callers check their own "ready" marker inside the lock."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    with FileLock(str(base / f"{name}.lock")):
        folder.mkdir(exist_ok=True)
        try:
            yield folder
        except BaseException:
            # a half-built fixture would fail the next worker with a misleading error: it starts from scratch
            shutil.rmtree(folder, ignore_errors=True)
            raise


def write_nnunet_splits(preprocessed_dataset: Path) -> None:
    """Write nnU-Net's default 5-fold splits_final.json (the one nnUNetTrainer.do_split would create on the first
    training) now, so that trainings in several workers never race to create it and it never changes under a
    test that compares it."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    data = next(d for d in sorted(preprocessed_dataset.glob("nnUNetPlans_*")) if d.is_dir())
    keys = [str(k) for k in np.sort(list(infer_dataset_class(str(data))(str(data)).identifiers))]
    splits = generate_crossval_split(keys, seed=12345, n_splits=5)
    (preprocessed_dataset / "splits_final.json").write_text(json.dumps(splits, indent=4))


@pytest.fixture(scope="session")
def ccta_dataset(tmp_path_factory):
    """(root folder, dataset id, env) of an 8-case CCTA phantom after nnUNetv2_plan_and_preprocess.

    raw and preprocessed data are shared by all workers (read only: splits are written up front); env's
    nnUNet_results is this worker's own. plan_and_preprocess.log holds the planning command's output."""
    did = 601
    with shared_folder(tmp_path_factory, "nnunet_ccta") as root:
        env = nnunet_env(root)
        if not (root / ".ready").is_file():
            run([BIN / "promptlesion_make_phantoms", "--kind", "ccta", "--dataset-id", did, "--cases", 8,
                 "--test-cases", 2, "--seed", 3], env)
            p = run([BIN / "nnUNetv2_plan_and_preprocess", "-d", did, "-c", "3d_fullres",
                     "--verify_dataset_integrity", "-np", 1, "-npfp", 1], env)
            (root / "plan_and_preprocess.log").write_text(p.stdout)
            write_nnunet_splits(next((root / "preprocessed").glob(f"Dataset{did}_*")))
            (root / ".ready").write_text("ok")
    env["nnUNet_results"] = str(tmp_path_factory.mktemp("ccta_results"))
    return root, did, env


#: promptlesion_pretrain arguments for a tiny2d generator pair trained 2 steps each (evaluation and checkpoints
#: exercised once): the 2D synthesis tests' generators
TINY2D_PRETRAIN = ["--preset", "tiny2d", "--vqgan-steps", "2", "--diffusion-steps", "2", "--device", "cpu",
                   "--num-threads", "1",
                   "--vqgan-args", "--disc-start 1 --batch-size 2 --eval-every 2 --checkpoint-every 2 "
                                   "--num-eval-patches 1 --no-progress",
                   "--diffusion-args", "--batch-size 2 --eval-every 2 --eval-steps 1 --checkpoint-every 2 "
                                       "--no-progress"]


def phantom_copy_2d(ccta_dataset, work: Path, config: str, batch_size: int | None = None) -> tuple[str, dict]:
    """(dataset name, nnU-Net path variables) of a private copy of the session CCTA phantom (raw + preprocessed)
    under ``work`` with promptlesion_demo's 2D configuration ``config`` added, as the demo does (32 x 32 slices of
    3d_fullres's preprocessed data); a copy, so that a test's plans edit never touches the shared fixture."""
    from nnunet_promptlesion.cli.demo import add_demo_configuration_2d

    root, did, _ = ccta_dataset
    name = next((root / "raw").glob(f"Dataset{did:03d}_*")).name
    shutil.copytree(root / "raw" / name, work / "raw" / name)
    shutil.copytree(root / "preprocessed" / name, work / "preprocessed" / name)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    add_demo_configuration_2d(work / "preprocessed" / name / "nnUNetPlans.json", name=config, **kw)
    return name, {"nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
                  "nnUNet_results": str(work / "results")}


@pytest.fixture
def nnunet_paths(ccta_dataset, monkeypatch):
    """Point this process's nnU-Net env vars at the session phantom (nnunetv2.paths reads them lazily)."""
    root, did, env = ccta_dataset
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(k, env[k])
    return ccta_dataset


# ---------------------------------------------------------------------------------------------- process hygiene
# Every process the suite starts inherits this variable (tests build their subprocess env from os.environ), so
# the session can find its own processes at the end by their environment, whatever their parent is now (a
# SIGKILLed trainer's workers are re-parented to init). A fresh value per session: a nested pytest run by a
# test checks its own processes.
SESSION_TAG_ENV = "PROMPTLESION_PYTEST_SESSION"
os.environ[SESSION_TAG_ENV] = f"{os.getpid()}-{os.urandom(6).hex()}"


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


# helpers multiprocessing starts for *this* process (they exit when it exits; not leftovers of a test)
_OWN_MP_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def processes_with_env(name: str, value: str) -> dict[int, str]:
    """pid -> command line of every live (non-zombie) process whose initial environment has ``name=value``,
    except this process, its ancestors and multiprocessing's helpers of this process. Linux /proc scan
    (processes of other users are skipped)."""
    needle = f"{name}={value}".encode()
    me = os.getpid()
    skip = _ancestors(me)
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in skip:
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] == "Z":
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if int(stat[1]) == me and any(h in cmd for h in _OWN_MP_HELPERS):
                continue
            found[int(d.name)] = cmd
        except (OSError, IndexError, ValueError):
            continue
    return found


def wait_until_gone(name: str, value: str, timeout: float) -> dict[int, str]:
    """Poll until no process carries ``name=value`` (see processes_with_env); returns the survivors."""
    import time

    t0 = time.time()
    while True:
        left = processes_with_env(name, value)
        if not left or time.time() - t0 > timeout:
            return left
        time.sleep(0.2)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run, naming them, if processes the suite started are still running when it ends (then kill them,
    so that a failed check does not leave them behind either). Processes get 15 s to finish exiting."""
    if not Path("/proc/self/environ").exists():
        return
    survivors = wait_until_gone(SESSION_TAG_ENV, os.environ[SESSION_TAG_ENV], timeout=15.0)
    if not survivors:
        return
    import signal

    lines = [f"  pid {pid}: {cmd[:300]}" for pid, cmd in sorted(survivors.items())]
    msg = ("process hygiene: these processes started by this test session are still running after it ended "
           f"(killed now):\n" + "\n".join(lines))
    rep = session.config.pluginmanager.get_plugin("terminalreporter")
    if rep is not None:
        rep.write_line(msg, red=True)
    else:
        print(msg, file=sys.stderr)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------------------------------------------ xdist scheduling
#: test files that take the longest (BENCHMARKS.md, test suite), longest first. With --dist loadfile
#: --no-loadscope-reorder (make test), pytest-xdist hands files to its workers in collection order; starting the long
#: ones first keeps one worker from running a 3-minute file alone at the end while the other idles (by default
#: xdist orders files by their number of tests, which put the 4-test, 3-minute demo file near the end).
LONG_FILES = ("test_real_ct.py", "test_demo.py", "test_cache.py", "test_online.py", "test_gauges.py", "test_trainer_paths.py",
              "test_experiment.py", "test_cluster.py", "test_faults.py", "test_install.py", "test_gpu_suite.py",
              "test_vqgan_train.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: order within a file kept
