"""Fused elementwise ops of the Llama block: SwiGLU and rotary embedding (RoPE).

Each op reads its inputs once and writes its outputs once in both directions; the eager
PyTorch versions write a temporary per intermediate (silu(gate), x * cos, rotate_half(x), ...).
Arithmetic is done in fp32 and rounded once to the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, new_output

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK = 1024  # elements per program along a row: large enough to keep 16-byte loads busy


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(GATE, UP, DOUT, DGATE, DUP, stride_g, stride_u, stride_do, stride_dg, stride_du, n_cols,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(GATE + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dsilu = s * (1.0 + g * (1.0 - s))  # d/dg of g * sigmoid(g)
    tl.store(DGATE + row * stride_dg + cols, (dout * u * dsilu).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + row * stride_du + cols, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2d, u2d = _rows_2d(gate), _rows_2d(up)
        n_rows, n_cols = g2d.shape
        out = new_output((n_rows, n_cols), gate.dtype, gate.device)
        _swiglu_fwd_kernel[(n_rows, triton.cdiv(n_cols, _BLOCK))](
            g2d, u2d, out, g2d.stride(0), u2d.stride(0), out.stride(0), n_cols, BLOCK=_BLOCK)
        ctx.save_for_backward(g2d, u2d)
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dout):
        g2d, u2d = ctx.saved_tensors
        d2d = _rows_2d(dout)
        n_rows, n_cols = g2d.shape
        dgate = new_output((n_rows, n_cols), g2d.dtype, g2d.device)
        dup = new_output((n_rows, n_cols), u2d.dtype, u2d.device)
        _swiglu_bwd_kernel[(n_rows, triton.cdiv(n_cols, _BLOCK))](
            g2d, u2d, d2d, dgate, dup, g2d.stride(0), u2d.stride(0), d2d.stride(0), dgate.stride(0), dup.stride(0),
            n_cols, BLOCK=_BLOCK)
        return dgate.view(dout.shape), dup.view(dout.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; differentiable in both inputs."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu needs gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    if gate.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"swiglu supports float16, bfloat16 and float32, got {gate.dtype}")
    if gate.dim() == 0 or gate.numel() == 0:
        raise ValueError(f"swiglu needs a non-empty tensor with at least one dimension, got shape {tuple(gate.shape)}")
    check_device(gate, up)
    return _SwiGLUFunction.apply(gate, up)


# ----------------------------------------------------------------------------- rotary embedding


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, seq_len, num_heads,
                 stride_xb, stride_xt, stride_xh, stride_cb, stride_ct, stride_ob, stride_ot, stride_oh,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    """One program per (batch, position): rotates pairs (i, i + D/2) of every head by that position's angles."""
    pid = tl.program_id(0)
    b = (pid // seq_len).to(tl.int64)
    t = (pid % seq_len).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    col_ok = offs < HALF
    mask = (heads[:, None] < num_heads) & col_ok[None, :]
    table = b * stride_cb + t * stride_ct
    cos1 = tl.load(COS + table + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(COS + table + HALF + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + table + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + table + HALF + offs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x_ptrs = X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation, for the backward
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    o_ptrs = OUT + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + offs[None, :]
    tl.store(o_ptrs, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, y2.to(OUT.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    batch, seq_len, num_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = new_output(x.shape, x.dtype, x.device)
    _rope_kernel[(batch * seq_len,)](
        x, cos, sin, out, seq_len, num_heads,
        x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), INVERSE=inverse,
    )
    return out


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        return _rotate(dout, cos, sin, inverse=True), None, None


def _rope_table(table: torch.Tensor, name: str, batch: int, seq_len: int, head_dim: int) -> torch.Tensor:
    """(B or 1, T, 1, D) or (T, D) -> an expanded (B, T, D) view with a contiguous last dimension."""
    if table.requires_grad:
        raise ValueError(f"apply_rotary treats {name} as a constant table; pass {name}.detach()")
    if table.dim() == 4 and table.shape[2] == 1:
        table = table[:, :, 0]
    try:
        table = table.expand(batch, seq_len, head_dim)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(table.shape)} does not broadcast to (batch={batch}, "
                         f"seq={seq_len}, 1, head_dim={head_dim})") from None
    return table if table.stride(-1) == 1 else table.contiguous()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x (B, T, H, D), with cos/sin (B or 1, T, 1, D) or (T, D).

    rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]): pairs (i, i + D/2) are rotated. The tables
    are constants (no gradient); the gradient with respect to x is the inverse rotation.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rotary needs x of shape (batch, seq, heads, head_dim), got {tuple(x.shape)}")
    batch, seq_len, _, head_dim = x.shape
    if head_dim % 2 != 0:
        raise ValueError(f"apply_rotary needs an even head_dim, got {head_dim}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"apply_rotary supports float16, bfloat16 and float32, got {x.dtype}")
    cos = _rope_table(cos, "cos", batch, seq_len, head_dim)
    sin = _rope_table(sin, "sin", batch, seq_len, head_dim)
    check_device(x, cos, sin)
    return _RotaryFunction.apply(x, cos, sin)
