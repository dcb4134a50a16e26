"""The torch backend: PyTorch's own ops, what the model runs when no kernel is chosen.

Each function has the call shape of its op in the registry (``backends.OPS``), so it can stand
in for the Triton kernel or an optional accelerator. ``tuning_group`` is part of the norms'
shape; there is nothing to tune here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# scaled_dot_product_attention groups kv heads itself from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, dropout_p: float = 0.0,
              mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, T, nh, hd), k/v (B, S, nkv, hd) -> (B, T, nh, hd) through ``scaled_dot_product_attention``.

    ``mask`` (B, 1, T, S) bool, True = may attend, replaces ``causal``: only this backend takes
    one (generation with a cache and padded prompts). ``document_ids`` (B, T): each run of equal
    consecutive ids is a document that attends only within itself (packed samples).
    """
    if document_ids is not None:
        return _attention_per_document(q, k, v, causal, softmax_scale, dropout_p, document_ids)
    return _sdpa(q, k, v, causal, softmax_scale, dropout_p, mask)


def _sdpa(q, k, v, causal, softmax_scale, dropout_p, mask=None):
    group_size = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    gqa = {}
    if group_size > 1 and _SDPA_HAS_GQA:
        gqa = {"enable_gqa": True}
    elif group_size > 1:
        k = k.repeat_interleave(group_size, dim=1)  # kv head g serves query heads g*group .. (g+1)*group-1
        v = v.repeat_interleave(group_size, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None, scale=softmax_scale, **gqa
    )  # (B, nh, T, hd)
    return out.transpose(1, 2)


def _attention_per_document(q, k, v, causal, softmax_scale, dropout_p, document_ids):
    """One SDPA call per document (variable-length attention): only the pairs inside documents are
    computed, where a (B, 1, T, T) block mask computes all and discards the rest. On one CPU thread
    it tied with a block mask at 512 tokens and took a fifth of its time at 2048; many small
    calls cost more with contended threads (docs/benchmarks.md, "Document-masked attention")."""
    rows = []
    for b in range(q.shape[0]):
        lengths = torch.unique_consecutive(document_ids[b], return_counts=True)[1].tolist()
        pieces = zip(q[b : b + 1].split(lengths, dim=1), k[b : b + 1].split(lengths, dim=1),
                     v[b : b + 1].split(lengths, dim=1))
        rows.append(torch.cat([_sdpa(qd, kd, vd, causal, softmax_scale, dropout_p) for qd, kd, vd in pieces], dim=1))
    return torch.cat(rows)  # (B, T, nh, hd)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               tuning_group=None) -> torch.Tensor:
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, tuning_group=None) -> torch.Tensor:
    """Normalised in float32, cast back, then scaled (the weight multiplies in the input's dtype)."""
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight
