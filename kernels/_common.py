"""Pieces shared by the Triton kernels: interpreter detection, output allocation, launching.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) is how the kernels are tested without a
GPU. It cannot autotune, and its ``tl.dot`` on bfloat16 multiplies raw bits, so kernels ask
``dot_upcast`` whether to lift bfloat16 operands to float32 first.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Sequence

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


def tuning_enabled() -> bool:
    """Launch tuning runs on GPU unless MEGATRON_LITE_KERNEL_TUNING=0 pins the first candidate."""
    return not interpreting() and os.environ.get("MEGATRON_LITE_KERNEL_TUNING", "1") != "0"


def gpu_time_ms(fn: Callable[[], Any], rounds: int = 5, round_ms: float = 10.0) -> float:
    """Median milliseconds per call of ``fn`` on the GPU, host overhead excluded.

    Each round queues its calls behind a device-side spin long enough for the host to enqueue
    them all, then times them back to back between two CUDA events. So a short kernel is charged
    neither for Python time between launches nor for an idle device waiting on the host.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, min(200, int(round_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(rounds):
        torch.cuda._sleep(calls * _SPIN_CYCLES_PER_CALL)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


_SPIN_CYCLES_PER_CALL = 1_000_000  # about 0.5 ms at 2 GHz: more than the host needs to enqueue one call


def tuning_time_ms(fn: Callable[[], Any]) -> float:
    """What a tuner times a candidate with: ``gpu_time_ms`` with fewer, shorter rounds."""
    return gpu_time_ms(fn, rounds=3, round_ms=5.0)


def _time_on_gpu(launch: Callable[[], Any], timer: Callable[..., float] = None) -> float:
    """A candidate that does not fit the device, or that this Triton cannot compile (front end,
    MLIR passes or ptxas), never wins; any other error is raised."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    try:
        from triton.runtime.errors import PTXASError
    except ImportError:  # older Triton
        PTXASError = CompilationError

    try:
        return (timer or tuning_time_ms)(launch)
    except (OutOfResources, CompilationError, PTXASError):
        return math.inf
    except RuntimeError as exc:
        if "PassManager::run failed" in str(exc):  # an MLIR pass of this Triton rejected the kernel
            return math.inf
        raise


def _agree(times: list[float], group) -> list[float]:
    """Every rank of ``group``'s times summed (an inf, a setting that failed, stays inf).

    Ranks that compute the same thing, as tensor-parallel ranks do for a norm outside
    sequence parallelism, must launch it the same way: their results are then bit-identical
    and parameters replicated over them cannot drift apart. They make their first call per
    shape in the same order, so the agreement is one all-reduce inside it.
    """
    import torch.distributed as dist

    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return times
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    summed = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(summed, group=group)
    return summed.tolist()


class LaunchTuner:
    """Picks launch settings per shape key by timing every candidate once, then reuses the pick.

    ``triton.autotune`` cannot express settings that change the grid together with a scratch
    buffer sized by it (the norm backward's per-program partial sums), so those kernels time
    whole launches here. The first candidate is the default: it is used under the interpreter,
    with tuning disabled, or when there is only one. A launch must be repeatable (it may run
    many times while being timed). Given a process group, its ranks agree on one pick.
    """

    def __init__(self, timer: Callable[[Callable[[], Any]], float] = _time_on_gpu,
                 enabled: Callable[[], bool] = tuning_enabled):
        self.timer, self.enabled = timer, enabled
        self.picks: dict[Hashable, Any] = {}
        self.timings: dict[Hashable, list[tuple[Any, float]]] = {}  # what each candidate took, when timed

    def pick(self, key: Hashable, candidates: Sequence | Callable[[], Sequence], launch: Callable[[Any], Any],
             group=None):
        """The setting for ``key``; ``candidates`` (default first) may be a function, so a call
        with a known key builds no list. Every rank of ``group`` (if any) gets the same pick: the
        least total time over them."""
        if key not in self.picks:
            if callable(candidates):
                candidates = candidates()
            if len(candidates) == 1 or not self.enabled():
                self.picks[key] = candidates[0]
            else:
                times = _agree([self.timer(lambda c=c: launch(c)) for c in candidates], group)
                self.timings[key] = list(zip(candidates, times))
                if all(math.isinf(t) for t in times):
                    raise RuntimeError(f"no launch setting fits this device for {key}: tried {list(candidates)}")
                self.picks[key] = candidates[times.index(min(times))]
        return self.picks[key]
