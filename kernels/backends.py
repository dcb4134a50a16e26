"""The kernel backend registry: every op's implementations by backend name, and which can run here.

``OPS`` is the one table ``{op: {backend: "module.function"}}``. The model (``model/ops.py``),
the config check (``choices``) and the benchmark (``tools/bench_kernels.py``) all go through it,
so a benchmark times what the model runs. Entries are resolved on use (``function``): listing
the names imports no optional package. Optional accelerators are detected, never required.
Note that ``pip install apex`` installs an unrelated web package, so NVIDIA apex is recognised
by the fused norms this registry calls, not by the name.

Every backend of an op takes the same arguments:

    attention(q, k, v, causal=, softmax_scale=, dropout_p=)  q (B, T, nh, hd), k/v (B, S, nkv, hd)
              document_ids=  (B, T) ids of packed documents; torch and triton only
    layer_norm(x, weight, bias, eps, tuning_group=None)      tuning_group: ranks that must pick
    rms_norm(x, weight, eps, tuning_group=None)                one launch setting (see LaunchTuner)
    cross_entropy(logits, labels, vocab_size, group)         per-token loss from a vocabulary shard
    swiglu(gate, up)
    rope(x, cos, sin)
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

# A module starting with "." is inside megatron_lite.kernels.
OPS: dict[str, dict[str, str]] = {
    "attention": {"torch": ".eager.attention", "triton": ".attention.flash_attention",
                  "flash_attn": "flash_attn.flash_attn_func"},
    "layer_norm": {"torch": ".eager.layer_norm", "triton": ".layernorm.layer_norm", "apex": ".apex_norms.layer_norm"},
    "rms_norm": {"torch": ".eager.rms_norm", "triton": ".layernorm.rms_norm", "apex": ".apex_norms.rms_norm"},
    "cross_entropy": {"torch": "megatron_lite.parallel.cross_entropy.vocab_parallel_cross_entropy",
                      "triton": ".cross_entropy.vocab_parallel_cross_entropy"},
    "swiglu": {"torch": ".reference.swiglu", "triton": ".elementwise.swiglu"},
    "rope": {"torch": ".reference.apply_rotary", "triton": ".elementwise.apply_rotary"},
}

# The attention backends that take per-token document ids (document-masked packed samples).
DOCUMENT_MASK_BACKENDS = ("torch", "triton")

# The model config chooses one backend per kind (model.<kind>_backend) for all of its ops.
KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("attention",), "norm": ("layer_norm", "rms_norm"), "loss": ("cross_entropy",),
    "elementwise": ("swiglu", "rope"),
}

_INSTALL_HINTS = {
    "flash_attn": "pip install flash-attn (needs CUDA)",
    "megatron_lite": "reinstall megatron-lite (pip install -e .) so megatron_lite.kernels exists",
}


class BackendUnavailableError(RuntimeError):
    """A configured backend cannot run on this machine; the message says how to fix it."""


def choices(kind: str) -> tuple[str, ...]:
    """The backends every op of ``kind`` has, in table order: what model.<kind>_backend may be."""
    ops = KINDS[kind]
    return tuple(name for name in OPS[ops[0]] if all(name in OPS[op] for op in ops[1:]))


def triton_available() -> bool:
    """True when Triton kernels can run: a CUDA GPU, or the CPU interpreter (TRITON_INTERPRET=1)."""
    return triton_unavailable_reason() is None


def triton_unavailable_reason() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError:
        return "triton is not importable: pip install triton"
    import torch

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
    """NVIDIA apex with the fused affine norms ``apex_norms`` calls."""
    try:
        functions = importlib.import_module("apex.normalization.fused_layer_norm")
    except Exception:  # noqa: BLE001 - the unrelated PyPI 'apex' lacks this module
        return False
    return all(hasattr(functions, name) for name in ("fused_layer_norm_affine", "fused_rms_norm_affine"))


def availability() -> dict[str, bool]:
    """Whether each backend that needs more than torch can run here."""
    return {"triton": triton_available(), "flash_attn": flash_attn_available(), "apex": apex_available()}


def _unavailable_reason(name: str, others: str) -> str | None:
    """Why backend ``name`` cannot run here (with the fix, or ``others`` to choose instead), or None."""
    if name == "triton":
        reason = triton_unavailable_reason()
        return None if reason is None else f"{reason}; or use {others}"
    if name == "flash_attn" and not flash_attn_available():
        return f"flash_attn is not importable: pip install flash-attn or use {others}"
    if name == "apex" and not apex_available():
        return (f"NVIDIA apex (apex.normalization.FusedLayerNorm) is not importable: build it from "
                f"https://github.com/NVIDIA/apex (not 'pip install apex', an unrelated package) or use {others}")
    return None


def _check_name(kind: str, name: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}; use one of {', '.join(KINDS)}")
    if name not in choices(kind):
        raise ValueError(f"unknown {kind} backend {name!r}; use one of {', '.join(choices(kind))}")


def _split(entry: str) -> tuple[str, str]:
    module, _, attribute = entry.rpartition(".")
    return (f"megatron_lite.kernels{module}" if module.startswith(".") else module), attribute


def function(op: str, name: str) -> Callable:
    """The function behind backend ``name`` of ``op``; raises ``BackendUnavailableError`` if it cannot be imported."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; use one of {', '.join(OPS)}")
    if name not in OPS[op]:
        raise ValueError(f"unknown {op} backend {name!r}; use one of {', '.join(OPS[op])}")
    module, attribute = _split(OPS[op][name])
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, OSError, AttributeError) as exc:  # OSError: a package built against another CUDA
        raise BackendUnavailableError(f"{module}.{attribute} cannot be imported: {exc}") from exc


