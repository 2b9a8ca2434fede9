"""Conversion throughput on a fake LiTS release with realistic in-plane size.

Builds N cases of 256 x 256 x Z int16 volumes (uncompressed .nii, like LiTS), converts them with
and without tumour staging, and reports seconds per case and MB/s of source data.

    .venv/bin/python benchmarks/bench_conversion.py --cases 4 --slices 96
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_releases import LITS_SPACING_XYZ, Sphere, lits_affine, phantom  # noqa: E402

from nnunet_promptlesion.dataset_conversion.core import ConvertOptions  # noqa: E402
from nnunet_promptlesion.dataset_conversion.lits import convert_lits  # noqa: E402


def build(root: Path, cases: int, slices: int) -> float:
    mb = 0.0
    for i in range(cases):
        shape = (256, 256, slices)
        img, lab = phantom(shape, LITS_SPACING_XYZ, [Sphere((90, 90, slices // 2), 15.0, 2),
                                                      Sphere((170, 160, slices // 2), 5.0, 2)], seed=i)
        d = root / "Training Batch 1"
        d.mkdir(parents=True, exist_ok=True)
        for arr, name in ((img, f"volume-{i}.nii"), (lab, f"segmentation-{i}.nii")):
            nib.save(nib.Nifti1Image(arr, lits_affine()), str(d / name))
            mb += (d / name).stat().st_size / 2 ** 20
    return mb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--slices", type=int, default=96)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mb = build(tmp / "LiTS", args.cases, args.slices)
        print(f"source: {args.cases} cases of 256x256x{args.slices} int16, {mb:.1f} MB")
        for did, stage in ((701, False), (702, True)):
            t = time.perf_counter()
            res = convert_lits(tmp / "LiTS", ConvertOptions(dataset_id=did, name="Bench", raw_dir=tmp / "raw",
                                                            stage_tumours=stage, progress=False))
            dt = time.perf_counter() - t
            print(f"stage_tumours={stage}: {dt:.1f} s total, {dt / args.cases:.2f} s/case, {mb / dt:.1f} MB/s "
                  f"(labels {res.labels})")


if __name__ == "__main__":
    main()
