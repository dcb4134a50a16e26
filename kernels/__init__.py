"""Triton kernels with PyTorch references behind the same signatures.

``flash_attention``, ``layer_norm``, ``rms_norm``, ``swiglu``, ``apply_rotary``,
``cross_entropy`` and ``vocab_parallel_cross_entropy`` run the Triton kernels (on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``); ``reference`` holds the PyTorch versions they are tested against, and
``backends`` is the registry of every op's backends (torch, triton, flash_attn, apex) that the
model and the benchmark call, with what can run here.
"""

from . import backends, reference
from .attention import flash_attention
from .cross_entropy import cross_entropy, vocab_parallel_cross_entropy
from .elementwise import apply_rotary, swiglu
from .layernorm import layer_norm, rms_norm

__all__ = ["backends", "reference", "flash_attention", "layer_norm", "rms_norm", "swiglu", "apply_rotary",
           "cross_entropy", "vocab_parallel_cross_entropy"]
