"""Insert diffusion-generated lesions into one CT NIfTI (the library side of ``promptlesion_synthesize``).

Lesion masks are drawn inside the parent structure (``parent_mask == parent_label``) by the mask sampler nnU-Net
training uses: an elastic ellipsoid of radius ``size_mm`` (or size and shape drawn from the lesion spec stored in
the checkpoint), centred on a parent voxel in the middle 30-70 % of the parent's extent along the file's
cranio-caudal voxel axis (the one closest to world z), clipped to the parent unless the class may leave it; or
given as a mask file (every connected component is one lesion). The CT is then seen in the generator's array
order (:class:`~nnunet_promptlesion.utils.geometry.NiftiView` of the generator's data description: nnU-Net's
order, reoriented for the ``...WithReorient`` readers, for a generator trained on preprocessed data; nibabel's
for a NIfTI-folder generator), a patch around every lesion is resampled to the generator's spacing, all patches
are inpainted in one batch (prompt ``prompt``, sampled with :func:`~.diffusion_render.sampling_prompt_id`: a
no-prompt model gets its null token), blended in (Gaussian-blurred mask) and resampled back; only voxels near the
lesions change, every other voxel keeps its exact value.

A 2D generator (trained on a 2D configuration's slices) paints each lesion in one slice of the CT: a slice along
the generator's slice axis (axis 0 of its array order: for nnU-Net's NIfTI readers without a transpose, the axial
slice). A lesion of ``mask`` paints its largest slice (the rest of the component is left unpainted and unlabelled);
placed lesions are 2D masks placed in a slice of the middle 30-70 % of the parent's extent along that axis. The
label map holds exactly the painted slices; the JSON records each lesion's slice.

Outputs in ``output_dir``: ``<name>_synthetic.nii.gz`` (CT with lesions, HU, the input's dtype and header),
``<name>_lesions.nii.gz`` (lesion label map), ``<name>_preview.png`` and ``<name>_synthesis.json`` (lesion
centres in voxels and world mm (RAS+), sizes, settings, checkpoint identities).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from scipy.ndimage import map_coordinates

from ..generator import train_utils as tu
from ..generator.data import spacing_mismatch
from ..generator.diffusion import inpaint
from ..generator.diffusion.checkpoint import attribute_bins_of, load_generator_pair
from ..generator.diffusion.preview import save_grid
from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler, sampler_steps
from ..generator.intensity import IntensitySpace
from ..lesions.attributes import AttributeRequestError, parse_assignment, radius_range
from ..lesions.components import equivalent_radius_mm
from ..lesions.masks import MaskBank, MaskSampler
from ..lesions.spec import LesionClass, LesionSpec
from ..placement.index import LesionIndex
from ..placement.placer import ArrayCases, Placer
from ..utils.atomic import atomic_path, write_json_atomic
from ..utils.geometry import ArrayGeometry, NiftiView, array_axes
from .diffusion_render import sampling_prompt_id


class SingleCTError(ValueError):
    """Bad input for single-CT synthesis; the message says what to fix."""


@dataclass
class SingleCTOptions:
    """What to synthesise. ``size_mm``: equivalent-sphere radius (mm; None: drawn from the lesion spec);
    ``mask``: a lesion mask NIfTI on the CT grid instead of placed lesions; ``steps``: DDIM steps (DDPM runs all
    T); ``blend_sigma``: blend blur in generator voxels; ``device``: "auto", "cuda" or "cpu"."""

    prompt: str
    parent_label: int
    mask: str | None = None
    size_mm: float | None = None
    count: int = 1
    seed: int = 0
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    eta: float = 0.0
    guidance: float = 1.0
    blend_sigma: float = 1.0
    device: str = "auto"
    #: attribute prompts, "radius=1,contrast=3" (bins of the checkpoint, 0 = null; unnamed attributes null). A radius
    #: bin also sets the radius range of generated masks (not of --mask / --size-mm lesions: their size stands)
    attributes: str | None = None


def stem(path: Path) -> str:
    n = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if n.endswith(ext):
            return n[: -len(ext)]
    return Path(path).stem


def cranio_caudal_axis(affine: np.ndarray) -> int:
    """The voxel axis of a NIfTI whose direction is closest to world z (superior-inferior)."""
    return int(np.argmax(np.abs(np.asarray(affine, float)[2, :3])))


#: the value the parent takes in the in-memory segmentation the placer reads (any label > 0 that is not the lesion's)
_PARENT, _OTHER_PARENT = 1, 2


def _placement_class(lesion, radius_mm: float | None, parent_label: int, may_leave: bool):
    """(lesion class, parent value) for placing in one CT: the placer reads parents from a segmentation, so the
    file's parent label becomes one value of an in-memory one. ``lesion`` None ("healthy" prompt or a checkpoint
    without a lesion spec): an elastic ellipsoid of ``radius_mm``; a given ``radius_mm`` fixes the radius."""
    if lesion is None:
        lesion = LesionClass(name="region", label=parent_label + 1 if parent_label >= 0 else 1, parents=[parent_label],
                             radius_mm=[(radius_mm, radius_mm)], shape="ellipsoid")
    elif radius_mm is not None:
        lesion = dataclasses.replace(lesion, radius_mm=[(radius_mm, radius_mm)], radius_weights=None, shape="ellipsoid")
    value = _PARENT if lesion.label != _PARENT else _OTHER_PARENT
    return dataclasses.replace(lesion, parents=[value], may_leave_parent=may_leave), value


def place_masks(parent: np.ndarray, spacing, count: int, radius_mm: float | None, lesion, rng, may_leave: bool,
                parent_label: int = 1, z_axis: int = 2, ct: np.ndarray | None = None,
                radius_range_mm: tuple[float, float] | None = None) -> list[np.ndarray]:
    """``count`` bool lesion masks on the CT grid (nibabel order, ``spacing`` mm per axis), placed by the trainer's
    :class:`~nnunet_promptlesion.placement.placer.Placer` on the CT as one in-memory case (the whole volume is the
    carrier): centred on a parent voxel in the middle 30-70 % of the parent's extent along ``z_axis`` (anywhere in
    the parent when that fails), clipped to the parent unless ``may_leave``.

    ``radius_mm`` fixes the equivalent-sphere radius (elastic ellipsoid); None draws it (and the shape prior)
    from ``lesion``, the checkpoint's lesion-spec class. ``ct`` (HU, same grid) lets a mass class avoid voxels
    brighter than the parent, as in training; without it that part of the rule sees a flat image and excludes none.
    ``radius_range_mm``: a requested radius bin (attribute prompts): every mask's equivalent radius lies in it.
    """
    lesion, value = _placement_class(lesion, radius_mm, parent_label, may_leave)
    seg = np.where(parent, value, 0).astype(np.int16)[None]
    shape = np.array(parent.shape)
    index = LesionIndex(spec=LesionSpec([lesion]), counts={}, stats={}, bank=MaskBank.empty(spacing),
                        carriers={value: [("ct", (shape // 2)[None])]})
    image = np.zeros(parent.shape, np.float32) if ct is None else np.asarray(ct, np.float32)
    cases = ArrayCases({"ct": (image[None], seg)})
    placer = Placer(cases, index, MaskSampler(spacing, max_tries=20), parent.shape, (1, 1, 1), tries=1)
    zs = np.nonzero(parent.any(axis=tuple(a for a in range(3) if a != z_axis)))[0]
    lo, hi = int(zs.min()), int(zs.max())
    central = [slice(None)] * 3
    central[z_axis] = slice(int(lo + 0.3 * (hi - lo)), int(np.ceil(lo + 0.7 * (hi - lo))) + 1)
    out = []
    for _ in range(count):
        # seed=0: a rendering seed is not needed here, and drawing one would change the next lesion's draws
        placed = placer.place(0, rng, region=tuple(central), seed=0, radius_range_mm=radius_range_mm)
        if placed is None:
            placed = placer.place(0, rng, region=(slice(None),) * 3, seed=0, radius_range_mm=radius_range_mm)
        if placed is not None:
            out.append(placed[0].mask())
    return out


def place_masks_2d(parent_v: np.ndarray, spacing_v, count: int, radius_mm: float | None, lesion, rng,
                   may_leave: bool, parent_label: int = 1, ct_v: np.ndarray | None = None,
                   radius_range_mm: tuple[float, float] | None = None) -> list[np.ndarray]:
    """``count`` bool lesion masks in the generator's view of the CT (axis 0 = the 2D generator's slice axis,
    ``spacing_v`` mm per view axis), each a 2D mask in one slice, placed by the trainer's 2D
    :class:`~nnunet_promptlesion.placement.placer.Placer` (the carrier patch is a whole slice) on a slice of the
    middle 30-70 % of the parent's extent along axis 0 (any parent slice when that fails). ``radius_mm``,
    ``lesion``, ``may_leave``, ``radius_range_mm`` (disc-equivalent here) and ``ct_v`` (HU, view order) as in
    :func:`place_masks`."""
    lesion, value = _placement_class(lesion, radius_mm, parent_label, may_leave)
    seg = np.where(parent_v, value, 0).astype(np.int16)[None]
    image = np.zeros(parent_v.shape, np.float32) if ct_v is None else np.asarray(ct_v, np.float32)
    cases = ArrayCases({"ct": (image[None], seg)})
    zs = np.nonzero(parent_v.any(axis=(1, 2)))[0]
    lo, hi = int(zs.min()), int(zs.max())
    central = zs[(zs >= lo + 0.3 * (hi - lo)) & (zs <= np.ceil(lo + 0.7 * (hi - lo)))]
    plane = np.array(parent_v.shape[1:])
    out = []
    for slices in (central, zs):
        # one carrier per candidate slice, centred in plane: the carrier patch is the whole slice
        carriers = np.stack([np.r_[z, plane // 2] for z in slices])
        index = LesionIndex(spec=LesionSpec([lesion]), counts={}, stats={}, bank=MaskBank.empty(spacing_v[1:]),
                            carriers={value: [("ct", carriers)]})
        placer = Placer(cases, index, MaskSampler(spacing_v[1:], max_tries=20), tuple(plane), (1, 1), tries=20)
        while len(out) < count:
            placed = placer.place(0, rng, region=(slice(None),) * 2, seed=0, radius_range_mm=radius_range_mm)
            if placed is None:
                break
            pl = placed[0]
            m = np.zeros(parent_v.shape, bool)
            m[pl.bbox[0][0]] = pl.mask()[0]  # the carrier patch is the whole slice: patch voxels are slice voxels
            out.append(m)
        if len(out) == count:
            break
    return out


def largest_slice(mask: np.ndarray) -> np.ndarray:
    """``mask`` (view order) reduced to its slice along axis 0 with the most voxels."""
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    out = np.zeros_like(mask)
    out[z] = mask[z]
    return out


def _patch_coords(centre_mm: np.ndarray, patch, spacing_g, spacing_c) -> np.ndarray:
    """CT voxel coordinates (n, *patch) of the generator patch voxels centred at ``centre_mm`` (n = len(patch))."""
    n = len(patch)
    axes = [centre_mm[a] + (np.arange(patch[a]) - (patch[a] - 1) / 2.0) * spacing_g[a] for a in range(n)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([grid[a] / spacing_c[a] for a in range(n)])


def extract_patches(ct: np.ndarray, parent: np.ndarray, masks: list[np.ndarray], spacing_c, spacing_g, patch,
                    space) -> dict:
    """Generator patches around every lesion, resampled from the CT grid to the generator's spacing.

    All arrays in the generator's axis order; ``spacing_c``/``spacing_g`` in mm in that order, ``patch`` in
    generator voxels. Returns ``image`` (n, 1, *patch) model space, ``mask`` and ``parent`` (n, 1, *patch)
    {0, 1} float32, and ``centres`` (CT voxel coordinates of the patch centres).
    """
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


def run_generator(vqgan, model, patches: dict, prompt_id: int, opts: SingleCTOptions, device,
                  attributes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint all patches in one batch with ``prompt_id`` (the id to *sample* with) and the attribute bins
    ``attributes`` (None: null) -> (decoded image in model space, blend weight), both (n, *patch)."""
    image = torch.from_numpy(patches["image"]).to(device)
    mask = torch.from_numpy(patches["mask"]).to(device)
    parent = torch.from_numpy(patches["parent"]).to(device)
    n = image.shape[0]
    gen = torch.Generator(device=device).manual_seed(int(opts.seed))
    sigma = torch.full((n,), float(opts.blend_sigma), device=device)
    _, decoded, _ = inpaint.inpaint_lesions(
        vqgan, model, image, mask, torch.full((n,), int(prompt_id), dtype=torch.long, device=device),
        steps=sampler_steps(opts.sampler, opts.steps), sampler=opts.sampler, guidance=opts.guidance,
        generator=gen, eta=opts.eta, blend_sigma=sigma, autocast=lambda: tu.autocast(device), return_decoded=True,
        parent_mask=parent,
        **({} if attributes is None else
           {"attributes": torch.tensor([attributes] * n, dtype=torch.long, device=device)}))
    g, _ = inpaint.blend_weights(mask, sigma)
    return decoded[:, 0].float().cpu().numpy(), g[:, 0].float().cpu().numpy()


