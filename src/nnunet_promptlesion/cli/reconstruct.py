"""promptlesion_reconstruct: encode and decode a CT NIfTI with a trained VQGAN; write the reconstruction and its PSNR/SSIM.

The CT (in HU) is put into the checkpoint's array axis order (nnU-Net's reader order after transpose_forward
for a VQGAN trained on nnU-Net preprocessed data; see nnunet_promptlesion.synthesis.reconstruct), resampled to the checkpoint's spacing, mapped to [-1, 1] with the checkpoint's intensity space
(HU window or nnU-Net CT normalisation), reconstructed patch-wise (MONAI sliding window, Gaussian blending),
mapped back to HU (values outside the intensity window come back clipped to it) and resampled to the input grid.
PSNR (dB) and 3D SSIM are computed in model space [-1, 1] (data range 2) at the checkpoint's spacing, MAE in HU
within the intensity window; they are printed and written to OUTPUT's sibling ``.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """example:
  promptlesion_reconstruct -i ct_0000.nii.gz -m runs/vqgan/checkpoint_final.pt -o ct_recon.nii.gz
  # writes ct_recon.nii.gz (HU, input grid) and ct_recon.json {"psnr_db": ..., "ssim": ..., "mae_hu": ...}"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptlesion_reconstruct", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, help="CT NIfTI in HU (.nii.gz / .nii)")
    p.add_argument("-m", "--checkpoint", required=True, help="VQGAN checkpoint (checkpoint_final.pt / checkpoint_latest.pt)")
    p.add_argument("-o", "--output", required=True, help="output NIfTI for the reconstruction (HU)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction (default 0.25)")
    p.add_argument("--sw-batch-size", type=int, default=1, help="patches per forward pass (default 1)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    return p


def model_axis_permutation(meta: dict) -> list[int]:
    """Axis permutation from a nibabel array to the checkpoint's array order (kept for callers of this name; the
    one definition is :func:`nnunet_promptlesion.utils.geometry.array_axes`)."""
    from ..utils.geometry import array_axes  # deferred: numpy + nibabel (~0.2 s CPU), see cli/__init__.py

    return list(array_axes(meta.get("source")).axes)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # deferred until the arguments are parsed: see cli/__init__.py
    import torch

    from ..synthesis.reconstruct import ReconstructError, reconstruct_nifti
    from ..utils.checkpoint import CheckpointError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        report = reconstruct_nifti(args.input, args.checkpoint, args.output, args.overlap, args.sw_batch_size,
                                   args.device)
    except (ReconstructError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"PSNR {report['psnr_db']:.2f} dB, SSIM {report['ssim']:.4f}, MAE {report['mae_hu']:.1f} HU -> "
          f"{report['output']} ({Path(report['json']).name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
