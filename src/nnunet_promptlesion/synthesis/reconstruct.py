"""Encode and decode a CT NIfTI with a trained VQGAN (the library side of ``promptlesion_reconstruct``).

The CT (HU) is seen in the checkpoint's array order (:class:`~nnunet_promptlesion.utils.geometry.NiftiView` of
its training data description: nnU-Net's order for a VQGAN trained on preprocessed data, nibabel's for a NIfTI
folder), resampled to the checkpoint's spacing, mapped to [-1, 1] with the checkpoint's intensity space (HU window
or nnU-Net CT normalisation), reconstructed patch-wise (MONAI sliding window, Gaussian blending), mapped back to
HU (values outside the intensity window come back clipped to it), resampled to the input grid and put back into
the file's orientation. PSNR (dB) and 3D SSIM are computed in model space [-1, 1] (data range 2) at the
checkpoint's spacing, MAE in HU within the intensity window.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..generator.data import resample_to_spacing, spacing_mismatch
from ..generator.intensity import IntensitySpace
from ..generator.train_utils import resolve_device
from ..generator.vqgan import load_vqgan
from ..generator.vqgan.train import psnr, ssim3d
from ..utils.atomic import write_json_atomic
from ..utils.geometry import NiftiView, array_axes, read_nifti_3d


class ReconstructError(ValueError):
    """Bad input for reconstruction; the message says what to fix."""


def reconstruct_volume(model, meta: dict, hu, zooms, overlap: float = 0.25, sw_batch_size: int = 1, device="cpu",
                       progress: bool = False) -> dict:
    """Reconstruct an HU array with spacing ``zooms`` (mm), both in the checkpoint's array order.

    Returns ``reconstruction_hu`` (input grid) and ``metrics``.
    """
    space = IntensitySpace.from_dict(meta["intensity"])
    spacing = meta["spacing"]
    res = resample_to_spacing(np.asarray(hu, np.float32), zooms, spacing, order=1)
    x = torch.from_numpy(np.asarray(space.hu_to_model(res), np.float32))[None, None].to(device)
    f = model.downsample_factor
    pad = [(-s) % f for s in x.shape[2:]]
    xp = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
    roi = [min(int(p), int(s)) // f * f for p, s in zip(model.config.patch_size, xp.shape[2:])]
    with torch.no_grad():
        y = sliding_window_inference(xp, roi, sw_batch_size, model.reconstruct, overlap=overlap, mode="gaussian",
                                     progress=progress)
    y = y[:, :, : x.shape[2], : x.shape[3], : x.shape[4]].clamp(-1, 1)
    metrics = {"psnr_db": psnr(x.cpu(), y.cpu()), "ssim": ssim3d(x.cpu(), y.cpu())}
    x_hu = space.model_to_hu(x.cpu().numpy()[0, 0])
    y_hu = space.model_to_hu(y.cpu().numpy()[0, 0])
    metrics["mae_hu"] = float(np.abs(x_hu - y_hu).mean())
    out = resample_to_spacing(y_hu, spacing, zooms, order=1)
    # resampling back may be off by a voxel from rounding: crop/pad to the input grid
    return {"reconstruction_hu": _fit_shape(out, np.shape(hu)), "metrics": metrics}


def _fit_shape(a, shape):
    out = np.empty(shape, np.float32)
    sl = tuple(slice(0, min(s, t)) for s, t in zip(a.shape, shape))
    out[...] = np.pad(a[sl], [(0, max(0, t - s)) for s, t in zip(a.shape, shape)], mode="edge")
    return out


def reconstruct_nifti(input_path, checkpoint, output_path, overlap: float = 0.25, sw_batch_size: int = 1,
                      device: str = "auto", progress: bool = True) -> dict:
    """Reconstruct ``input_path`` with the VQGAN ``checkpoint``; write the reconstruction (HU, input grid and
    header) to ``output_path`` and the report to its sibling ``.json``. Returns the report.

    Raises :class:`ReconstructError` for bad files and ``CheckpointError`` for an unusable checkpoint.
    """
    inp, out = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise ReconstructError(f"input {inp} does not exist")
    if not out.name.endswith((".nii.gz", ".nii")):
        raise ReconstructError(f"output {out} must end with .nii.gz or .nii")
    dev = resolve_device(device)
    model, meta = load_vqgan(checkpoint, map_location=dev)
    try:
        img, hu = read_nifti_3d(inp)
    except ValueError as e:
        raise ReconstructError(str(e)) from e
    view = NiftiView(img, array_axes(meta.get("source")))

    # before the work: a spacing far from the generator's makes a long run (a finer CT is resampled up) of little use
    warning = spacing_mismatch(view.spacing, meta["spacing"], np.shape(view.to_view(hu)), what=str(inp))
    if warning:
        warnings.warn(warning, stacklevel=2)
    # progress bar (stderr) over the sliding windows: a large input takes minutes on a CPU
    r = reconstruct_volume(model, meta, view.to_view(hu), [float(s) for s in view.spacing], overlap, sw_batch_size, dev,
                           progress=progress)
    rec_hu = view.from_view(r["reconstruction_hu"])
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = nib.Nifti1Image(rec_hu.astype(np.float32), img.affine, img.header)
    rec.set_data_dtype(np.float32)
    # nibabel picks the format from the extension, so the temporary sibling keeps it
    tmp = out.with_name(f".{out.name}.partial" + (".nii.gz" if out.name.endswith(".gz") else ".nii"))
    try:
        nib.save(rec, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    report = {"input": str(inp.resolve()), "output": str(out.resolve()), "checkpoint": str(Path(checkpoint).resolve()),
              "checkpoint_id": meta["checkpoint_id"], "preset": meta["preset"], "step": meta["step"],
              "spacing_mm": meta["spacing"], "intensity": meta["intensity"],
              "model_axes": list(view.permutation), "model_reorients": view.order.reorient, **r["metrics"],
              "spacing_warning": warning,
              "note": "PSNR/SSIM in model space [-1, 1] (data range 2) at the checkpoint spacing; MAE in HU inside "
                      "the intensity window"}
    json_path = out.with_name(out.name.replace(".nii.gz", "").replace(".nii", "") + ".json")
    write_json_atomic(report, json_path)
    report["json"] = str(json_path)
    return report


__all__ = ["reconstruct_nifti", "reconstruct_volume", "ReconstructError"]
