"""Cross entropy over vocabulary-sharded logits that never gathers the full logits.

Per token: one max all-reduce (for a stable softmax), then one sum all-reduce of
[sum of exp, target logit]. Columns at or past ``vocab_size`` are vocabulary padding
and take no part in the softmax.

One full-size float32 tensor is written per call: the shifted logits, turned in place into
their exponentials (kept for backward with the per-row sums), then into the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.collectives import all_reduce, group_rank


def _local_row_max(logits: torch.Tensor, real_columns: int) -> torch.Tensor:
    """Float32 max over this rank's vocabulary columns, -inf on a rank that holds only padding."""
    if real_columns == 0:
        return torch.full(logits.shape[:-1], float("-inf"), dtype=torch.float32, device=logits.device)
    return logits[..., :real_columns].amax(dim=-1).float()


def _shifted_logits(logits: torch.Tensor, row_max: torch.Tensor, real_columns: int) -> torch.Tensor:
    """A new float32 tensor of logits - row_max, with -inf in the padding columns."""
    if logits.dtype == torch.float32:
        shifted = logits - row_max.unsqueeze(-1)
    else:  # the float32 copy is needed anyway, so shift it in place
        shifted = logits.float().sub_(row_max.unsqueeze(-1))
    if real_columns < shifted.shape[-1]:
        shifted[..., real_columns:] = float("-inf")
    return shifted


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_size, group, ignore_index):
        # logits: (B, T, V/tp) this rank's columns; labels: (B, T) global ids
        ctx.logits_dtype = logits.dtype
        local_vocab = logits.shape[-1]
        rank = group_rank(group)
        vocab_start = rank * local_vocab
        # Padding columns sit at the end of the vocabulary, so each rank's real columns come first.
        real_columns = min(max(vocab_size - vocab_start, 0), local_vocab)

        row_max = all_reduce(_local_row_max(logits, real_columns), group, dist.ReduceOp.MAX)  # (B, T)
        shifted = _shifted_logits(logits, row_max, real_columns)  # (B, T, V/tp)

        ignored = labels == ignore_index
        local_label = labels - vocab_start
        mine = (local_label >= 0) & (local_label < local_vocab) & ~ignored
        local_label = local_label.masked_fill(~mine, 0)
        target = torch.gather(shifted, -1, local_label.unsqueeze(-1)).squeeze(-1)
        target = target.masked_fill(~mine, 0.0)
        exp = shifted.exp_()

        sums = all_reduce(torch.stack([exp.sum(dim=-1), target]), group)
        sum_exp, target = sums[0], sums[1]
        loss = (torch.log(sum_exp) - target).masked_fill(ignored, 0.0)

        ctx.save_for_backward(exp, sum_exp, local_label, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss / d logit = (softmax - one_hot(label)) * grad_loss, with the softmax's division
        # folded into the per-row factor. The exponentials become the gradient in place; a second
        # backward through this graph is refused by autograd, which sees the saved tensor changed.
        exp, sum_exp, local_label, mine, ignored = ctx.saved_tensors
        grad_loss = grad_loss.masked_fill(ignored, 0.0)
        grad = exp.mul_((grad_loss / sum_exp).unsqueeze(-1))
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -(grad_loss * mine).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token loss (B, T) float32 from logits (B, T, V_padded/tp); labels equal to ignore_index give 0."""
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_size, group, ignore_index)
