"""VQGAN training loop (used by ``promptlesion_train_vqgan``).

One step: a batch of random patches per rank (``generator.data`` sources, label/organ oversampling), the
generator update (L1 + commitment + perceptual, plus adversarial and feature matching from ``disc_start``),
then the discriminator update. DDP through ``torchrun`` (gloo on CPU, NCCL on GPU), bf16 autocast on GPU.

Outputs in ``output_dir``: ``checkpoint_latest.pt`` (every ``checkpoint_every`` steps, atomic, full training
state: model, discriminators, optimizers, schedulers, codebook EMA, per-rank RNG, step), ``checkpoint_final.pt``,
``train_log.jsonl`` (losses, codebook usage/perplexity; PSNR/SSIM on held-out patches at each evaluation),
``train.log``, ``recon_stepNNNNNNNN.png`` (held-out patch and reconstruction in three planes; one slice for a
2D model). A 2D model (two-entry ``patch_size``) trains on (y, x) slices of the source (``generator.data``).
A run restarted with the same output folder resumes from ``checkpoint_latest.pt`` at the exact step.

Fine-tuning (``init_from``): the autoencoder (codebook included) and the discriminators start from another VQGAN
checkpoint of the same architecture (:data:`INIT_FREE_FIELDS` may differ: patch size, loss weights, schedule);
Adam moments only with ``init_optimizer``. The checkpoint may come from another intensity space or spacing (another
dataset): the new run records this run's space, and the log says what changed.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric

from ...utils.atomic import atomic_path
from ...utils.checkpoint import config_to_dict
from .. import train_utils as tu
from ..data import PatchSource
from .config import VQGANConfig
from .discriminator import VQGANDiscriminators, random_slice_indices
from .losses import VQGANLoss
from ..intensity import IntensitySpace
from .model import KIND, VQGAN, build_meta, check_meta, check_spatial_dims
from .perceptual import build_perceptual


@dataclasses.dataclass
class VQGANRunConfig:
    """Settings of one training run (the model/loss settings live in :class:`VQGANConfig`)."""
    max_steps: int = 100000
    batch_size: int | None = None            # per rank; None = the preset's batch size
    warmup_steps: int = 0                    # linear LR warm-up (steps)
    eval_every: int = 1000
    checkpoint_every: int = 500
    keep_every: int = 0                      # also keep checkpoint_step{N}.pt every N steps (0 = never)
    log_every: int = 10
    num_eval_patches: int = 8
    oversample_rate: float = 0.33            # probability that a patch is centred on a labelled voxel
    oversample_labels: dict | None = None    # label -> weight; None = every foreground label, weight 1
    seed: int = 0
    device: str = "auto"
    perceptual_weights: str | None = None
    stop_after: int | None = None            # stop (as if interrupted) after this step; the schedule is unchanged
    save_png: bool = True
    progress: bool = True


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    mse = F.mse_loss(x.float(), y.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def ssim_nd(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM (MONAI SSIMMetric, Gaussian window of 11 voxels per axis, fewer for small patches) of
    (B, 1, D, H, W) volumes (3D SSIM) or (B, 1, H, W) slices (2D SSIM)."""

    k = int(min(11, *x.shape[2:]))
    k = k if k % 2 else k - 1
    m = SSIMMetric(spatial_dims=x.ndim - 2, data_range=data_range, win_size=k)
    return float(m(x.float(), y.float()).mean())


ssim3d = ssim_nd  # the name of the 3D-only version


