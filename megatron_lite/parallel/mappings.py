"""Every tensor-parallel collective, as small autograd pairs whose backward is the forward's dual.

Each function takes the group explicitly; with ``group=None`` (tp = 1) it is the identity.
The last dimension is the hidden/feature dimension; the sequence dimension is dim 1
of a (B, T, H) activation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.collectives import all_reduce, group_rank, group_size

SEQUENCE_DIM = 1


def _summed_copy(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum over ``group`` in a new tensor: autograd may still need ``x`` as it is."""
    if group_size(group) == 1:
        return x
    return all_reduce(x.contiguous().clone(), group)


def _split(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {world} tensor-parallel ranks")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if dist.get_backend(group) == "gloo":
        # gloo has no reduce-scatter: all-reduce, then keep this rank's slice.
        return _split(_summed_copy(x, group), dim, group)
    parts = [p.contiguous() for p in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _summed_copy(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _summed_copy(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    """Forward: this rank's slice of ``dim``. Backward: all-gather along ``dim``."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather along ``dim``. Backward: this rank's slice (what follows computes the
    whole gradient on every rank)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        # The gathered sequence feeds a tensor-parallel matmul: each rank's gradient is a partial sum.
        return _reduce_scatter(grad, SEQUENCE_DIM, ctx.group), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQUENCE_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQUENCE_DIM, ctx.group), None


def copy_to_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce (the input fans out to every tp rank's shard)."""
    return x if group is None else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: all-reduce partial sums. Backward: identity."""
    return x if group is None else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the last dim."""
    return x if group is None else _ScatterToRegion.apply(x, group, -1)


def gather_from_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: all-gather the last dim. Backward: keep this rank's slice."""
    return x if group is None else _GatherFromRegion.apply(x, group, -1)


def scatter_to_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: keep this rank's sequence slice. Backward: all-gather along the sequence."""
    return x if group is None else _ScatterToRegion.apply(x, group, SEQUENCE_DIM)


def gather_from_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: all-gather along the sequence. Backward: reduce-scatter along the sequence."""
    return x if group is None else _GatherFromSequenceRegion.apply(x, group)


def gather_replicated_from_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: all-gather along the sequence. Backward: keep this rank's sequence slice (what
    follows is computed identically on every tp rank, e.g. per-position scores of a value head)."""
    return x if group is None else _GatherFromRegion.apply(x, group, SEQUENCE_DIM)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Forward: reduce-scatter along the sequence. Backward: all-gather along the sequence."""
    return x if group is None else _ReduceScatterToSequenceRegion.apply(x, group)
