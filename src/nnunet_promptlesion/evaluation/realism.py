"""How close synthetic lesions are to real ones, per lesion class.

* Fréchet distance between the feature distributions of real and synthetic lesion patches (FID-style: Gaussians
  fitted to the features). Features come from a pluggable extractor; the default is the encoder of an nnU-Net
  model trained on the same dataset, its stage outputs pooled over the lesion mask (lesion-focused features, as
  the paper's lesion-focused 3D FID) -- nothing is downloaded. As a noise floor the same distance is reported
  between two random halves of the real lesions: with tens of lesions per class, FD values are only comparable
  to that floor and to each other at equal sample sizes.
* Two-sample Kolmogorov-Smirnov tests (scipy ``ks_2samp``) of the lesion size (equivalent-sphere radius, mm),
  the mean lesion intensity (HU) and the lesion-to-surroundings contrast (HU).
* A blinded montage per class: real and synthetic lesions shuffled and numbered, with the answer key in a
  separate file, for a human reader (a visual Turing test).

Patches are in nnU-Net's preprocessed space: (C, *patch) arrays in nnU-Net axis order at the configuration's
spacing, CT-normalised (z-scores); HU = z * std + mean with the plans' foreground intensity properties.
Real patches are centred on each ground-truth lesion (a connected component) of the training cases; synthetic
patches come from PromptLesionTrainer's own training loader with the given settings (any synthesizer: rule-based,
diffusion cache or online), before augmentation -- exactly what the segmenter is fed.

2D configurations (a 2-value patch size on nnU-Net's 3-D preprocessed volumes) train on slices and the trainer
paints 2-D lesions into single slices, so both sides are compared in plane: a real lesion is represented by its
largest cross-section (the slice of the first axis with most of its voxels) and patches are (C, X, Y) with (X, Y)
masks; a 2-D lesion's size is the radius of the circle of the same area (the painter draws ``radius_mm`` in plane).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from scipy import ndimage, stats

from ..lesions.components import label_components
from ..lesions.components import equivalent_radius_mm
from ..utils.atomic import atomic_path, write_json_atomic, write_text_atomic


@dataclass
class LesionPatch:
    """One lesion: image (C, *patch) z-scores, mask (*patch) bool of this lesion only, centred on the lesion."""

    source: str          # "real" or "synthetic"
    class_name: str
    case: str
    image: np.ndarray
    mask: np.ndarray


# ----------------------------------------------------------------------------------------------- patches
def centre_on_lesion(image: np.ndarray, mask: np.ndarray, size: Sequence[int], pad_value: float = 0.0,
                     centre: Sequence[int] | None = None):
    """Crop/pad ``image`` (C, *spatial) and ``mask`` (*spatial) to ``size`` centred on ``centre`` (voxel indices;
    default: the mask's centroid). ``size`` has one entry per spatial axis (a 2D patch of a 3D volume: see
    :func:`lesion_patch`)."""
    if len(size) != mask.ndim or image.ndim != mask.ndim + 1:
        raise ValueError(f"centre_on_lesion: crop size {tuple(size)} and image {image.shape} do not match the "
                         f"{mask.ndim}-D mask {mask.shape}; for a 2D configuration's patch of a 3D volume use "
                         "lesion_patch")
    c = np.argwhere(mask).mean(0).round().astype(int) if centre is None else np.asarray(centre, int)
    lo = [int(ci) - s // 2 for ci, s in zip(c, size)]
    img = np.full((image.shape[0], *size), pad_value, dtype=np.float32)
    msk = np.zeros(tuple(size), dtype=bool)
    src, dst = [], []
    for l, s, n in zip(lo, size, mask.shape):
        a, b = max(l, 0), min(l + s, n)
        src.append(slice(a, b))
        dst.append(slice(a - l, b - l))
    img[(slice(None), *dst)] = image[(slice(None), *src)]
    msk[tuple(dst)] = mask[tuple(src)]
    return img, msk


def lesion_patch(image: np.ndarray, mask: np.ndarray, patch_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The crop of a training patch's size centred on a lesion: (C, *patch_size) image and (*patch_size) mask.

    ``image`` (C, *spatial), ``mask`` (*spatial) holding one lesion. A 3D configuration crops around the mask's
    centroid. A 2D configuration (``patch_size`` with one axis fewer than the mask) takes the slice of the first
    axis with most lesion voxels (its largest cross-section; a synthetic 2D lesion has a single slice) and crops it
    in plane around the lesion voxel nearest the section's centroid (a curved section's centroid can lie outside
    it); the slice axis is dropped."""
    ps = [int(p) for p in patch_size]
    if len(ps) == mask.ndim:
        return centre_on_lesion(image, mask, ps)
    if len(ps) != mask.ndim - 1:
        raise ValueError(f"lesion_patch: a {len(ps)}-D patch size {tuple(ps)} does not fit a {mask.ndim}-D mask")
    k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
    pts = np.argwhere(mask[k])
    centre = (k, *pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))])
    img, msk = centre_on_lesion(image, mask, [1, *ps], centre=centre)
    return img[:, 0], msk[0]


