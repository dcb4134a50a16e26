"""Cross-entropy over low-precision logits without an fp32 copy of the (tokens, vocab) matrix.

``F.cross_entropy(logits.float(), ...)`` first writes a float32 copy of every logit (for a
50k vocabulary and 16k tokens, 3.2 GB). Here a program streams one row's logits in chunks of
the vocabulary, keeping a running max and running sum of exponentials in fp32 (the same
online log-sum-exp as attention), and saves one fp32 log-sum-exp per row. The backward streams
the row again and writes softmax - one_hot, scaled by the row's loss gradient, in the logits'
dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, new_output


@triton.jit
def _ce_fwd_kernel(LOGITS, TARGETS, LOSS, LSE, stride_row, n_vocab, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    running_max = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    running_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, 0))  # finite: every chunk holds a real logit
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    target_logit = tl.load(base + tl.where(ignored, 0, target)).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - target_logit))
    tl.store(LSE + row, lse)


@triton.jit
def _ce_bwd_kernel(LOGITS, TARGETS, LSE, DLOSS, DLOGITS, stride_row, stride_drow, n_vocab, ignore_index,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(DLOSS + row).to(tl.float32))
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        mask = cols < n_vocab
        x = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        tl.store(DLOGITS + row * stride_drow + cols, grad.to(DLOGITS.dtype.element_ty), mask=mask)


def _block_v(n_vocab: int) -> int:
    return min(triton.next_power_of_2(n_vocab), 128 if interpreting() else 4096)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int):
        n_rows, n_vocab = logits.shape
        loss = new_output((n_rows,), torch.float32, logits.device)
        lse = new_output((n_rows,), torch.float32, logits.device)
        _ce_fwd_kernel[(n_rows,)](logits, targets, loss, lse, logits.stride(0), n_vocab, ignore_index,
                                  BLOCK_V=_block_v(n_vocab), num_warps=8)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        n_rows, n_vocab = logits.shape
        dlogits = new_output((n_rows, n_vocab), logits.dtype, logits.device)
        _ce_bwd_kernel[(n_rows,)](logits, targets, lse, dloss.contiguous(), dlogits, logits.stride(0),
                                  dlogits.stride(0), n_vocab, ctx.ignore_index, BLOCK_V=_block_v(n_vocab), num_warps=8)
        return dlogits, None, None


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
    losses = _CrossEntropyFunction.apply(logits, targets.contiguous(), int(ignore_index))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum().clamp(min=1)
