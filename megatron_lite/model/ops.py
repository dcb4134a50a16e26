"""The one dispatch point for attention, normalization, loss and elementwise (SwiGLU, RoPE) backends.

torch: plain PyTorch (the reference). triton: this project's kernels in
``megatron_lite.kernels``. flash_attn / apex: optional NVIDIA packages. A backend that
cannot be imported is reported by ``check_backends`` when the model is built, never
as a crash in the first step.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
import torch.nn.functional as F

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy

# scaled_dot_product_attention groups kv heads itself from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)

_INSTALL_HINTS = {
    "flash_attn": "pip install flash-attn (needs CUDA)",
    "apex": "install NVIDIA apex with its CUDA extensions",
    "megatron_lite.kernels": "reinstall megatron-lite (pip install -e .) so megatron_lite.kernels exists",
}


def _module_has(module: str, names: tuple[str, ...]) -> bool:
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        mod = importlib.import_module(module)
    except (ImportError, OSError):  # a package built against another CUDA fails with OSError
        return False
    return all(hasattr(mod, n) for n in names)


def _require(setting: str, backend: str, module: str, names: tuple[str, ...]) -> None:
    if not _module_has(module, names):
        root = "megatron_lite.kernels" if module.startswith("megatron_lite.kernels") else module.split(".")[0]
        raise ConfigError(
            f"{setting}={backend} is not available: {module} with {', '.join(names)} cannot be imported "
            f"({_INSTALL_HINTS[root]}); or set {setting}=torch"
        )


def check_backends(cfg: ModelConfig) -> None:
    """Fail at model construction if a chosen backend cannot run here."""
    if cfg.attention_backend == "triton" and cfg.dropout > 0:
        raise ConfigError(
            "model.attention_backend=triton has no attention dropout; set model.dropout=0 "
            "or model.attention_backend=torch"
        )
    from megatron_lite.kernels.backends import BackendUnavailableError, require_backend

    try:
        require_backend("attention", cfg.attention_backend)
        require_backend("norm", cfg.norm_backend)
        require_backend("loss", cfg.loss_backend)
        require_backend("elementwise", cfg.elementwise_backend)
    except BackendUnavailableError as exc:
        raise ConfigError(str(exc)) from exc
    _check_imports(cfg)


def _check_imports(cfg: ModelConfig) -> None:
    """The exact functions this module calls, whatever the kernels package reports."""
    if cfg.attention_backend == "triton":
        _require("model.attention_backend", "triton", "megatron_lite.kernels", ("flash_attention",))
    elif cfg.attention_backend == "flash_attn":
        _require("model.attention_backend", "flash_attn", "flash_attn", ("flash_attn_func",))
    if cfg.norm_backend == "triton":
        _require("model.norm_backend", "triton", "megatron_lite.kernels", ("layer_norm", "rms_norm"))
    elif cfg.norm_backend == "apex":
        names = ("fused_layer_norm_affine", "fused_rms_norm_affine")
        _require("model.norm_backend", "apex", "apex.normalization.fused_layer_norm", names)
    if cfg.loss_backend == "triton":
        _require("model.loss_backend", "triton", "megatron_lite.kernels", ("vocab_parallel_cross_entropy",))
    if cfg.elementwise_backend == "triton":
        _require("model.elementwise_backend", "triton", "megatron_lite.kernels", ("swiglu", "apply_rotary"))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    backend: str = "torch",
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (B, T, nh, hd), k/v (B, S, nkv, hd) -> (B, T, nh, hd); nh a multiple of nkv (grouped-query).

    ``mask`` (B, 1, T, S) bool, True = may attend, replaces ``causal``; only the torch path takes
    it (generation with a cache and padded prompts), so a mask always runs there.
    """
    if mask is None and backend == "triton":
        from megatron_lite.kernels import flash_attention

        return flash_attention(q, k, v, causal=causal, softmax_scale=None)
    if mask is None and backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal)
    group_size = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
    gqa = {}
    if group_size > 1 and _SDPA_HAS_GQA:
        gqa = {"enable_gqa": True}
    elif group_size > 1:
        k = k.repeat_interleave(group_size, dim=1)  # kv head g serves query heads g*group .. (g+1)*group-1
        v = v.repeat_interleave(group_size, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None, **gqa
    )  # (B, nh, T, hd)
    return out.transpose(1, 2)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, backend: str = "torch"):
    if backend == "triton":
        from megatron_lite.kernels import layer_norm as triton_layer_norm

        return triton_layer_norm(x, weight, bias, eps)
    if backend == "apex":
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        return fused_layer_norm_affine(x, weight, bias, weight.shape, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch"):
    if backend == "triton":
        from megatron_lite.kernels import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    if backend == "apex":
        from apex.normalization.fused_layer_norm import fused_rms_norm_affine

        return fused_rms_norm_affine(x, weight, weight.shape, eps)
    variance = x.float().pow(2).mean(dim=-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, group, backend: str = "torch"):
    """Per-token loss (B, T) float32 from this rank's vocabulary shard of the logits (B, T, V_padded/tp)."""
    if backend == "triton":
        from megatron_lite.kernels import vocab_parallel_cross_entropy as triton_cross_entropy

        return triton_cross_entropy(logits, labels, vocab_size, group)
    return vocab_parallel_cross_entropy(logits, labels, vocab_size, group)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) * up: the Triton kernel or its torch reference."""
    from megatron_lite.kernels import reference, swiglu as triton_swiglu

    return (triton_swiglu if backend == "triton" else reference.swiglu)(gate, up)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: str = "torch") -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (B, T, heads, hd) by their position's angles; cos, sin (B, T, 1, hd)."""
    from megatron_lite.kernels import apply_rotary, reference

    return (apply_rotary if backend == "triton" else reference.apply_rotary)(x, *rope)
