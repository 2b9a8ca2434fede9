"""Shared training infrastructure for the generator trainings (VQGAN and diffusion).

API (all functions are safe to call in a single process without ``torchrun``):

``setup_distributed(device="auto") -> DistEnv``
    Reads the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). With
    WORLD_SIZE > 1 it initialises ``torch.distributed`` with NCCL on CUDA and gloo on CPU.
    ``DistEnv`` has rank, world_size, local_rank, device, is_main, distributed.
``cleanup_distributed(env)``                 destroy the process group if one was created.
``wrap_ddp(model, env)`` / ``unwrap(model)`` DistributedDataParallel wrapper (no-op when not distributed).
``autocast(device)``                         bf16 autocast on CUDA, a no-op (fp32) on CPU.
``seed_everything(seed, rank)``              seeds python/numpy/torch per rank (rank offsets the seed).
``capture_rng_state(np_rng) / restore_rng_state(state, np_rng)``
    torch CPU (+CUDA) RNG, python ``random`` and a ``numpy.random.Generator``; the result is a plain
    dict of tensors/ints/strings, so it goes into a ``weights_only`` checkpoint.
``gather_rng_states(state, env) -> list``    every rank's RNG state on every rank (store it on rank 0);
    on resume each rank restores ``states[env.rank]``.
``CheckpointManager(folder, keep_every=0)``
    ``save(state, step)`` writes ``checkpoint_latest.pt`` atomically (plus ``checkpoint_step{N}.pt`` every
    ``keep_every`` steps), ``latest()`` returns its path or None, ``load_latest(kind)`` loads it with
    ``weights_only=True`` (see :mod:`nnunet_promptlesion.utils.checkpoint`).
``TrainLogger(folder, total_steps, start_step, env)``
    tqdm progress bar + ``train_log.jsonl`` (JSON lines) + ``train.log`` (text) on rank 0 only;
    ``log(step, **metrics)``, ``info(msg)``, ``update(n, **postfix)``, ``close()``.
``peak_memory_mb(device)``                   peak CUDA memory allocated, or the process peak RSS on CPU (MiB).
``reset_peak_memory(device)``

``GeneratorTrainer``                         the base of the VQGAN and diffusion trainers: distributed setup,
    seeding, exact resume (config check, state dicts, step, per-rank RNG), atomic checkpoints and the
    ``fit`` loop (logging, evaluation, checkpoints, ``stop_after``); subclasses supply the model parts.
    ``init_from`` (fine-tuning): a run without a checkpoint in its folder starts from another run's weights
    (model, plus EMA / discriminators where the trainer has them; optimizer moments only with ``init_optimizer``);
    the step counter starts at 0 and the checkpoint's meta records ``init_from``. A run folder that already holds
    ``checkpoint_latest.pt`` resumes instead (resume takes precedence, so an interrupted fine-tune continues).
``check_architecture(stored, new, free_fields, path, what)`` refuse another architecture, naming the fields.
``read_init_meta(path, kind, what)`` the ``meta`` of an ``--init-from`` checkpoint, wrong kinds refused clearly.
``run_trainer(make_trainer, out, no_resume)`` the shared tail of the training CLIs (exit status 0 / 2).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import logging
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..utils.atomic import write_json_atomic
from ..utils.checkpoint import CheckpointError, config_from_dict, config_to_dict, load_checkpoint, save_checkpoint
from ..utils.jsonlog import JsonlLogger


@dataclasses.dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, distributed=world > 1)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return env


def cleanup_distributed(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, env: DistEnv, **kwargs) -> torch.nn.Module:
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed for bf16); fp32 on CPU, where bf16 convs are slow."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int, rank: int = 0) -> np.random.Generator:
    """Seed python, numpy and torch; returns a numpy Generator for data sampling (rank-specific)."""
    s = int(seed) + 1000 * int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    return np.random.default_rng(s)


def _np_state_to_plain(state: dict) -> dict:
    # PCG64 state holds 128-bit ints; strings survive weights_only loading whatever their size.
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return {"__int__": str(int(v))}
        return v
    return conv(state)


def _np_state_from_plain(state: dict) -> dict:
    def conv(v):
        if isinstance(v, dict):
            if set(v) == {"__int__"}:
                return int(v["__int__"])
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(state)


def capture_rng_state(np_rng: np.random.Generator | None = None) -> dict:
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if np_rng is not None:
        st["numpy_generator"] = _np_state_to_plain(np_rng.bit_generator.state)
    return st


def restore_rng_state(state: dict, np_rng: np.random.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "python" in state:
        s = ast.literal_eval(state["python"])
        random.setstate((s[0], tuple(s[1]), s[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    if np_rng is not None and "numpy_generator" in state:
        np_rng.bit_generator.state = _np_state_from_plain(state["numpy_generator"])


def gather_rng_states(state: dict, env: DistEnv) -> list[dict]:
    """Every rank's RNG state (collective when distributed: all ranks must call it)."""
    if not env.distributed:
        return [state]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, state)
    return out


