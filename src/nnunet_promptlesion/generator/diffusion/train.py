"""PromptLesion diffusion training loop (used by ``promptlesion_train_diffusion``).

One step (:func:`diffusion_loss`): a class-balanced batch of lesion-centred and healthy crops per rank
(:class:`~.data.LesionCropSampler`), encoded by the frozen VQGAN (:func:`~.inpaint.encode_inputs`, the same
code as inference) into latents z0 (B, 8, d, h, w) in [-1, 1], the healthy context c = (1 - m) E(x with the
mask blanked) (no lesion voxel reaches it), the latent region m and parent; prompt dropout to the CFG null
token (never to "healthy", which only ever sees healthy crops); t uniform in [0, T-1];
z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; loss = mean((1 + w g) (f(z_t, t, c, m, p, parent) - eps)^2), where
g is the generated region (m dilated by the VQGAN encoder's reach, the cells the sampler generates; see
:mod:`.inpaint`). No host synchronisation per step: the logged values stay device tensors until the
trainer writes a log line (every ``log_every`` steps).
Adam, optional linear warm-up, gradient clipping, EMA of the weights (used for evaluation and sampling),
bf16 autocast on GPU, DDP under ``torchrun``.

Outputs in ``output_dir``: ``checkpoint_latest.pt`` (atomic; model, EMA, optimizer, scheduler, step,
per-rank RNG), ``checkpoint_final.pt``, ``train_log.jsonl``, ``train.log``, ``run_settings.json`` and per
evaluation ``samples/stepNNNNNNNN_<prompt>.png`` (a real lesion of the class if any, a healthy carrier
with the mask, and the EMA model's inpainting with that prompt, three planes each).

Fine-tuning (``init_from``): the denoiser and its EMA start from another diffusion checkpoint of the same
architecture and prompt vocabulary (names), trained on the latents of the same VQGAN (or of the VQGAN this run's
VQGAN was itself fine-tuned from: allowed, with a note, since the latents then moved); Adam moments only with
``init_optimizer``; the step counter (and with it the EMA warm-up) starts at 0.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

from ...utils.checkpoint import CheckpointError, config_to_dict
from .. import train_utils as tu
from ..vqgan.model import check_spatial_dims
from .checkpoint import KIND, build_meta, check_format, check_vqgan_pairing
from .config import DiffusionConfig, PromptVocabulary
from .data import LesionCropSampler, stack_crops
from .inpaint import encode_inputs, inpaint_lesions
from .preview import save_grid
from .schedule import NoiseSchedule
from .unet import PromptLesionUNet, parameter_report


@dataclasses.dataclass
class DiffusionRunConfig:
    """Settings of one training run (architecture, schedule and loss live in :class:`DiffusionConfig`)."""
    max_steps: int = 60000          # paper: 60k steps
    batch_size: int = 4             # per rank; paper: 4
    lr: float = 1e-4                # paper: 1e-4
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    healthy_fraction: float = 0.25  # share of healthy crops (healthy prompt)
    jitter: float = 0.25            # lesion crop centre shift, fraction of the patch size
    eval_every: int = 1000
    eval_sampler: str = "ddim"
    eval_steps: int = 50
    eval_guidance: float = 1.0
    blend_sigma: float = 1.0        # voxels, for the sample grids
    checkpoint_every: int = 500
    keep_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    stop_after: int | None = None   # stop (checkpoint written) after this step; the schedule is unchanged
    save_png: bool = True
    progress: bool = True


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._keys = [k for k, v in self.model.state_dict().items() if v.dtype.is_floating_point]

    def decay_at(self, step: int) -> float:
        # warm-up (1 + n) / (10 + n): early EMA weights follow the model instead of its random init
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        src, dst = model.state_dict(), self.model.state_dict()
        d = self.decay_at(step)
        # one fused call instead of a Python loop over a few hundred tensors
        torch._foreach_lerp_([dst[k] for k in self._keys], [src[k].detach() for k in self._keys], 1.0 - d)


def diffusion_loss(model, vqgan, schedule: NoiseSchedule, cfg: DiffusionConfig, batch: dict, device,
                   generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                   prompt_dropout: float | None = None) -> tuple[torch.Tensor, dict]:
    """Weighted epsilon MSE of one batch (``image``, ``mask``, optional ``parent`` (B, 1, X, Y, Z), ``prompt`` (B,),
    optional ``attributes`` (B, A) bins for a model with attribute prompts).

    Prompt dropout (probability ``cfg.prompt_dropout`` unless given) replaces ids by ``cfg.null_id`` and the
    attributes of those rows by null; attribute dropout (``cfg.attribute_dropout``; off when ``prompt_dropout`` is
    given as 0, the fixed evaluation batches) nulls each remaining attribute independently.
    Returns (loss, logs with loss, mse_lesion, mse_background as 0-d device tensors: no host sync here).
    The lesion weight covers the generated region (``encode_inputs(...)["generate"]``): at sampling the model
    produces those cells, the ring around the lesion included.
    """
    x, mask, ids = batch["image"].to(device), batch["mask"].to(device), batch["prompt"].to(device)
    attrs = batch.get("attributes") if cfg.attributes else None
    attrs = None if attrs is None else attrs.to(device).long()
    parent = batch.get("parent")
    parent = None if parent is None else parent.to(device)
    b = x.shape[0]
    device = torch.device(device)
    with torch.no_grad():
        enc = encode_inputs(vqgan, x, mask, parent, autocast=lambda: tu.autocast(device), chunk=None)
    z0, region = enc["z"], enc["region"]
    p = cfg.prompt_dropout if prompt_dropout is None else prompt_dropout
    if p > 0:
        drop = torch.rand(b, device=device, generator=generator) < p
        ids = torch.where(drop, torch.full_like(ids, cfg.null_id), ids)
        if attrs is not None:  # the CFG null is the null class *and* null attributes
            attrs = torch.where(drop[:, None], torch.zeros_like(attrs), attrs)
    if attrs is not None and cfg.attribute_dropout > 0 and prompt_dropout != 0.0:
        # each attribute alone also goes null, so any subset can be requested (and guided) at sampling
        keep = torch.rand(attrs.shape, device=device, generator=generator) >= cfg.attribute_dropout
        attrs = torch.where(keep, attrs, torch.zeros_like(attrs))
    if t is None:
        t = schedule.sample_timesteps(b, device, generator)
    noise = torch.randn(z0.shape, device=device, generator=generator)
    zt = schedule.q_sample(z0, t, noise)
    with tu.autocast(device):
        pred = model(zt, t, enc["context"], region, ids, enc["parent"], *([attrs] if attrs is not None else []))
    se = (pred.float() - noise) ** 2
    w = 1.0 + cfg.lesion_loss_weight * enc["generate"]
    loss = (w * se).mean()
    with torch.no_grad():
        # masked means by sums (no boolean indexing, which syncs to size its output); 0 / 0 = nan without a lesion
        rv = region.expand_as(se)
        inside = (se * rv).sum() / rv.sum()
        outside = (se * (1.0 - rv)).sum() / (1.0 - rv).sum()
    return loss, {"loss": loss.detach(), "mse_lesion": inside, "mse_background": outside}


#: DiffusionConfig fields no weight depends on: a fine-tune may change them
INIT_FREE_FIELDS = frozenset({"preset", "dropout", "lesion_loss_weight", "prompt_dropout", "attribute_dropout"})


def vqgan_lineage(vqgan_meta: dict) -> list[str]:
    """checkpoint ids of the VQGANs ``vqgan_meta``'s VQGAN was fine-tuned from (its ``init_from`` chain), nearest
    first."""
    out, node = [], vqgan_meta.get("init_from")
    while isinstance(node, dict):
        if node.get("checkpoint_id"):
            out.append(node["checkpoint_id"])
        node = node.get("init_from")
    return out


class DiffusionTrainer(tu.GeneratorTrainer):
    KIND = KIND
    DESC = "diffusion"
    eval_at_start = True  # baseline of the eval_loss curve
    INIT_FREE_FIELDS = INIT_FREE_FIELDS

    def __init__(self, cfg: DiffusionConfig, run: DiffusionRunConfig, data: LesionCropSampler, vqgan, vqgan_meta: dict,
                 vqgan_path, output_dir: str | Path, lesion_spec: dict | None = None, resume: bool = True,
                 init_from: str | Path | None = None, init_optimizer: bool = False):
        self.cfg, self.data = cfg, data
        self.vocab: PromptVocabulary = data.vocab
        if cfg.num_classes != len(self.vocab.names) - 1:
            raise ValueError(f"config has {cfg.num_classes} classes but the vocabulary {self.vocab.names} has "
                             f"{len(self.vocab.names) - 1}")
        bins = data.attribute_bins
        have = () if bins is None else tuple(bins.names)
        if tuple(cfg.attributes) != have or (bins is not None and bins.n_bins != cfg.attribute_bins):
            raise ValueError(f"config attributes {list(cfg.attributes)} ({cfg.attribute_bins} bins) but the crops carry "
                             f"{list(have)}" + ("" if bins is None else f" ({bins.n_bins} bins)"))
        self._setup(run, output_dir)
        if int(vqgan.config.spatial_dims) != cfg.spatial_dims:
            raise ValueError(f"diffusion preset '{cfg.preset}' is {cfg.spatial_dims}D but VQGAN {vqgan_path} is "
                             f"{vqgan.config.spatial_dims}D: use a {vqgan.config.spatial_dims}D diffusion preset")
        self.vqgan = vqgan.to(self.device).eval().requires_grad_(False)
        self.vqgan_meta, self.vqgan_path = vqgan_meta, vqgan_path
        self.factor = int(vqgan.downsample_factor)
        self.lesion_spec = lesion_spec
        self.schedule = NoiseSchedule.from_config(cfg, self.device)
        self.model = PromptLesionUNet(cfg).to(self.device)
        self.ema = EMA(self.model, run.ema_decay)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=run.lr, foreach=True)
        warm = max(0, int(run.warmup_steps))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, (lambda s: min(1.0, (s + 1) / warm)) if warm else (lambda s: 1.0))
        self._resume_or_start(resume, init_from, init_optimizer)
        self.model_ddp = tu.wrap_ddp(self.model, self.env)
        self._eval = self._eval_set()

    # ------------------------------------------------------------------------------------------
    def source_meta(self) -> dict:
        return self.data.source.describe()

    def components(self) -> dict:
        return {"model": self.model, "ema": self.ema.model, "opt": self.opt, "sched": self.sched}

    def check_resume(self, meta: dict, path) -> None:
        check_format(meta, path)
        check_vqgan_pairing(meta, self.vqgan_meta, path, self.vqgan_path)
        if PromptVocabulary.from_dict(meta["vocabulary"]) != self.vocab:
            raise CheckpointError(f"{path} was trained with prompts {meta['vocabulary']['names']}, the lesion spec now "
                                  f"gives {self.vocab.names}; use a new --output-dir")
        if meta.get("attribute_bins") != self._bins_meta():
            raise CheckpointError(f"{path} was trained with attribute bins {meta.get('attribute_bins')}, this run "
                                  f"measures {self._bins_meta()}; use a new --output-dir")

    def _bins_meta(self) -> dict | None:
        b = self.data.attribute_bins
        return None if b is None else b.as_dict()

    def check_init(self, meta: dict, path) -> None:
        check_spatial_dims(meta, path, self.cfg.spatial_dims, "diffusion model")
        check_format(meta, path)
        names = PromptVocabulary.from_dict(meta["vocabulary"]).names
        if names != self.vocab.names:
            raise CheckpointError(f"--init-from {path} was trained with prompts {names}, the lesion spec here gives "
                                  f"{self.vocab.names}: a prompt id would mean another class. Fine-tune from a model "
                                  "with the same lesion classes (prompt names, in the same order)")
        want = meta.get("vqgan", {}).get("checkpoint_id")
        have = self.vqgan_meta.get("checkpoint_id")
        self._init_changes = []
        if want != have:
            if want not in vqgan_lineage(self.vqgan_meta):
                raise CheckpointError(
                    f"--init-from {path} was trained on the latents of VQGAN {want} "
                    f"({meta.get('vqgan', {}).get('path')}), but this run encodes with VQGAN {have} ({self.vqgan_path}),"
                    " whose latent space is another one. Pass --vqgan with the VQGAN the init checkpoint was trained "
                    "with, or a VQGAN fine-tuned from it (promptlesion_train_vqgan --init-from)")
            self._init_changes.append(f"VQGAN {have} was fine-tuned from {want}, the VQGAN of the init checkpoint: its "
                                      "latents moved, this fine-tune adapts the denoiser to them")

    def init_weights(self, state: dict) -> dict:
        # a checkpoint without an EMA copy starts both from its weights
        return {"model": (self.model, state["model"]), "ema": (self.ema.model, state.get("ema", state["model"]))}

    def init_optimizers(self) -> list[str]:
        return ["opt"]

    def checkpoint_meta(self) -> dict:
        return build_meta(self.cfg, self.vocab, self.vqgan_meta, self.vqgan_path, self.data.patch_size, self.step,
                          self.source_meta(), self.ema.model.state_dict(), self.lesion_spec,
                          {"world_size": self.env.world_size, "init_from": self.init_meta,
                           "attribute_bins": self._bins_meta()})

    def _eval_set(self) -> dict:
        """Fixed crops (same every run and resume): one healthy carrier and one real crop per available class."""
        rng = np.random.default_rng(12345)
        carrier = self.data.healthy_crop(rng, max_tries=10 * self.data.max_tries)  # raises with advice if none
        real = {p: self.data.lesion_crop(rng, p) for p in self.data.available}
        crops = [carrier] + list(real.values())
        return {"carrier": carrier, "real": real, "batch": stack_crops(crops)}

    def settings(self) -> dict:
        return {"diffusion_config": config_to_dict(self.cfg), "run_config": config_to_dict(self.run),
                "vocabulary": self.vocab.as_dict(), "source": self.source_meta(),
                "vqgan": {"path": str(self.vqgan_path), "checkpoint_id": self.vqgan_meta.get("checkpoint_id")},
                "schedule": self.schedule.as_dict(), "patch_size": list(self.data.patch_size),
                "init_from": self.init_meta}

    def describe(self) -> list[str]:
        cfg, run = self.cfg, self.run
        return [f"preset {cfg.preset}, prompt {cfg.prompt_type}: parameters {parameter_report(self.model)}; "
                f"device {self.device}, world size {self.env.world_size}, batch {run.batch_size}/rank",
                f"prompts {self.vocab.names} (+ CFG null token id {cfg.null_id}); training cases per class "
                f"{self.data.counts()}; schedule {self.schedule.as_dict()}"] + (
            [] if self.data.attribute_bins is None else
            [f"attribute prompts {list(cfg.attributes)} ({cfg.attribute_bins} bins, dropout {cfg.attribute_dropout}); "
             f"bin edges per class {self.data.attribute_bins.edges}"]) \
            + [f"fine-tuning: {c}" for c in getattr(self, "_init_changes", [])]

    def next_batch(self) -> dict:
        return self.data.batch(self.np_rng, self.run.batch_size, self.device)

    def current_lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def postfix(self, logs: dict) -> dict:
        return {"loss": logs["loss"]}

    def train_mode(self) -> None:
        self.model_ddp.train()

    # ------------------------------------------------------------------------------------------
    def loss(self, model, batch: dict, generator: torch.Generator | None = None, t: torch.Tensor | None = None,
             prompt_dropout: float | None = None) -> tuple[torch.Tensor, dict]:
        return diffusion_loss(model, self.vqgan, self.schedule, self.cfg, batch, self.device, generator, t,
                              prompt_dropout)

    def train_step(self, batch: dict) -> dict:
        loss, logs = self.loss(self.model_ddp, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.run.grad_clip > 0:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run.grad_clip).detach()
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model, self.step)
        logs["healthy_refused"] = self.data.healthy_refused  # cumulative count of refused healthy draws
        return logs

    @torch.no_grad()
    def evaluate(self, pngs: bool | None = None) -> dict:
        """EMA loss on the fixed crops at fixed timesteps and noise (comparable across steps), plus sample PNGs."""
        ema = self.ema.model
        batch = self._eval["batch"]
        g = torch.Generator(device=self.device).manual_seed(777)
        n = batch["image"].shape[0]
        losses = []
        for t in np.linspace(0, self.schedule.T - 1, 8).round().astype(int):
            tt = torch.full((n,), int(t), device=self.device, dtype=torch.long)
            _, logs = self.loss(ema, batch, g, tt, prompt_dropout=0.0)
            losses.append(float(logs["loss"]))
        res = {"eval_loss": float(np.mean(losses))}
        if pngs is None:
            pngs = self.step > 0  # no sample grid of the untrained model at step 0
        if self.run.save_png and pngs:
            self.sample_pngs()
        return res

    @torch.no_grad()
    def sample_pngs(self) -> list[Path]:
        carrier = self._eval["carrier"]
        k = len(self.vocab.names)
        rows = (lambda a: torch.from_numpy(a)[None].expand(k, *a.shape).to(self.device))
        img, mask = rows(carrier.image), rows(carrier.mask)
        parent = rows(carrier.parent if carrier.parent is not None else carrier.mask)
        ids = torch.arange(k, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(4321)
        out = inpaint_lesions(self.vqgan, self.ema.model, img, mask, ids, steps=self.run.eval_steps,
                              sampler=self.run.eval_sampler, guidance=self.run.eval_guidance, generator=g,
                              blend_sigma=self.run.blend_sigma, schedule=self.schedule, parent_mask=parent,
                              autocast=lambda: tu.autocast(self.device)).float().cpu().numpy()
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        m = carrier.mask[0]
        for pid, name in enumerate(self.vocab.names):
            rows = []
            if pid in self._eval["real"]:
                rc = self._eval["real"][pid]
                rows.append((f"real '{name}' crop ({rc.case_id})", [(rc.image[0], rc.mask[0] > 0.5)]))
            rows.append((f"healthy carrier ({carrier.case_id}) + mask", [(carrier.image[0], m > 0.5)]))
            rows.append((f"generated, prompt '{name}'", [(out[pid, 0], m > 0.5)]))
            p = folder / f"step{self.step:08d}_{pid:02d}_{name}.png"
            save_grid(rows, p, f"step {self.step}: prompt '{name}' ({self.run.eval_sampler} {self.run.eval_steps})",
                      aspect=self.data.source.spacing)
            paths.append(p)
        if self.cfg.attributes:
            paths += self._attribute_pngs(img[:1], mask[:1], parent[:1], folder)
        return paths

    @torch.no_grad()
    def _attribute_pngs(self, img, mask, parent, folder: Path) -> list[Path]:
        """Per lesion class with bins: the carrier inpainted with each bin of each attribute (the others null), same
        noise, so the rows differ only by the requested bin (the radius rows keep the carrier's mask: what they show
        is the model's response to the bin, not a mask of that size)."""
        bins = self.data.attribute_bins
        names, n = self.cfg.attributes, self.cfg.attribute_bins
        paths = []
        for pid, name in enumerate(self.vocab.names):
            if pid == 0 or name not in bins.edges:
                continue
            combos = [tuple(b if j == i else 0 for j in range(len(names))) for i in range(len(names))
                      for b in range(1, n + 1)]
            k = len(combos)
            attrs = torch.tensor(combos, dtype=torch.long, device=self.device)
            gens = [torch.Generator(device=self.device).manual_seed(4321) for _ in range(k)]
            out = inpaint_lesions(self.vqgan, self.ema.model, img.expand(k, *img.shape[1:]),
                                  mask.expand(k, *mask.shape[1:]), torch.full((k,), pid, device=self.device),
                                  steps=self.run.eval_steps, sampler=self.run.eval_sampler,
                                  guidance=self.run.eval_guidance, generator=gens, blend_sigma=self.run.blend_sigma,
                                  schedule=self.schedule, parent_mask=parent.expand(k, *parent.shape[1:]),
                                  autocast=lambda: tu.autocast(self.device), attributes=attrs).float().cpu().numpy()
            m = mask[0, 0].cpu().numpy() > 0.5
            rows = [(f"'{name}' {names[i // n]} bin {i % n + 1}", [(out[i, 0], m)]) for i in range(k)]
            p = folder / f"step{self.step:08d}_{pid:02d}_{name}_attributes.png"
            save_grid(rows, p, f"step {self.step}: '{name}', one attribute bin at a time (others null)",
                      aspect=self.data.source.spacing)
            paths.append(p)
        return paths

    # ------------------------------------------------------------------------------------------
