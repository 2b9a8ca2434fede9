"""promptlesion_convert: official CT releases -> nnU-Net raw datasets with lesion specs.

Run ``promptlesion_convert <source> --help`` for each source's options.
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

# The converters load what the CLI's own core import loads already (numpy, scipy, SimpleITK, nibabel: no torch),
# so they sit here; --help costs the same.
from ..dataset_conversion.ccta import LabelMapping, convert_folder
from ..dataset_conversion.core import ConversionError, ConversionResult, ConvertOptions
from ..dataset_conversion.kits import DEFAULT_NAMES as KITS_NAMES, convert_kits
from ..dataset_conversion.lits import convert_lits
from ..dataset_conversion.merge import merge_datasets
from ..dataset_conversion.msd import convert_msd, msd_default_name
from ..dataset_conversion.nifti_pairs import DEFAULT_AIR_HU, DEFAULT_MASS_FRACTION, DEFAULT_MIN_COMPONENT_MM3, \
    DEFAULT_PARENT_NAME, DEFAULT_TISSUE_HU, BodyWindowParent, LesionMapping, MaskParent, convert_nifti_pairs

EPILOG = textwrap.dedent("""\
    examples:
      export nnUNet_raw=/data/nnUNet_raw
      promptlesion_convert kits  /data/kits23/dataset --version kits23 --dataset-id 501
      promptlesion_convert lits  "/data/LiTS" --dataset-id 502 --stage-tumours
      promptlesion_convert msd   /data/Task07_Pancreas --dataset-id 503
      promptlesion_convert ccta  --images /data/ccta/images --labels /data/ccta/labels \\
          --label wall=1 --label calcified_plaque=2 --label noncalcified_plaque=3 --dataset-id 504
      promptlesion_convert nifti --images ../shared/data/ibsi_sts/imagesTr --masks ../shared/data/ibsi_sts/labelsTr \
          --lesion sarcoma=1 --test-cases 15 --split-seed 0 --dataset-id 505 --name Sarcoma
      promptlesion_convert merge --inputs 501 502 503 --dataset-id 510 --name AbdomenTumours --stage-tumours
      nnUNetv2_plan_and_preprocess -d 501 --verify_dataset_integrity

    Every command validates all inputs first (each problem is reported with its file), writes
    into a hidden temporary folder and renames it to nnUNet_raw/DatasetXXX_Name at the end, and
    refuses to replace an existing dataset unless --overwrite is given. Besides dataset.json it
    writes lesion_spec.json (lesion labels, parent structures, radii seen), conversion.json
    (provenance of every case) and conversion_log.jsonl.
    """)


def _add_common(p: argparse.ArgumentParser, default_name: str | None, reorient_default: str | None = None,
                stage: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-d", "--dataset-id", type=int, required=True,
                   help="nnU-Net dataset id (1-999) of the new dataset; must not be used by another dataset")
    g.add_argument("--name", default=None,
                   help=f"dataset name, written as DatasetXXX_<name> (default: {default_name})")
    g.add_argument("--raw-dir", type=Path, default=None,
                   help="nnU-Net raw folder to write into (default: the nnUNet_raw environment variable)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing DatasetXXX_<name> folder (only once the new one is complete)")
    if stage:
        g.add_argument("--stage-tumours", "--stage-tumors", action="store_true", dest="stage_tumours",
                       help="relabel each tumour connected component as <tumour>_early (equivalent-sphere radius "
                            "<= 10 mm, diameter <= 2 cm, measured with the voxel spacing) or <tumour>_late, "
                            "as two separate labels (cysts are not staged)")
    g.add_argument("--reorient", default=reorient_default or "none", metavar="CODE",
                   help="reorient images and labels without resampling to this DICOM orientation code "
                        "(e.g. LPS = SimpleITK identity direction) or 'none' to keep the source orientation "
                        f"(default: {reorient_default or 'none'})")
    g.add_argument("--tolerance", type=float, default=1e-5,
                   help="relative tolerance for image/label spacing, origin and direction agreement (default 1e-5)")
    g.add_argument("--no-progress", action="store_true", help="hide the per-case progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptlesion_convert",
        description="Convert CT lesion datasets (KiTS19/21/23, LiTS, MSD tasks, CCTA/generic folders, plain CT + "
                    "lesion-mask NIfTI pairs with a derived parent structure) to nnU-Net raw format with a lesion_spec.json for PromptLesionTrainer, or merge converted datasets "
                    "into one multi-organ dataset. Set the nnUNet_raw environment variable first.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{kits,lits,msd,ccta,nifti,merge}")

    k = sub.add_parser("kits", help="KiTS19 / KiTS21 / KiTS23 (case_XXXXX/imaging.nii.gz + segmentation.nii.gz)",
                       description="Convert a KiTS release. SOURCE is the folder with the case_XXXXX folders "
                                   "(kits19/data, kits23/dataset) or its parent. Labels 1 kidney, 2 tumour, "
                                   "3 cyst (KiTS21/23); KiTS21's aggregated_MAJ_seg.nii.gz is used as the label. "
                                   "Cases are named <version>_<id>, e.g. kits23_00012.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  promptlesion_convert kits /data/kits23/dataset --version kits23 -d 501")
    k.add_argument("source", type=Path, help="KiTS data folder (with case_XXXXX subfolders)")
    k.add_argument("--version", required=True, choices=["kits19", "kits21", "kits23"],
                   help="which release; selects the expected labels (KiTS19 has no cyst label)")
    k.add_argument("--region-labels", action="store_true",
                   help="write nnU-Net region labels as in nnU-Net's Dataset220 (kidney = 1|2|3, kidney_masses = "
                        "2|3, kidney_tumor = 2, regions_class_order 1,3,2); file values stay the same. "
                        "Region datasets cannot be merged.")
    k.add_argument("--unlabelled-to-test", action="store_true",
                   help="put cases without segmentation (KiTS19 test cases 210-299) into imagesTs instead of "
                        "refusing them")
    _add_common(k, "KiTS19, KiTS21 or KiTS23", reorient_default="LPS")

    li = sub.add_parser("lits", help="LiTS (volume-N.nii + segmentation-N.nii, searched recursively)",
                        description="Convert LiTS. SOURCE holds volume-N.nii / segmentation-N.nii pairs, directly or "
                                    "in sub-folders ('Training Batch 1', 'Training Batch 2'). Labels 1 liver, "
                                    "2 tumour. Cases are named lits_NNNN.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  promptlesion_convert lits /data/LiTS -d 502 --stage-tumours")
    li.add_argument("source", type=Path, help="folder with the LiTS training batches")
    li.add_argument("--include-test", action="store_true",
                    help="also write test-volume-N.nii files to imagesTs (as litstest_NNNN)")
    _add_common(li, "LiTS")

    m = sub.add_parser("msd", help="Medical Segmentation Decathlon task folder (TaskXX_Name)",
                       description="Convert an MSD task (imagesTr, labelsTr, imagesTs, dataset.json). Hidden '._*' "
                                   "files are skipped, 4D images split into channels with nnU-Net's own "
                                   "split_4d_nifti. Lesions are recognised by name (cancer, tumour, ...) with the "
                                   "other labels as parents; generic names get the organ prefixed "
                                   "(Task03 'cancer' -> 'liver_tumor').",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  promptlesion_convert msd /data/Task03_Liver -d 503\n"
                              "  promptlesion_convert msd /data/Task08_HepaticVessel -d 508 --lesion tumour:vessel")
    m.add_argument("source", type=Path, help="MSD task folder, e.g. /data/Task07_Pancreas")
    m.add_argument("--lesion", action="append", default=[], metavar="LESION:PARENT[,PARENT]",
                   help="declare a lesion label and its parent label(s) by their dataset.json names, replacing "
                        "the name heuristic (repeatable)")
    m.add_argument("--no-test", action="store_true", help="skip imagesTs")
    _add_common(m, "the task name, e.g. Pancreas for Task07_Pancreas")

    c = sub.add_parser("ccta", help="generic folder of CT volumes (NIfTI/MHA/NRRD/TIFF/slice folders) + label maps",
                       description="Convert a folder of images and a folder of label maps paired by name "
                                   "(labels/<case><label-suffix>.nii.gz). TIFF files and folders of 2D slices need "
                                   "--spacing. Give the label mapping with --label (and --lesion) or --label-map "
                                   "JSON: {\"labels\": {\"wall\": [1], \"calcified_plaque\": [2], "
                                   "\"noncalcified_plaque\": [3]}, \"lesions\": {\"calcified_plaque\": [\"wall\"]}, "
                                   "\"ignore\": []}. Written values follow the order of the labels (1, 2, ...).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  promptlesion_convert ccta --images ccta/images --labels ccta/labels \\\n"
                              "      --label wall=1 --label calcified_plaque=2 --label noncalcified_plaque=3 -d 504\n"
                              "  (plaque labels become lesions of 'wall' automatically)")
    c.add_argument("--images", type=Path, required=True, help="folder of CT volumes (one file or slice folder per case)")
    c.add_argument("--labels", type=Path, required=True, help="folder of label maps with the same case names")
    c.add_argument("--label-suffix", default="", help="suffix of label file names after the case name (e.g. _seg)")
    c.add_argument("--label", action="append", default=[], metavar="NAME=VALUE[,VALUE]",
                   help="a written label and the source value(s) forming it; repeat in output order")
    c.add_argument("--lesion", action="append", default=[], metavar="LESION:PARENT[,PARENT]",
                   help="declare a lesion label and its parent label(s); default: names with plaque, lesion, "
                        "tumour, calcif ... are lesions of all other labels")
    c.add_argument("--ignore-value", action="append", type=int, default=[], metavar="VALUE",
                   help="source label value to write as background (repeatable)")
    c.add_argument("--label-map", type=Path, help="JSON label mapping instead of --label/--lesion/--ignore-value")
    c.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="voxel size in mm (columns, rows, slices) for TIFF files and slice folders")
    c.add_argument("--prefix", default="ccta", help="case name prefix: cases are named <prefix>_<case> (default ccta)")
    c.add_argument("--unlabelled-to-test", action="store_true", help="put images without a label map into imagesTs")
    _add_common(c, "CCTA")

    n = sub.add_parser(
        "nifti", help="CT + lesion-mask NIfTI pairs without organ labels; derives the parent structure",
        description="Convert a folder of CT images and a folder of lesion masks paired by name (images/<case>.nii.gz "
                    "or <case>_0000.nii.gz, masks/<case>.nii.gz on the same grid) and derive the parent structure "
                    "synthetic lesions are placed in (PromptLesionTrainer places lesions only at labelled parent "
                    "voxels; background never qualifies). Written labels: the parent(s) 1, 2, ..., then the "
                    "lesions. --parent body-window (default) derives it from the CT: the body (largest connected "
                    "component above --air-hu, plus any component holding a lesion, holes filled slice by slice "
                    "and in 3D) within the tissue window --tissue-hu LO HI, minus the lesions, without components "
                    "under --min-component-mm3. Choose the window as the tissue the lesions grow in and resemble: "
                    "it is where synthetic lesions are painted. The default -30..150 HU (muscle-like soft tissue; "
                    "fat, air, lung and bone excluded) suits soft-tissue tumours such as sarcomas (median ~30 HU); "
                    "the per-case share of lesion voxels inside the window is printed and kept in conversion.json. "
                    "--parent masks takes the parents from organ label files you already have (e.g. "
                    "TotalSegmentator --ml output) instead. lesion_spec.json gets the real lesions' radii and "
                    "their HU contrast to the surrounding parent. Every input is checked and every parent derived "
                    "before anything is written.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  # 36 soft-tissue sarcoma CTs with their GTV masks; 15 held out (seeded) into imagesTs/labelsTs\n"
               "  promptlesion_convert nifti --images ../shared/data/ibsi_sts/imagesTr \\\n"
               "      --masks ../shared/data/ibsi_sts/labelsTr --lesion sarcoma=1 \\\n"
               "      --test-cases 15 --split-seed 0 -d 505 --name Sarcoma\n"
               "  nnUNetv2_plan_and_preprocess -d 505 -c 3d_fullres --verify_dataset_integrity\n\n"
               "  # parents from TotalSegmentator multi-label masks (liver = 5, kidneys = 2,3)\n"
               "  promptlesion_convert nifti --images ct --masks tumours --lesion liver_tumour=1:liver \\\n"
               "      --lesion kidney_tumour=2:kidney --parent masks --parent-masks totalseg \\\n"
               "      --parent-label liver=5 --parent-label kidney=2,3 -d 506")
    n.add_argument("--images", type=Path, required=True, help="folder of CT volumes in HU (.nii.gz, .nii, .mha, .nrrd)")
    n.add_argument("--masks", type=Path, required=True, help="folder of lesion masks with the same case names")
    n.add_argument("--mask-suffix", default="", help="suffix of mask file names after the case name (e.g. _gtv)")
    n.add_argument("--lesion", action="append", default=[], metavar="NAME=VALUE[,VALUE][:PARENT[,PARENT]]",
                   help="a lesion class and the mask value(s) forming it (repeatable, required), e.g. sarcoma=1; "
                        "optionally the parent names it lies in (default: every parent). Other non-zero mask "
                        "values are refused")
    n.add_argument("--parent", choices=["body-window", "masks"], default="body-window",
                   help="how the parent structure is made (default body-window)")
    n.add_argument("--parent-name", default=DEFAULT_PARENT_NAME,
                   help=f"body-window: name of the derived parent label (default {DEFAULT_PARENT_NAME})")
    n.add_argument("--air-hu", type=float, default=DEFAULT_AIR_HU,
                   help=f"body-window: voxels above this HU form the body (default {DEFAULT_AIR_HU:g})")
    n.add_argument("--tissue-hu", type=float, nargs=2, default=list(DEFAULT_TISSUE_HU), metavar=("LO", "HI"),
                   help="body-window: HU window of the parent tissue, inclusive (default "
                        f"{DEFAULT_TISSUE_HU[0]:g} {DEFAULT_TISSUE_HU[1]:g}: muscle-like soft tissue, for soft-tissue "
                        "tumours)")
    n.add_argument("--min-component-mm3", type=float, default=DEFAULT_MIN_COMPONENT_MM3,
                   help="body-window: drop parent components smaller than this (default "
                        f"{DEFAULT_MIN_COMPONENT_MM3:g} mm^3)")
    n.add_argument("--parent-masks", type=Path, default=None,
                   help="masks: folder of organ label files <case>[<parent-suffix>].nii.gz on the images' grids")
    n.add_argument("--parent-suffix", default="", help="masks: suffix of parent mask file names after the case name")
    n.add_argument("--parent-label", action="append", default=[], metavar="NAME=VALUE[,VALUE]",
                   help="masks: a parent label and the organ-mask value(s) forming it (repeatable, in output order); "
                        "other organ values become background; lesion voxels win over parent voxels")
    n.add_argument("--test-cases", type=int, default=0,
                   help="hold this many cases (a seeded random choice) out into imagesTs/labelsTs (default 0)")
    n.add_argument("--split-seed", type=int, default=0, help="seed of the test split (default 0)")
    n.add_argument("--allow-healthy", action="store_true",
                   help="accept masks without any lesion voxel (healthy cases) instead of refusing them")
    n.add_argument("--prefix", default="", help="case name prefix: cases are named <prefix>_<case> (default: none)")
    n.add_argument("--mass-fraction", type=_fraction_or_none, default=DEFAULT_MASS_FRACTION, metavar="F|none",
                   help="lesion_spec.json's min_parent_fraction for the lesions: synthetic lesions are masses kept "
                        "whole (not clipped to the ragged derived parent) with at least this share of their voxels "
                        f"in it, never over bone (default {DEFAULT_MASS_FRACTION}); 'none' clips them to the parent")
    _add_common(n, "NiftiLesions")

    mg = sub.add_parser("merge", help="merge converted datasets into one multi-organ dataset",
                        description="Merge datasets converted by this tool (plain labels, each with "
                                    "lesion_spec.json). Labels are matched by name: the same organ from two sources "
                                    "is one class, each organ keeps its own tumour label. Case names are kept "
                                    "(they name their source); conversion.json records each case's dataset.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  promptlesion_convert merge --inputs 501 502 503 -d 510 --name "
                               "AbdomenTumours --stage-tumours")
    mg.add_argument("--inputs", nargs="+", required=True, metavar="DATASET",
                    help="datasets to merge: ids (501), names (Dataset501_KiTS23) or folders")
    mg.add_argument("--prefix-cases", action="store_true",
                    help="prefix every case with its source id (d501_...) when case names collide")
    _add_common(mg, "MultiOrgan")
    return parser


DEFAULT_NAMES = {"lits": "LiTS", "ccta": "CCTA", "nifti": "NiftiLesions", "merge": "MultiOrgan"}


def _fraction_or_none(v: str) -> float | None:
    if v.lower() == "none":
        return None
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got '{v}'") from None
    if not 0.0 < f <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] or 'none', got {f}")
    return f


def _options(args, name: str | None = None) -> ConvertOptions:
    reorient = None if str(args.reorient).lower() == "none" else str(args.reorient).upper()
    return ConvertOptions(dataset_id=args.dataset_id, name=args.name or name or DEFAULT_NAMES[args.command], overwrite=args.overwrite,
                          stage_tumours=getattr(args, "stage_tumours", False), reorient=reorient,
                          rtol=args.tolerance, raw_dir=args.raw_dir, progress=not args.no_progress)


def _parse_lesions(items: list[str]) -> dict[str, list[str]] | None:
    out = {}
    for a in items:
        les, sep, parents = a.partition(":")
        if not sep or not les or not parents:
            raise ConversionError([f"--lesion {a}: expected LESION:PARENT[,PARENT...]"], header="invalid argument")
        out[les] = parents.split(",")
    return out or None


def run(args) -> ConversionResult:
    if args.command == "kits":
        return convert_kits(args.source, args.version, _options(args, KITS_NAMES[args.version]),
                            region_labels=args.region_labels, unlabelled_to_test=args.unlabelled_to_test)
    if args.command == "lits":
        return convert_lits(args.source, _options(args), include_test=args.include_test)
    if args.command == "msd":
        return convert_msd(args.source, _options(args, msd_default_name(args.source)[1]), lesions=_parse_lesions(args.lesion),
                           include_test=not args.no_test)
    if args.command == "ccta":
        if args.label_map is not None:
            if args.label or args.lesion or args.ignore_value:
                raise ConversionError(["give either --label-map or --label/--lesion/--ignore-value, not both"],
                                      header="invalid arguments")
            mapping = LabelMapping.from_json(args.label_map)
        elif args.label:
            mapping = LabelMapping.from_cli(args.label, args.lesion, args.ignore_value)
        else:
            raise ConversionError(["no label mapping: give --label NAME=VALUE (repeatable) or --label-map FILE.json"],
                                  header="invalid arguments")
        return convert_folder(args.images, args.labels, mapping, _options(args), prefix=args.prefix,
                              label_suffix=args.label_suffix, spacing=args.spacing,
                              unlabelled_to_test=args.unlabelled_to_test)
    if args.command == "nifti":
        if args.parent == "masks":
            if args.parent_masks is None:
                raise ConversionError(["--parent masks needs --parent-masks DIR and --parent-label NAME=VALUE"],
                                      header="invalid arguments")
            parent = MaskParent.from_cli(args.parent_masks, args.parent_label, args.parent_suffix)
        else:
            if args.parent_masks is not None or args.parent_label:
                raise ConversionError(["--parent-masks/--parent-label need --parent masks"], header="invalid arguments")
            parent = BodyWindowParent(args.parent_name, args.air_hu, tuple(args.tissue_hu), args.min_component_mm3)
        return convert_nifti_pairs(args.images, args.masks, [LesionMapping.parse(a) for a in args.lesion],
                                   _options(args), parent, test_cases=args.test_cases, split_seed=args.split_seed,
                                   prefix=args.prefix, mask_suffix=args.mask_suffix, allow_healthy=args.allow_healthy,
                                   mass_fraction=args.mass_fraction)

    return merge_datasets(args.inputs, _options(args), prefix_cases=args.prefix_cases)


def _print_nifti_summary(folder: Path) -> None:
    info = json.loads((folder / "conversion.json").read_text())
    rows = sorted(info["cases"].items())
    print(f"parent derivation: {info['parent_derivation']}")
    print(f"{'case':<22} {'split':<5} {'parent %':>8} {'parent HU':>9} {'lesion vox':>10} {'lesion HU p5/50/p95':>20} "
          f"{'in window':>9}")
    for cid, st in rows:
        hu = st.get("lesion_hu_p5_median_p95")
        win = st.get("lesion_in_window_fraction")
        print(f"{cid:<22} {st.get('split', 'train'):<5} {100 * st['parent_fraction']:>8.1f} "
              f"{st['parent_median_hu']:>9.0f} {st['lesion_voxels']:>10d} "
              f"{'/'.join(f'{x:.0f}' for x in hu) if hu else '-':>20} {'-' if win is None else f'{100 * win:.0f} %':>9}")
    fr = [st["parent_fraction"] for _, st in rows]
    print(f"parent fraction of the volume: median {100 * float(sorted(fr)[len(fr) // 2]):.1f} %, "
          f"min {100 * min(fr):.1f} %, max {100 * max(fr):.1f} %")
    for name, p in info.get("lesion_intensity_hu", {}).items():
        print(f"{name}: {p.get('lesions', 0)} training lesion(s); contrast to the parent {p.get('contrast_hu')} HU, "
              f"texture {p.get('texture_hu')} HU (10th-90th percentile over lesions, min-max under 5; written to "
              "lesion_spec.json)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        res = run(args)
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"promptlesion_convert {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {res.folder}: {res.num_training} training case(s), {res.num_test} test case(s)")
    print(f"labels: {res.labels}")
    if res.spec is not None:
        for l in res.spec.lesions:
            n = len(res.radii_mm.get(l.name, []))
            print(f"lesion {l.name} (label {l.label}, parents {l.parents}): {n} component(s), radius ranges "
                  f"{[list(r) for r in l.radius_mm]} mm")
    else:
        print("no lesion_spec.json written: no lesion label with a parent structure (use --lesion LESION:PARENT)")
    if args.command == "nifti":
        _print_nifti_summary(res.folder)
    print(f"next: nnUNetv2_plan_and_preprocess -d {args.dataset_id} --verify_dataset_integrity")
    return 0


if __name__ == "__main__":
    sys.exit(main())
