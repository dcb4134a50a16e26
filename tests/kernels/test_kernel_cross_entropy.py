"""Streaming cross-entropy against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_matches_reference

from megatron_lite.kernels import cross_entropy, reference, vocab_parallel_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _targets(rows, vocab, ignored=()):
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[list(ignored)] = -100
    return targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(dtype, reduction):
    # A vocabulary that is not a multiple of the chunk, large logits (no overflow allowed), ignored rows.
    logits = 8 * torch.randn(7, 1000, device=DEVICE, dtype=dtype)
    targets = _targets(7, 1000, ignored=(2, 5))
    assert_matches_reference(lambda x: cross_entropy(x, targets, reduction=reduction),
                             lambda x: reference.cross_entropy(x, targets, reduction=reduction), [logits])


def test_ignored_rows_get_no_loss_and_no_gradient():
    logits = torch.randn(4, 300, device=DEVICE, requires_grad=True)
    targets = _targets(4, 300, ignored=(1,))
    losses = cross_entropy(logits, targets, reduction="none")
    assert losses[1] == 0
    losses.sum().backward()
    assert torch.equal(logits.grad[1], torch.zeros(300, device=DEVICE))
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(4, device=DEVICE), atol=1e-6, rtol=0)


def test_every_row_ignored_gives_zero_mean():
    logits = torch.randn(3, 50, device=DEVICE, requires_grad=True)
    loss = cross_entropy(logits, torch.full((3,), -100, device=DEVICE))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_logits_are_not_modified():
    logits = torch.randn(5, 200, device=DEVICE, dtype=torch.float16, requires_grad=True)
    before = logits.detach().clone()
    cross_entropy(logits, _targets(5, 200)).backward()
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("make_args,kwargs,message", [
    (lambda: (torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)), {}, r"shape \(tokens, vocab\)"),
    (lambda: (torch.randn(4, 10), torch.zeros(3, dtype=torch.long)), {}, r"integer class ids of shape \(4,\)"),
    (lambda: (torch.randn(4, 10), torch.zeros(4)), {}, "integer class ids"),
    (lambda: (torch.randn(2, 10), torch.tensor([3, 10])), {}, r"target 10 is outside the vocabulary \[0, 10\)"),
    (lambda: (torch.randn(2, 10), torch.tensor([3, 1])), {"reduction": "max"}, "reduction='max' is not one of"),
])
def test_bad_arguments(make_args, kwargs, message):
    logits, targets = (t.to(DEVICE) for t in make_args())
    with pytest.raises(ValueError, match=message):
        cross_entropy(logits, targets, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vocab_parallel_form_matches_the_torch_loss_with_padding(dtype):
    # The model's path: (B, T, V_padded) logits whose last columns are vocabulary padding.
    from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy as torch_loss

    vocab, padded = 300, 320
    logits = (6 * torch.randn(2, 5, padded, device=DEVICE)).to(dtype)
    logits[..., vocab:] = 50.0  # padding would dominate the softmax if it took part
    labels = torch.randint(0, vocab, (2, 5), device=DEVICE)
    labels[1, 3] = -100
    upstream = torch.rand(2, 5, device=DEVICE)
    results = []
    for fn in (vocab_parallel_cross_entropy, torch_loss):
        x = logits.detach().clone().requires_grad_()
        loss = fn(x, labels, vocab)
        (loss * upstream).sum().backward()
        results.append((loss, x.grad))
    (loss, grad), (want_loss, want_grad) = results
    assert loss.shape == (2, 5) and loss.dtype == torch.float32 and grad.dtype == dtype
    exact = F.cross_entropy(logits[..., :vocab].double().reshape(-1, vocab), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.double(), exact.view(2, 5), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=1e-3, atol=1e-3 if dtype == torch.float16 else 1e-6)
    assert torch.all(grad[..., vocab:] == 0) and torch.all(grad[1, 3] == 0)


def test_vocab_parallel_form_errors_name_the_problem():
    logits = torch.randn(2, 3, 10, device=DEVICE)
    with pytest.raises(ValueError, match=r"labels of shape \(2,\) do not match logits of shape \(2, 3, 10\)"):
        vocab_parallel_cross_entropy(logits, torch.zeros(2, dtype=torch.long, device=DEVICE), 10)
    with pytest.raises(ValueError, match="supports float16, bfloat16 and float32 logits, got torch.float64"):
        vocab_parallel_cross_entropy(logits.double(), torch.zeros(2, 3, dtype=torch.long, device=DEVICE), 10)


def test_fused_loss_keeps_no_float32_copy_for_the_backward():
    # What each loss holds for its backward, per logit: the fused one its bf16 input (2 bytes),
    # the torch vocab-parallel loss a float32 softmax (4 bytes).
    from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy as torch_loss

    logits = torch.randn(2, 8, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 250, (2, 8), device=DEVICE)
    saved = {}
    for name, fn in (("triton", vocab_parallel_cross_entropy), ("torch", torch_loss)):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size() if t.shape[-1:] == (256,) else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, labels, 250)
        saved[name] = sum(sizes)
    assert saved == {"triton": logits.numel() * 2, "torch": logits.numel() * 4}
