"""The global gradient norm over tensor, pipeline and (ZeRO) data parallel ranks, and clipping.

Each element of the model's gradient must be counted exactly once. After ``parallel.grad_sync``
every copy of an element holds the same gradient, so each rank asks the element's
``ParamLayout`` whether it is the one that counts it:
- a tp-sharded parameter holds a different piece on every tp rank: counted on every tp rank
  (summed over tp); a whole one holds the same gradient on every tp rank: counted on tp rank 0
  (``counts_in_grad_norm``);
- pipeline stages hold different layers: summed over pp; the two copies of a tied embedding
  are counted on pipeline rank 0 (the first stage's copy) only, so it does not matter whether
  the flag marks the last stage's copy alone or both;
- under ZeRO-1 each dp rank holds a different slice of the reduced gradient: summed over dp.
  Without ZeRO all dp ranks hold the same gradient; pass ``dp_group=None``;
- the replicated rows of a grouped parameter (k and v copied to the tp / num_kv_heads ranks of
  their group) are counted on the first rank of each replica set only
  (``counts_replicated_rows``). A ZeRO ``GradShard`` names its parameter and its offset in it,
  so the rows are found in a slice too.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from megatron_lite.parallel.collectives import group_rank, group_size
from megatron_lite.parallel.comm_stats import CommStats, record
from megatron_lite.parallel.layout import layout_of


def _duplicate_range(item, tp_rank: int, tp: int) -> tuple[int, int] | None:
    """Flat range of ``item.grad`` holding copies that another rank of the replica set counts."""
    layout = layout_of(item)
    if layout.counts_replicated_rows(tp_rank, tp):
        return None
    param = getattr(item, "param", None)
    param = item if param is None else param
    row_numel = param.numel() // param.shape[0]
    start = (param.shape[0] - layout.replicated_rows) * row_numel  # partition_dim 0: the rows are a flat tail
    offset = getattr(item, "offset", 0)
    lo, hi = max(start, offset) - offset, min(param.numel(), offset + item.grad.numel()) - offset
    return (lo, hi) if lo < hi else None


def _squared_sum(item, tp_rank: int, tp: int) -> torch.Tensor:
    grad = item.grad.detach().float().reshape(-1)
    duplicate = _duplicate_range(item, tp_rank, tp)
    if duplicate is None:
        return grad.pow(2).sum()
    return grad[: duplicate[0]].pow(2).sum() + grad[duplicate[1] :].pow(2).sum()


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
    ``data_parallel.GradShard``s: anything with ``.grad`` and a layout."""
    params = list(params)
    items = [p for p in params if p.grad is not None]
    tp_rank, tp, pp_rank = group_rank(tp_group), group_size(tp_group), group_rank(pp_group)
    device = _device_of(params)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for item in items:
        if layout_of(item).counts_in_grad_norm(tp_rank, pp_rank):
            total += _squared_sum(item, tp_rank, tp)
    for kind, group in (("tp", tp_group), ("pp", pp_group), ("dp", dp_group)):
        if group is not None:
            dist.all_reduce(total, group=group)
            record(comm_stats, kind, "all_reduce", total.element_size(), group_size(group))
    return total.sqrt()


def clip_grad_norm(
    params: Iterable,
    max_norm: float,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    dp_group_if_zero1: dist.ProcessGroup | None = None,
    comm_stats: CommStats | None = None,
) -> torch.Tensor:
    """Scale the gradients so their global norm is at most ``max_norm``; return the norm before
    (an fp32 scalar tensor on the gradients' device: nothing here waits for the device).

    ``max_norm=0`` only measures. A non-finite norm leaves the gradients alone (the caller
    skips the step, as the fp16 loss scaler does on overflow).
    """
    if max_norm < 0:
        raise ValueError(f"max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    items = [p for p in params if p.grad is not None]
    norm = global_grad_norm(items, tp_group, pp_group, dp_group_if_zero1, comm_stats)
    if max_norm > 0 and items:
        torch._foreach_mul_([item.grad for item in items], _clip_factor(norm, max_norm))
    return norm


def _clip_factor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``max_norm / (norm + 1e-6)`` where that clips, else exactly 1 (non-finite norms included).
    Computed in float64 and rounded once, as a Python float scale would be, so clipped gradients
    keep their bits whether the factor lives on the host or the device."""
    norm64 = norm.double()
    clips = torch.isfinite(norm64) & (norm64 > max_norm)
    return torch.where(clips, max_norm / (norm64 + 1e-6), torch.ones_like(norm64)).float()
