"""The global gradient norm over tensor, pipeline and (ZeRO) data parallel ranks, and clipping.

Each element of the model's gradient must be counted exactly once:
- a tp-sharded parameter (``partition_dim`` set) holds a different piece on every tp rank:
  summed over tp;
- a replicated parameter (``partition_dim`` None) holds the same gradient on every tp rank:
  counted on tp rank 0 only;
- pipeline stages hold different layers: summed over pp;
- the copies of a tied embedding (``shared_embedding``) hold the same gradient after
  ``sync_tied_embedding_grads``: counted on pipeline rank 0 (the first stage's copy) only, so
  it does not matter whether the flag marks the last stage's copy alone or both;
- under ZeRO-1 each dp rank holds a different slice of the reduced gradient: summed over dp.
  Without ZeRO all dp ranks hold the same gradient; pass ``dp_group=None``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from megatron_lite.parallel.comm_stats import CommStats, record


def _counted_here(item, tp_rank: int, pp_rank: int) -> bool:
    if getattr(item, "shared_embedding", False) and pp_rank != 0:
        return False
    return getattr(item, "partition_dim", None) is not None or tp_rank == 0


def _device_of(params: list) -> torch.device:
    """Where the norm lives; a rank without gradients still joins the all-reduces there (NCCL needs CUDA)."""
    for p in params:
        if p.grad is not None:
            return p.grad.device
    return getattr(params[0], "device", torch.device("cpu")) if params else torch.device("cpu")


def global_grad_norm(
    params: Iterable,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    comm_stats: CommStats | None = None,
) -> torch.Tensor:
    """L2 norm (fp32 scalar tensor) of the whole model's gradient. ``params`` are parameters or
    ``data_parallel.GradShard``s: anything with ``.grad`` and the layout attributes."""
    params = list(params)
    items = [p for p in params if p.grad is not None]
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    pp_rank = 0 if pp_group is None else dist.get_rank(pp_group)
    device = _device_of(params)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for item in items:
        if _counted_here(item, tp_rank, pp_rank):
            total += item.grad.detach().float().pow(2).sum()
    for kind, group in (("tp", tp_group), ("pp", pp_group), ("dp", dp_group)):
        if group is not None:
            dist.all_reduce(total, group=group)
            record(comm_stats, kind, "all_reduce", total.element_size(), dist.get_world_size(group))
    return total.sqrt()


def clip_grad_norm(
    params: Iterable,
    max_norm: float,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    dp_group_if_zero1: dist.ProcessGroup | None = None,
    comm_stats: CommStats | None = None,
) -> float:
    """Scale the gradients so their global norm is at most ``max_norm``; return the norm before.

    ``max_norm=0`` only measures. A non-finite norm leaves the gradients alone (the caller
    skips the step, as the fp16 loss scaler does on overflow).
    """
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    items = [p for p in params if p.grad is not None]
    norm = global_grad_norm(items, tp_group, pp_group, dp_group_if_zero1, comm_stats).item()
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for item in items:
            item.grad.mul_(scale)
    return norm
