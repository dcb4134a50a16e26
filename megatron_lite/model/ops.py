"""The model's calls into the kernel registry (``megatron_lite.kernels.backends``).

Each function looks up the configured backend's entry and calls it with the registry's
argument shape, so the model runs exactly what the benchmark times. A backend that cannot
run here is reported by ``check_backends`` when the model is built, never as a crash in
the first step.
"""

from __future__ import annotations

import torch

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.kernels import backends
from megatron_lite.parallel.context_parallel import ContextParallel, context_parallel_attention


def check_backends(cfg: ModelConfig) -> None:
    """Fail at model construction if a chosen backend cannot run here."""
    if cfg.attention_backend == "triton" and cfg.dropout > 0:
        raise ConfigError(
            "model.attention_backend=triton has no attention dropout; set model.dropout=0 "
            "or model.attention_backend=torch"
        )
    try:
        for kind in backends.KINDS:
            backends.require_backend(kind, getattr(cfg, f"{kind}_backend"))
    except backends.BackendUnavailableError as exc:
        raise ConfigError(str(exc)) from exc


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    backend: str = "torch",
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
    context_parallel: ContextParallel | None = None,
    *,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, T, nh, hd), k/v (B, S, nkv, hd) -> (B, T, nh, hd); nh a multiple of nkv (grouped-query).

    ``mask`` (B, 1, T, S) replaces ``causal``: bool (True = may attend) or an additive bias in q's
    dtype (0 or -inf), the form attention uses as is, which generation builds once per decode step
    for every layer; only the torch backend takes a mask (generation with a cache and padded
    prompts), so a mask always runs there.
    ``context_parallel``: q, k, v hold this cp rank's two chunks of the sequence; causal attention
    then runs over the whole sequence (``parallel.context_parallel``).
    ``document_ids`` (B, T) int: packed documents, each attending only within itself.
    """
    if context_parallel is not None:
        return context_parallel_attention(q, k, v, context_parallel, backend, dropout_p, document_ids)
    if mask is not None:
        if document_ids is not None:
            raise ValueError("attention takes a mask or document_ids, not both; fold the documents into the mask")
        return backends.function("attention", "torch")(q, k, v, causal=causal, dropout_p=dropout_p, mask=mask)
    if document_ids is None:
        return backends.function("attention", backend)(q, k, v, causal=causal, dropout_p=dropout_p)
    check_document_backend(backend)
    return backends.function("attention", backend)(q, k, v, causal=causal, dropout_p=dropout_p,
                                                   document_ids=document_ids)


def check_document_backend(backend: str) -> None:
    if backend not in backends.DOCUMENT_MASK_BACKENDS:
        raise ConfigError(
            f"model.attention_backend={backend} cannot mask packed documents; use one of "
            f"{', '.join(backends.DOCUMENT_MASK_BACKENDS)} or set data.document_mask=false"
        )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, backend: str = "torch",
               tuning_group=None) -> torch.Tensor:
    return backends.function("layer_norm", backend)(x, weight, bias, eps, tuning_group=tuning_group)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch",
             tuning_group=None) -> torch.Tensor:
    return backends.function("rms_norm", backend)(x, weight, eps, tuning_group=tuning_group)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, group, backend: str = "torch"):
    """Per-token loss (B, T) float32 from this rank's vocabulary shard of the logits (B, T, V_padded/tp)."""
    return backends.function("cross_entropy", backend)(logits, labels, vocab_size, group)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) * up."""
    return backends.function("swiglu", backend)(gate, up)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: str = "torch") -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (B, T, heads, hd) by their position's angles; cos, sin (B, T, 1, hd)."""
    return backends.function("rope", backend)(x, *rope)
