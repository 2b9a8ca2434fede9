"""Checkpoint writing and safe loading shared by every trained component.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: loading never unpickles arbitrary objects. Configuration
dataclasses are stored as dicts (``dataclasses.asdict``) together with their class name and
the spacing / intensity space the model was trained in, under the key ``"meta"``.

``meta["checkpoint_id"]`` is the sha256 of the sampling weights (:func:`weights_id`); loading recomputes it, so
a checkpoint changed after it was written (a bit flip on disk, a torn or tampered copy of the right size) is
refused instead of synthesizing with weights nobody trained.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here (wrong kind, preset, intensity space, corrupt)."""


def config_to_dict(cfg: Any) -> dict:
    if dataclasses.is_dataclass(cfg):
        return {"__class__": type(cfg).__name__, **dataclasses.asdict(cfg)}
    if isinstance(cfg, dict):
        return dict(cfg)
    raise TypeError(f"cannot store config of type {type(cfg).__name__}")


def config_from_dict(cls: type, d: dict):
    """Rebuild dataclass ``cls`` from a stored dict, refusing a dict of another class."""
    d = dict(d)
    stored = d.pop("__class__", cls.__name__)
    if stored != cls.__name__:
        raise CheckpointError(f"checkpoint holds a {stored} config, expected {cls.__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise CheckpointError(f"checkpoint config has unknown fields {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            # JSON/torch round trips turn tuples into lists; dataclass fields typed as tuples get them back.
            if isinstance(v, list) and "tuple" in str(f.type).lower():
                v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
            kwargs[f.name] = v
    return cls(**kwargs)


def weights_id(state_dict: dict) -> str:
    """sha256 over the model tensors (names, shapes, bytes): identifies a set of weights."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k]
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def short_weights_id(checkpoint_id: str, digits: int = 12) -> str:
    """The first ``digits`` hex digits of a ``"sha256:..."`` weights id, for folder names (no colon in a path:
    it separates entries of PATH-like variables)."""
    return str(checkpoint_id).split(":")[-1][:digits]


def verify_weights(state: dict, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose weights do not hash to its stored ``meta["checkpoint_id"]``. The id is taken over
    the sampling weights: the EMA copy where a training checkpoint holds one, else the model's."""
    want = state["meta"].get("checkpoint_id") if isinstance(state.get("meta"), dict) else None
    candidates = [state[k] for k in ("ema", "model") if isinstance(state.get(k), dict)]
    if not want or not candidates:
        return   # nothing to compare (a checkpoint kind without an id)
    if all(weights_id(c) != want for c in candidates):
        raise CheckpointError(f"{path}: its weights do not match the checkpoint_id stored with them ({want}); the file "
                              "changed after it was written (a bit flip on disk, a torn or edited copy): copy it again "
                              "from its source or retrain")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` atomically (temporary sibling + rename): never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", kind: str | None = None,
                    verify: bool = True) -> dict:
    """Load a checkpoint with ``weights_only=True``; optionally check its ``meta['kind']``; with ``verify`` (default)
    check the weights against ``meta['checkpoint_id']`` (:func:`verify_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(
            f"could not load {path} as a safe (weights_only) checkpoint: {e}. "
            "Only checkpoints written by nnunet_promptlesion are accepted."
        ) from e
    if not isinstance(state, dict) or "meta" not in state:
        raise CheckpointError(f"{path} is not an nnunet_promptlesion checkpoint (no 'meta' entry)")
    if kind is not None and state["meta"].get("kind") != kind:
        raise CheckpointError(f"{path} is a '{state['meta'].get('kind')}' checkpoint, expected '{kind}'")
    if verify:
        verify_weights(state, path)
    return state
