"""Pieces shared by the Triton kernels: interpreter detection, output allocation, launching.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) is how the kernels are tested without a
GPU. It cannot autotune, and its ``tl.dot`` on bfloat16 multiplies raw bits, so kernels ask
``dot_upcast`` whether to lift bfloat16 operands to float32 first.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    """True when ``tl.dot`` on ``dtype`` operands would be wrong here (bfloat16 in the interpreter)."""
    return interpreting() and dtype == torch.bfloat16


_poison_outputs = os.environ.get("MEGATRON_LITE_POISON_OUTPUTS", "0") == "1"


@contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    """Allocate kernel outputs filled with NaN, so an element a kernel forgets to write shows up."""
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all inputs must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"Triton kernels need CUDA tensors, got tensors on {device}; move them to a GPU, "
            f"or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
        )


def multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def seq_bucket(length: int) -> int:
    """Autotuning key for a sequence length: the next power of two, so a new length reuses a tuning."""
    return triton.next_power_of_2(max(length, 16))