def write_back(ct: np.ndarray, centres, decoded_hu: np.ndarray, weights: np.ndarray, spacing_c, spacing_g,
               patch) -> np.ndarray:
    """Blend the decoded patches (HU) back into a copy of ``ct`` (generator axis order).

    Only voxels with a non-zero resampled blend weight change; every other voxel keeps its exact value.
    """
    out = ct.copy()
    half_mm = (np.array(patch) - 1) / 2.0 * spacing_g
    for i, c in enumerate(centres):
        c_mm = c * spacing_c
        lo = np.maximum(np.floor((c_mm - half_mm) / spacing_c).astype(int), 0)
        hi = np.minimum(np.ceil((c_mm + half_mm) / spacing_c).astype(int) + 1, ct.shape)
        idx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        gc = np.stack([(idx[a] * spacing_c[a] - c_mm[a]) / spacing_g[a] + (patch[a] - 1) / 2.0
                       for a in range(len(patch))])
        w = map_coordinates(weights[i], gc, order=1, mode="constant", cval=0.0)
        d = map_coordinates(decoded_hu[i], gc, order=1, mode="nearest")
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        region = out[sl]
        out[sl] = np.where(w > 0, region + w * (d - region), region)
    return out


def read_inputs(ct_path, parent_path, parent_label: int):
    """(nibabel image, CT (nibabel order) float32 HU, parent bool); :class:`SingleCTError` for bad files."""
    inp, pm = Path(ct_path), Path(parent_path)
    for f in (inp, pm):
        if not f.is_file():
            raise SingleCTError(f"{f} does not exist")
    try:
        img = nib.load(str(inp))
        ct = np.asarray(img.dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(pm)).dataobj)
    except Exception as e:  # noqa: BLE001
        raise SingleCTError(f"could not read the input NIfTI files: {e}") from e
    if ct.ndim != 3:
        raise SingleCTError(f"{inp}: expected a 3D CT, got shape {ct.shape}")
    if labels.shape != ct.shape:
        raise SingleCTError(f"{pm} has shape {labels.shape} but {inp} has {ct.shape}; the parent mask must be on the "
                            "CT grid")
    parent = labels == parent_label
    if not parent.any():
        present = [int(v) for v in np.unique(labels) if v != 0][:30]
        raise SingleCTError(f"{pm} holds no voxel with label {parent_label} (labels present: {present}); fix "
                            "--parent-label")
    return img, ct, parent