def _check_imports(kind: str, name: str, setting: str) -> None:
    """Every function ``kind`` runs under ``name`` resolves, whatever the availability probes said."""
    by_module: dict[str, list[str]] = {}
    failed: list[str] = []
    for op in KINDS[kind]:
        module, attribute = _split(OPS[op][name])
        by_module.setdefault(module, []).append(attribute)
        try:
            function(op, name)
        except BackendUnavailableError:
            failed.append(module)
    if failed:
        module = failed[0]
        hint = _INSTALL_HINTS.get(module.split(".")[0], f"install {module.split('.')[0]}")
        raise BackendUnavailableError(
            f"{setting} is not available: {module} with {', '.join(by_module[module])} cannot be imported "
            f"({hint}); or set model.{kind}_backend=torch"
        )


def require_backend(kind: str, name: str) -> None:
    """Raise ``BackendUnavailableError`` unless backend ``name`` of ``kind`` (attention|norm|loss|elementwise) can run here."""
    _check_name(kind, name)
    setting = f"model.{kind}_backend={name}"
    reason = _unavailable_reason(name, "|".join(n for n in choices(kind) if n != name))
    if reason is not None:
        raise BackendUnavailableError(f"{setting} but {reason}")
    _check_imports(kind, name, setting)


def describe(model_config=None) -> str:
    """One line per op: its backends here, the chosen one (``model_config``'s <kind>_backend) marked."""
    kind_of = {op: kind for kind, ops in KINDS.items() for op in ops}
    lines = []
    for op, backends in OPS.items():
        chosen = getattr(model_config, f"{kind_of[op]}_backend", None)
        cells = []
        for name in backends:
            marks = (["chosen"] if name == chosen else []) + ([] if _runs_here(name) else ["unavailable"])
            cells.append(name + (f" ({', '.join(marks)})" if marks else ""))
        lines.append(f"{op}: {', '.join(cells)}")
    return "\n".join(lines)


def _runs_here(name: str) -> bool:
    return _unavailable_reason(name, "") is None
