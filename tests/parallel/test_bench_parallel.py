"""tools/bench_parallel.py: what the real ``ParallelStep`` records matches the analytical count."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.distributed import run_distributed

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_parallel.py"
LAYOUTS = [(2, 1, 1, False), (2, 1, 1, True), (1, 2, 1, False)]  # (dp, pp, virtual_pp, zero1)
HIDDEN, LAYERS, TOKENS, MICRO_BATCHES = 32, 2, 8, 2


def _tool():
    spec = importlib.util.spec_from_file_location("bench_parallel", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_step_per_layout(rank: int, world_size: int) -> list[dict]:
    tool = _tool()
    return [tool.bytes_of_one_step(layout, HIDDEN, LAYERS, TOKENS, MICRO_BATCHES) for layout in LAYOUTS]


def test_recorded_bytes_match_the_analytical_count():
    tool = _tool()
    per_rank = run_distributed(_one_step_per_layout, 2)
    for index, layout in enumerate(LAYOUTS):
        for results in per_rank:
            result = results[index]
            expected = tool.analytical_bytes(layout, result, TOKENS, HIDDEN, MICRO_BATCHES)
            counted = {kind: sent for kind, sent in result["stats"]["sent_bytes"].items() if sent}
            assert set(counted) == set(expected), (layout, counted, expected)
            for kind, sent in counted.items():
                assert sent == pytest.approx(expected[kind]), (layout, kind)
