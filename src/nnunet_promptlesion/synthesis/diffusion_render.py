"""Batched diffusion rendering of placed lesions into nnU-Net preprocessed cases.

Input: :class:`LesionRequest` (case, lesion class label, mask in the case's voxel grid, seed, blend sigma).
Output: :class:`RenderedLesion`, the only voxels that change: a box around the lesion (case grid, nnU-Net
axis order), the lesion mask inside it, the blend support (mask dilated by ``blend_margin(sigma)``) and the
new z-score values at the support voxels. Pasting those values into any crop of the case that holds them
reproduces the synthetic sample exactly; every other voxel is the case's own.

Used by the cache builder (``promptlesion_build_cache``) and the online producer; both own the generator on
one device. Never used inside nnU-Net's forked loader workers.

2D configurations: cases keep nnU-Net's pseudo-3D layout (Z, Y, X) and a request's mask has extent 1 along axis 0
(the 2D placer's placements). A 2D generator renders it in plane, on that one (Y, X) slice, exactly where the 2D
trainer's patch lies; the :class:`RenderedLesion` is still described in the case grid (3 entries, box extent 1
along axis 0), so caches and the online ring store 2D and 3D lesions alike. The generator's dimensionality must
match the configuration's (checked when the generator is loaded).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..generator.diffusion.sampler_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler, sampler_steps
from ..lesions.attributes import check_mix_against_bins, draw_bins, radius_range
from ..lesions.blending import blend_margin, dilate
from .space import DoesNotFitError, GridSpec, SpaceMapping, prompt_ids_for


@dataclass
class LesionRequest:
    """A placed lesion to render. mask_lo: (3,) case-grid corner of ``mask`` (bool box, case-grid axis order; extent 1
    along axis 0 for a 2D configuration); seed: noise seed; sigma: blend sigma (data voxels); attributes: requested
    attribute bins in the generator's order (0 = null), None = all null."""

    case: str
    label: int
    mask_lo: np.ndarray
    mask: np.ndarray
    seed: int
    sigma: float
    attributes: tuple[int, ...] | None = None

    @classmethod
    def from_placement(cls, placement, sigma: float) -> "LesionRequest":
        """The request to render a fresh :class:`~nnunet_promptlesion.placement.placement.Placement` (its seed,
        blend sigma ``sigma`` in voxels, its requested attributes)."""
        lo = np.array([lo for lo, _ in placement.lesion_box_in_case()])
        return cls(case=placement.case, label=placement.label, mask_lo=lo, mask=placement.lesion_mask,
                   seed=placement.seed, sigma=float(sigma), attributes=getattr(placement, "attributes", None))


class AttributeRequests:
    """Per-lesion attribute requests of a synthesis run: the mix (by prompt name) checked against the checkpoint's
    bins; :meth:`draw` gives one lesion's (radius range for the mask sampler, bins for the renderer).

    ``mix`` keys may be lesion names or prompts (normalised by ``spec``); an empty or None mix draws nothing (no
    random numbers used, so runs without a mix are unchanged) and requests null attributes.
    """

    def __init__(self, spec, bins, mix, where: str, checkpoint: str = "the diffusion checkpoint"):
        self.spec, self.bins = spec, bins
        self.mix = spec.normalise_mix(mix or {}, where)
        check_mix_against_bins(self.mix, bins, where, checkpoint)

    @property
    def active(self) -> bool:
        return any(self.mix.values())

    def draw(self, class_idx: int, rng: np.random.Generator) -> tuple[tuple[float, float] | None, tuple[int, ...] | None]:
        if self.bins is None:
            return None, None
        prompt = self.spec.lesions[class_idx].prompt
        bins = draw_bins(self.mix, prompt, self.bins.names, rng)
        return radius_range(self.bins, prompt, bins), bins


