"""Which kernel backends can run here, and the functions behind each backend name.

Optional accelerators are detected, never required: importing this module imports neither
flash-attn nor apex. Note that ``pip install apex`` installs an unrelated web package, so
NVIDIA apex is recognised by its ``apex.normalization`` fused norms, not by the name.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

ATTENTION_BACKENDS = ("torch", "triton", "flash_attn")
NORM_BACKENDS = ("torch", "triton", "apex")
LOSS_BACKENDS = ("torch", "triton")
ELEMENTWISE_BACKENDS = ("torch", "triton")
_BACKENDS = {"attention": ATTENTION_BACKENDS, "norm": NORM_BACKENDS, "loss": LOSS_BACKENDS,
             "elementwise": ELEMENTWISE_BACKENDS}


class BackendUnavailableError(RuntimeError):
    """A configured backend cannot run on this machine; the message says how to fix it."""


def triton_available() -> bool:
    """True when Triton kernels can run: a CUDA GPU, or the CPU interpreter (TRITON_INTERPRET=1)."""
    return triton_unavailable_reason() is None


def triton_unavailable_reason() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not importable: pip install triton"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return (
        "triton cannot run here: there is no CUDA GPU and TRITON_INTERPRET is not 1 "
        "(set TRITON_INTERPRET=1 before starting Python to run the kernels slowly on CPU)"
    )


def flash_attn_available() -> bool:
    try:
        return callable(getattr(importlib.import_module("flash_attn"), "flash_attn_func", None))
    except Exception:  # noqa: BLE001 - a broken install (bad CUDA build) counts as absent
        return False


def apex_available() -> bool:
    try:
        norms = importlib.import_module("apex.normalization")
    except Exception:  # noqa: BLE001 - the unrelated PyPI 'apex' lacks this module
        return False
    return all(hasattr(norms, name) for name in ("FusedLayerNorm", "FusedRMSNorm"))


def describe() -> dict[str, bool]:
    """Availability of every optional backend, for a start-up log line."""
    return {"triton": triton_available(), "flash_attn": flash_attn_available(), "apex": apex_available()}


def _check_name(kind: str, name: str) -> None:
    if kind not in _BACKENDS:
        raise ValueError(f"unknown backend kind {kind!r}; use one of {', '.join(_BACKENDS)}")
    if name not in _BACKENDS[kind]:
        raise ValueError(f"unknown {kind} backend {name!r}; use one of {', '.join(_BACKENDS[kind])}")


def require_backend(kind: str, name: str) -> None:
    """Raise ``BackendUnavailableError`` unless backend ``name`` of ``kind`` (attention|norm|loss|elementwise) can run here."""
    _check_name(kind, name)
    others = "|".join(n for n in _BACKENDS[kind] if n != name)
    setting = f"model.{kind}_backend={name}"
    if name == "triton":
        reason = triton_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"{setting} but {reason}; or use {others}")
    elif name == "flash_attn" and not flash_attn_available():
        raise BackendUnavailableError(
            f"{setting} but flash_attn is not importable: pip install flash-attn or use {others}"
        )
    elif name == "apex" and not apex_available():
        raise BackendUnavailableError(
            f"{setting} but NVIDIA apex (apex.normalization.FusedLayerNorm) is not importable: build it from "
            f"https://github.com/NVIDIA/apex (not 'pip install apex', an unrelated package) or use {others}"
        )


def _flash_attn_attention(q, k, v, causal=True, softmax_scale=None):
    # flash-attn takes (B, S, H, D) and grouped-query k/v as they are.
    flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal)


def _apex_layer_norm(x, weight, bias, eps=1e-5):
    functions = importlib.import_module("apex.normalization.fused_layer_norm")
    if bias is None:
        return functions.fused_layer_norm_affine(x, weight, torch.zeros_like(weight), weight.shape, eps)
    return functions.fused_layer_norm_affine(x, weight, bias, weight.shape, eps)


def _apex_rms_norm(x, weight, eps=1e-6):
    functions = importlib.import_module("apex.normalization.fused_layer_norm")
    return functions.fused_rms_norm_affine(x, weight, weight.shape, eps)


def attention_function(name: str) -> Callable:
    """The ``flash_attention(q, k, v, causal, softmax_scale)``-shaped function for a backend."""
    require_backend("attention", name)
    from . import attention, reference

    return {"torch": reference.sdpa_attention, "triton": attention.flash_attention,
            "flash_attn": _flash_attn_attention}[name]


def norm_functions(name: str) -> tuple[Callable, Callable]:
    """(layer_norm(x, weight, bias, eps), rms_norm(x, weight, eps)) for a backend."""
    require_backend("norm", name)
    from . import layernorm, reference

    return {"torch": (reference.layer_norm, reference.rms_norm),
            "triton": (layernorm.layer_norm, layernorm.rms_norm),
            "apex": (_apex_layer_norm, _apex_rms_norm)}[name]