def save_three_plane_png(x: np.ndarray, y: np.ndarray, path: Path, title: str) -> None:
    """Centre slices of input ``x`` and reconstruction ``y`` ((D, H, W), [-1, 1]) along the three axes; a 2D
    model's (H, W) slices are shown whole (one panel each)."""
    # here, not at the top: the Agg backend is chosen when a plot is drawn, never by importing this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    ncol = 3 if x.ndim == 3 else 1
    fig, axes = plt.subplots(2, ncol, figsize=(3 * ncol, 6), squeeze=False)
    for row, (vol, name) in enumerate(((x, "input"), (y, "reconstruction"))):
        c = [s // 2 for s in vol.shape]
        planes = (((vol[c[0]], "axis 0"), (vol[:, c[1]], "axis 1"), (vol[:, :, c[2]], "axis 2")) if vol.ndim == 3
                  else ((vol, "slice"),))
        for col, (sl, plane) in enumerate(planes):
            ax = axes[row, col]
            ax.imshow(sl.T, cmap="gray", vmin=-1, vmax=1, origin="lower")
            ax.set_title(f"{name}, {plane}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def batch_from_source(source: PatchSource, rng: np.random.Generator, batch: int, patch_size, run: VQGANRunConfig,
                      device) -> torch.Tensor:
    patches = [source.random_patch(rng, patch_size, run.oversample_labels, run.oversample_rate).image for _ in range(batch)]
    return torch.from_numpy(np.stack(patches)).to(device)


#: VQGANConfig fields no weight depends on: a fine-tune may change them (the patch size's length may not: 2D vs 3D)
INIT_FREE_FIELDS = frozenset({
    "patch_size", "ema_decay", "commitment_weight", "dead_code_threshold", "restart_every", "quantizer_chunk",
    "l1_weight", "perceptual_weight", "gan3d_weight", "gan2d_weight", "feature_matching_weight",
    "adversarial_criterion", "disc_start", "lr", "betas", "grad_clip", "batch_size", "preset"})


class VQGANTrainer(tu.GeneratorTrainer):
    KIND = KIND
    DESC = "vqgan"
    INIT_FREE_FIELDS = INIT_FREE_FIELDS

    def __init__(self, cfg: VQGANConfig, run: VQGANRunConfig, source: PatchSource, eval_source: PatchSource | None,
                 output_dir: str | Path, resume: bool = True, init_from: str | Path | None = None,
                 init_optimizer: bool = False):
        self.cfg, self.source = cfg, source
        src_dims = len(source.spacing)
        if src_dims != cfg.spatial_dims:
            raise ValueError(f"VQGAN preset '{cfg.preset}' is {cfg.spatial_dims}D (patch {list(cfg.patch_size)}) but the "
                             f"data source is {src_dims}D (spacing {list(source.spacing)} mm): use a {src_dims}D preset")
        self.eval_source = eval_source if eval_source is not None and len(eval_source) else source
        self._setup(run, output_dir)
        self.model = VQGAN(cfg).to(self.device)
        self.discs = VQGANDiscriminators(cfg).to(self.device)
        self.perceptual = build_perceptual(run.perceptual_weights).to(self.device)
        self.loss = VQGANLoss(cfg, self.perceptual)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        self.opt_d = torch.optim.Adam(self.discs.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        warm = max(0, int(run.warmup_steps))
        lam = (lambda s: min(1.0, (s + 1) / warm)) if warm else (lambda s: 1.0)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lam)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lam)
        self._resume_or_start(resume, init_from, init_optimizer)
        # broadcast rank 0's initial weights (DDP does it at wrap time) before wrapping
        self.model_ddp = tu.wrap_ddp(self.model, self.env)
        self.discs_ddp = tu.wrap_ddp(self.discs, self.env)
        self.eval_batch = self._eval_patches()
        self.batch_size = int(run.batch_size or cfg.batch_size)

    # ------------------------------------------------------------------------------------------
    def source_meta(self) -> dict:
        return {"train": self.source.describe(), "eval": self.eval_source.describe(),
                "eval_is_held_out": self.eval_source is not self.source}

    def components(self) -> dict:
        return {"model": self.model, "discriminators": self.discs, "opt_g": self.opt_g, "opt_d": self.opt_d,
                "sched_g": self.sched_g, "sched_d": self.sched_d}

    def check_resume(self, meta: dict, path) -> None:
        check_meta(meta, path, expect_preset=self.cfg.preset, expect_intensity=self.source.intensity,
                   expect_spacing=self.source.spacing, expect_spatial_dims=self.cfg.spatial_dims)

    def checkpoint_meta(self) -> dict:
        return build_meta(self.model, self.source.spacing, self.source.intensity, self.step, self.source_meta(),
                          {"perceptual": self.perceptual.description, "world_size": self.env.world_size,
                           "init_from": self.init_meta})

    def init_weights(self, state: dict) -> dict:
        return {"model": (self.model, state["model"]), "discriminators": (self.discs, state["discriminators"])} \
            if "discriminators" in state else {"model": (self.model, state["model"])}

    def init_optimizers(self) -> list[str]:
        return ["opt_g", "opt_d"]

    def check_init(self, meta: dict, path) -> None:
        check_spatial_dims(meta, path, self.cfg.spatial_dims, "VQGAN")
        changes = []
        have = IntensitySpace.from_dict(meta["intensity"])
        if not have.same_as(self.source.intensity):
            changes.append(f"intensity space {have.describe()} -> {self.source.intensity.describe()}")
        sp = [float(s) for s in meta.get("spacing", [])]
        if len(sp) != len(self.source.spacing) or any(abs(a - b) > 1e-3 for a, b in zip(sp, self.source.spacing)):
            changes.append(f"spacing {sp} -> {list(self.source.spacing)} mm")
        # another dataset's VQGAN is a legitimate start (that is what fine-tuning is for); say what it adapts to
        self._init_changes = changes

    def _eval_patches(self) -> torch.Tensor:
        rng = np.random.default_rng(12345)  # fixed: every run and every resume evaluates the same patches
        patches = [self.eval_source.random_patch(rng, self.cfg.patch_size, None, 0.0).image
                   for _ in range(max(1, self.run.num_eval_patches))]
        return torch.from_numpy(np.stack(patches))

    def settings(self) -> dict:
        return {"vqgan_config": config_to_dict(self.cfg), "run_config": config_to_dict(self.run),
                "source": self.source_meta(), "intensity": self.source.intensity.as_dict(),
                "spacing": list(self.source.spacing), "init_from": self.init_meta}

    def describe(self) -> list[str]:
        cfg = self.cfg
        return [f"preset {cfg.preset}: {self.model.num_parameters()} parameters, latent {cfg.latent_shape}, "
                f"device {self.device}, world size {self.env.world_size}, batch {self.batch_size}/rank",
                f"intensity space: {self.source.intensity.describe()}; spacing {self.source.spacing} mm",
                f"perceptual term: {self.perceptual.description}",
                f"held-out patches: {self.eval_source.describe()}"
                + ("" if self.eval_source is not self.source else " (no held-out cases: evaluating on training cases)")] \
            + [f"fine-tuning a VQGAN trained elsewhere: {c}" for c in getattr(self, "_init_changes", [])]

    def next_batch(self) -> torch.Tensor:
        return batch_from_source(self.source, self.np_rng, self.batch_size, self.cfg.patch_size, self.run, self.device)

    def current_lr(self) -> float:
        return self.sched_g.get_last_lr()[0]

    def postfix(self, logs: dict) -> dict:
        return {"l1": logs["l1"], "usage": logs["active_codes"]}

    def train_mode(self) -> None:
        self.model_ddp.train()
        self.discs_ddp.train()

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        xs, ys, codes = [], [], []
        for i in range(self.eval_batch.shape[0]):
            x = self.eval_batch[i:i + 1].to(self.device)
            with tu.autocast(self.device):
                z = self.model.encode(x)
                codes.append(self.model.quantizer.nearest_codes(z.float().movedim(1, -1).reshape(-1, self.cfg.latent_dim)))
                y = self.model.decode(self.model.quantizer.snap(z.float()).to(z.dtype))
            xs.append(x.float().cpu())
            ys.append(y.float().clamp(-1, 1).cpu())
        self.model.train()
        x, y = torch.cat(xs), torch.cat(ys)
        used = torch.unique(torch.cat(codes)).numel()
        res = {"eval_psnr": psnr(x, y), "eval_ssim": ssim_nd(x, y), "eval_l1": float((x - y).abs().mean()),
               "eval_codes_used": int(used), "eval_code_usage": used / self.cfg.codebook_size}
        if self.run.save_png:
            save_three_plane_png(x[0, 0].numpy(), y[0, 0].numpy(), self.out / f"recon_step{self.step:08d}.png",
                                 f"step {self.step}: PSNR {res['eval_psnr']:.2f} dB, SSIM {res['eval_ssim']:.3f}")
        return res

    # ------------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor) -> dict:
        cfg = self.cfg
        slice_idx = random_slice_indices(x)
        adv = self.loss.adversarial_active(self.step)
        self.discs.requires_grad_(False)
        with tu.autocast(self.device):
            recon, commit, info = self.model_ddp(x)
            g_loss, logs = self.loss.generator(x, recon, commit, self.discs, slice_idx, self.step)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        if cfg.grad_clip > 0:
            logs["grad_norm_g"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        self.opt_g.step()
        self.sched_g.step()
        if adv:
            self.discs.requires_grad_(True)
            with tu.autocast(self.device):
                d_loss, dlogs = self.loss.discriminator(x, recon.detach(), self.discs_ddp, slice_idx)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.discs.parameters(), cfg.grad_clip)
            self.opt_d.step()
            self.sched_d.step()
            logs.update(dlogs)
        logs.update(perplexity=info["perplexity"], batch_code_usage=info["usage"],
                    active_codes=info["active_codes"], restarted_codes=info["restarted"])
        return logs
