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


def _cp_step(rank: int, world_size: int, cp: int) -> dict:
    return _tool().cp_step(rank, world_size, cp, 64, 2, 32, 2, 1)


def test_context_parallel_table_runs_on_tiny_shapes():
    tool = _tool()
    results = [run_distributed(_cp_step, ranks, cp)[0] for _, ranks, cp in tool.CP_LAYOUTS]
    rows = [line for line in tool.cp_table(results, 64, 2, 32, 2, 1).splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| 1 rank, cp=1", "| 2 ranks, dp=2", "| 2 ranks, cp=2"]
    assert [r["kv_mb"] for r in results[:2]] == [0.0, 0.0]  # no K/V crosses ranks at cp=1
    # 2 layers x 2 sequences x (K and V) x (forward and backward) x 1/2 x 32 tokens x 1 kv head x 16 dims x 4 bytes
    assert results[2]["kv_mb"] == pytest.approx(2 * 2 * 2 * 2 * 0.5 * 32 * 16 * 4 / 1e6)
