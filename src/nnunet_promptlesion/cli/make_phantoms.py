"""``promptlesion_make_phantoms``: write a procedural CT phantom dataset in nnU-Net raw format."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

# at the top: --help lists the phantom kinds, so it loads this module (numpy + scipy, ~0.4 s CPU) either way
from ..dataset_conversion.phantoms import MANIFEST_FILENAME, phantom_kinds, write_phantom_dataset

EPILOG = textwrap.dedent("""\
    examples:
      export nnUNet_raw=$PWD/nnUNet_raw nnUNet_preprocessed=$PWD/nnUNet_preprocessed nnUNet_results=$PWD/nnUNet_results
      promptlesion_make_phantoms --kind ccta --dataset-id 501 --cases 20 --seed 0
      promptlesion_make_phantoms --kind abdomen --dataset-id 502 --cases 20 --test-cases 6 --seed 0
      nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres --verify_dataset_integrity -np 1 -npfp 1

    The dataset folder is DatasetNNN_<Name> in --output-root ($nnUNet_raw by default) with imagesTr,
    labelsTr, imagesTs, labelsTs, dataset.json, lesion_spec.json and phantom_manifest.json (per-case
    lesion list). The same --seed always gives bit-identical files. See docs/phantoms.md.
    """)


def build_parser() -> argparse.ArgumentParser:
    kinds = phantom_kinds()
    p = argparse.ArgumentParser(
        prog="promptlesion_make_phantoms",
        description="Generate a procedural CT phantom dataset (HU images, lesion labels with strong class "
                    "imbalance and healthy cases) in nnU-Net v2 raw format. "
                    + " ".join(f"'{k}': {v.description}" for k, v in kinds.items()),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=sorted(kinds), help="phantom type")
    p.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id, 1..999 (folder DatasetNNN_<Name>)")
    p.add_argument("--cases", type=int, required=True, help="number of training cases (imagesTr/labelsTr)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files (default 0)")
    p.add_argument("--test-cases", type=int, default=None,
                   help="number of test cases written to imagesTs/labelsTs (default max(2, cases // 4))")
    p.add_argument("--name", default=None,
                   help="dataset name after the id (default " + ", ".join(f"{k}: {v.default_dataset_name}" for k, v in kinds.items()) + ")")
    p.add_argument("--preset", default="default",
                   help="size preset: " + "; ".join(f"{k}: {', '.join(v.presets)}" for k, v in kinds.items()) + " (default: default)")
    p.add_argument("--output-root", type=Path, default=None, help="folder to write into (default: $nnUNet_raw)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset with this id (any name); otherwise it is refused")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.output_root is None and not os.environ.get("nnUNet_raw"):
        print("error: nnUNet_raw is not set and no --output-root was given.\n"
              "  export nnUNet_raw=/path/to/nnUNet_raw   (or pass --output-root DIR)", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        folder = write_phantom_dataset(args.kind, args.dataset_id, args.cases, args.seed, n_test=args.test_cases,
                                       name=args.name, output_root=args.output_root, overwrite=args.overwrite,
                                       preset=args.preset, progress=not args.quiet)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {folder} in {time.time() - t0:.1f} s (per-case lesions: {folder / MANIFEST_FILENAME})")
    pre = os.environ.get("nnUNet_preprocessed")
    if pre and list(Path(pre).glob(f"Dataset{args.dataset_id:03d}_*")):
        print(f"note: {pre} already holds preprocessed data for id {args.dataset_id:03d}; re-run "
              f"nnUNetv2_plan_and_preprocess -d {args.dataset_id} so it matches the new images", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
