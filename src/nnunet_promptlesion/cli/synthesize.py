"""promptlesion_synthesize: insert diffusion-generated lesions into one CT.

Lesion masks are drawn inside the parent structure (``--parent-mask`` == ``--parent-label``): an elastic
ellipsoid of radius ``--size-mm`` (or a radius drawn from the lesion spec stored in the checkpoint), centred
on a parent voxel in the middle 30-70% of the parent's extent along the last array axis and clipped to the
parent (unless the class may leave it); or given as ``--mask`` (every connected component is one lesion).
Around every lesion a patch is resampled to the generator's spacing, all patches are inpainted in one
batch (prompt ``--prompt``), blended in (Gaussian-blurred mask) and resampled back; only voxels near the
lesions change, every other voxel keeps its exact value.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

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
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50); ddpm always runs all T steps")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="reverse sampler (default ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic; default 0)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off; default 1)")
    p.add_argument("--blend-sigma", type=float, default=1.0, help="blend blur sigma in generator voxels (default 1)")
    p.add_argument("--diffusion", required=True, help="diffusion checkpoint (promptlesion_train_diffusion output)")
    p.add_argument("--vqgan", help="VQGAN checkpoint (default: the path stored in the diffusion checkpoint)")
    p.add_argument("-o", "--output-dir", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda or cpu")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _stem(path: Path) -> str:
    n = path.name
    for ext in (".nii.gz", ".nii"):
        if n.endswith(ext):
            return n[: -len(ext)]
    return path.stem


def place_masks(parent: np.ndarray, spacing, count: int, radius_mm: float | None, lesion, rng, may_leave: bool) -> list[np.ndarray]:
    """``count`` bool lesion masks (CT grid) centred in the middle 30-70% of the parent along the last axis."""
    from scipy import ndimage

    from ..synthesis.masks import elastic_ellipsoid, paste_centered, sample_radius_mm

    eroded = ndimage.binary_erosion(parent)
    cand_mask = eroded if eroded.any() else parent
    zs = np.nonzero(cand_mask.any(axis=(0, 1)))[0]
    lo, hi = zs.min(), zs.max()
    region = np.zeros_like(parent)
    z0, z1 = int(lo + 0.3 * (hi - lo)), int(np.ceil(lo + 0.7 * (hi - lo)))
    region[..., z0:z1 + 1] = True
    cands = np.argwhere(cand_mask & region)
    if len(cands) == 0:
        cands = np.argwhere(cand_mask)
    out = []
    for _ in range(count):
        for _try in range(20):
            r = radius_mm if radius_mm is not None else sample_radius_mm(lesion, rng)
            shape = elastic_ellipsoid(r, spacing, rng, elastic=True if lesion is None else lesion.elastic)
            m = paste_centered(parent.shape, shape, cands[int(rng.integers(len(cands)))])
            if not may_leave:
                m &= parent
            if m.any():
                out.append(m)
                break
    return out


def _patch_coords(centre_mm: np.ndarray, patch, spacing_g, spacing_c) -> np.ndarray:
    """CT voxel coordinates (3, P0, P1, P2) of the generator patch voxels centred at ``centre_mm``."""
    axes = [centre_mm[a] + (np.arange(patch[a]) - (patch[a] - 1) / 2.0) * spacing_g[a] for a in range(3)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([grid[a] / spacing_c[a] for a in range(3)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import nibabel as nib
    import torch
    from scipy import ndimage

    from ..generator import train_utils as tu
    from ..generator.diffusion.checkpoint import load_generator_pair
    from ..generator.diffusion.inpaint import blend_weights, inpaint_lesions
    from ..generator.diffusion.preview import save_grid
    from ..generator.intensity import IntensitySpace
    from ..synthesis.lesion_spec import LesionSpec
    from ..utils.atomic import write_json_atomic
    from ..utils.checkpoint import CheckpointError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    inp, pm = Path(args.input), Path(args.parent_mask)
    for f in (inp, pm):
        if not f.is_file():
            return _fail(f"{f} does not exist")
    if args.count < 1:
        return _fail("--count must be >= 1")
    try:
        img = nib.load(str(inp))
        ct = np.asarray(img.dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(pm)).dataobj)
    except Exception as e:  # noqa: BLE001
        return _fail(f"could not read the input NIfTI files: {e}")
    if ct.ndim != 3:
        return _fail(f"{inp}: expected a 3D CT, got shape {ct.shape}")
    if labels.shape != ct.shape:
        return _fail(f"{pm} has shape {labels.shape} but {inp} has {ct.shape}; the parent mask must be on the CT grid")
    parent = labels == args.parent_label
    if not parent.any():
        present = [int(v) for v in np.unique(labels) if v != 0][:30]
        return _fail(f"{pm} holds no voxel with label {args.parent_label} (labels present: {present}); fix --parent-label")
    spacing_c = np.array([float(z) for z in img.header.get_zooms()[:3]])

    device = tu.resolve_device(args.device)
    try:
        vqgan, vq_meta, model, meta, vocab = load_generator_pair(args.diffusion, args.vqgan, device)
    except CheckpointError as e:
        return _fail(str(e))
    try:
        pid = vocab.id_of(args.prompt)
    except KeyError as e:
        return _fail(str(e).strip("'\""))
    spacing_g = np.array([float(s) for s in meta["spacing"]])
    patch = [int(p) for p in meta["patch_size"]]
    space = IntensitySpace.from_dict(meta["intensity"])
    spec = LesionSpec.from_dict(meta["lesion_spec"]) if meta.get("lesion_spec") else None
    lesion = spec.by_name(vocab.names[pid]) if (spec is not None and pid > 0) else None
    rng = np.random.default_rng(args.seed)

    if args.mask:
        mp = Path(args.mask)
        if not mp.is_file():
            return _fail(f"{mp} does not exist")
        user = np.asarray(nib.load(str(mp)).dataobj) > 0
        if user.shape != ct.shape:
            return _fail(f"{mp} has shape {user.shape} but {inp} has {ct.shape}; the lesion mask must be on the CT grid")
        if not (lesion is not None and lesion.may_leave_parent):
            user &= parent
        lab, n = ndimage.label(user, structure=np.ones((3, 3, 3)))
        masks = [lab == i for i in range(1, n + 1)]
        if not masks:
            return _fail(f"{mp} holds no lesion voxel inside parent label {args.parent_label}")
    else:
        if args.size_mm is None and lesion is None:
            return _fail("--size-mm is needed for the 'healthy' prompt or a checkpoint without a lesion spec")
        if args.size_mm is not None and args.size_mm <= 0:
            return _fail("--size-mm must be > 0")
        masks = place_masks(parent, spacing_c, args.count, args.size_mm, lesion, rng,
                            may_leave=bool(lesion is not None and lesion.may_leave_parent))
        if not masks:
            return _fail(f"could not place a lesion inside parent label {args.parent_label}")

    # generator patches around every lesion (resampled to the generator's spacing)
    from scipy.ndimage import map_coordinates

    centres = [np.argwhere(m).mean(0) for m in masks]
    imgs, msks = [], []
    for m, c in zip(masks, centres):
        coords = _patch_coords(c * spacing_c, patch, spacing_g, spacing_c)
        hu = map_coordinates(ct, coords, order=1, mode="nearest")
        mk = map_coordinates(m.astype(np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
        if not mk.any():  # a lesion thinner than a generator voxel: keep its centre voxel
            mk[tuple(p // 2 for p in patch)] = True
        imgs.append(np.asarray(space.hu_to_model(hu), dtype=np.float32))
        msks.append(mk.astype(np.float32))
    image = torch.from_numpy(np.stack(imgs)[:, None]).to(device)
    mask_t = torch.from_numpy(np.stack(msks)[:, None]).to(device)
    n = image.shape[0]
    gen = torch.Generator(device=device).manual_seed(int(args.seed))
    sigma = torch.full((n,), float(args.blend_sigma), device=device)
    _, decoded, _ = inpaint_lesions(vqgan, model, image, mask_t, torch.full((n,), pid, dtype=torch.long, device=device),
                                    steps=args.steps if args.sampler == "ddim" else None, sampler=args.sampler,
                                    guidance=args.guidance, generator=gen, eta=args.eta, blend_sigma=sigma,
                                    autocast=lambda: tu.autocast(device), return_decoded=True)
    g, _ = blend_weights(mask_t, sigma)
    g = g[:, 0].float().cpu().numpy()
    dec_hu = space.model_to_hu(decoded[:, 0].float().cpu().numpy())

    # back to the CT grid: only voxels with a non-zero resampled blend weight change
    out = ct.copy()
    label_map = np.zeros(ct.shape, dtype=np.int16)
    lesion_label = vocab.labels[pid]
    records = []
    half_mm = (np.array(patch) - 1) / 2.0 * spacing_g
    for i, (m, c) in enumerate(zip(masks, centres)):
        c_mm = c * spacing_c
        lo = np.maximum(np.floor((c_mm - half_mm) / spacing_c).astype(int), 0)
        hi = np.minimum(np.ceil((c_mm + half_mm) / spacing_c).astype(int) + 1, ct.shape)
        idx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        gc = np.stack([(idx[a] * spacing_c[a] - c_mm[a]) / spacing_g[a] + (patch[a] - 1) / 2.0 for a in range(3)])
        w = map_coordinates(g[i], gc, order=1, mode="constant", cval=0.0)
        d = map_coordinates(dec_hu[i], gc, order=1, mode="nearest")
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        region = out[sl]
        out[sl] = np.where(w > 0, region + w * (d - region), region)
        label_map[m] = lesion_label if pid > 0 else 0
        records.append({"centre_voxel": [round(float(v), 2) for v in c], "voxels": int(m.sum()),
                        "equivalent_radius_mm": round(float((3 * m.sum() * np.prod(spacing_c) / (4 * np.pi)) ** (1 / 3)), 2)})

    outdir = Path(args.output_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = _stem(inp)
    dtype = img.get_data_dtype()
    hdr = img.header.copy()
    hdr.set_slope_inter(1.0, 0.0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.round(out), info.min, info.max).astype(dtype)
    else:
        data = out.astype(np.float32)
        hdr.set_data_dtype(np.float32)
    _save_nifti_atomic(nib.Nifti1Image(data, img.affine, hdr), outdir / f"{stem}_synthetic.nii.gz")
    lhdr = img.header.copy()
    lhdr.set_data_dtype(np.int16)
    lhdr.set_slope_inter(1.0, 0.0)
    _save_nifti_atomic(nib.Nifti1Image(label_map, img.affine, lhdr), outdir / f"{stem}_lesions.nii.gz")
    c0 = tuple(int(round(v)) for v in centres[0])
    win = (-160.0, 240.0)
    save_grid([("input CT + lesion mask", [(ct, masks[0])]), (f"synthetic '{vocab.names[pid]}'", [(out, masks[0])])],
              outdir / f"{stem}_preview.png", f"{inp.name}: {len(masks)} x '{vocab.names[pid]}' "
              f"({args.sampler}{'' if args.sampler == 'ddpm' else ' ' + str(args.steps)})", window=win, centre=c0,
              aspect=spacing_c)
    write_json_atomic({"input": str(inp.resolve()), "parent_mask": str(pm.resolve()), "parent_label": args.parent_label,
                       "prompt": vocab.names[pid], "label": lesion_label, "lesions": records, "seed": args.seed,
                       "sampler": args.sampler, "steps": args.steps if args.sampler == "ddim" else meta["schedule"]["timesteps"],
                       "eta": args.eta, "guidance": args.guidance, "blend_sigma_voxels": args.blend_sigma,
                       "ct_spacing_mm": spacing_c.tolist(), "generator_spacing_mm": spacing_g.tolist(),
                       "diffusion_checkpoint": {"path": str(Path(args.diffusion).resolve()), "checkpoint_id": meta["checkpoint_id"]},
                       "vqgan_checkpoint_id": vq_meta.get("checkpoint_id")}, outdir / f"{stem}_synthesis.json")
    print(f"wrote {len(masks)} '{vocab.names[pid]}' lesion(s) into {outdir / (stem + '_synthetic.nii.gz')}")
    return 0


def _save_nifti_atomic(nimg, target: Path) -> None:
    """nibabel picks gzip from the file name, so the temporary sibling keeps the .nii.gz ending."""
    import os
    import tempfile

    import nibabel as nib

    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".nii.gz", dir=target.parent)
    os.close(fd)
    try:
        nib.save(nimg, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":
    sys.exit(main())