def real_lesion_patches(dataset, identifiers: Sequence[str], lesions: Sequence, patch_size: Sequence[int],
                        per_class: int, rng: np.random.Generator, progress: Callable[[str], None] | None = None
                        ) -> list[LesionPatch]:
    """Up to ``per_class`` real lesions of every class in ``lesions`` (LesionClass objects), chosen at random
    among all connected components (26-connectivity) of the given preprocessed training cases."""
    found: dict[str, list[tuple[str, int]]] = {l.name: [] for l in lesions}
    for ident in identifiers:
        _, seg, _, _ = dataset.load_case(ident)
        seg = np.asarray(seg[0])
        for l in lesions:
            n = label_components(seg == l.label)[1]
            found[l.name] += [(ident, k) for k in range(1, n + 1)]
    chosen = {name: [items[i] for i in sorted(rng.permutation(len(items))[:per_class])] for name, items in found.items()}
    out = []
    by_case: dict[str, list[tuple[str, int]]] = {}
    for name, items in chosen.items():
        for ident, k in items:
            by_case.setdefault(ident, []).append((name, k))
    label_of = {l.name: l.label for l in lesions}
    for ident, items in sorted(by_case.items()):
        data, seg, _, _ = dataset.load_case(ident)
        data, seg = np.asarray(data), np.asarray(seg[0])
        for name, k in items:
            lab = label_components(seg == label_of[name])[0]
            img, msk = lesion_patch(data, lab == k, patch_size)
            out.append(LesionPatch("real", name, ident, img, msk))
    if progress:
        progress("real lesions: " + ", ".join(f"{n} {len(found[n])} found, {len(chosen[n])} used" for n in found))
    return out


def synthetic_lesion_patches(loader, lesions: Sequence, per_class: int, patch_size: Sequence[int],
                             progress: Callable[[str], None] | None = None) -> list[LesionPatch]:
    """``per_class`` synthetic lesions of every class, drawn by a PromptLesionDataLoader (``make_synthetic``) and
    re-centred on the lesion like the real ones."""
    out = []
    for ci, l in enumerate(lesions):
        for _ in range(per_class):
            s = loader.make_synthetic(class_idx=ci)
            img, msk = lesion_patch(np.asarray(s.data, dtype=np.float32), s.mask, patch_size)
            out.append(LesionPatch("synthetic", l.name, s.case, img, msk))
        if progress:
            progress(f"synthetic {l.name}: {per_class} drawn")
    return out


# ----------------------------------------------------------------------------------------------- features
class NnUNetEncoderFeatures:
    """Lesion-focused features from an nnU-Net network's encoder: every selected stage's output averaged over
    the lesion mask (the mask area-resampled to that stage's grid), concatenated.

    network: an nnU-Net network with an ``encoder`` that returns its stage outputs (PlainConvUNet,
    ResidualEncoderUNet). stages: indices into the encoder's outputs (default: all). Input patches must have a
    spatial size divisible by the network's total stride (the configuration's patch size always is).
    """

    def __init__(self, network, stages: Sequence[int] | None = None, device: str = "cpu", batch_size: int = 4,
                 name: str = "nnunet_encoder"):
        self.network = network.to(device).eval()
        self.stages = list(stages) if stages is not None else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_model_folder(cls, model_folder: str | os.PathLike, fold: str = "0",
                          checkpoint: str = "checkpoint_best.pth", **kw) -> "NnUNetEncoderFeatures":
        """Load a trained nnU-Net model (``$nnUNet_results/DatasetX/Trainer__Plans__Config``) with nnU-Net's
        predictor; its weights for ``fold`` are loaded into the network."""
        fold_v = fold if fold == "all" else int(fold)
        p = nnUNetPredictor(device=torch.device("cpu"), verbose=False, verbose_preprocessing=False,
                            allow_tqdm=False)
        p.initialize_from_trained_model_folder(str(model_folder), (fold_v,), checkpoint)
        net = p.network
        net.load_state_dict(p.list_of_parameters[0])
        return cls(net, name=f"nnunet_encoder({Path(model_folder).name}, fold {fold}, {checkpoint})", **kw)

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """images (N, C, *patch) float32, masks (N, *patch) bool -> (N, D) float64."""
        feats = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size], dtype=np.float32)).to(self.device)
                m = torch.from_numpy(np.ascontiguousarray(masks[i:i + self.batch_size], dtype=np.float32))[:, None]
                m = m.to(self.device)
                skips = self.network.encoder(x)
                skips = skips if isinstance(skips, (list, tuple)) else [skips]
                chosen = [skips[s] for s in self.stages] if self.stages is not None else list(skips)
                pooled = []
                for f in chosen:
                    pool = F.adaptive_avg_pool3d if f.ndim == 5 else F.adaptive_avg_pool2d
                    w = pool(m, f.shape[2:])
                    dims = tuple(range(2, f.ndim))
                    pooled.append((f * w).sum(dims) / w.sum(dims).clamp_min(1e-6))
                feats.append(torch.cat(pooled, 1).double().cpu().numpy())
        return np.concatenate(feats, 0)


