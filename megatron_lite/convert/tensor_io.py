"""A lazy Hugging Face tensor source and a sharded safetensors sink for streaming conversion.

(A megatron-lite checkpoint is read through ``training.checkpoint.ShardReader``.)
``HFWeights`` serves tensors of a Hugging Face directory through ``safe_open``.
``SafetensorsShardWriter`` writes tensors into shards of at most ``max_shard_bytes`` as
they arrive, with the index file Hugging Face expects when there is more than one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_lite.errors import UserError


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ConversionError(UserError, ValueError):
    """An input the conversion cannot use (wrong directory, unsupported model, mismatched files)."""


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ConversionError(f"shard size {size!r} is not a size such as 5GB, 500MB, 2GiB or a byte count")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConversionError(f"shard size must be positive, got {size!r}")
    return value


# ----------------------------------------------------------------------------- Hugging Face source


class HFWeights:
    """Tensors of a Hugging Face model directory (``model.safetensors`` or a sharded index)."""

    def __init__(self, hf_dir: str | Path):
        self.directory = Path(hf_dir)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConversionError(
                f"{self.directory} is not a Hugging Face model directory: it has no config.json "
                f"(save one with model.save_pretrained(DIR))"
            )
        self.config = json.loads(config_path.read_text())
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        single = self.directory / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        raise ConversionError(
            f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are read "
            f"(re-save the model with model.save_pretrained(DIR, safe_serialization=True))"
        )

    def _stored_name(self, name: str) -> str | None:
        """Files saved from the base model (GPT-2 on the Hub) drop the ``transformer.`` / ``model.`` prefix."""
        if name in self.weight_map:
            return name
        unprefixed = name.split(".", 1)[-1]
        return unprefixed if unprefixed in self.weight_map else None

    def check_complete(self, names: list[str]) -> None:
        missing = [n for n in names if self._stored_name(n) is None]
        if missing:
            raise ConversionError(
                f"{self.directory} lacks {len(missing)} tensors the config implies, e.g. {missing[:3]}; "
                f"the weights do not belong to this config.json"
            )

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = self._stored_name(name)
        if stored is None:
            raise ConversionError(f"{self.directory} has no tensor {name!r}")
        file_name = self.weight_map[stored]
        if file_name not in self._handles:
            self._handles[file_name] = safe_open(self.directory / file_name, framework="pt")
        return self._handles[file_name].get_tensor(stored)


# ----------------------------------------------------------------------------- safetensors sink


class SafetensorsShardWriter:
    """Collects tensors and writes a shard whenever the next batch would overflow ``max_shard_bytes``."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queue tensors in order; a shard closes before the tensor that would overflow it (a single
        tensor larger than ``max_shard_bytes`` gets a shard of its own)."""
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[name] = tensor
            self._pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        temp_name = f"shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(self.out_dir / temp_name), metadata={"format": "pt"})
        self._written.append((temp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards (``model.safetensors`` alone, else ``model-0000i-of-0000n``) and write the index."""
        if self._pending:
            self._flush()
        count = len(self._written)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (temp_name, tensor_names), final in zip(self._written, names):
            os.replace(self.out_dir / temp_name, self.out_dir / final)
            weight_map.update({n: final for n in tensor_names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
