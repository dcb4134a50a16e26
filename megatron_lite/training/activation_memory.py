"""Measured activation memory: the bytes autograd keeps from forward to backward for one micro-batch.

``saved_activation_bytes(cfg, dims, micro_batch_size)`` builds this rank's model chunks as
training would (same recompute mode, precision, sequence parallelism), runs one micro-batch
forward through each under ``torch.autograd.graph.saved_tensors_hooks`` and adds up the storages
the graph holds for backward, each counted once however many views of it are saved. Parameters
are not activations and are left out; the chunk's input (token ids, or the hidden states a later
stage receives) is counted where backward keeps it. On CPU this is the activation memory; on a
GPU the allocator's peak adds workspace and transients on top.

Tensors saved inside a recomputed region are dropped by the recomputation itself, so they never
reach these hooks: the count is what each ``train.recompute`` mode really keeps. Under fp16/bf16
autocast the 16-bit weight copies a matmul keeps count as saved tensors, as they are held too.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from megatron_lite.config import Config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.setup import autocast_context, build_model_chunks


def saved_tensor_bytes(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(bytes of the distinct storages autograd saves while ``forward`` runs, its output), leaving
    out the storages of ``exclude`` (parameters)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return sum(storages.values()), output


def chunk_saved_bytes(chunk: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None, precision: str) -> int:
    """Saved bytes of one forward of ``chunk`` on ``inputs`` under ``precision``'s autocast; then
    backward, which must succeed."""
    with autocast_context(precision, inputs.device):
        saved, output = saved_tensor_bytes(lambda: chunk(inputs, labels), list(chunk.parameters()))
    output.float().sum().backward()
    return saved


def saved_activation_bytes(cfg: Config, dims: ParallelDims | None = None, micro_batch_size: int | None = None) -> int:
    """Bytes of activations this rank keeps for backward per micro-batch, summed over its model chunks.

    ``cfg``: a config with ``model.vocab_size`` set; ``dims``: this rank's place in the grid; None: one
    process holding the whole model. At tp = 1 any pipeline rank can be measured in one process with
    ``ParallelDims.for_world(cfg.parallel, world_size, rank)`` (no process groups needed); at tp > 1
    the tp ranks of the stage call it together with their real ``dims``, as their layers communicate.
    ``micro_batch_size``: None takes ``train.micro_batch_size``. The sequence is ``model.seq_length``,
    of which a rank under context parallelism holds its 1 / cp (the model places it in the sequence).
    """
    dims = dims or ParallelDims.single()
    batch = micro_batch_size or cfg.train.micro_batch_size
    seq = cfg.model.seq_length // dims.cp  # a cp rank holds two chunks of each sequence
    generator = torch.Generator().manual_seed(cfg.train.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=generator).to(dims.device)
    labels = torch.randint(0, cfg.model.vocab_size, (batch, seq), generator=generator).to(dims.device)
    # A later stage receives its sequence shard under sequence parallelism.
    hidden_length = seq // dims.tp if dims.sequence_parallel else seq
    total = 0
    for chunk in build_model_chunks(cfg, dims):
        chunk.train()
        inputs = tokens
        if not chunk.pre_process:
            inputs = torch.randn(batch, hidden_length, cfg.model.hidden_size, generator=generator)
            inputs = inputs.to(dims.device).requires_grad_()
        total += chunk_saved_bytes(chunk, inputs, labels if chunk.post_process else None, cfg.train.precision)
    return total
