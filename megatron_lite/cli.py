"""What every command line shares: an error the user can fix is one line, ``error: ...``, and exit code 2."""

from __future__ import annotations

import sys
import time
from typing import Callable


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (config, checkpoint, conversion, fine-tuning records) or a
    diverged run, not a bug."""
    from megatron_lite.config import ConfigError
    from megatron_lite.convert.tensor_io import ConversionError
    from megatron_lite.rlhf.data import RLHFDataError
    from megatron_lite.training.checkpoint import CheckpointError
    from megatron_lite.training.divergence import TrainingDivergedError

    return ConfigError, CheckpointError, ConversionError, RLHFDataError, TrainingDivergedError


def report_user_error(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def run_timed(action: Callable[[], str]) -> int:
    """Run ``action``, which returns what it wrote; print that with the time taken and return 0,
    or report a user error and return 2."""
    start = time.perf_counter()
    try:
        done = action()
    except user_errors() as exc:
        return report_user_error(exc)
    print(f"{done} in {time.perf_counter() - start:.1f}s")
    return 0
