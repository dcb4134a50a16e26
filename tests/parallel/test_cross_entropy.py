"""The torch vocab-parallel loss in one process (tp = 1) against ``F.cross_entropy``.

The sharded case (tp = 2, with a padded tail) is checked on gloo ranks in test_tensor_parallel.py.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.parallel.cross_entropy import _local_row_max, _shifted_logits, vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def _loss_and_grad(loss_fn, logits, labels, upstream):
    x = logits.detach().clone().requires_grad_()
    loss = loss_fn(x)
    (loss * upstream).sum().backward()
    return loss, x.grad


@pytest.mark.parametrize("vocab,padded", [(50, 50), (50, 64)], ids=["unpadded", "padded"])
def test_loss_and_gradient_equal_torch_cross_entropy(vocab, padded):
    torch.manual_seed(0)
    logits = 4 * torch.randn(3, 7, padded)
    logits[..., vocab:] = 30.0  # padding would dominate the softmax if it took part
    labels = torch.randint(0, vocab, (3, 7))
    labels[0, 2] = labels[2, 6] = IGNORE_INDEX
    upstream = torch.rand(3, 7)

    loss, grad = _loss_and_grad(lambda x: vocab_parallel_cross_entropy(x, labels, vocab), logits, labels, upstream)
    reference = lambda x: F.cross_entropy(  # noqa: E731
        x[..., :vocab].reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(3, 7)
    want_loss, want_grad = _loss_and_grad(reference, logits, labels, upstream)

    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert loss[0, 2] == 0 and loss[2, 6] == 0
    assert torch.all(grad[0, 2] == 0) and torch.all(grad[..., vocab:] == 0)


def test_input_logits_are_left_unchanged():
    logits = torch.randn(2, 5, 40, requires_grad=True)
    before = logits.detach().clone()
    vocab_parallel_cross_entropy(logits, torch.randint(0, 36, (2, 5)), 36).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_second_backward_through_the_same_graph_is_refused():
    # backward turns the saved softmax into the gradient in place; reusing it would be silently wrong
    logits = torch.randn(2, 3, 16, requires_grad=True)
    loss = vocab_parallel_cross_entropy(logits, torch.randint(0, 16, (2, 3)), 16).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_shard_of_only_padding_takes_no_part():
    # a tensor-parallel rank past the real vocabulary: its max is -inf and its exponentials are 0
    logits = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    assert torch.all(_local_row_max(logits, 0) == float("-inf"))
    row_max = torch.zeros(2, 3)
    shifted = _shifted_logits(logits, row_max, 0)
    assert shifted.dtype == torch.float32 and torch.all(shifted == float("-inf"))
    partial = _shifted_logits(logits, row_max, 5)
    assert torch.equal(partial[..., :5], logits[..., :5].float()) and torch.all(partial[..., 5:] == float("-inf"))
