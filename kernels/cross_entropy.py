"""Cross-entropy over low-precision logits without an fp32 copy of the (tokens, vocab) matrix.

``F.cross_entropy(logits.float(), ...)`` first writes a float32 copy of every logit (for a
50k vocabulary and 16k tokens, 3.2 GB). Here a program streams one row's logits in chunks of
the vocabulary, keeping a running max and running sum of exponentials in fp32 (the same
online log-sum-exp as attention), and writes three fp32 numbers per row: the max, the sum of
exponentials relative to it, and the target's logit. The backward streams the row again and
writes softmax - one_hot, scaled by the row's loss gradient, in the logits' dtype.

The logits may be one tensor-parallel rank's shard of the vocabulary (columns ``vocab_start``
onwards; columns at or past the true vocabulary size are padding and take no part). Then the
per-row numbers of all ranks are combined with one max and one sum all-reduce, as in
Megatron-LM's vocab-parallel loss, and every rank's backward needs only its own shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._common import LaunchTuner, check_device, interpreting, new_output


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, ROW_MAX, SUM_EXP, TARGET_LOGIT, stride_row, n_valid, vocab_start, ignore_index,
                   BLOCK_V: tl.constexpr):
    """Columns [0, n_valid) are real (the rest padding); a shard with none keeps max -inf, sum 0."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    running_max = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    running_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for start in range(0, n_valid, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))  # finite: every chunk holds a real logit
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    target = tl.load(TARGETS + row)
    local = target - vocab_start
    mine = (target != ignore_index) & (local >= 0) & (local < n_valid)
    target_logit = tl.load(base + tl.where(mine, local, 0), mask=mine, other=0.0).to(tl.float32)
    tl.store(ROW_MAX + row, running_max)
    tl.store(SUM_EXP + row, running_sum)
    tl.store(TARGET_LOGIT + row, target_logit)


