"""Writes that survive a crash: each file reaches the disk under a temporary name and is renamed
into place, so a reader sees the old content or the new, never a torn one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch


def fsync_path(path: Path) -> None:
    """Flush a file or a directory (its entries: a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def replace_directory(finished: Path, final: Path) -> None:
    """Move the complete directory ``finished`` to ``final``, replacing an older one of that name."""
    fsync_path(finished)
    if final.exists():
        stale = final.with_name(final.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(finished, final)
    fsync_path(final.parent)
