"""Compare a kernel with its PyTorch reference against float64, outputs and gradients.

The bound follows FlashAttention's rule: the kernel's error may be at most twice the error
of the PyTorch reference run in the same dtype, plus a small absolute tolerance. It never
goes below one unit in the last place of the largest exact value: storing the result in the
dtype costs that much, and on a lucky draw the reference's own error can be smaller.
Triton's CPU interpreter casts float32 to bfloat16 by truncation (toward zero) instead of
rounding to nearest, so there a stored bfloat16 value may be off by two such units.
"""

from __future__ import annotations

from typing import Callable

import os

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _storage_units(dtype: torch.dtype) -> int:
    truncates = dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    return 2 if truncates else 1


def outputs_and_grads(fn: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach()] + [g for g in grads]


def max_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [float((g.double() - w).abs().max()) if not torch.isnan(g).any() else float("nan")
            for g, w in zip(got, want)]


def assert_matches_reference(fast: Callable, reference: Callable, inputs: list[torch.Tensor]) -> list[float]:
    """Assert every output and gradient of ``fast`` is within the bound; return its errors."""
    dtype = inputs[0].dtype
    with torch.no_grad():
        grad_out = torch.randn_like(reference(*[t.double() for t in inputs]))
    exact = outputs_and_grads(reference, [t.double() for t in inputs], grad_out)
    fast_errors = max_errors(outputs_and_grads(fast, inputs, grad_out), exact)
    torch_errors = max_errors(outputs_and_grads(reference, inputs, grad_out), exact)
    names = ["output"] + [f"grad of input {i}" for i in range(len(inputs))]
    for name, fast_err, torch_err, want in zip(names, fast_errors, torch_errors, exact):
        storage_ulp = torch.finfo(dtype).eps * float(want.abs().max()) * _storage_units(dtype)
        bound = max(2 * torch_err, storage_ulp) + ATOL[dtype]
        assert fast_err <= bound, f"{name}: error {fast_err:.3g} exceeds bound {bound:.3g} (torch {torch_err:.3g})"
    return fast_errors
