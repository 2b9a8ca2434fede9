"""Append-only JSON-lines log: one JSON object per line, flushed at once so a crash loses nothing."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class JsonlLogger:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record: Any) -> None:
        record.setdefault("time", time.time())
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_to_builtin) + "\n")
            f.flush()


def _to_builtin(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
