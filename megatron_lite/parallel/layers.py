"""Tensor-parallel Linear and Embedding layers, and the shard metadata the checkpoint code reads.

Every parameter carries ``partition_dim`` (None: replicated over tp; else the dim split
over tp) and ``partition_chunks`` (the full tensor along ``partition_dim`` is this many
equal blocks, each split over tp on its own: 2 for a fused [gate; up] weight). The
full (tp = 1) layout is canonical; ``shard_tensor`` and ``merge_shards`` move between them.
At tp = 1 these layers compute exactly what ``nn.Linear`` / ``nn.Embedding`` do.

Grouped rows (a fused QKV weight of grouped-query attention): ``partition_groups`` G says
the full tensor along dim 0 is G equal groups, and ``replicated_rows`` R that the last R
rows of each group (that group's k and v) must stay whole. With tp <= G each rank holds
G / tp whole groups, an ordinary contiguous split. With tp = r x G the r consecutive ranks
of group g split its other rows r ways and each keeps a copy of its R rows: the parameter's
``tp_replicas`` is then r, and the copies' gradients are summed over those r ranks
(``allreduce_replicated_grads``) so they stay identical.
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


def set_partition(
    param: nn.Parameter,
    partition_dim: int | None,
    partition_chunks: int = 1,
    partition_groups: int = 1,
    replicated_rows: int = 0,
) -> nn.Parameter:
    if (partition_groups > 1 or replicated_rows > 0) and (partition_dim != 0 or partition_chunks != 1):
        # The replicated rows must be a contiguous tail of the flat gradient (ZeRO slices it flat).
        raise ValueError("grouped rows (partition_groups / replicated_rows) need partition_dim=0 and one chunk")
    param.partition_dim = partition_dim
    param.partition_chunks = partition_chunks
    param.partition_groups = partition_groups
    param.replicated_rows = replicated_rows
    return param


_LAYOUT_DEFAULTS = {"partition_dim": None, "partition_chunks": 1, "partition_groups": 1, "replicated_rows": 0}


def layout_of(source) -> dict:
    """The four layout fields of a parameter (its attributes) or of a checkpoint manifest entry (a dict),
    as keyword arguments for ``shard_tensor``, ``merge_shards`` and ``full_shape``; missing ones take
    their defaults, so manifests written before grouped rows existed read unchanged."""
    if isinstance(source, dict):
        return {key: source.get(key, default) for key, default in _LAYOUT_DEFAULTS.items()}
    return {key: getattr(source, key, default) for key, default in _LAYOUT_DEFAULTS.items()}


def tp_replicas(tp: int, partition_groups: int = 1, replicated_rows: int = 0) -> int:
    """How many consecutive tp ranks hold a copy of each group's replicated rows (1: no copies)."""
    if replicated_rows == 0 or tp <= partition_groups:
        return 1
    if tp % partition_groups:
        raise ValueError(
            f"tensor-parallel size {tp} is larger than the {partition_groups} row groups but not a multiple "
            f"of them; each group's replicated rows need a whole number of ranks"
        )
    return tp // partition_groups


def _grouped_sizes(rows: int, tp: int, groups: int, replicated: int) -> tuple[int, int]:
    """(rows of a group split over its ranks, rows per rank of that part) when groups are replicated."""
    replicas = tp_replicas(tp, groups, replicated)
    if rows % groups or rows // groups < replicated or (rows // groups - replicated) % replicas:
        raise ValueError(
            f"dim 0 of size {rows} does not split into {groups} groups of {replicated} replicated rows "
            f"plus rows divisible by {replicas} tensor-parallel ranks"
        )
    split = rows // groups - replicated
    return split, split // replicas


def full_shape(local_shape, tp: int, partition_dim=None, partition_chunks=1, partition_groups=1,
               replicated_rows=0) -> list[int]:
    """The full (tp = 1) shape of a tp rank's shard."""
    shape = list(local_shape)
    if partition_dim is None:
        return shape
    replicas = tp_replicas(tp, partition_groups, replicated_rows)
    if replicas == 1:
        shape[partition_dim] *= tp
    else:  # one group per rank: a 1/replicas part of its split rows, then its replicated rows
        per_group = (shape[partition_dim] - replicated_rows) * replicas + replicated_rows
        shape[partition_dim] = partition_groups * per_group
    return shape


