"""Section ``cuda_tests``: the CUDA-only tests of tests/ (fused SDPA kernel chosen, no host sync in the sampling
loop) run by pytest in a child process; on a machine without CUDA pytest skips them (recorded as a skip)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from .common import REPO, md_table, parse_junit


def run(suite, sec: dict) -> None:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if re.search(r"skipif\(\s*not\s+CUDA|torch\.cuda\.is_available\(\)", p.read_text()))
    if not files:
        raise RuntimeError("no test file in tests/ marks CUDA-only tests (skipif(not CUDA ...)); nothing to run")
    xml = suite.work / "cuda_tests.xml"
    # CUDA-only tests carry "cuda" in their names (test_..._on_cuda); -k keeps the rest of each file out
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}", *files]
    env = dict(os.environ)
    if suite.dev.type == "cuda" and suite.dev.index is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(suite.dev.index)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=max(30, int(suite.budget.left())))
    sec["command"] = " ".join(["python", *cmd[1:]]).replace(str(xml), "<xml>")
    sec["pytest_seconds"] = round(time.monotonic() - t0, 2)
    tests = parse_junit(xml) if xml.is_file() else []
    sec["tests"] = tests
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")}
    sec["counts"] = counts
    if not tests:
        raise RuntimeError(f"pytest ran no test (exit {p.returncode}): {p.stdout[-1500:]} {p.stderr[-1500:]}")
    if counts["failed"] or counts["error"]:
        sec.update(status="failed", error=f"{counts['failed'] + counts['error']} CUDA test(s) failed: " +
                   ", ".join(t["name"] for t in tests if t["outcome"] in ("failed", "error")))
    elif counts["skipped"] == len(tests):
        reasons = sorted({t.get("message", "") for t in tests})
        sec.update(status="skipped", reason=f"no CUDA device here: pytest collected {len(tests)} CUDA-only tests and "
                                            f"skipped them ({'; '.join(reasons)})")


def summary(sec: dict) -> dict:
    return sec.get("counts", {})


def markdown(sec: dict) -> list[str]:
    L: list[str] = []
    if sec.get("command"):
        L.append(f"`{sec['command']}`")
        L.append("")
    L += md_table(["test", "outcome", "s", "message"],
                  [[t["name"], t["outcome"], t["seconds"], t.get("message", "")[:150]] for t in sec.get("tests", [])])
    return L
