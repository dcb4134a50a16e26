"""Plain PyTorch versions of every kernel, with the same signatures.

``flash_attention``, ``layer_norm`` and ``rms_norm`` here spell out the math (they are the
references the Triton kernels are tested against, run in float64 by the tests); the torch
backend runs PyTorch's own ops instead (``eager``). ``swiglu``, ``apply_rotary`` and
``cross_entropy`` mirror the fused kernels of the same names; the first two are also the
torch backend's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _expand_kv(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, KVH, D) -> (B, S, H, D), each k/v head repeated for its group of query heads."""
    group = num_heads // t.shape[2]
    return t if group == 1 else t.repeat_interleave(group, dim=2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, document_ids: torch.Tensor | None = None,
                    query_start: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale) v, with the softmax in float32 (or float64 for float64 inputs).
    ``document_ids`` (B, S): each run of equal consecutive ids is a document (packed samples)
    whose queries see only its own keys. With ``query_start`` the ids cover one sequence with the
    keys at [0, S_k) and the queries at [query_start, query_start + S_q); a query whose document
    has no key gets zeros."""
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    num_heads = q.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, _expand_kv(k, num_heads), _expand_kv(v, num_heads)))  # (B, H, S, D)
    scores = torch.matmul(q_, k_.transpose(-1, -2)) * softmax_scale  # (B, H, Sq, Sk)
    if causal:
        seq_q, seq_k = scores.shape[-2:]
        future = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    alone = None
    if document_ids is not None:  # a document is a run of equal consecutive ids
        numbers = torch.cat([torch.zeros_like(document_ids[:, :1]),
                             (document_ids[:, 1:] != document_ids[:, :-1]).cumsum(dim=1)], dim=1)
        query_numbers = numbers[:, query_start : query_start + q.shape[1]]  # (B, Sq)
        other_document = query_numbers[:, None, :, None] != numbers[:, None, None, : k.shape[1]]  # (B, 1, Sq, Sk)
        scores = scores.masked_fill(other_document, float("-inf"))
        alone = other_document.all(dim=-1, keepdim=True)  # (B, 1, Sq, 1): no key of its document
    softmax_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(q.dtype)
    if alone is not None:
        probs = probs.masked_fill(alone, 0.0)
    return torch.matmul(probs, v_).transpose(1, 2)  # (B, Sq, H, D)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, statistics in float32 (float64 for float64 inputs)."""
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(stats_dtype)
    mean = xf.mean(dim=-1, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(stats_dtype)
    if bias is not None:
        y = y + bias.to(stats_dtype)
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight."""
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(stats_dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(stats_dtype)
    return y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, computed in float32 (float64 for float64 inputs)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    if cos.dim() == 2:  # (T, D) -> (1, T, 1, D)
        cos, sin = cos[None, :, None], sin[None, :, None]
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (xf * cos.to(compute) + rotated * sin.to(compute)).to(x.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """PyTorch's cross-entropy on a float32 (float64 for float64 inputs) copy of the logits."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(compute), targets, ignore_index=ignore_index, reduction=reduction)
