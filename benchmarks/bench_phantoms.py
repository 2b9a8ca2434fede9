"""Benchmark and describe the procedural phantoms: generation speed, size on disk, class imbalance,
lesion sizes and HU per label.

    .venv/bin/python benchmarks/bench_phantoms.py --cases 20 --seed 0 [--out benchmarks/results/phantoms.md]

Writes each dataset to a temporary folder with the real writer (``write_phantom_dataset``), reads
the files back and prints a markdown report (also written to ``--out`` if given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from nnunet_promptlesion.dataset_conversion.phantoms import MANIFEST_FILENAME, phantom_kinds, write_phantom_dataset


def describe(kind: str, n_cases: int, seed: int, root: Path) -> list[str]:
    t0 = time.perf_counter()
    folder = write_phantom_dataset(kind, 900, n_cases, seed, n_test=0, output_root=root / kind, progress=False)
    dt = time.perf_counter() - t0
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    manifest = json.loads((folder / MANIFEST_FILENAME).read_text())
    spec = json.loads((folder / "lesion_spec.json").read_text())
    lesion_labels = {l["label"]: l["name"] for l in spec["lesions"]}
    hu: dict[int, list[float]] = {v: [] for v in labels.values()}
    present = {v: 0 for v in labels.values()}
    shape = None
    for lab_file in sorted((folder / "labelsTr").glob("*.nii.gz")):
        lab = np.asarray(nib.load(str(lab_file)).dataobj)
        img = np.asarray(nib.load(str(folder / "imagesTr" / lab_file.name.replace(".nii.gz", "_0000.nii.gz"))).dataobj)
        shape = img.shape
        for v in labels.values():
            m = lab == v
            if m.any():
                present[v] += 1
                hu[v].append(float(img[m].mean()))
    healthy = sum(1 for r in manifest["training"] if not r["lesions"])
    lines = [f"### {kind} ({n_cases} training cases, seed {seed})", "",
             f"- shape (X, Y, Z) {shape}, spacing {tuple(manifest['config']['spacing'])} mm",
             f"- generation + writing: {dt:.1f} s total, {dt / n_cases:.2f} s/case; {size_mb:.1f} MB on disk",
             f"- healthy (lesion-free) cases: {healthy}/{n_cases}", "",
             "| label | name | cases containing it | mean HU (median over cases) | lesions | median voxels | early / late |",
             "|---|---|---|---|---|---|---|"]
    inv = {v: k for k, v in labels.items()}
    for v in sorted(labels.values()):
        les = [l for r in manifest["training"] for l in r["lesions"] if l["label"] == v]
        vox = int(np.median([l["voxels"] for l in les])) if les else "-"
        stages = ([sum(l.get("stage") == "early" for l in les), sum(l.get("stage") == "late" for l in les)]
                  if les and "stage" in les[0] else None)
        lines.append(f"| {v} | {inv[v]} | {present[v]}/{n_cases} | "
                     f"{np.median(hu[v]):.0f} | {len(les) if v in lesion_labels else '-'} | "
                     f"{vox if v in lesion_labels else '-'} | {'%d / %d' % tuple(stages) if stages else '-'} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines = ["## Phantom datasets", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU "
             "(shared with other jobs while measured). Command: "
             f"`.venv/bin/python benchmarks/bench_phantoms.py --cases {args.cases} --seed {args.seed}`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in phantom_kinds():
            lines += describe(kind, args.cases, args.seed, Path(tmp))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
