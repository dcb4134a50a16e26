"""What every command line shares: an error the user can fix is one line, ``error: ...``, and exit code 2.

``megatron_lite.errors.UserError`` is the base of every such error; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from megatron_lite.errors import UserError


def report_user_error(exc: UserError) -> int:
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def run_reporting(command: Callable[[], int]) -> int:
    """Run a command's body and return its exit code; a ``UserError`` is printed as one line and exits 2."""
    try:
        return command()
    except UserError as exc:
        return report_user_error(exc)


def run_timed(action: Callable[[], str]) -> int:
    """Run ``action``, which returns what it wrote; print that with the time taken and return 0,
    or report a user error and return 2."""
    start = time.perf_counter()

    def timed() -> int:
        done = action()
        print(f"{done} in {time.perf_counter() - start:.1f}s")
        return 0

    return run_reporting(timed)