@dataclass
class RenderedLesion:
    """A rendered lesion in the case grid (nnU-Net axis order, voxels).

    box_lo: (3,) int corner of the box; mask / support: bool arrays of the box shape; values: float32 z-scores
    at the support voxels (C order of ``np.argwhere(support)``); centre: (3,) int lesion centre voxel.
    """

    case: str
    label: int
    seed: int
    box_lo: np.ndarray
    mask: np.ndarray
    support: np.ndarray
    values: np.ndarray
    centre: np.ndarray

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.mask.shape)

    def paste(self, data: np.ndarray, crop_lo: Sequence[int]) -> np.ndarray:
        """Write the lesion into ``data`` (C, X, Y, Z), a crop whose corner is ``crop_lo`` (case grid). In place.

        Returns the lesion mask in crop coordinates (bool, crop shape; voxels of the lesion outside the crop drop).
        """
        shape = data.shape[1:]
        overlap = self._overlap(crop_lo, shape)
        if overlap is None:
            return np.zeros(shape, bool)
        src, dst = overlap
        full = np.zeros(self.support.shape, np.float32)
        full[self.support] = self.values
        sup = self.support[src]
        region = data[(0,) + dst]
        region[sup] = full[src][sup]
        out = np.zeros(shape, bool)
        out[dst] = self.mask[src]
        return out

    def mask_in(self, crop_lo: Sequence[int], shape: Sequence[int]) -> np.ndarray:
        """The lesion mask in a crop with corner ``crop_lo`` (case grid) and spatial ``shape``: bool, crop shape;
        lesion voxels outside the crop drop (the mask :meth:`paste` returns, without pasting)."""
        out = np.zeros(tuple(int(s) for s in shape), bool)
        overlap = self._overlap(crop_lo, out.shape)
        if overlap is not None:
            out[overlap[1]] = self.mask[overlap[0]]
        return out

    def _overlap(self, crop_lo, shape):
        """(box slices, crop slices) of the part of the lesion box inside the crop, or None if they do not meet."""
        rel = np.asarray(self.box_lo) - np.asarray(crop_lo)
        src, dst = [], []
        for r, b, s in zip(rel, self.mask.shape, shape):
            lo, hi = max(int(r), 0), min(int(r + b), int(s))
            if hi <= lo:
                return None
            dst.append(slice(lo, hi))
            src.append(slice(lo - int(r), hi - int(r)))
        return tuple(src), tuple(dst)


