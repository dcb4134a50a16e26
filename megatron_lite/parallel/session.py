"""The life of a command's process group: joined when the command builds its grid
(``ParallelDims.initialize``), left here however the command ends.

A process that exits with its group still open tears the communication threads down during
interpreter shutdown, and a rank then sometimes aborts ("terminate called without an active
exception") after a run that succeeded, so the launcher reports a failure.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch.distributed as dist

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(SIGTERM_EXIT_CODE)


@contextlib.contextmanager
def process_group_session():
    """Destroy the process group opened inside this block when it ends: after a barrier when it
    ends normally (no rank closes its connections while a peer finishes its last collective), at
    once on an exception, so a failing rank exits instead of waiting for peers that may never come.

    SIGTERM inside the block ends it through ``SystemExit`` (so it is left cleanly too), except
    where the training loop takes SIGTERM over to save and stop at a step boundary. A group that
    was open before the block (a test launcher's) is left open.
    """
    owns_group = not dist.is_initialized()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    ended_normally = False
    try:
        yield
        ended_normally = True
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        if owns_group and dist.is_initialized():
            _leave(wait_for_peers=ended_normally)


def _leave(wait_for_peers: bool) -> None:
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        dist.destroy_process_group()
