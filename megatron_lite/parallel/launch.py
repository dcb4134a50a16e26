"""Run a function on N gloo ranks in child processes of this one and collect what each returns:
the launcher of the distributed tests and of the CPU benchmarks (``torchrun`` launches real runs).

Launching ranks costs seconds, so a caller should run several checks inside one launch. A
failure on any rank is raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout_s: float, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # the ranks share this machine's cores
    result: dict[str, Any]
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0,
                    join_timeout_s: float = 900.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return per-rank results.

    ``fn`` must be importable (a module-level function) and its return value picklable. The
    process group is initialised before ``fn`` runs (the env:// variables are set too), with
    collectives timing out after ``timeout_s``; a rank still running after ``join_timeout_s``
    is killed.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, timeout_s, fn, args, out_dir))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=join_timeout_s)
            if p.is_alive():
                p.kill()
        return [_result(out_dir, r, procs[r].exitcode) for r in range(world_size)]


def _result(out_dir: str, rank: int, exitcode: int | None) -> Any:
    path = os.path.join(out_dir, f"rank{rank}.pt")
    if not os.path.exists(path):
        raise RuntimeError(f"rank {rank} exited with code {exitcode} and no result")
    result = torch.load(path, weights_only=False)
    if not result["ok"]:
        raise AssertionError(f"rank {rank} failed:\n{result['error']}")
    return result["value"]
