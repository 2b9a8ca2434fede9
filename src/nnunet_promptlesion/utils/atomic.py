"""Atomic file and folder writes: a reader never sees a half-written result.

Everything is written to a temporary sibling first and moved into place with ``os.replace``
(atomic on POSIX when source and target share a filesystem, which a sibling guarantees).

The temporary file or folder gets the mode a plain ``open()`` / ``mkdir()`` would give under the process's
umask (``mkstemp`` / ``mkdtemp`` make them private, 0600 / 0700): on a shared cluster file system the group
must be able to read a dataset, a checkpoint or an evaluation like the files nnU-Net writes next to them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status, kernel >= 4.7);
    elsewhere set and restored under a lock (os.umask has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file under the current umask, as ``open(path, "w")`` creates it."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the current umask, as ``os.mkdir`` creates it."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; move it onto ``target`` on success.

    On an exception the temporary file is removed and ``target`` is left untouched. ``suffix``: ending of the
    temporary name (writers that pick a format from the name, e.g. nibabel's ".nii.gz", need the target's).
    The file has the umask's mode (see the module docstring); writers that open it again keep that mode.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(obj: Any, target: str | os.PathLike, indent: int = 2) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False)
            f.write("\n")


def write_text_atomic(text: str, target: str | os.PathLike) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; rename it to ``target`` on success.

    An existing ``target`` is refused unless ``overwrite`` is set, in which case it is only
    replaced once the new content is complete. On an exception the temporary folder is removed,
    so an interrupted run leaves nothing half-written behind.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        tmp.chmod(dir_mode())
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