class CheckpointManager:
    """Atomic training checkpoints in one folder: ``checkpoint_latest.pt`` (+ optional snapshots)."""

    LATEST = "checkpoint_latest.pt"
    FINAL = "checkpoint_final.pt"

    def __init__(self, folder: str | os.PathLike, keep_every: int = 0):
        self.folder = Path(folder)
        self.keep_every = int(keep_every)

    def save(self, state: dict, step: int, final: bool = False) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(state, self.folder / self.LATEST)
        if self.keep_every and step % self.keep_every == 0:
            save_checkpoint(state, self.folder / f"checkpoint_step{step:08d}.pt")
        if final:
            save_checkpoint(state, self.folder / self.FINAL)
        return self.folder / self.LATEST

    def latest(self) -> Path | None:
        p = self.folder / self.LATEST
        return p if p.is_file() else None

    def load_latest(self, kind: str | None = None, map_location="cpu") -> dict | None:
        p = self.latest()
        return None if p is None else load_checkpoint(p, map_location=map_location, kind=kind)


class TrainLogger:
    """Progress bar, JSON-lines metrics and a text log; silent on ranks other than 0."""

    def __init__(self, folder: str | os.PathLike, total_steps: int, start_step: int, env: DistEnv,
                 desc: str = "train", jsonl_name: str = "train_log.jsonl", progress: bool = True):
        self.env = env
        self.folder = Path(folder)
        self.bar = None
        self.jsonl = None
        self.logger = logging.getLogger(f"nnunet_promptlesion.{desc}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        if env.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.jsonl = JsonlLogger(self.folder / jsonl_name)
            fh = logging.FileHandler(self.folder / "train.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.logger.addHandler(fh)
            if progress:

                self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                                file=sys.stderr, mininterval=1.0)

    def info(self, msg: str) -> None:
        if self.env.is_main:
            self.logger.info(msg)
            if self.bar is not None:
                self.bar.write(msg)
            else:
                print(msg, file=sys.stderr)

    def log(self, step: int, **metrics: Any) -> None:
        if self.jsonl is not None:
            self.jsonl.log(step=int(step), **metrics)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (MiB) on GPU; on CPU the process' peak resident set size (MiB).

    The CPU figure is a process-lifetime high-water mark (``getrusage``), so measure in a fresh process.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0  # Linux reports KiB


@contextlib.contextmanager
def timed() -> Iterator[dict]:
    t = {"start": time.perf_counter()}
    yield t
    t["seconds"] = time.perf_counter() - t["start"]


def host_values(logs: dict) -> dict:
    """``logs`` with 0-d tensors read to Python floats (one host sync for all of them)."""
    keys = [k for k, v in logs.items() if torch.is_tensor(v)]
    if not keys:
        return dict(logs)
    vals = torch.stack([logs[k].detach().float().reshape(()) for k in keys]).cpu().tolist()
    return {**logs, **dict(zip(keys, vals))}


KIND_NAMES = {"vqgan": "VQGAN", "promptlesion_diffusion": "diffusion"}  # meta["kind"] -> what users call it


def read_init_meta(path: str | os.PathLike, kind: str, what: str = "--init-from") -> dict:
    """``meta`` of the checkpoint ``path`` (``weights_only`` load, weights verified) that must be of ``kind``."""
    state = load_checkpoint(path, map_location="cpu")
    return check_init_kind(state["meta"], path, kind, what)


def check_init_kind(meta: dict, path, kind: str, what: str = "--init-from") -> dict:
    have = meta.get("kind")
    if have != kind:
        raise CheckpointError(
            f"{what} {path} is a {KIND_NAMES.get(have, repr(have))} checkpoint, but this training needs a "
            f"{KIND_NAMES.get(kind, kind)} checkpoint (the {'promptlesion_train_vqgan' if kind == 'vqgan' else 'promptlesion_train_diffusion'} output)")
    return meta


def check_architecture(stored, new, free_fields: frozenset | set, path, what: str) -> None:
    """Refuse to initialise ``new`` (a config dataclass) from a checkpoint written with ``stored`` when a field
    outside ``free_fields`` (settings no weight depends on: loss weights, learning rate, patch size) differs;
    the message names every differing field with both values. ``spatial_dims`` (2D slices vs 3D patches) is
    compared first, also where it is a property (the VQGAN's)."""
    diff = {}
    if getattr(stored, "spatial_dims", None) != getattr(new, "spatial_dims", None):
        diff["spatial_dims"] = (stored.spatial_dims, new.spatial_dims)
    for f in dataclasses.fields(type(new)):
        if f.name in free_fields or f.name in diff:
            continue
        a, b = getattr(stored, f.name), getattr(new, f.name)
        if a != b:
            diff[f.name] = (a, b)
    if diff:
        fields = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} here" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"--init-from {path} holds a {what} of another architecture (preset '{stored.preset}'; this run: preset "
            f"'{new.preset}'), its weights cannot initialise this one. Differing fields: {fields}. Use the same preset "
            "and architecture options as the checkpoint (or leave --preset out: it then defaults to the checkpoint's).")