def lesion_masks(opts: SingleCTOptions, ct_path, img, parent, lesion, rng, ct: np.ndarray | None = None,
                 view: NiftiView | None = None, radius_range_mm: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Lesion masks on the CT grid (nibabel order) from ``opts.mask`` or placed by the placer (``ct``: HU).

    ``view``: the view of a 2D generator (axis 0 = its slice axis): every mask then lies in one slice of it (a
    component of ``opts.mask`` is cut to its largest slice; placed masks are 2D masks placed in a slice)."""
    may_leave = bool(lesion is not None and lesion.may_leave_parent)
    if opts.mask:
        mp = Path(opts.mask)
        if not mp.is_file():
            raise SingleCTError(f"{mp} does not exist")
        user = np.asarray(nib.load(str(mp)).dataobj) > 0
        if user.shape != parent.shape:
            raise SingleCTError(f"{mp} has shape {user.shape} but {ct_path} has {parent.shape}; the lesion mask must "
                                "be on the CT grid")
        if not may_leave:
            user &= parent
        lab, n = ndimage.label(user, structure=np.ones((3, 3, 3)))
        masks = [lab == i for i in range(1, n + 1)]
        if view is not None:
            masks = [view.from_view(largest_slice(view.to_view(m))) for m in masks]
        if not masks:
            raise SingleCTError(f"{mp} holds no lesion voxel inside parent label {opts.parent_label}")
        return masks
    if opts.size_mm is None and lesion is None:
        raise SingleCTError("--size-mm is needed for the 'healthy' prompt or a checkpoint without a lesion spec")
    if opts.size_mm is not None and opts.size_mm <= 0:
        raise SingleCTError("--size-mm must be > 0")
    geo = ArrayGeometry.from_nifti(img)
    if view is not None:
        masks = [view.from_view(m) for m in place_masks_2d(
            view.to_view(parent), np.asarray(view.spacing, float), opts.count, opts.size_mm, lesion, rng, may_leave,
            opts.parent_label, ct_v=None if ct is None else view.to_view(ct), radius_range_mm=radius_range_mm)]
    else:
        masks = place_masks(parent, np.asarray(geo.spacing), opts.count, opts.size_mm, lesion, rng, may_leave,
                            opts.parent_label, z_axis=cranio_caudal_axis(img.affine), ct=ct,
                            radius_range_mm=radius_range_mm)
    if not masks:
        raise SingleCTError(f"could not place a lesion inside parent label {opts.parent_label}")
    return masks


def synthesize_ct(ct_path, parent_path, diffusion, output_dir, opts: SingleCTOptions, vqgan=None) -> dict:
    """Synthesise lesions into one CT (see the module docstring) and write the outputs to ``output_dir``.

    Returns the record written to ``<name>_synthesis.json``. Raises :class:`SingleCTError` for bad input and
    :class:`~nnunet_promptlesion.utils.checkpoint.CheckpointError` for unusable checkpoints.
    """
    if opts.count < 1:
        raise SingleCTError("--count must be >= 1")
    try:
        check_sampler(opts.sampler, opts.steps)
    except ValueError as e:
        raise SingleCTError(str(e)) from e
    img, ct, parent = read_inputs(ct_path, parent_path, opts.parent_label)
    inp = Path(ct_path)
    device = tu.resolve_device(opts.device)
    vq, vq_meta, model, meta, vocab = load_generator_pair(diffusion, vqgan, device)
    two_d = int(meta["spatial_dims"]) == 2
    try:
        pid = vocab.id_of(opts.prompt)
    except KeyError as e:
        raise SingleCTError(str(e).strip("'\"")) from e
    sample_id = sampling_prompt_id(meta, pid)
    spec = LesionSpec.from_dict(meta["lesion_spec"]) if meta.get("lesion_spec") else None
    lesion = spec.by_name(vocab.names[pid]) if (spec is not None and pid > 0) else None
    rng = np.random.default_rng(opts.seed)
    attrs, rr = None, None
    if opts.attributes:
        bins = attribute_bins_of(meta)
        if bins is None:
            raise SingleCTError(f"--attributes: {diffusion} was trained without attribute prompts")
        try:
            attrs = parse_assignment(opts.attributes, bins.names, bins.n_bins)
            rr = radius_range(bins, vocab.names[pid], attrs)
            for a, b in zip(bins.names, attrs):
                if b:
                    bins.range_of(vocab.names[pid], a, b)  # refuses a class the checkpoint has no bins for
        except AttributeRequestError as e:
            raise SingleCTError(str(e)) from e
        if opts.size_mm is not None:
            rr = None  # the user's size stands; the bin is only the prompt

    view = NiftiView(img, array_axes(meta))
    # 1. placement on the CT grid (nibabel order); a 2D generator's lesions lie in slices of its view
    masks = lesion_masks(opts, ct_path, img, parent, lesion, rng, ct=ct, view=view if two_d else None,
                         radius_range_mm=rr)
    # 2. generator space: its axis order, spacing and patch
    spacing_cg = np.asarray(view.spacing, float)
    spacing_g = np.array([float(s) for s in meta["spacing"]])
    # a 2D generator sees one slice: its in-plane spacing meets the view's axes 1, 2
    spacing_ci = spacing_cg[1:] if two_d else spacing_cg

    # a generator trained at 0.5 mm painting 2.5 mm CT writes lesions of a voxel or two: said, and recorded
    spacing_warning = spacing_mismatch(spacing_ci, spacing_g, what=str(ct_path))
    if spacing_warning:
        warnings.warn(spacing_warning, stacklevel=2)
    patch = [int(p) for p in meta["patch_size"]]
    space = IntensitySpace.from_dict(meta["intensity"])
    ct_g = view.to_view(ct)
    parent_g = view.to_view(parent)
    masks_g = [view.to_view(m) for m in masks]
    if two_d:
        slices = [int(np.nonzero(m.any(axis=(1, 2)))[0][0]) for m in masks_g]
        per = [extract_patches(ct_g[z], parent_g[z], [m[z]], spacing_ci, spacing_g, patch, space)
               for z, m in zip(slices, masks_g)]
        patches = {k: np.concatenate([p[k] for p in per]) for k in ("image", "mask", "parent")}
        patches["centres"] = [p["centres"][0] for p in per]
    else:
        patches = extract_patches(ct_g, parent_g, masks_g, spacing_cg, spacing_g, patch, space)
    # 3. inference, all lesions in one batch
    decoded, weights = run_generator(vq, model, patches, sample_id, opts, device, attrs)
    # 4. write-back in the generator's order, then the file's grid again
    decoded_hu = space.model_to_hu(decoded)
    if two_d:
        out_g = ct_g.copy()
        for i, z in enumerate(slices):
            out_g[z] = write_back(out_g[z], [patches["centres"][i]], decoded_hu[i:i + 1], weights[i:i + 1],
                                  spacing_ci, spacing_g, patch)
        out = view.from_view(out_g)
    else:
        out = view.from_view(write_back(ct_g, patches["centres"], decoded_hu, weights, spacing_cg, spacing_g, patch))
    label_map = np.zeros(ct.shape, dtype=np.int16)
    lesion_label = vocab.labels[pid]
    file_geo = ArrayGeometry.from_nifti(img)
    records = []
    for i, m in enumerate(masks):
        label_map[m] = lesion_label if pid > 0 else 0
        c = np.argwhere(m).mean(0)
        records.append({**({"generator_slice": slices[i]} if two_d else {}),
                        "centre_voxel": [round(float(v), 2) for v in c],
                        "centre_world_mm_ras": [round(float(v), 2) for v in file_geo.index_to_world(c)],
                        "voxels": int(m.sum()),
                        "equivalent_radius_mm": round(equivalent_radius_mm(int(m.sum()), file_geo.spacing), 2)})

    outdir = Path(output_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    name = stem(inp)
    dtype = img.get_data_dtype()
    hdr = img.header.copy()
    hdr.set_slope_inter(1.0, 0.0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.round(out), info.min, info.max).astype(dtype)
    else:
        data = out.astype(np.float32)
        hdr.set_data_dtype(np.float32)
    save_nifti_atomic(nib.Nifti1Image(data, img.affine, hdr), outdir / f"{name}_synthetic.nii.gz")
    lhdr = img.header.copy()
    lhdr.set_data_dtype(np.int16)
    lhdr.set_slope_inter(1.0, 0.0)
    save_nifti_atomic(nib.Nifti1Image(label_map, img.affine, lhdr), outdir / f"{name}_lesions.nii.gz")
    c0 = tuple(int(round(v)) for v in np.argwhere(masks[0]).mean(0))
    save_grid([("input CT + lesion mask", [(ct, masks[0])]), (f"synthetic '{vocab.names[pid]}'", [(out, masks[0])])],
              outdir / f"{name}_preview.png", f"{inp.name}: {len(masks)} x '{vocab.names[pid]}' "
              f"({opts.sampler}{'' if opts.sampler == 'ddpm' else ' ' + str(opts.steps)})", window=(-160.0, 240.0),
              centre=c0, aspect=file_geo.spacing)
    record = {"input": str(inp.resolve()), "parent_mask": str(Path(parent_path).resolve()),
              "parent_label": opts.parent_label, "prompt": vocab.names[pid], "label": lesion_label,
              "sampled_prompt_id": sample_id, "lesions": records, "seed": opts.seed, "sampler": opts.sampler,
              "steps": sampler_steps(opts.sampler, opts.steps) or meta["schedule"]["timesteps"], "eta": opts.eta,
              "guidance": opts.guidance, "blend_sigma_voxels": opts.blend_sigma,
              **({} if attrs is None else {"attributes": dict(zip(attribute_bins_of(meta).names, attrs))}),
              "ct_spacing_mm": [float(s) for s in file_geo.spacing], "generator_spacing_mm": spacing_g.tolist(),
              "spacing_warning": spacing_warning,
              "generator_axes": [int(p) for p in view.permutation], "generator_reorients": view.order.reorient,
              "generator_spatial_dims": int(meta["spatial_dims"]),
              "diffusion_checkpoint": {"path": str(Path(diffusion).resolve()), "checkpoint_id": meta["checkpoint_id"]},
              "vqgan_checkpoint_id": vq_meta.get("checkpoint_id")}
    write_json_atomic(record, outdir / f"{name}_synthesis.json")
    record["output"] = str(outdir / f"{name}_synthetic.nii.gz")
    return record


def save_nifti_atomic(nimg, target: Path) -> None:
    """nibabel picks gzip from the file name, so the temporary sibling keeps the .nii.gz / .nii ending."""
    target = Path(target)
    with atomic_path(target, suffix=".nii.gz" if target.name.endswith(".gz") else ".nii") as tmp:
        nib.save(nimg, str(tmp))


__all__ = ["SingleCTOptions", "SingleCTError", "synthesize_ct", "place_masks", "place_masks_2d", "largest_slice", "extract_patches", "run_generator",
           "write_back", "save_nifti_atomic", "cranio_caudal_axis"]
