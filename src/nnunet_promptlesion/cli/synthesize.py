"""promptlesion_synthesize: insert diffusion-generated lesions into one CT.

Lesion masks are drawn inside the parent structure (``--parent-mask`` == ``--parent-label``) by the same mask
sampler nnU-Net training uses: an elastic ellipsoid of radius ``--size-mm`` (or size and shape drawn from the
lesion spec stored in the checkpoint), centred on a parent voxel in the middle 30-70% of the parent's extent
along the cranio-caudal axis and clipped to the parent (unless the class may leave it); or given as ``--mask``
(every connected component is one lesion). The CT is then put into the generator's array order (nnU-Net's
reader order after transpose_forward, for a generator trained with -d), a patch around every lesion is
resampled to the generator's spacing, all patches are inpainted in one batch (prompt ``--prompt``; a model
trained without prompts samples with its null token), blended in (Gaussian-blurred mask) and resampled back;
only voxels near the lesions change, every other voxel keeps its exact value.

A 2D generator (trained on a 2D configuration such as 2d_demo) paints each lesion in ONE slice along its slice axis
(the generator's array axis 0: axial for nnU-Net-trained generators without a transpose): a --mask component is cut
to its largest slice (only that slice is painted and labelled), and generated masks are 2D masks placed in a slice
of the middle 30-70% of the parent's extent along that axis. The JSON records each lesion's slice.
"""
from __future__ import annotations

import argparse
import sys

from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_HELP, SAMPLERS, STEPS_HELP

EPILOG = """examples:
  promptlesion_synthesize -i ct.nii.gz --parent-mask organs.nii.gz --parent-label 5 --prompt liver_tumor \\
      --size-mm 8 --count 2 --seed 0 --steps 50 --diffusion runs/diffusion/checkpoint_final.pt -o out/
  promptlesion_synthesize -i ct.nii.gz --parent-mask organs.nii.gz --parent-label 2 --prompt kidney_tumor \\
      --mask my_lesion.nii.gz --sampler ddpm --diffusion runs/diffusion/checkpoint_final.pt -o out/

Outputs in -o: <name>_synthetic.nii.gz (CT with lesions, HU, the input's dtype and header),
<name>_lesions.nii.gz (lesion label map: the class label of --prompt), <name>_preview.png (three planes
through the first lesion, before/after with the mask contour) and <name>_synthesis.json (lesion centres,
sizes, settings, checkpoint identities)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_synthesize", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="CT NIfTI in HU")
    p.add_argument("--parent-mask", required=True, help="label map on the CT grid (e.g. organ segmentation)")
    p.add_argument("--parent-label", type=int, required=True, help="label of the structure the lesions go into")
    p.add_argument("--prompt", required=True, help="lesion class name or label from the checkpoint's vocabulary, or 'healthy'")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--mask", help="lesion mask NIfTI on the CT grid (>0 = lesion); each connected component is one lesion")
    g.add_argument("--size-mm", type=float, help="equivalent-sphere radius of each lesion in mm (default: drawn from the lesion spec)")
    p.add_argument("--count", type=int, default=1, help="number of lesions to insert (default 1; ignored with --mask)")
    p.add_argument("--seed", type=int, default=0, help="random seed for placement, shape and sampling (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=STEPS_HELP)
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER, help=SAMPLER_HELP)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic; default 0)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off; default 1)")
    p.add_argument("--blend-sigma", type=float, default=1.0, help="blend blur sigma in generator voxels (default 1)")
    p.add_argument("--diffusion", required=True, help="diffusion checkpoint (promptlesion_train_diffusion output)")
    p.add_argument("--vqgan", help="VQGAN checkpoint (default: the path stored in the diffusion checkpoint)")
    p.add_argument("-o", "--output-dir", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--attributes", default=None, metavar="NAME=BIN,...",
                   help="attribute prompts of a checkpoint trained with --attributes, e.g. radius=1,contrast=3 (bins "
                        "1..n of its training lesions, 0 = null; unnamed attributes null). A radius bin also sets the "
                        "radius range of generated masks")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # deferred until the arguments are parsed: see cli/__init__.py
    import torch

    from ..synthesis.single_ct import SingleCTError, SingleCTOptions, synthesize_ct
    from ..utils.checkpoint import CheckpointError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    opts = SingleCTOptions(prompt=args.prompt, parent_label=args.parent_label, mask=args.mask, size_mm=args.size_mm,
                           count=args.count, seed=args.seed, steps=args.steps, sampler=args.sampler, eta=args.eta,
                           guidance=args.guidance, blend_sigma=args.blend_sigma, device=args.device,
                           attributes=args.attributes)
    try:
        rec = synthesize_ct(args.input, args.parent_mask, args.diffusion, args.output_dir, opts, vqgan=args.vqgan)
    except (SingleCTError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(rec['lesions'])} '{rec['prompt']}' lesion(s) into {rec['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
