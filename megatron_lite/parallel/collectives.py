"""The few collective helpers every module of ``parallel`` shares.

A group of ``None`` stands for a degree of 1 (tp = 1, no pipeline, no data parallelism):
every helper is then the identity, so callers need no ``if group is not None`` of their own.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from megatron_lite.parallel.comm_stats import CommStats, record


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` and return it."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_flat(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None,
    comm_stats: CommStats | None = None,
    kind: str = "tp",
) -> None:
    """Sum every tensor over ``group`` in place with one all-reduce: flatten them into one buffer,
    all-reduce it, copy the sums back (one call instead of one per small tensor). ``kind`` names
    the group for ``comm_stats``."""
    if group is None or not tensors:
        return
    if len(tensors) == 1 and tensors[0].is_contiguous():  # nothing to gather: reduce in place, no copy
        flat = tensors[0]
        dist.all_reduce(flat, group=group)
    else:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
    record(comm_stats, kind, "all_reduce", flat.numel() * flat.element_size(), group_size(group))


def sum_over_replicas(values: torch.Tensor, dims) -> torch.Tensor:
    """Values only the last pipeline stage of each data-parallel replica holds (a loss, metric sums)
    -> their sum over the replicas, on every rank. In place; ``dims`` is the rank's ``ParallelDims``."""
    if not dims.is_last_stage:
        values.zero_()
    all_reduce(values, dims.pp_group)  # only the last stage adds a non-zero value
    return all_reduce(values, dims.dp_group)