def shard_tensor(full: torch.Tensor, partition_dim: int | None, partition_chunks: int, tp_rank: int, tp: int,
                 partition_groups: int = 1, replicated_rows: int = 0):
    """This rank's shard of a full tensor: each of ``partition_chunks`` blocks split over tp, rejoined;
    with replicated groups, its part of its group's split rows followed by the group's replicated rows."""
    if partition_dim is None or tp == 1:
        return full
    replicas = tp_replicas(tp, partition_groups, replicated_rows)
    if replicas > 1:
        split, per_rank = _grouped_sizes(full.shape[0], tp, partition_groups, replicated_rows)
        group = full.chunk(partition_groups, dim=0)[tp_rank // replicas]
        part = group[(tp_rank % replicas) * per_rank : (tp_rank % replicas + 1) * per_rank]
        return torch.cat([part, group[split:]], dim=0)
    blocks = full.chunk(partition_chunks, dim=partition_dim)
    if any(b.shape[partition_dim] % tp for b in blocks) or full.shape[partition_dim] % partition_chunks:
        raise ValueError(
            f"dim {partition_dim} of size {full.shape[partition_dim]} does not split into "
            f"{partition_chunks} block(s) x {tp} tensor-parallel ranks"
        )
    if partition_groups % tp and tp < partition_groups:
        raise ValueError(f"{partition_groups} row groups do not split over {tp} tensor-parallel ranks")
    return torch.cat([b.chunk(tp, dim=partition_dim)[tp_rank] for b in blocks], dim=partition_dim)


def merge_shards(shards: list[torch.Tensor], partition_dim: int | None, partition_chunks: int,
                 partition_groups: int = 1, replicated_rows: int = 0) -> torch.Tensor:
    """The full tensor from every rank's shard, tp rank order; the exact inverse of ``shard_tensor``.
    Replicated rows must be identical on every rank that holds them: a difference means the copies
    drifted apart (their gradients were not summed), and picking one would hide it."""
    if partition_dim is None or len(shards) == 1:
        return shards[0]
    replicas = tp_replicas(len(shards), partition_groups, replicated_rows)
    if replicas > 1:
        return torch.cat([_merge_group(shards[g * replicas : (g + 1) * replicas], replicated_rows, g)
                          for g in range(partition_groups)], dim=0)
    per_rank = [s.chunk(partition_chunks, dim=partition_dim) for s in shards]
    blocks = [torch.cat([pieces[c] for pieces in per_rank], dim=partition_dim) for c in range(partition_chunks)]
    return torch.cat(blocks, dim=partition_dim)


def _merge_group(shards: list[torch.Tensor], replicated_rows: int, group: int) -> torch.Tensor:
    split = shards[0].shape[0] - replicated_rows
    copies = [s[split:] for s in shards]
    if any(not torch.equal(c, copies[0]) for c in copies[1:]):
        raise ValueError(
            f"the replicated rows of group {group} differ between the tensor-parallel ranks that hold copies; "
            f"the shards were not saved from one consistent model"
        )
    return torch.cat([s[:split] for s in shards] + [copies[0]], dim=0)


def replicated_part(tensor: torch.Tensor, param) -> torch.Tensor:
    """The rows of this rank's shard (or of its gradient) that other tp ranks hold copies of: a view."""
    return tensor.narrow(0, tensor.shape[0] - param.replicated_rows, param.replicated_rows)


def allreduce_replicated_grads(params, replica_group: dist.ProcessGroup | None, comm_stats=None) -> None:
    """Sum the gradients of replicated rows over the ranks sharing them (``replica_group``, one
    set of consecutive tp ranks): each rank's copy only saw its own query heads' use of the
    rows. One flat all-reduce; call once per step, after backward and before clipping."""
    params = [p for p in params if getattr(p, "tp_replicas", 1) > 1 and p.grad is not None]
    if not params:
        return
    replicas = params_replicas(params)
    if _world(replica_group) != replicas:
        raise ValueError(
            f"parameters hold copies on {replicas} tensor-parallel ranks but the replica group has "
            f"{_world(replica_group)}; build the dims with ParallelDims.initialize, which creates the replica groups"
        )
    grads = [replicated_part(p.grad, p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=replica_group)
    if comm_stats is not None:
        comm_stats.record("tp", "all_reduce", flat.numel() * flat.element_size(), _world(replica_group))
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def params_replicas(params) -> int:
    """The replica count the parameters share (1 when none is replicated)."""
    counts = {getattr(p, "tp_replicas", 1) for p in params} - {1}
    if len(counts) > 1:
        raise ValueError(f"parameters are replicated over different numbers of ranks {sorted(counts)}")
    return counts.pop() if counts else 1


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
    shard = shard_tensor(full, tp_rank=_rank(group), tp=_world(group), **layout_of(param))
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
        partition_groups: int = 1,
        replicated_rows: int = 0,
    ):
        """``partition_groups`` / ``replicated_rows``: output rows in groups whose last rows are
        copied rather than split when tp exceeds the group count (see the module docstring)."""
        super().__init__()
        world = _world(group)
        self.group, self.sequence_parallel, self.gather_output = group, sequence_parallel, gather_output
        self.in_features, self.out_features = in_features, out_features
        layout = dict(partition_dim=0, partition_chunks=partition_chunks, partition_groups=partition_groups,
                      replicated_rows=replicated_rows)
        self.tp_replicas = tp_replicas(world, partition_groups, replicated_rows)
        if self.tp_replicas > 1 and gather_output:
            raise ValueError("gather_output would repeat the replicated rows; gather only unreplicated outputs")
        local_out = self._local_out(out_features, world, partition_chunks, partition_groups, replicated_rows)
        self.weight = set_partition(nn.Parameter(torch.zeros(local_out, in_features, device=device)), **layout)
        self.bias = None
        if bias:
            self.bias = set_partition(nn.Parameter(torch.zeros(local_out, device=device)), **layout)
        for p in self.parameters():
            p.tp_replicas = self.tp_replicas

    def _local_out(self, out_features: int, world: int, chunks: int, groups: int, replicated_rows: int) -> int:
        if self.tp_replicas > 1:
            _, per_rank = _grouped_sizes(out_features, world, groups, replicated_rows)
            return per_rank + replicated_rows
        if out_features % (world * chunks) != 0:
            raise ValueError(
                f"out_features={out_features} does not split into {chunks} block(s) x {world} "
                f"tensor-parallel ranks; make it a multiple of {world * chunks}"
            )
        if world > 1 and world < groups and groups % world:
            raise ValueError(f"the {groups} row groups do not split over {world} tensor-parallel ranks")
        return out_features // world

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
