"""Tensor-parallel Linear and Embedding layers, and the shard metadata the checkpoint code reads.

Every parameter carries ``partition_dim`` (None: replicated over tp; else the dim split
over tp) and ``partition_chunks`` (the full tensor along ``partition_dim`` is this many
equal blocks, each split over tp on its own: 2 for a fused [gate; up] weight). The
full (tp = 1) layout is canonical; ``shard_tensor`` and ``merge_shards`` move between them.
At tp = 1 these layers compute exactly what ``nn.Linear`` / ``nn.Embedding`` do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel.mappings import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_sequence_region,
)


def set_partition(param: nn.Parameter, partition_dim: int | None, partition_chunks: int = 1) -> nn.Parameter:
    param.partition_dim = partition_dim
    param.partition_chunks = partition_chunks
    return param


def shard_tensor(full: torch.Tensor, partition_dim: int | None, partition_chunks: int, tp_rank: int, tp: int):
    """This rank's shard of a full tensor: each of ``partition_chunks`` blocks split over tp, rejoined."""
    if partition_dim is None or tp == 1:
        return full
    blocks = full.chunk(partition_chunks, dim=partition_dim)
    if any(b.shape[partition_dim] % tp for b in blocks) or full.shape[partition_dim] % partition_chunks:
        raise ValueError(
            f"dim {partition_dim} of size {full.shape[partition_dim]} does not split into "
            f"{partition_chunks} block(s) x {tp} tensor-parallel ranks"
        )
    return torch.cat([b.chunk(tp, dim=partition_dim)[tp_rank] for b in blocks], dim=partition_dim)


def merge_shards(shards: list[torch.Tensor], partition_dim: int | None, partition_chunks: int) -> torch.Tensor:
    """The full tensor from every rank's shard, tp rank order; the exact inverse of ``shard_tensor``."""
    if partition_dim is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(partition_chunks, dim=partition_dim) for s in shards]
    blocks = [torch.cat([pieces[c] for pieces in per_rank], dim=partition_dim) for c in range(partition_chunks)]
    return torch.cat(blocks, dim=partition_dim)


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _divide(size: int, world: int, what: str) -> int:
    if size % world != 0:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size {world}")
    return size // world


def fill_from_full_(param: nn.Parameter, full: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Copy this rank's shard of ``full`` into ``param``, following the param's metadata."""
    shard = shard_tensor(full, param.partition_dim, param.partition_chunks, _rank(group), _world(group))
    with torch.no_grad():
        param.copy_(shard)


def column_parallel_linear(x, weight, bias, group, sequence_parallel: bool, gather_output: bool = False):
    """y = x W^T + b with W split by output rows; x is full (or the sequence shard when sequence-parallel)."""
    x = gather_from_sequence_region(x, group) if sequence_parallel else copy_to_region(x, group)
    y = F.linear(x, weight, bias)
    return gather_from_region(y, group) if gather_output else y


class ColumnParallelLinear(nn.Module):
    """Linear whose output features are split over tp: weight (out/tp, in)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        partition_chunks: int = 1,
        device: torch.device | None = None,
    ):
        super().__init__()
        world = _world(group)
        self.group, self.sequence_parallel, self.gather_output = group, sequence_parallel, gather_output
        self.in_features, self.out_features = in_features, out_features
        if out_features % (world * partition_chunks) != 0:
            raise ValueError(
                f"out_features={out_features} does not split into {partition_chunks} block(s) x {world} "
                f"tensor-parallel ranks; make it a multiple of {world * partition_chunks}"
            )
        local_out = out_features // world
        self.weight = set_partition(nn.Parameter(torch.zeros(local_out, in_features, device=device)), 0, partition_chunks)
        self.bias = None
        if bias:
            self.bias = set_partition(nn.Parameter(torch.zeros(local_out, device=device)), 0, partition_chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.group, self.sequence_parallel, self.gather_output)


class RowParallelLinear(nn.Module):
    """Linear whose input features are split over tp: weight (out, in/tp); the input arrives split."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group: dist.ProcessGroup | None = None,
        sequence_parallel: bool = False,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        local_in = _divide(in_features, _world(group), "in_features")
        self.weight = set_partition(nn.Parameter(torch.zeros(out_features, local_in, device=device)), 1)
        self.bias = None
        if bias:
            self.bias = set_partition(nn.Parameter(torch.zeros(out_features, device=device)), None)
            # Added after the reduce-scatter, so under sequence parallelism each rank sees only its
            # sequence shard's gradient: the reducer must sum it over tp.
            self.bias.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in/tp)
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(partial, self.group)
        else:
            y = reduce_from_region(partial, self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over tp: weight (V/tp, H).

    Each rank looks up the ids in its row range, zeros the rest, and the all-reduce
    sums the one non-zero contribution per token.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local_rows = _divide(num_embeddings, _world(group), "num_embeddings")
        self.vocab_start = _rank(group) * local_rows
        self.vocab_end = self.vocab_start + local_rows
        self.weight = set_partition(nn.Parameter(torch.zeros(local_rows, embedding_dim, device=device)), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T) -> (B, T, H)
        if self.group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(partial, self.group)