class IntensityShapeFeatures:
    """A weight-free extractor: intensity statistics inside the lesion and in a 2-voxel shell around it, and
    shape descriptors (log volume, surface-to-volume ratio, extent along each axis). Use it when no trained
    nnU-Net model is at hand; it sees less than a network does."""

    name = "intensity_shape"

    def __call__(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        out = []
        for img, m in zip(images, masks):
            x = img[0]
            inside = x[m]
            shell = ndimage.binary_dilation(m, iterations=2) & ~m
            around = x[shell] if shell.any() else np.zeros(1)
            surface = m & ~ndimage.binary_erosion(m)
            ext = [float(np.ptp(ix) + 1) for ix in np.nonzero(m)]
            out.append([inside.mean(), inside.std(), *np.percentile(inside, [10, 50, 90]), around.mean(),
                        inside.mean() - around.mean(), math.log(m.sum()), surface.sum() / m.sum(), *ext])
        return np.asarray(out, dtype=np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). None with fewer than 2 samples on a side."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return None
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((Sa Sb)^(1/2)) = sum of sqrt(eigenvalues of Sa^(1/2) Sb Sa^(1/2)), a symmetric PSD matrix: eigh is exact
    # and stable also for the singular covariances of fewer samples than feature dimensions.
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum())
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * tr_covmean, 0.0))


# ----------------------------------------------------------------------------------------------- statistics
def lesion_measurements(p: LesionPatch, spacing: Sequence[float], hu: Callable[[np.ndarray], np.ndarray]) -> dict:
    """radius_mm (equivalent sphere; for a 2-D patch the equivalent circle of the section, in-plane spacing),
    mean_hu inside, contrast_hu (inside minus a 2-voxel shell around it)."""
    x = hu(p.image[0])
    shell = ndimage.binary_dilation(p.mask, iterations=2) & ~p.mask
    inside = float(x[p.mask].mean())
    n = int(p.mask.sum())
    radius = equivalent_radius_mm(n, list(spacing)[-p.mask.ndim:])
    return {"radius_mm": radius, "mean_hu": inside,
            "contrast_hu": inside - float(x[shell].mean()) if shell.any() else None}


def ks_test(a: Sequence[float], b: Sequence[float]) -> dict:
    a = [v for v in a if v is not None]
    b = [v for v in b if v is not None]
    if len(a) < 2 or len(b) < 2:
        return {"statistic": None, "p": None, "n_real": len(a), "n_synthetic": len(b)}
    r = stats.ks_2samp(a, b)
    return {"statistic": float(r.statistic), "p": float(r.pvalue), "n_real": len(a), "n_synthetic": len(b)}


def realism_report(patches: Sequence[LesionPatch], extractor, spacing: Sequence[float],
                   hu: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator) -> dict:
    """Per class: Fréchet distance (and the real-vs-real split floor), KS tests, measurements of every lesion."""
    classes = list(dict.fromkeys(p.class_name for p in patches))
    report = {"extractor": getattr(extractor, "name", type(extractor).__name__), "classes": {}}
    for c in classes:
        real = [p for p in patches if p.class_name == c and p.source == "real"]
        syn = [p for p in patches if p.class_name == c and p.source == "synthetic"]
        entry = {"n_real": len(real), "n_synthetic": len(syn)}
        if real and syn:
            fr = extractor(np.stack([p.image for p in real]), np.stack([p.mask for p in real]))
            fs = extractor(np.stack([p.image for p in syn]), np.stack([p.mask for p in syn]))
            entry["feature_dim"] = int(fr.shape[1])
            entry["frechet"] = frechet_distance(fr, fs)
            perm = rng.permutation(len(fr))
            half = len(fr) // 2
            entry["frechet_real_split"] = frechet_distance(fr[perm[:half]], fr[perm[half:2 * half]])
            # the same sample size as the split, so the two numbers are comparable
            entry["frechet_real_vs_synthetic_half"] = frechet_distance(fr[perm[:half]],
                                                                       fs[rng.permutation(len(fs))[:half]])
        else:
            entry.update(feature_dim=None, frechet=None, frechet_real_split=None, frechet_real_vs_synthetic_half=None)
        meas = {s: [lesion_measurements(p, spacing, hu) for p in grp] for s, grp in (("real", real), ("synthetic", syn))}
        for key in ("radius_mm", "mean_hu", "contrast_hu"):
            entry[f"ks_{key}"] = ks_test([m[key] for m in meas["real"]], [m[key] for m in meas["synthetic"]])
            for s in ("real", "synthetic"):
                vals = [m[key] for m in meas[s] if m[key] is not None]
                entry[f"{s}_{key}_median"] = float(np.median(vals)) if vals else None
        entry["measurements"] = meas
        report["classes"][c] = entry
    return report


