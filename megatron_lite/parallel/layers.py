"""Tensor-parallel Linear and Embedding layers; each attaches its parameters' ``ParamLayout`` once.

The full (tp = 1) tensor is canonical; ``parallel.layout`` says how each parameter is cut from
it (``shard_tensor``) and joined again (``merge_shards``), including a grouped-query QKV weight
whose k and v rows are copied rather than split when tp exceeds the kv heads. At tp = 1 these
layers compute exactly what ``nn.Linear`` / ``nn.Embedding`` do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel.collectives import group_rank, group_size
from megatron_lite.parallel.layout import ParamLayout, attach_layout, layout_of
from megatron_lite.parallel.mappings import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_sequence_region,
)


def _divide(size: int, world: int, what: str) -> int:
    if size % world != 0:
        raise ValueError(f"{what}={size} is not divisible by the tensor-parallel size {world}")
    return size // world


def fill_from_full_(param: nn.Parameter, full: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """Copy this rank's shard of ``full`` into ``param``, following the param's layout."""
    shard = layout_of(param).shard_tensor(full, group_rank(group), group_size(group))
    with torch.no_grad():
        param.copy_(shard)


def _local_out(out_features: int, world: int, layout: ParamLayout) -> int:
    """Output rows of this rank's shard of a column-parallel weight."""
    if layout.tp_replicas(world) > 1:
        return layout.replicated_shard_rows(out_features, world)
    chunks, groups = layout.partition_chunks, layout.partition_groups
    if out_features % (world * chunks) != 0:
        raise ValueError(
            f"out_features={out_features} does not split into {chunks} block(s) x {world} "
            f"tensor-parallel ranks; make it a multiple of {world * chunks}"
        )
    if world > 1 and world < groups and groups % world:
        raise ValueError(f"the {groups} row groups do not split over {world} tensor-parallel ranks")
    return out_features // world


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
        *,
        bias: bool,
        group: dist.ProcessGroup | None,
        sequence_parallel: bool = False,
        gather_output: bool = False,
        device: torch.device | None = None,
        partition_chunks: int = 1,
        partition_groups: int = 1,
        replicated_rows: int = 0,
    ):
        """``partition_chunks``: the output rows are that many blocks split over tp on their own (a
        fused [gate; up]). ``partition_groups`` / ``replicated_rows``: output rows in groups whose
        last rows are copied rather than split when tp exceeds the group count (``parallel.layout``)."""
        super().__init__()
        self.group, self.sequence_parallel, self.gather_output = group, sequence_parallel, gather_output
        self.in_features, self.out_features = in_features, out_features
        layout = ParamLayout(partition_dim=0, partition_chunks=partition_chunks, partition_groups=partition_groups,
                             replicated_rows=replicated_rows)
        if layout.tp_replicas(group_size(group)) > 1 and gather_output:
            raise ValueError("gather_output would repeat the replicated rows; gather only unreplicated outputs")
        local_out = _local_out(out_features, group_size(group), layout)
        self.weight = attach_layout(nn.Parameter(torch.zeros(local_out, in_features, device=device)), layout)
        self.bias = None
        if bias:
            self.bias = attach_layout(nn.Parameter(torch.zeros(local_out, device=device)), layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.group, self.sequence_parallel, self.gather_output)


class RowParallelLinear(nn.Module):
    """Linear whose input features are split over tp: weight (out, in/tp); the input arrives split."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        group: dist.ProcessGroup | None,
        sequence_parallel: bool = False,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        local_in = _divide(in_features, group_size(group), "in_features")
        self.weight = attach_layout(nn.Parameter(torch.zeros(out_features, local_in, device=device)),
                                    ParamLayout(partition_dim=1))
        self.bias = None
        if bias:
            # Added after the reduce-scatter, so under sequence parallelism each rank sees only its
            # sequence shard's gradient: the gradient path sums it over tp.
            self.bias = attach_layout(nn.Parameter(torch.zeros(out_features, device=device)),
                                      ParamLayout(sequence_parallel=sequence_parallel))

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
        *,
        group: dist.ProcessGroup | None,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        local_rows = _divide(num_embeddings, group_size(group), "num_embeddings")
        self.vocab_start = group_rank(group) * local_rows
        self.vocab_end = self.vocab_start + local_rows
        self.weight = attach_layout(nn.Parameter(torch.zeros(local_rows, embedding_dim, device=device)),
                                    ParamLayout(partition_dim=0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: (B, T) -> (B, T, H)
        if self.group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(partial, self.group)
