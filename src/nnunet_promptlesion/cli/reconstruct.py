"""promptlesion_reconstruct: encode and decode a CT NIfTI with a trained VQGAN; write the reconstruction and its PSNR/SSIM.

The CT (in HU) is put into the checkpoint's array axis order (nnU-Net's order for a VQGAN trained on nnU-Net
preprocessed data), resampled to the checkpoint's spacing, mapped to [-1, 1] with the checkpoint's intensity space
(HU window or nnU-Net CT normalisation), reconstructed patch-wise (MONAI sliding window, Gaussian blending),
mapped back to HU (values outside the intensity window come back clipped to it) and resampled to the input grid.
PSNR (dB) and 3D SSIM are computed in model space [-1, 1] (data range 2) at the checkpoint's spacing, MAE in HU
within the intensity window; they are printed and written to OUTPUT's sibling ``.json``.
"""
from __future__ import annotations

import argparse
import os
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


def reconstruct_volume(model, meta: dict, hu, zooms, overlap: float = 0.25, sw_batch_size: int = 1, device="cpu") -> dict:
    """Reconstruct an (X, Y, Z) HU array with spacing ``zooms`` (mm). Returns arrays and metrics."""
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    from ..generator.data import resample_to_spacing
    from ..generator.intensity import IntensitySpace
    from ..generator.vqgan.train import psnr, ssim3d

    space = IntensitySpace.from_dict(meta["intensity"])
    spacing = meta["spacing"]
    res = resample_to_spacing(np.asarray(hu, np.float32), zooms, spacing, order=1)
    x = torch.from_numpy(np.asarray(space.hu_to_model(res), np.float32))[None, None].to(device)
    f = model.downsample_factor
    pad = [(-s) % f for s in x.shape[2:]]
    xp = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    roi = [min(int(p), int(s)) // f * f for p, s in zip(model.config.patch_size, xp.shape[2:])]
    with torch.no_grad():
        y = sliding_window_inference(xp, roi, sw_batch_size, model.reconstruct, overlap=overlap, mode="gaussian")
    y = y[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].clamp(-1, 1)
    metrics = {"psnr_db": psnr(x.cpu(), y.cpu()), "ssim": ssim3d(x.cpu(), y.cpu())}
    x_hu = space.model_to_hu(x.cpu().numpy()[0, 0])
    y_hu = space.model_to_hu(y.cpu().numpy()[0, 0])
    metrics["mae_hu"] = float(np.abs(x_hu - y_hu).mean())
    out = resample_to_spacing(y_hu, spacing, zooms, order=1)
    # resampling back may be off by a voxel from rounding: crop/pad to the input grid
    out = _fit_shape(out, hu.shape)
    return {"reconstruction_hu": out, "metrics": metrics}


def model_axis_permutation(meta: dict) -> list[int]:
    """Axis permutation from a nibabel (x, y, z) array to the checkpoint's array order.

    A VQGAN trained on nnU-Net preprocessed data saw nnU-Net's order: (z, y, x) as nnU-Net's readers
    return it, then permuted by the plans' ``transpose_forward``. A VQGAN trained on a NIfTI folder saw
    nibabel's order (identity). Works for VQGAN and diffusion checkpoint metadata.
    """
    src = meta.get("source") or {}
    src = src.get("train") or src  # VQGAN meta: {"train": ..., "eval": ...}; diffusion meta: the source itself
    if src.get("type") != "nnunet_preprocessed":
        return [0, 1, 2]
    tf = src.get("transpose_forward") or [0, 1, 2]
    zyx = [2, 1, 0]
    return [zyx[i] for i in tf]


def _fit_shape(a, shape):
    import numpy as np

    out = np.empty(shape, np.float32)
    sl = tuple(slice(0, min(s, t)) for s, t in zip(a.shape, shape))
    out[...] = np.pad(a[sl], [(0, max(0, t - s)) for s, t in zip(a.shape, shape)], mode="edge")
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import nibabel as nib
    import numpy as np
    import torch

    from ..generator.train_utils import resolve_device
    from ..generator.vqgan import load_vqgan
    from ..utils.atomic import write_json_atomic
    from ..utils.checkpoint import CheckpointError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    inp = Path(args.input)
    if not inp.is_file():
        print(f"error: input {inp} does not exist", file=sys.stderr)
        return 2
    out = Path(args.output)
    if not out.name.endswith((".nii.gz", ".nii")):
        print(f"error: output {out} must end with .nii.gz or .nii", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    try:
        model, meta = load_vqgan(args.checkpoint, map_location=device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        img = nib.load(str(inp))
        hu = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001
        print(f"error: could not read {inp} as NIfTI: {e}", file=sys.stderr)
        return 2
    if hu.ndim != 3:
        print(f"error: {inp} is not a 3D volume (shape {hu.shape})", file=sys.stderr)
        return 2
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    perm = model_axis_permutation(meta)
    hu_m = np.ascontiguousarray(hu.transpose(perm))
    r = reconstruct_volume(model, meta, hu_m, [zooms[i] for i in perm], args.overlap, args.sw_batch_size, device)
    r["reconstruction_hu"] = np.ascontiguousarray(r["reconstruction_hu"].transpose(np.argsort(perm)))
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = nib.Nifti1Image(r["reconstruction_hu"].astype(np.float32), img.affine, img.header)
    rec.set_data_dtype(np.float32)
    # nibabel picks the format from the extension, so the temporary sibling keeps it
    tmp = out.with_name(f".{out.name}.partial" + (".nii.gz" if out.name.endswith(".gz") else ".nii"))
    try:
        nib.save(rec, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    report = {"input": str(inp.resolve()), "output": str(out.resolve()), "checkpoint": str(Path(args.checkpoint).resolve()),
              "checkpoint_id": meta["checkpoint_id"], "preset": meta["preset"], "step": meta["step"],
              "spacing_mm": meta["spacing"], "intensity": meta["intensity"], **r["metrics"],
              "note": "PSNR/SSIM in model space [-1, 1] (data range 2) at the checkpoint spacing; MAE in HU inside the intensity window"}
    json_path = out.with_name(out.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
    write_json_atomic(report, json_path)
    m = r["metrics"]
    print(f"PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']:.4f}, MAE {m['mae_hu']:.1f} HU -> {out} ({json_path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
