"""A rank that stops taking part must end its peers' collectives at parallel.timeout_s, not hang them."""

import time

import torch
import torch.distributed as dist

from megatron_lite.config import ParallelConfig
from megatron_lite.parallel.dims import ParallelDims
from tests.distributed import run_distributed

TIMEOUT_S = 3.0


def _one_rank_goes_silent(rank, world):
    dims = ParallelDims.initialize(ParallelConfig(tp=2, timeout_s=TIMEOUT_S))
    x = torch.ones(4)
    dist.all_reduce(x, group=dims.tp_group)  # both ranks alive: the group works
    if rank == 1:
        time.sleep(4 * TIMEOUT_S)  # alive but silent: never joins the next collective
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(x, group=dims.tp_group)
    except RuntimeError as exc:
        return {"elapsed": time.monotonic() - start, "message": str(exc), "after_first": x.tolist()}
    return {"elapsed": time.monotonic() - start, "message": None, "after_first": x.tolist()}


def test_a_silent_rank_times_out_the_collective_instead_of_hanging():
    results = run_distributed(_one_rank_goes_silent, 2)
    outcome = results[0]
    assert outcome["after_first"] == [2.0] * 4  # the first all-reduce ran on both ranks
    assert outcome["message"] is not None, "the collective returned although rank 1 never joined"
    assert "timed out" in outcome["message"].lower() or "timeout" in outcome["message"].lower(), outcome["message"]
    # It gave up after the group's timeout, well before rank 1 would have joined.
    assert TIMEOUT_S * 0.8 <= outcome["elapsed"] < 4 * TIMEOUT_S, outcome