def check_state_shapes(stored: dict, target: dict, path, component: str) -> None:
    """Refuse a state dict whose keys or tensor shapes differ from ``target``'s (names the first few)."""
    missing = [k for k in target if k not in stored]
    extra = [k for k in stored if k not in target]
    shapes = [f"{k} {tuple(stored[k].shape)} vs {tuple(target[k].shape)}" for k in target
              if k in stored and torch.is_tensor(target[k]) and tuple(stored[k].shape) != tuple(target[k].shape)]
    if missing or extra or shapes:
        parts = [f"{name}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                 for name, v in (("missing", missing), ("unexpected", extra), ("other shapes", shapes)) if v]
        raise CheckpointError(f"--init-from {path}: the {component} weights do not fit this model ({'; '.join(parts)})")


class GeneratorTrainer:
    """Resume / save / fit logic shared by the VQGAN and diffusion trainers.

    A subclass sets ``KIND`` (checkpoint kind), builds ``self.cfg`` (a dataclass config), ``self.run`` (run
    settings with max_steps, batch, eval_every, checkpoint_every, log_every, keep_every, seed, device,
    stop_after, progress) and its modules between :meth:`_setup` and :meth:`_resume_or_start`, and implements
    ``components`` (checkpoint key -> object with state_dict/load_state_dict), ``checkpoint_meta``,
    ``check_resume``, ``next_batch``, ``train_step``, ``evaluate``, ``settings``, ``describe``, ``current_lr``
    and ``postfix``. The checkpoint holds ``meta``, every component's state dict, ``step``, ``rng`` (one entry
    per rank) and ``run_config``.
    """

    KIND = ""
    DESC = "train"
    eval_at_start = False  # evaluate before the first step (baseline of an eval curve)
    #: config fields an --init-from checkpoint may differ in (no weight depends on them)
    INIT_FREE_FIELDS: frozenset = frozenset()

    def _setup(self, run, output_dir) -> None:
        self.run = run
        self.out = Path(output_dir)
        self.env = setup_distributed(run.device)
        self.device = self.env.device
        self.np_rng = seed_everything(run.seed, self.env.rank)
        self.step = 0
        self.ckpt = CheckpointManager(self.out, keep_every=run.keep_every)

    # ---- subclass interface -----------------------------------------------------------------
    def components(self) -> dict[str, Any]:
        raise NotImplementedError

    def checkpoint_meta(self) -> dict:
        raise NotImplementedError

    def check_resume(self, meta: dict, path: Path) -> None:
        """Raise CheckpointError when the stored run cannot continue here (other data, VQGAN...)."""

    def next_batch(self):
        raise NotImplementedError

    def train_step(self, batch) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def describe(self) -> list[str]:
        return []

    def current_lr(self) -> float:
        raise NotImplementedError

    def postfix(self, logs: dict) -> dict:
        return {}

    def check_init(self, meta: dict, path: Path) -> None:
        """Raise CheckpointError when an --init-from checkpoint cannot start this run (beyond its architecture)."""

    def init_weights(self, state: dict) -> dict[str, tuple[Any, dict]]:
        """component name -> (module, state dict from the --init-from checkpoint ``state``) to initialise."""
        raise NotImplementedError

    def init_optimizers(self) -> list[str]:
        """checkpoint keys of the optimizers (their moments are carried over only with ``init_optimizer``)."""
        raise NotImplementedError

    # ---- shared logic -----------------------------------------------------------------------
    def _resume_or_start(self, resume: bool, init_from: str | os.PathLike | None = None,
                         init_optimizer: bool = False) -> None:
        self.init_meta: dict | None = None
        if resume and self.ckpt.latest() is not None:
            # resume wins: an interrupted fine-tune continues from its own checkpoint, not from init_from again
            self._maybe_resume()
            if init_from is not None:
                self._resume_note += f" (--init-from {init_from} ignored: resume takes precedence)"
            return
        if init_from is not None:
            self._init_from(Path(init_from), init_optimizer)

    def _init_from(self, path: Path, with_optimizer: bool) -> None:
        state = load_checkpoint(path, map_location=self.device)  # weights_only, weights verified
        meta = check_init_kind(state["meta"], path, self.KIND)
        self.check_init(meta, path)
        check_architecture(config_from_dict(type(self.cfg), meta["config"]), self.cfg, self.INIT_FREE_FIELDS, path,
                           f"{KIND_NAMES.get(self.KIND, self.DESC)} model")
        parts = self.init_weights(state)
        for name, (obj, sd) in parts.items():
            check_state_shapes(sd, obj.state_dict(), path, name)
        for obj, sd in parts.values():
            obj.load_state_dict(sd)
        if with_optimizer:
            for key in self.init_optimizers():
                if key not in state:
                    raise CheckpointError(f"--init-from {path} holds no optimizer state '{key}' (not a training "
                                          "checkpoint); drop --init-optimizer")
                opt = self.components()[key]
                # only the moments travel: lr, betas and the scheduler's initial_lr are this run's settings
                keep = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                try:
                    opt.load_state_dict(state[key])
                except ValueError as e:
                    raise CheckpointError(f"--init-from {path}: optimizer state '{key}' does not fit: {e}") from e
                for g, hp in zip(opt.param_groups, keep):
                    g.update(hp)
        self.init_meta = {"path": str(path.resolve()), "checkpoint_id": meta.get("checkpoint_id"),
                          "kind": meta.get("kind"), "preset": meta.get("preset"), "step": int(meta.get("step", 0)),
                          "source": meta.get("source"), "optimizer": bool(with_optimizer),
                          "init_from": meta.get("init_from")}
        self._resume_note = (f"initialised from {path} ({', '.join(parts)}; its step {self.init_meta['step']}, "
                             f"{meta.get('checkpoint_id')}); step counter at 0, "
                             + ("optimizer moments carried over" if with_optimizer else "fresh optimizer"))

    def _maybe_resume(self) -> None:
        state = self.ckpt.load_latest(kind=self.KIND, map_location=self.device)
        if state is None:
            return
        meta, path = state["meta"], self.ckpt.latest()
        self.init_meta = meta.get("init_from")
        self.check_resume(meta, path)
        cls = type(self.cfg)
        stored = config_from_dict(cls, meta["config"])
        if stored != self.cfg:
            diff = {f.name: (getattr(stored, f.name), getattr(self.cfg, f.name)) for f in dataclasses.fields(cls)
                    if getattr(stored, f.name) != getattr(self.cfg, f.name)}
            raise CheckpointError(f"{path} was written with other {self.DESC} settings {diff} (stored, requested); "
                                  "use a new --output-dir or the same settings to resume")
        for key, obj in self.components().items():
            obj.load_state_dict(state[key])
        self.step = int(state["step"])
        rng = state["rng"]
        if len(rng) != self.env.world_size:
            # another world size: RNG streams cannot continue exactly; keep fresh per-rank seeds
            self.np_rng = seed_everything(self.run.seed + self.step, self.env.rank)
            self._resume_note = f"resumed at step {self.step} with world size {self.env.world_size} (was {len(rng)}): new RNG streams"
        else:
            restore_rng_state(rng[self.env.rank], self.np_rng)
            self._resume_note = f"resumed from {path} at step {self.step}"

    def checkpoint_state(self, rng_states: list) -> dict:
        state = {"meta": self.checkpoint_meta()}
        state.update({key: obj.state_dict() for key, obj in self.components().items()})
        state.update(step=int(self.step), rng=rng_states, run_config=config_to_dict(self.run))
        return state

    def save(self, final: bool = False) -> None:
        rng_states = gather_rng_states(capture_rng_state(self.np_rng), self.env)  # collective
        if self.env.is_main:
            self.ckpt.save(self.checkpoint_state(rng_states), self.step, final=final)

    def _evaluate_and_log(self, log: "TrainLogger") -> dict:
        ev = self.evaluate()
        log.log(self.step, **ev)
        log.info(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in ev.items()))
        return ev

    def fit(self) -> dict:
        run = self.run
        log = TrainLogger(self.out, run.max_steps, self.step, self.env, desc=self.DESC, progress=run.progress)
        last: dict[str, Any] = {}
        every = (lambda n: n > 0 and self.step % n == 0)
        try:
            if self.env.is_main:
                write_json_atomic({**self.settings(), "world_size": self.env.world_size}, self.out / "run_settings.json")
            log.info(getattr(self, "_resume_note", f"starting a new run in {self.out}"))
            for line in self.describe():
                log.info(line)
            if self.eval_at_start and self.env.is_main and self.step == 0 and run.eval_every > 0:
                self._evaluate_and_log(log)
            self.train_mode()
            while self.step < run.max_steps:
                if run.stop_after is not None and self.step >= run.stop_after:
                    break
                logs = self.train_step(self.next_batch())
                self.step += 1
                last = logs
                # logs may hold device tensors (no per-step host sync): read them only at log steps
                if every(run.log_every) or self.step == run.max_steps:
                    last = logs = host_values(logs)
                    log.update(1, **self.postfix(logs))
                    log.log(self.step, lr=self.current_lr(), **logs)
                else:
                    log.update(1)
                if self.env.is_main and (every(run.eval_every) or (run.eval_every > 0 and self.step == run.max_steps)):
                    last = {**last, **self._evaluate_and_log(log)}
                if every(run.checkpoint_every) or self.step == run.max_steps:
                    self.save(final=self.step == run.max_steps)
            if run.stop_after is not None and run.stop_after <= self.step < run.max_steps:
                self.save()
        finally:
            log.close()
        return host_values(last)

    def train_mode(self) -> None:
        """Put the trained modules in training mode before the loop."""

    def close(self) -> None:
        cleanup_distributed(self.env)


def run_trainer(make_trainer: Callable[[], GeneratorTrainer], out: Path, no_resume: bool,
                errors: tuple = (CheckpointError, FileNotFoundError, ValueError)) -> int:
    """The training CLIs' tail: refuse an existing run with --no-resume, build, fit, close, print a summary."""
    if no_resume and (Path(out) / CheckpointManager.LATEST).exists():
        print(f"error: {out} already holds a run ({CheckpointManager.LATEST}); drop --no-resume to continue it "
              "or choose another --output-dir", file=sys.stderr)
        return 2
    try:
        trainer = make_trainer()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        last = trainer.fit()
    finally:
        trainer.close()
    if trainer.env.is_main:
        summary = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        print(f"done at step {trainer.step}; {summary}\ncheckpoint: {Path(out) / CheckpointManager.LATEST}")
    return 0
