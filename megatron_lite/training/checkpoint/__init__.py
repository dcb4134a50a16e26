"""Sharded checkpoints that resume exactly and reshard to another (tp, pp) layout.

- ``format``: names on disk, the ``Manifest``, the memory-mapped ``ShardReader`` (convert reads it too)
- ``live``: save and load of a running model, resharding on load
- ``offline``: full state dicts in and out, for conversion and offline resharding
- ``durable``: fsync and atomic renames
- ``checkpointer``: ``Checkpointer``, the one call a trainer makes to save or resume
- ``background``: ``BackgroundWriter``, the thread that writes ``checkpoint.async_save`` checkpoints
"""

from megatron_lite.training.checkpoint.background import BackgroundWriter, CheckpointWriteError
from megatron_lite.training.checkpoint.checkpointer import Checkpointer, DataPosition
from megatron_lite.training.checkpoint.format import (
    TIED_COPIES, CheckpointError, Manifest, ParamRecord, SavedLayout, ShardReader, iteration_dir_name,
    named_parameters, read_manifest, resolve_checkpoint_dir, shard_file_name,
)
from megatron_lite.training.checkpoint.live import LoadPolicy, load_checkpoint, save_checkpoint
from megatron_lite.training.checkpoint.offline import load_full_optimizer_state, load_full_state_dict, save_full_state_dict

__all__ = [
    "TIED_COPIES", "BackgroundWriter", "CheckpointError", "CheckpointWriteError", "Checkpointer", "DataPosition", "LoadPolicy", "Manifest", "ParamRecord", "SavedLayout",
    "ShardReader", "iteration_dir_name", "load_checkpoint", "load_full_optimizer_state", "load_full_state_dict",
    "named_parameters", "read_manifest", "resolve_checkpoint_dir", "save_checkpoint", "save_full_state_dict",
    "shard_file_name",
]
