"""nnU-Net checkpoints written atomically, so a run killed at any moment can be continued with ``--c``.

nnU-Net writes ``checkpoint_latest.pth`` / ``checkpoint_best.pth`` / ``checkpoint_final.pth`` with a plain
``torch.save`` onto the final name. A job killed during that write (a cluster's SIGKILL at the end of its time
slot, an out-of-memory kill) leaves a torn file, and ``nnUNetv2_train ... --c`` then fails in ``torch.load`` with
``EOFError: Ran out of input``: the run cannot be continued at all. :class:`AtomicCheckpointMixin` lets nnU-Net
write to a hidden temporary sibling and moves it onto the final name with ``os.replace``, so the checkpoint on
disk is always the previous complete one or the new complete one.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..utils.atomic import atomic_path


class AtomicCheckpointMixin:
    """Put before the nnU-Net trainer class: ``class MyTrainer(AtomicCheckpointMixin, nnUNetTrainer)``."""

    def save_checkpoint(self, filename: str) -> None:
        # only rank 0 writes (nnU-Net's own rule); other ranks must not move an empty temporary file into place
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        target = Path(filename)
        _remove_torn_temporaries(target)
        with atomic_path(target) as tmp:
            super().save_checkpoint(str(tmp))


def _remove_torn_temporaries(target: Path) -> None:
    """Temporaries of ``target`` left by a process killed during a save (atomic_path's ``.NAME.*.tmp``).

    Only one trainer writes a fold folder, so any such file is stale; each can be as big as a checkpoint."""
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass


__all__ = ["AtomicCheckpointMixin"]
