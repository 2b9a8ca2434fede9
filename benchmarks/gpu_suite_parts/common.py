"""What every part of the GPU suite shares: paths, the section list and cost estimates, the packages each section
needs, the time budget, and small helpers (formatting, host facts)."""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent   # benchmarks/
REPO = HERE.parent
ENTRY = HERE / "gpu_suite.py"

SECTION_ORDER = ["env", "cuda_tests", "sampler", "cache", "training", "vqgan", "sampler_compiled"]

#: rough cost of each section in seconds (full presets on a CUDA machine / --tiny on a CPU), used to skip a section
#: that cannot fit the budget left. "setup" is the phantom + nnU-Net preprocessing + generator checkpoints that
#: the cache and training sections share (paid once, by the first of them that runs).
ESTIMATE_S = {
    "full": {"env": 10, "cuda_tests": 30, "sampler": 45, "setup": 60, "cache": 20, "training": 90, "vqgan": 15,
             "sampler_compiled": 90},
    "tiny": {"env": 2, "cuda_tests": 10, "sampler": 10, "setup": 25, "cache": 5, "training": 25, "vqgan": 3,
             "sampler_compiled": 60},
}

#: packages the sections import (module name -> pip name); the env section lists those that are missing
REQUIRED = {"torch": "torch", "monai": "monai", "nnunetv2": "nnunetv2", "batchgenerators": "batchgenerators",
            "dynamic_network_architectures": "dynamic-network-architectures", "blosc2": "blosc2",
            "SimpleITK": "SimpleITK", "nibabel": "nibabel", "einops": "einops", "scipy": "scipy",
            "timm": "timm", "torchvision": "torchvision", "matplotlib": "matplotlib", "pytest": "pytest"}
SECTION_NEEDS = {"cuda_tests": ["pytest", "monai"], "sampler": ["monai", "einops"], "vqgan": ["monai"],
                 "sampler_compiled": ["monai", "einops"],
                 "cache": ["nnunetv2", "monai", "batchgenerators", "blosc2", "SimpleITK"],
                 "training": ["nnunetv2", "monai", "batchgenerators", "blosc2", "SimpleITK", "timm", "torchvision"]}

PHANTOM_ID = 990
TINY_PLANS_FILE = REPO / "tests" / "tiny_plans.py"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        return f"{v:.{nd}g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


class Budget:
    """The suite's time budget, in minutes; every section asks what is left before it starts."""

    def __init__(self, minutes: float):
        self.t0 = time.monotonic()
        self.total = 60.0 * minutes

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def command_line() -> str:
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else ENTRY
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def have(mod: str) -> bool:
    """Whether ``mod`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def version_of(mod: str):
    try:
        return version(mod)
    except Exception:  # noqa: BLE001
        return "importable (version unknown)" if have(mod) else None


def nvidia_driver():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        return subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def parse_junit(path: Path) -> list[dict]:
    out = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        rec = {"name": f"{tc.get('classname', '')}::{tc.get('name')}", "seconds": float(tc.get("time", 0) or 0),
               "outcome": "passed"}
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                rec["outcome"] = {"failure": "failed"}.get(tag, tag)
                rec["message"] = (el.get("message") or el.text or "")[:500]
        out.append(rec)
    return out



def sig(v, nd=4):
    """``v`` to ``nd`` significant digits (non-numbers as they are): the console line's figures."""
    return float(f"{v:.{nd}g}") if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else v



def md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return out
