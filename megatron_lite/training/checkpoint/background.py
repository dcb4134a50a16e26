"""Checkpoints written by a background thread while training continues (``checkpoint.async_save``).

The main thread takes a host copy of everything a checkpoint holds at the step boundary
(``live.capture_checkpoint(copy=True)``); one writer thread per run writes the copies through the
same durable path as a synchronous save and publishes them (marker files, ``latest``), so a crash
at any moment leaves the previous checkpoint latest, exactly as before.

Multi-rank: every rank writes its own files, then the ranks agree that all files are written
before rank 0 publishes. The writer thread runs those collectives on a gloo group of its own,
created at start-up by every rank: collectives of two threads on one group could interleave
differently on different ranks and hang, while two groups never share a message.
"""

from __future__ import annotations

import queue
import threading
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from megatron_lite.errors import UserError
from megatron_lite.training.checkpoint.live import CheckpointSnapshot, write_checkpoint

# A save waits for the previous one; a writer stuck this long (a hung file system) ends the run.
WRITER_TIMEOUT = timedelta(minutes=30)


class CheckpointWriteError(UserError, RuntimeError):
    """A background checkpoint write failed; the message names the checkpoint and the cause."""


class BackgroundWriter:
    """Writes submitted checkpoint snapshots in order on one thread. ``wait()`` returns once all
    of them are published and raises the first failure; call ``close()`` before the process ends."""

    def __init__(self):
        self._group = dist.new_group(backend="gloo", timeout=WRITER_TIMEOUT) if dist.is_initialized() else None
        self._jobs: queue.Queue[CheckpointSnapshot | None] = queue.Queue()
        self._failure: tuple[Path, BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, snapshot: CheckpointSnapshot) -> None:
        self._jobs.put(snapshot)

    def wait(self) -> None:
        """Block until every submitted checkpoint is published; raise if one failed."""
        self._jobs.join()
        if self._failure is not None:
            path, error = self._failure
            self._failure = None
            raise CheckpointWriteError(
                f"writing checkpoint {path} in the background failed: {type(error).__name__}: {error}; the "
                f"previous checkpoint stays latest; free space or fix the directory's permissions and resume "
                f"from it, or set checkpoint.async_save=false to save in the training loop"
            ) from error

    def close(self) -> None:
        """Wait for the writes in flight (raising a failure) and stop the thread."""
        try:
            self.wait()
        finally:
            self._jobs.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (snapshot := self._jobs.get()) is not None:
            try:
                if self._failure is None:  # after a failure nothing more is published this run
                    write_checkpoint(snapshot, self._group)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread by wait()
                self._failure = (snapshot.final, error)
            finally:
                self._jobs.task_done()
        self._jobs.task_done()