class CaseReader:
    """Crops of nnU-Net preprocessed cases (blosc2/npy, read lazily), data padded at the edges, seg with -1."""

    def __init__(self, data_folder: str | os.PathLike, identifiers: Sequence[str]):
        # deferred, as torch and the generator below: nnU-Net and torch cost ~1.4 s CPU at import (measured here), and
        # settings validation imports this module (through diffusion_source) without rendering anything
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        cls = infer_dataset_class(str(data_folder))
        self._ds = cls(str(data_folder), list(identifiers))

    def shape(self, case: str) -> tuple[int, int, int]:
        data, _, _, _ = self._ds.load_case(case)
        return tuple(int(s) for s in data.shape[1:])

    def crop(self, case: str, lo: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        data, seg, _, _ = self._ds.load_case(case)
        shape = data.shape[1:]
        lo = [int(v) for v in lo]
        size = [int(v) for v in size]
        a = [max(l, 0) for l in lo]
        b = [min(l + s, sh) for l, s, sh in zip(lo, size, shape)]
        img = np.asarray(data[:, a[0]:b[0], a[1]:b[1], a[2]:b[2]], dtype=np.float32)
        sg = np.asarray(seg[:, a[0]:b[0], a[1]:b[1], a[2]:b[2]], dtype=np.int16)
        pads = [(x - l, l + s - y) for l, s, x, y in zip(lo, size, a, b)]
        img = np.pad(img, [(0, 0)] + pads, mode="edge")
        sg = np.pad(sg, [(0, 0)] + pads, mode="constant", constant_values=-1)
        return img, sg


def sampling_prompt_ids(meta: dict, spec, vocab, labels: Sequence[int] | None = None) -> dict[int, int]:
    """Lesion label -> the prompt id to sample with.

    A model trained with ``prompt_dropout >= 1`` (the paper's "no lesion prompt" ablation,
    ``promptlesion_train_diffusion --prompt-dropout 1``) has only ever seen its classifier-free-guidance null
    token; feeding it class ids would condition it on embeddings that were never trained, so every class is
    sampled with ``meta["null_prompt_id"]`` instead. Any other model gets its class prompts.
    """
    return {label: sampling_prompt_id(meta, pid) for label, pid in prompt_ids_for(spec, vocab, labels).items()}


def sampling_prompt_id(meta: dict, prompt_id: int) -> int:
    """The prompt id to sample ``prompt_id`` (a vocabulary id, "healthy" included) with: the null token for a model
    trained with ``prompt_dropout >= 1`` (see :func:`sampling_prompt_ids`), else ``prompt_id`` itself."""
    if float(meta.get("config", {}).get("prompt_dropout", 0.0)) >= 1.0:
        return int(meta["null_prompt_id"])
    return int(prompt_id)


class DiffusionRenderer:
    """Owns one generator pair on ``device`` and renders batches of :class:`LesionRequest`.

    data_grid: the dataset side (:meth:`GridSpec.from_nnunet`; two spacing entries for a 2D configuration, which
    needs a 2D generator); spec: the dataset's LesionSpec; reader: a :class:`CaseReader` over the carrier cases.
    Sampler options are passed to ``inpaint_lesions`` (``steps``: model evaluations, not read for ddpm).
    Raises CheckpointError for a generator of the other dimensionality, ValueError for an unknown sampler.
    """

    def __init__(self, diffusion: str | os.PathLike, data_grid: GridSpec, spec, reader: CaseReader,
                 vqgan: str | os.PathLike | None = None, device: str = "cpu", sampler: str = DEFAULT_SAMPLER,
                 steps: int | None = DEFAULT_STEPS, guidance: float = 1.0, eta: float = 0.0, labels: Sequence[int] | None = None):
        # deferred: torch and the generator (torch + MONAI, ~3.6 s CPU at import), see CaseReader
        import torch

        from ..generator.diffusion.checkpoint import attribute_bins_of, load_generator_pair

        check_sampler(sampler, steps)
        self.device = torch.device(device)
        self.vqgan, self.vqgan_meta, self.model, self.meta, self.vocab = load_generator_pair(
            diffusion, vqgan, map_location=self.device, dtype="auto", expect_spatial_dims=data_grid.spatial_dims)
        self.diffusion_path = str(Path(diffusion).resolve())
        self.attribute_bins = attribute_bins_of(self.meta)
        self.mapping = SpaceMapping(data_grid, GridSpec.from_generator_meta(self.meta), self.meta["patch_size"])
        self.two_d = self.mapping.ndim == 2
        self.spec = spec
        self.prompt_ids = sampling_prompt_ids(self.meta, spec, self.vocab, labels)
        self.reader = reader
        self.sampler, self.steps, self.guidance, self.eta = sampler, sampler_steps(sampler, steps), guidance, eta
        self._inpaint_kw = set(inspect.signature(_inpaint_fn()).parameters)

    def identity(self) -> dict:
        """What makes two renderers produce the same samples (stored in cache manifests)."""
        return {"diffusion_checkpoint_id": self.meta.get("checkpoint_id"),
                "vqgan_checkpoint_id": self.vqgan_meta.get("checkpoint_id"), "preset": self.meta.get("preset"),
                "patch_size": list(self.meta["patch_size"]), "sampler": self.sampler, "steps": self.steps,
                "guidance": self.guidance, "eta": self.eta, "mapping": self.mapping.describe(),
                "prompt_ids": {str(k): int(v) for k, v in sorted(self.prompt_ids.items())},
                # only for models with attribute prompts: the identity of other caches stays as it was
                **({} if self.attribute_bins is None else {"attributes": list(self.attribute_bins.names),
                                                             "attribute_bins": self.attribute_bins.n_bins})}

    def _prepare(self, req: LesionRequest):
        m = self.mapping
        margin = blend_margin(req.sigma)
        lo = np.asarray(req.mask_lo, int)
        mask = np.asarray(req.mask, bool)
        z = None
        if self.two_d:
            # in plane, on the request's slice: everything below runs on (Y, X) arrays of that slice
            if mask.ndim != 3 or mask.shape[0] != 1:
                raise DoesNotFitError(f"a 2D generator renders one slice; this lesion spans {mask.shape[0]} slices")
            z, lo, mask = int(lo[0]), lo[1:], mask[0]
        lo = lo - margin
        full = np.zeros(np.asarray(mask.shape) + 2 * margin, bool)
        full[tuple(slice(margin, margin + s) for s in mask.shape)] = mask
        support = dilate(full, margin)
        centre = m.centre_for(support) + lo  # case grid (in plane for 2D)
        fp = m.footprint()
        r_lo = np.floor(centre - (fp - 1) / 2.0).astype(int) - 1
        r_size = fp + 3
        if self.two_d:
            img, seg = self.reader.crop(req.case, [z, *r_lo], [1, *r_size])
            img, seg = img[:, 0], seg[:, 0]
        else:
            img, seg = self.reader.crop(req.case, r_lo, r_size)
        mask_r = np.zeros(tuple(r_size), bool)
        off = lo - r_lo
        if (off < 0).any() or (off + full.shape > r_size).any():
            raise DoesNotFitError("lesion larger than the generator patch")
        mask_r[tuple(slice(o, o + s) for o, s in zip(off, full.shape))] = full
        lesion = self.spec.by_label(req.label)
        parent_r = np.isin(seg[0], lesion.parents)
        c_rel = centre - r_lo
        m.check_fits(dilate(mask_r, margin), c_rel)
        model_img, (gmask, gparent) = m.to_generator(img[0], [mask_r, parent_r], c_rel)
        return dict(req=req, img=img, seg=seg, r_lo=r_lo, mask_r=mask_r, c_rel=c_rel, model_img=model_img,
                    gmask=gmask, gparent=gparent, z=z)

    def render(self, requests: Sequence[LesionRequest], progress: Callable | None = None) -> list[RenderedLesion | None]:
        """Render a batch; None for requests whose lesion does not fit the generator patch."""
        import torch  # deferred: see CaseReader

        prepared: list[dict | None] = []
        for r in requests:
            try:
                prepared.append(self._prepare(r))
            except DoesNotFitError:
                prepared.append(None)
        ok = [p for p in prepared if p is not None]
        out: list[RenderedLesion | None] = [None] * len(requests)
        if not ok:
            return out
        dev = self.device
        image = torch.from_numpy(np.stack([p["model_img"] for p in ok])[:, None]).to(dev)
        mask = torch.from_numpy(np.stack([p["gmask"] for p in ok])[:, None].astype(np.float32)).to(dev)
        parent = torch.from_numpy(np.stack([p["gparent"] for p in ok])[:, None].astype(np.float32)).to(dev)
        prompts = torch.tensor([self.prompt_ids[p["req"].label] for p in ok], dtype=torch.long, device=dev)
        # one noise stream per request, seeded with its recorded seed: a lesion re-rendered alone (or in
        # another batch) from its seed is the same lesion
        gens = [torch.Generator(device=dev).manual_seed(int(p["req"].seed)) for p in ok]
        kw = dict(steps=self.steps, sampler=self.sampler, guidance=self.guidance, generator=gens, eta=self.eta,
                  return_decoded=True)
        wanted = [p["req"].attributes for p in ok]
        if self.attribute_bins is not None:
            n = len(self.attribute_bins.names)
            kw["attributes"] = torch.tensor([a if a is not None else (0,) * n for a in wanted], dtype=torch.long,
                                            device=dev).reshape(len(ok), n)
        elif any(a is not None and any(a) for a in wanted):
            raise ValueError(f"lesions request attributes {wanted}, but {self.diffusion_path} has no attribute prompts")
        if "parent_mask" in self._inpaint_kw:
            kw["parent_mask"] = parent
        if "autocast" in self._inpaint_kw and dev.type == "cuda":
            kw["autocast"] = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        _, decoded, _ = _inpaint_fn()(self.vqgan, self.model, image, mask, prompts, **kw)
        decoded = decoded[:, 0].float().cpu().numpy()
        it = iter(range(len(ok)))
        for i, p in enumerate(prepared):
            if p is None:
                continue
            j = next(it)
            req = p["req"]
            try:
                blended = self.mapping.from_generator(p["img"][0], decoded[j], p["mask_r"], p["c_rel"], req.sigma)
            except DoesNotFitError:
                continue
            out[i] = _to_rendered(req, p, blended)
        return out


def _inpaint_fn():
    # deferred: torch (see CaseReader); looked up per call, so a test may patch inpaint.inpaint_lesions
    from ..generator.diffusion.inpaint import inpaint_lesions

    return inpaint_lesions


def _to_rendered(req: LesionRequest, p: dict, blended: np.ndarray) -> RenderedLesion:
    margin = blend_margin(req.sigma)
    support = dilate(p["mask_r"], margin) & (p["seg"][0] >= 0)  # never write into padding outside the case
    idx = np.argwhere(support)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sup = support[box]
    vals = blended[box][sup].astype(np.float32)
    mask = p["mask_r"][box] & sup
    mi = np.argwhere(mask)
    centre = np.round(mi.mean(0)).astype(int) + lo + p["r_lo"] if len(mi) else lo + p["r_lo"]
    box_lo = lo + p["r_lo"]
    if p.get("z") is not None:
        # rendered on one slice: back to the case grid, extent 1 along axis 0 (C order of the support unchanged)
        box_lo, centre, mask, sup = np.r_[p["z"], box_lo], np.r_[p["z"], centre], mask[None], sup[None]
    return RenderedLesion(case=req.case, label=int(req.label), seed=int(req.seed), box_lo=np.asarray(box_lo, int),
                          mask=np.ascontiguousarray(mask), support=np.ascontiguousarray(sup), values=vals,
                          centre=np.asarray(centre, int))