def format_realism_markdown(report: dict) -> str:
    def f(v, d=3):
        return "n/a" if v is None else (f"{v:.{d}g}" if abs(v) < 1e4 else f"{v:.3e}")

    out = [f"Features: {report['extractor']}. FD: Fréchet distance real vs synthetic; floor: FD between two halves of "
           "the real lesions, next to FD of one real half vs as many synthetic lesions. KS: two-sample "
           "Kolmogorov-Smirnov statistic (p) of radius, mean HU and contrast HU.", "",
           "| class | real | synthetic | FD | FD floor (real/2 vs real/2) | FD (real/2 vs syn) | KS radius | KS mean HU | "
           "KS contrast | median radius mm real / syn | median HU real / syn |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, e in report["classes"].items():
        ks = [f"{f(e[k]['statistic'], 2)} (p {f(e[k]['p'], 2)})" for k in ("ks_radius_mm", "ks_mean_hu", "ks_contrast_hu")]
        out.append(f"| {c} | {e['n_real']} | {e['n_synthetic']} | {f(e['frechet'])} | {f(e['frechet_real_split'])} | "
                   f"{f(e['frechet_real_vs_synthetic_half'])} | " + " | ".join(ks) +
                   f" | {f(e['real_radius_mm_median'])} / {f(e['synthetic_radius_mm_median'])} | "
                   f"{f(e['real_mean_hu_median'])} / {f(e['synthetic_mean_hu_median'])} |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- montage
def lesion_slice(p: LesionPatch) -> np.ndarray:
    """The 2D image to show: for 3D patches the slice along the first axis with most lesion voxels."""
    if p.mask.ndim == 2:
        return p.image[0]
    return p.image[0][int(np.argmax(p.mask.sum(axis=tuple(range(1, p.mask.ndim)))))]


def blinded_montage(patches: Sequence[LesionPatch], png: str | os.PathLike, key: str | os.PathLike,
                    window: tuple[float, float], rng: np.random.Generator, title: str = "",
                    hu: Callable[[np.ndarray], np.ndarray] | None = None, ncols: int = 6) -> list[dict]:
    """Shuffled, numbered lesion slices (no contour, no source) in one intensity ``window`` (HU if ``hu`` is given,
    else the patch values) and the answer key {panel, source, class, case} written to ``key`` (JSON)."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    order = rng.permutation(len(patches))
    n = len(order)
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.9 * ncols, 2.0 * nrows + 0.4), squeeze=False)
    answer = []
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        ax.axis("off")
        if k >= n:
            continue
        p = patches[order[k]]
        img = lesion_slice(p)
        if hu is not None:
            img = hu(img)
        ax.imshow(img.T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
        ax.set_title(str(k + 1), fontsize=8)
        answer.append({"panel": k + 1, "source": p.source, "class": p.class_name, "case": p.case})
    fig.suptitle(title or "Which lesions are synthetic? (answer key in a separate file)", fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    write_json_atomic(answer, key)
    return answer


def plot_distributions(report: dict, png: str | os.PathLike) -> None:
    """Histograms of radius, mean HU and contrast, real vs synthetic, one row per class."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    classes = list(report["classes"])
    keys = ("radius_mm", "mean_hu", "contrast_hu")
    fig, axes = plt.subplots(len(classes), 3, figsize=(10, 2.6 * len(classes)), squeeze=False)
    for i, c in enumerate(classes):
        meas = report["classes"][c]["measurements"]
        for j, key in enumerate(keys):
            ax = axes[i][j]
            for s, color in (("real", "tab:blue"), ("synthetic", "tab:orange")):
                vals = [m[key] for m in meas[s] if m[key] is not None]
                if vals:
                    ax.hist(vals, bins=12, alpha=0.55, color=color, label=f"{s} ({len(vals)})")
            ks = report["classes"][c][f"ks_{key}"]
            ax.set_title(f"{c}: {key}" + (f"  KS p={ks['p']:.2g}" if ks["p"] is not None else ""), fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> None:
    write_json_atomic(report, out_dir / "realism.json")
    write_text_atomic(format_realism_markdown(report), out_dir / "realism.md")
    plot_distributions(report, out_dir / "distributions.png")
    json.dumps(report)  # fail loudly here, not in a reader, if something is not serialisable
