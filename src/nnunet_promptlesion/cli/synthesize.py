"""promptlesion_synthesize: insert diffusion-generated lesions into one CT.

Lesion masks are drawn inside the parent structure (``--parent-mask`` == ``--parent-label``) by the same mask
sampler nnU-Net training uses: an elastic ellipsoid of radius ``--size-mm`` (or size and shape drawn from the
lesion spec stored in the checkpoint), centred on a parent voxel in the middle 30-70% of the parent's extent
along z (the NIfTI's last axis) and clipped to the parent (unless the class may leave it); or given as
``--mask`` (every connected component is one lesion). The CT is then put into the generator's array order
(nnU-Net's, after transpose_forward, for a generator trained with -d), a patch around every lesion is
resampled to the generator's spacing, all patches are inpainted in one batch (prompt ``--prompt``, the parent
mask feeding MaskTransformer prompts), blended in (Gaussian-blurred mask) and resampled back; only voxels near
the lesions change, every other voxel keeps its exact value.
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


def place_masks(parent: np.ndarray, spacing, count: int, radius_mm: float | None, lesion, rng, may_leave: bool,
                parent_label: int = 1) -> list[np.ndarray]:
    """``count`` bool lesion masks on the CT grid (NIfTI axis order (x, y, z), ``spacing`` mm), drawn by the
    trainer's :class:`~nnunet_promptlesion.lesions.masks.MaskSampler`: centred on a parent voxel in the middle
    30-70% of the parent's extent along z (the last axis), clipped to the parent unless ``may_leave``.

    ``radius_mm`` fixes the equivalent-sphere radius (elastic ellipsoid); None draws it (and the shape prior)
    from ``lesion``, the checkpoint's lesion-spec class.
    """
    import dataclasses

    from ..lesions.spec import LesionClass
    from ..lesions.masks import MaskSampler

    if lesion is None:  # "healthy" prompt or a checkpoint without a lesion spec: an elastic ellipsoid of radius_mm
        lesion = LesionClass(name="region", label=parent_label + 1 if parent_label >= 0 else 1, parents=[parent_label],
                             radius_mm=[(radius_mm, radius_mm)], shape="ellipsoid")
    elif radius_mm is not None:
        lesion = dataclasses.replace(lesion, radius_mm=[(radius_mm, radius_mm)], radius_weights=None, shape="ellipsoid")
    lesion = dataclasses.replace(lesion, may_leave_parent=may_leave)
    zs = np.nonzero(parent.any(axis=(0, 1)))[0]
    lo, hi = int(zs.min()), int(zs.max())
    central = (slice(None), slice(None), slice(int(lo + 0.3 * (hi - lo)), int(np.ceil(lo + 0.7 * (hi - lo))) + 1))
    sampler = MaskSampler(spacing, max_tries=20)
    out = []
    for _ in range(count):
        m = sampler.sample(lesion, parent, rng, central)
        if m is None:
            m = sampler.sample(lesion, parent, rng)
        if m is not None:
            out.append(m)
    return out


def generator_axes(meta: dict) -> list[int]:
    """Permutation from the NIfTI (x, y, z) array to the generator's array order (see promptlesion_reconstruct)."""
    from .reconstruct import model_axis_permutation

    return model_axis_permutation(meta)


