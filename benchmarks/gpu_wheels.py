"""Prepare the Python packages the GPU suite needs on a lent GPU machine, as wheels to carry there.

The lent machines (see the device tool's KINDS.md) run Python 3.12 with PyTorch, numpy, scipy, matplotlib,
tifffile and most of the scientific stack, but not nnU-Net's: nnunetv2, monai, SimpleITK, nibabel, blosc2,
batchgenerators, ... Nothing can be downloaded there, and one call carries at most 64 MiB of working tree. This
script, run here (where pip reaches the package index):

1. walks the dependency closure of nnunet_promptlesion in THIS environment (same versions as the tests use),
2. leaves out what the GPU image already has (``--have``: a file with one package name per line, or the
   device tool's KINDS.md, whose "Packages:" line it reads),
3. downloads a cp312 manylinux wheel of each remaining package (builds one from the sdist where only an sdist
   exists, e.g. pure-Python packages), and
4. splits them into carry groups ``.whl/g1``, ``.whl/g2``, ... of at most ``--group-mib`` each (SimpleITK alone
   is ~50 MiB), and prints the run commands: one call per group installs it into /tmp/site, which stays on the
   warm machine between calls; the last call runs the suite.

    python benchmarks/gpu_wheels.py --have /work/.library/device/KINDS.md    # writes .whl/ and prints the calls

``.whl/`` is ignored by git (.gitignore). Nothing here is needed on a machine that can pip install normally.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
# Requirements that name packages the target Python ships or never needs (Python 2 back-ports).
NEVER = {"argparse", "unittest2", "traceback2", "linecache2", "future"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "nnunet_promptlesion", have: set[str] = frozenset()) -> dict[str, str]:
    """{normalised name: installed version} of ``root`` and everything it requires (extras left out), not
    descending into packages in ``have`` (the image brings those with their own requirements)."""
    seen: dict[str, str] = {}

    def walk(name: str) -> None:
        key = norm(name)
        if key in seen or key in have or key in NEVER:
            return
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            return
        seen[key] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            walk(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))

    walk(root)
    seen.pop(norm(root), None)
    return seen


def read_have(path: Path) -> set[str]:
    text = path.read_text()
    if "Packages: " in text:  # the device tool's KINDS.md: "Packages: a, b, c."
        line = text.split("Packages: ", 1)[1].splitlines()[0].rstrip(".")
        return {norm(p.strip()) for p in line.split(",") if p.strip()}
    return {norm(l.strip()) for l in text.split() if l.strip()}


def download(name: str, version: str, dest: Path, python_version: str) -> Path:
    """One wheel for the target interpreter in ``dest`` (built from the sdist if no wheel is published)."""
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *sum((["--platform", p] for p in PLATFORMS), []), "-d", str(dest),
           f"{name}=={version}"]
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        # pure-Python sdist only: build the wheel here (it is platform independent)
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), f"{name}=={version}"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"no wheel for {name}=={version} and building one failed:\n{r.stderr[-2000:]}")
    new = sorted(set(dest.iterdir()) - before)
    if len(new) != 1:
        raise SystemExit(f"expected one file for {name}=={version}, got {[p.name for p in new]}")
    return new[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--have", type=Path, required=True,
                    help="packages already on the GPU image: the device tool's KINDS.md or a file of names")
    ap.add_argument("--out", type=Path, default=REPO / ".whl", help="where the carry groups go (default .whl/)")
    ap.add_argument("--group-mib", type=float, default=56.0,
                    help="largest carry group in MiB (the device tool carries 64 MiB per call, repository included)")
    ap.add_argument("--python-version", default="3.12", help="the GPU image's Python (default 3.12)")
    a = ap.parse_args(argv)

    have = read_have(a.have)
    need = closure(have=have)
    print(f"{len(need)} packages to carry: " + ", ".join(f"{n}=={v}" for n, v in sorted(need.items())))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = [download(n, v, tmp, a.python_version) for n, v in sorted(need.items())]
        wheels.sort(key=lambda p: -p.stat().st_size)
        limit = a.group_mib * 2 ** 20
        groups: list[list[Path]] = []
        for w in wheels:  # first fit, largest first
            size = w.stat().st_size
            if size > limit:
                raise SystemExit(f"{w.name} ({size / 2**20:.1f} MiB) alone exceeds --group-mib {a.group_mib}")
            for g in groups:
                if sum(p.stat().st_size for p in g) + size <= limit:
                    g.append(w)
                    break
            else:
                groups.append([w])
        if a.out.exists():
            shutil.rmtree(a.out)
        for i, g in enumerate(groups, 1):
            d = a.out / f"g{i}"
            d.mkdir(parents=True)
            for w in g:
                shutil.move(str(w), d / w.name)
            print(f"  {d.relative_to(REPO) if d.is_relative_to(REPO) else d}: {len(g)} wheels, "
                  f"{sum((d / w.name).stat().st_size for w in g) / 2**20:.1f} MiB")
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
               "{g}/*.whl")
    print("\nDevice calls (run tool), one per group on the same warm machine, then the suite:")
    rel = a.out.relative_to(REPO) if a.out.is_relative_to(REPO) else a.out
    for i in range(1, len(groups) + 1):
        print(f"  carry=['{rel}/g{i}']  command: {install.format(g=f'{rel}/g{i}')} && echo ok")
    print("  command: export PYTHONPATH=/tmp/site:$PWD/src nnUNet_extTrainer=$PWD/src/nnunet_promptlesion/trainers/nnunet_ext; "
          "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --budget-min 7")


if __name__ == "__main__":
    main()
