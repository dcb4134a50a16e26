"""Cross entropy over vocabulary-sharded logits that never gathers the full logits.

Per token: one max all-reduce (for a stable softmax), then one sum all-reduce of
[sum of exp, target logit]. Columns at or past ``vocab_size`` are vocabulary padding
and take no part in the softmax.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.parallel.collectives import all_reduce, group_rank


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_size, group, ignore_index):
        # logits: (B, T, V/tp) this rank's columns; labels: (B, T) global ids
        ctx.logits_dtype = logits.dtype
        local_vocab = logits.shape[-1]
        rank = group_rank(group)
        vocab_start = rank * local_vocab
        logits = logits.float()
        column_ids = torch.arange(vocab_start, vocab_start + local_vocab, device=logits.device)
        logits = logits.masked_fill(column_ids >= vocab_size, float("-inf"))

        row_max = all_reduce(logits.amax(dim=-1), group, dist.ReduceOp.MAX)  # (B, T)
        exp = torch.exp(logits - row_max.unsqueeze(-1))  # (B, T, V/tp)

        ignored = labels == ignore_index
        local_label = labels - vocab_start
        mine = (local_label >= 0) & (local_label < local_vocab) & ~ignored
        local_label = local_label.masked_fill(~mine, 0)
        target = torch.gather(logits, -1, local_label.unsqueeze(-1)).squeeze(-1) - row_max
        target = target.masked_fill(~mine, 0.0)

        sums = all_reduce(torch.stack([exp.sum(dim=-1), target]), group)
        sum_exp, target = sums[0], sums[1]
        loss = (torch.log(sum_exp) - target).masked_fill(ignored, 0.0)

        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_label, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_label, mine, ignored = ctx.saved_tensors
        grad = softmax.clone()  # d loss / d logit = softmax - one_hot(label)
        grad.scatter_add_(-1, local_label.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad = grad * grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
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