def _patch_coords(centre_mm: np.ndarray, patch, spacing_g, spacing_c) -> np.ndarray:
    """CT voxel coordinates (3, P0, P1, P2) of the generator patch voxels centred at ``centre_mm``."""
    axes = [centre_mm[a] + (np.arange(patch[a]) - (patch[a] - 1) / 2.0) * spacing_g[a] for a in range(3)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([grid[a] / spacing_c[a] for a in range(3)])


def extract_patches(ct: np.ndarray, parent: np.ndarray, masks: list[np.ndarray], spacing_c, spacing_g, patch,
                    space) -> dict:
    """Generator patches around every lesion, resampled from the CT grid to the generator's spacing.

    All arrays in the generator's axis order; ``spacing_c``/``spacing_g`` in mm in that order, ``patch`` in
    generator voxels. Returns ``image`` (n, 1, *patch) model space, ``mask`` and ``parent`` (n, 1, *patch)
    {0, 1} float32, and ``centres`` (CT voxel coordinates of the patch centres).
    """
    from scipy.ndimage import map_coordinates

    centres = [np.argwhere(m).mean(0) for m in masks]
    imgs, msks, pars = [], [], []
    for m, c in zip(masks, centres):
        coords = _patch_coords(c * spacing_c, patch, spacing_g, spacing_c)
        hu = map_coordinates(ct, coords, order=1, mode="nearest")
        mk = map_coordinates(m.astype(np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
        if not mk.any():  # a lesion thinner than a generator voxel: keep its centre voxel
            mk[tuple(p // 2 for p in patch)] = True
        pa = map_coordinates(parent.astype(np.float32), coords, order=1, mode="constant", cval=0.0) >= 0.5
        imgs.append(np.asarray(space.hu_to_model(hu), dtype=np.float32))
        msks.append(mk.astype(np.float32))
        pars.append((pa | mk).astype(np.float32))
    stack = (lambda xs: np.stack(xs)[:, None])
    return {"image": stack(imgs), "mask": stack(msks), "parent": stack(pars), "centres": centres}


def run_generator(vqgan, model, patches: dict, prompt_id: int, args, device) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint all patches in one batch -> (decoded image in model space, blend weight), both (n, *patch)."""
    import torch

    from ..generator import train_utils as tu
    from ..generator.diffusion import inpaint

    image = torch.from_numpy(patches["image"]).to(device)
    mask = torch.from_numpy(patches["mask"]).to(device)
    parent = torch.from_numpy(patches["parent"]).to(device)
    n = image.shape[0]
    gen = torch.Generator(device=device).manual_seed(int(args.seed))
    sigma = torch.full((n,), float(args.blend_sigma), device=device)
    _, decoded, _ = inpaint.inpaint_lesions(
        vqgan, model, image, mask, torch.full((n,), prompt_id, dtype=torch.long, device=device),
        steps=args.steps if args.sampler == "ddim" else None, sampler=args.sampler, guidance=args.guidance,
        generator=gen, eta=args.eta, blend_sigma=sigma, autocast=lambda: tu.autocast(device), return_decoded=True,
        parent_mask=parent)
    g, _ = inpaint.blend_weights(mask, sigma)
    return decoded[:, 0].float().cpu().numpy(), g[:, 0].float().cpu().numpy()


def write_back(ct: np.ndarray, centres, decoded_hu: np.ndarray, weights: np.ndarray, spacing_c, spacing_g,
               patch) -> np.ndarray:
    """Blend the decoded patches (HU) back into a copy of ``ct`` (generator axis order).

    Only voxels with a non-zero resampled blend weight change; every other voxel keeps its exact value.
    """
    from scipy.ndimage import map_coordinates

    out = ct.copy()
    half_mm = (np.array(patch) - 1) / 2.0 * spacing_g
    for i, c in enumerate(centres):
        c_mm = c * spacing_c
        lo = np.maximum(np.floor((c_mm - half_mm) / spacing_c).astype(int), 0)
        hi = np.minimum(np.ceil((c_mm + half_mm) / spacing_c).astype(int) + 1, ct.shape)
        idx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        gc = np.stack([(idx[a] * spacing_c[a] - c_mm[a]) / spacing_g[a] + (patch[a] - 1) / 2.0 for a in range(3)])
        w = map_coordinates(weights[i], gc, order=1, mode="constant", cval=0.0)
        d = map_coordinates(decoded_hu[i], gc, order=1, mode="nearest")
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        region = out[sl]
        out[sl] = np.where(w > 0, region + w * (d - region), region)
    return out


def _read_inputs(args):
    """(nibabel image, CT (x, y, z) float32 HU, parent bool, spacing mm) or an error string."""
    import nibabel as nib

    inp, pm = Path(args.input), Path(args.parent_mask)
    for f in (inp, pm):
        if not f.is_file():
            return f"{f} does not exist"
    try:
        img = nib.load(str(inp))
        ct = np.asarray(img.dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(pm)).dataobj)
    except Exception as e:  # noqa: BLE001
        return f"could not read the input NIfTI files: {e}"
    if ct.ndim != 3:
        return f"{inp}: expected a 3D CT, got shape {ct.shape}"
    if labels.shape != ct.shape:
        return f"{pm} has shape {labels.shape} but {inp} has {ct.shape}; the parent mask must be on the CT grid"
    parent = labels == args.parent_label
    if not parent.any():
        present = [int(v) for v in np.unique(labels) if v != 0][:30]
        return f"{pm} holds no voxel with label {args.parent_label} (labels present: {present}); fix --parent-label"
    return img, ct, parent, np.array([float(z) for z in img.header.get_zooms()[:3]])


def _lesion_masks(args, ct_shape, parent, spacing_c, lesion, rng):
    """Lesion masks on the CT grid (NIfTI order) from --mask or placed by the sampler; or an error string."""
    import nibabel as nib
    from scipy import ndimage

    may_leave = bool(lesion is not None and lesion.may_leave_parent)
    if args.mask:
        mp = Path(args.mask)
        if not mp.is_file():
            return f"{mp} does not exist"
        user = np.asarray(nib.load(str(mp)).dataobj) > 0
        if user.shape != ct_shape:
            return f"{mp} has shape {user.shape} but {args.input} has {ct_shape}; the lesion mask must be on the CT grid"
        if not may_leave:
            user &= parent
        lab, n = ndimage.label(user, structure=np.ones((3, 3, 3)))
        masks = [lab == i for i in range(1, n + 1)]
        return masks or f"{mp} holds no lesion voxel inside parent label {args.parent_label}"
    if args.size_mm is None and lesion is None:
        return "--size-mm is needed for the 'healthy' prompt or a checkpoint without a lesion spec"
    if args.size_mm is not None and args.size_mm <= 0:
        return "--size-mm must be > 0"
    masks = place_masks(parent, spacing_c, args.count, args.size_mm, lesion, rng, may_leave, args.parent_label)
    return masks or f"could not place a lesion inside parent label {args.parent_label}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import nibabel as nib
    import torch

    from ..generator import train_utils as tu
    from ..generator.diffusion.checkpoint import load_generator_pair
    from ..generator.diffusion.preview import save_grid
    from ..generator.intensity import IntensitySpace
    from ..lesions.spec import LesionSpec
    from ..utils.atomic import write_json_atomic
    from ..utils.checkpoint import CheckpointError

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.count < 1:
        return _fail("--count must be >= 1")
    read = _read_inputs(args)
    if isinstance(read, str):
        return _fail(read)
    img, ct, parent, spacing_c = read
    inp = Path(args.input)

    device = tu.resolve_device(args.device)
    try:
        vqgan, vq_meta, model, meta, vocab = load_generator_pair(args.diffusion, args.vqgan, device)
    except CheckpointError as e:
        return _fail(str(e))
    try:
        pid = vocab.id_of(args.prompt)
    except KeyError as e:
        return _fail(str(e).strip("'\""))
    spec = LesionSpec.from_dict(meta["lesion_spec"]) if meta.get("lesion_spec") else None
    lesion = spec.by_name(vocab.names[pid]) if (spec is not None and pid > 0) else None
    rng = np.random.default_rng(args.seed)

    # 1. placement on the CT grid (NIfTI order: z is the last axis)
    masks = _lesion_masks(args, ct.shape, parent, spacing_c, lesion, rng)
    if isinstance(masks, str):
        return _fail(masks)
    # 2. generator space: its axis order (nnU-Net's for a generator trained with -d), spacing and patch
    perm = generator_axes(meta)
    to_g = (lambda a: np.ascontiguousarray(a.transpose(perm)))
    spacing_cg = spacing_c[perm]
    spacing_g = np.array([float(s) for s in meta["spacing"]])
    patch = [int(p) for p in meta["patch_size"]]
    space = IntensitySpace.from_dict(meta["intensity"])
    ct_g = to_g(ct)
    patches = extract_patches(ct_g, to_g(parent), [to_g(m) for m in masks], spacing_cg, spacing_g, patch, space)
    # 3. inference, all lesions in one batch
    decoded, weights = run_generator(vqgan, model, patches, pid, args, device)
    # 4. write-back on the CT grid, then NIfTI order again
    out = write_back(ct_g, patches["centres"], space.model_to_hu(decoded), weights, spacing_cg, spacing_g, patch)
    out = np.ascontiguousarray(out.transpose(np.argsort(perm)))
    label_map = np.zeros(ct.shape, dtype=np.int16)
    lesion_label = vocab.labels[pid]
    records = []
    for m in masks:
        label_map[m] = lesion_label if pid > 0 else 0
        records.append({"centre_voxel": [round(float(v), 2) for v in np.argwhere(m).mean(0)], "voxels": int(m.sum()),
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
    c0 = tuple(int(round(v)) for v in np.argwhere(masks[0]).mean(0))
    win = (-160.0, 240.0)
    save_grid([("input CT + lesion mask", [(ct, masks[0])]), (f"synthetic '{vocab.names[pid]}'", [(out, masks[0])])],
              outdir / f"{stem}_preview.png", f"{inp.name}: {len(masks)} x '{vocab.names[pid]}' "
              f"({args.sampler}{'' if args.sampler == 'ddpm' else ' ' + str(args.steps)})", window=win, centre=c0,
              aspect=spacing_c)
    write_json_atomic({"input": str(inp.resolve()), "parent_mask": str(Path(args.parent_mask).resolve()),
                       "parent_label": args.parent_label,
                       "prompt": vocab.names[pid], "label": lesion_label, "lesions": records, "seed": args.seed,
                       "sampler": args.sampler, "steps": args.steps if args.sampler == "ddim" else meta["schedule"]["timesteps"],
                       "eta": args.eta, "guidance": args.guidance, "blend_sigma_voxels": args.blend_sigma,
                       "ct_spacing_mm": spacing_c.tolist(), "generator_spacing_mm": spacing_g.tolist(),
                       "generator_axes": [int(p) for p in perm],
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
