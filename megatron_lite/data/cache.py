"""On-disk cache for dataset indices, keyed by a hash of everything that determines them.

With torch.distributed initialised, rank 0 builds and saves while the others wait at a barrier
and then load, so a large index is computed once per job. Files are written under temporary
names and renamed, so a reader never sees a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

FORMAT_VERSION = 1


def cache_key(description: dict) -> str:
    text = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _distributed():
    """torch.distributed when a process group is up. A process that never imported torch cannot
    have one, and importing torch just to find out would cost seconds."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


class IndexCache:
    """``get_or_build(description, build, name)`` -> dict of arrays, from disk when present."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory else None
        self.hits = 0
        self.builds = 0

    def paths(self, description: dict, name: str, fields: list[str]) -> dict[str, Path]:
        key = cache_key(description)
        return {field: self.directory / f"{name}-{key}-{field}.npy" for field in fields}

    def get_or_build(self, description: dict, build: Callable[[], dict[str, np.ndarray]], name: str) -> dict[str, np.ndarray]:
        if self.directory is None:
            self.builds += 1
            return build()
        dist = _distributed()
        manifest = self.directory / f"{name}-{cache_key(description)}.json"
        if dist is None or dist.get_rank() == 0:
            if not manifest.is_file():
                self._save(manifest, description, build())
                self.builds += 1
        if dist is not None:
            dist.barrier()
        return self._load(manifest)

    def _save(self, manifest: Path, description: dict, arrays: dict[str, np.ndarray]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = manifest.with_suffix("")
        for field, array in arrays.items():
            temp = Path(f"{stem}-{field}.tmp{os.getpid()}.npy")
            np.save(temp, array)
            os.replace(temp, f"{stem}-{field}.npy")
        temp = Path(f"{manifest}.tmp{os.getpid()}")
        temp.write_text(json.dumps({"fields": sorted(arrays), "description": description}, indent=1, default=str))
        os.replace(temp, manifest)  # last: its presence means every array is complete

    def _load(self, manifest: Path) -> dict[str, np.ndarray]:
        self.hits += 1
        fields = json.loads(manifest.read_text())["fields"]
        stem = manifest.with_suffix("")
        return {field: np.load(f"{stem}-{field}.npy", mmap_mode="r") for field in fields}
