"""Fused SwiGLU and rotary embedding against float64 references."""

import pytest
import torch
from kernel_checks import assert_matches_reference

from megatron_lite.kernels import apply_rotary, reference, swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rope_tables(batch, seq_len, head_dim, theta=10000.0):
    positions = torch.arange(seq_len, device=DEVICE).repeat(batch, 1) + torch.randint(0, 50, (batch, 1), device=DEVICE)
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=DEVICE, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None]  # (B, T, 1, D)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("shape,dtype", [((3, 7, 1500), torch.float32), ((5, 300), torch.float16),
                                         ((4, 130), torch.bfloat16)])
def test_swiglu_matches_float64_reference(shape, dtype):
    gate, up = (2 * torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2))
    assert_matches_reference(swiglu, reference.swiglu, [gate, up])


def test_swiglu_on_halves_of_one_projection():
    # The MLP splits one (B, T, 2F) projection into gate and up: views with a row stride of 2F.
    h = torch.randn(2, 5, 2 * 96, device=DEVICE, dtype=torch.float16)
    gate, up = h.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    assert_matches_reference(swiglu, reference.swiglu, [gate, up])


@pytest.mark.parametrize("batch,seq_len,heads,head_dim,dtype", [(2, 9, 4, 64, torch.float32),
                                                                (1, 13, 3, 48, torch.float16),
                                                                (2, 5, 2, 128, torch.bfloat16)])
def test_rotary_matches_float64_reference(batch, seq_len, heads, head_dim, dtype):
    x = torch.randn(batch, seq_len, heads, head_dim, device=DEVICE, dtype=dtype)
    cos, sin = _rope_tables(batch, seq_len, head_dim)
    assert_matches_reference(lambda x: apply_rotary(x, cos, sin), lambda x: reference.apply_rotary(x, cos, sin), [x])


def test_rotary_with_shared_table_and_strided_input():
    qkv = torch.randn(2, 6, 3, 4, 32, device=DEVICE)
    q = qkv[:, :, 0]  # (B, T, H, D) view inside a packed projection
    cos, sin = _rope_tables(1, 6, 32)
    out = apply_rotary(q, cos[0, :, 0], sin[0, :, 0])  # a (T, D) table shared by the batch
    torch.testing.assert_close(out, reference.apply_rotary(q, cos, sin), atol=1e-6, rtol=1e-6)


def test_rotary_preserves_norm_of_each_pair_and_inverts():
    x = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=torch.float32, requires_grad=True)
    cos, sin = _rope_tables(1, 8, 16)
    y = apply_rotary(x, cos, sin)
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x.detach()), atol=1e-5, rtol=1e-5)
    # The gradient of <y, g> is the inverse rotation of g: rotating it forward again gives g back.
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(apply_rotary(dx, cos, sin), g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_args,message", [
    (lambda: (torch.randn(2, 3, 4, 7), torch.ones(3, 7), torch.ones(3, 7)), "even head_dim, got 7"),
    (lambda: (torch.randn(2, 3, 8), torch.ones(3, 8), torch.ones(3, 8)),
     r"shape \(batch, seq, heads, head_dim\)"),
    (lambda: (torch.randn(2, 3, 4, 8), torch.ones(5, 8), torch.ones(5, 8)),
     r"cos of shape \(5, 8\) does not broadcast"),
    (lambda: (torch.randn(2, 3, 4, 8), torch.ones(3, 8, requires_grad=True), torch.ones(3, 8)), "constant table"),
])
def test_rotary_bad_arguments(make_args, message):
    x, cos, sin = (t.to(DEVICE) if not t.requires_grad else t for t in make_args())
    with pytest.raises(ValueError, match=message):
        apply_rotary(x, cos, sin)


def test_swiglu_bad_arguments():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.randn(2, 4, device=DEVICE), torch.randn(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="supports float16, bfloat16 and float32"):
        ones = torch.ones(2, 4, device=DEVICE, dtype=torch.float64)
        swiglu(ones, ones)