@triton.jit
def _ce_bwd_kernel(LOGITS, TARGETS, LSE, DLOSS, DLOGITS, stride_row, stride_drow, n_cols, n_valid, vocab_start,
                   ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    local = target - vocab_start  # matches no column when the target lives on another rank
    lse = tl.load(LSE + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(DLOSS + row).to(tl.float32))
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        softmax = tl.where(cols < n_valid, tl.exp(x - lse), 0.0)  # padding columns: no gradient
        grad = (softmax - tl.where(cols == local, 1.0, 0.0)) * scale
        tl.store(DLOGITS + row * stride_drow + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


# Launch settings (BLOCK_V, num_warps), the default first: longer chunks mean fewer row
# reductions (each a barrier) per row, shorter ones more programs per SM. On GPU each shape's
# first call times them (LaunchTuner) and keeps the fastest.
LAUNCH_SETTINGS = ((4096, 8), (2048, 4), (8192, 16), (16384, 16), (16384, 32))
_fwd_tuner, _bwd_tuner = LaunchTuner(), LaunchTuner()


def launch_settings(width: int) -> list[tuple[int, int]]:
    """The settings for rows of ``width`` columns: chunks no longer than the row, no repeats."""
    if interpreting():
        return [(min(triton.next_power_of_2(max(width, 1)), 128), 4)]
    return list(dict.fromkeys((min(triton.next_power_of_2(max(width, 1)), block), warps)
                              for block, warps in LAUNCH_SETTINGS))


def forward_stats(logits, targets, vocab_start: int, n_valid: int, ignore_index: int, setting=None):
    """Per row of ``logits`` (rows, V_local): (max, sum of exp(x - max), target logit or 0), fp32."""
    n_rows = logits.shape[0]
    outputs = tuple(new_output((n_rows,), torch.float32, logits.device) for _ in range(3))

    def launch(chosen: tuple[int, int]) -> None:
        block, warps = chosen
        _ce_fwd_kernel[(n_rows,)](logits, targets, *outputs, logits.stride(0), n_valid, vocab_start, ignore_index,
                                  BLOCK_V=block, num_warps=warps)

    if n_rows:
        key = (logits.shape[1], n_valid, triton.next_power_of_2(n_rows), logits.dtype, logits.device)
        launch(setting or _fwd_tuner.pick(key, lambda: launch_settings(n_valid), launch))
    return outputs


def backward_grad(logits, targets, lse, dloss, vocab_start: int, n_valid: int, ignore_index: int, setting=None):
    """(softmax - one_hot) * dloss per row, padding columns 0, in the logits' dtype."""
    n_rows, n_cols = logits.shape
    dlogits = new_output((n_rows, n_cols), logits.dtype, logits.device)

    def launch(chosen: tuple[int, int]) -> None:
        block, warps = chosen
        _ce_bwd_kernel[(n_rows,)](logits, targets, lse, dloss, dlogits, logits.stride(0), dlogits.stride(0), n_cols,
                                  n_valid, vocab_start, ignore_index, BLOCK_V=block, num_warps=warps)

    if n_rows:
        key = (n_cols, n_valid, triton.next_power_of_2(n_rows), logits.dtype, logits.device)
        launch(setting or _bwd_tuner.pick(key, lambda: launch_settings(n_cols), launch))
    return dlogits


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_size: int, group, ignore_index: int):
        """logits (rows, V_local), this rank's columns of the vocabulary; targets (rows,) global ids."""
        n_rows, n_cols = logits.shape
        rank = 0 if group is None else dist.get_rank(group)
        vocab_start = rank * n_cols
        n_valid = max(0, min(n_cols, vocab_size - vocab_start))
        row_max, sum_exp, target_logit = forward_stats(logits, targets, vocab_start, n_valid, ignore_index)
        if group is not None and dist.get_world_size(group) > 1:
            local_max = row_max.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([sum_exp * torch.exp(local_max - row_max), target_logit])  # rescaled to the global max
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target_logit = sums
        lse = row_max + torch.log(sum_exp)
        loss = (lse - target_logit).masked_fill(targets == ignore_index, 0.0)
        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start, ctx.n_valid, ctx.ignore_index = vocab_start, n_valid, ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        dlogits = backward_grad(logits, targets, lse, dloss.contiguous(), ctx.vocab_start, ctx.n_valid,
                                ctx.ignore_index)
        return dlogits, None, None, None, None


def _check(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"cross_entropy needs logits of shape (tokens, vocab), got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"cross_entropy supports float16, bfloat16 and float32 logits, got {logits.dtype}")
    if targets.shape != logits.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be integer class ids of shape ({logits.shape[0]},), got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of mean, sum, none")
    check_device(logits, targets)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= logits.shape[1]))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"target {first} is outside the vocabulary [0, {logits.shape[1]}) and is not "
                         f"ignore_index={ignore_index}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (tokens, vocab) against class ids (tokens,), in fp32; differentiable.

    Rows whose target is ``ignore_index`` add nothing; "mean" divides by the rows that count
    (and gives 0, not PyTorch's NaN, when every row is ignored).
    The loss is float32 whatever the logits' dtype; the logits' gradient has the logits' dtype.
    """
    _check(logits, targets, ignore_index, reduction)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    losses = _CrossEntropyFunction.apply(logits, targets.contiguous(), logits.shape[1], None, int(ignore_index))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum().clamp(min=1)


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                                 group: dist.ProcessGroup | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss (...,) in float32 from logits (..., V_padded / tp), this rank's vocabulary shard.

    The model's loss path: rank r of ``group`` holds columns [r * V_local, (r + 1) * V_local) of
    the padded vocabulary; columns at or past ``vocab_size`` are padding (no probability, no
    gradient); labels equal to ``ignore_index`` give 0. Labels are not range-checked here (that
    would stop the host every step); a label outside the vocabulary gets the loss of a logit of 0.
    """
    if logits.dim() < 1 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)} "
                         f"(labels must have the logits' shape without the vocabulary dimension)")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"vocab_parallel_cross_entropy supports float16, bfloat16 and float32 logits, got {logits.dtype}")
    check_device(logits, labels)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    loss = _CrossEntropyFunction.apply(flat, labels.reshape(-1).contiguous(), int(vocab_size), group, int(ignore_index))
    return loss.view(labels.shape)
