"""LaunchTuner: times each candidate once per key and reuses the fastest."""

import math

import pytest

from megatron_lite.kernels._common import LaunchTuner
from tests.distributed import run_distributed


class FakeClock:
    """Times a launch by the cost its candidate declares; counts how often it was asked."""

    def __init__(self, costs: dict):
        self.costs, self.calls = costs, []

    def __call__(self, launch) -> float:
        candidate = launch()
        self.calls.append(candidate)
        return self.costs[candidate]


def test_picks_the_fastest_candidate_and_remembers_it_per_key():
    clock = FakeClock({"a": 3.0, "b": 1.5, "c": 2.0})
    tuner = LaunchTuner(timer=clock, enabled=lambda: True)
    assert tuner.pick("shape-1", ["a", "b", "c"], lambda c: c) == "b"
    assert clock.calls == ["a", "b", "c"]
    assert tuner.pick("shape-1", ["a", "b", "c"], lambda c: c) == "b"
    assert len(clock.calls) == 3  # no second timing for a known key
    clock.costs["a"] = 0.5
    assert tuner.pick("shape-2", ["a", "b", "c"], lambda c: c) == "a"


def test_candidates_are_built_only_for_a_new_key():
    built = []

    def candidates():
        built.append(1)
        return ["a", "b"]

    tuner = LaunchTuner(timer=FakeClock({"a": 2.0, "b": 1.0}), enabled=lambda: True)
    assert [tuner.pick("k", candidates, lambda c: c) for _ in range(3)] == ["b", "b", "b"]
    assert len(built) == 1


def test_settings_that_do_not_fit_are_passed_over_and_none_fitting_is_an_error():
    clock = FakeClock({"huge": math.inf, "small": 4.0})
    tuner = LaunchTuner(timer=clock, enabled=lambda: True)
    assert tuner.pick("k", ["huge", "small"], lambda c: c) == "small"
    with pytest.raises(RuntimeError, match="no launch setting fits this device"):
        tuner.pick("k2", ["huge"] * 2, lambda c: c)


def test_candidates_this_triton_cannot_build_lose_and_other_errors_surface():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    from megatron_lite.kernels._common import _time_on_gpu

    def failing(error):
        def timer(launch, **_):
            raise error
        return timer

    for error in (OutOfResources(300000, 232448, "shared memory"), PTXASError("ptxas fatal"),
                  CompilationError("src", None, "bad"), RuntimeError("PassManager::run failed")):
        assert _time_on_gpu(lambda: None, timer=failing(error)) == math.inf
    assert _time_on_gpu(lambda: None, timer=lambda launch, **_: 0.25) == 0.25
    with pytest.raises(RuntimeError, match="CUDA error: an illegal memory access"):
        _time_on_gpu(lambda: None, timer=failing(RuntimeError("CUDA error: an illegal memory access")))


def test_disabled_or_single_candidate_takes_the_default_without_timing():
    clock = FakeClock({"a": 9.0, "b": 1.0})
    assert LaunchTuner(timer=clock, enabled=lambda: False).pick("k", ["a", "b"], lambda c: c) == "a"
    assert LaunchTuner(timer=clock, enabled=lambda: True).pick("k", ["a"], lambda c: c) == "a"
    assert clock.calls == []


def _agreeing_ranks(rank: int, world_size: int) -> list:
    import torch.distributed as dist

    # Each rank's clock favours a different setting; together "b" costs least (2 + 2 vs 1 + 5, 5 + 1).
    costs = [{"a": 1.0, "b": 2.0, "c": 5.0}, {"a": 5.0, "b": 2.0, "c": 1.0}][rank]
    tuner = LaunchTuner(timer=FakeClock(costs), enabled=lambda: True)
    alone = LaunchTuner(timer=FakeClock(costs), enabled=lambda: True).pick("k", ["a", "b", "c"], lambda c: c)
    agreed = tuner.pick("k", ["a", "b", "c"], lambda c: c, group=dist.group.WORLD)
    failed = LaunchTuner(timer=FakeClock({"x": [math.inf, 1.0][rank], "y": 3.0}), enabled=lambda: True)
    skipped = failed.pick("k", ["x", "y"], lambda c: c, group=dist.group.WORLD)  # x failed on rank 0, so nobody takes it
    return [alone, agreed, skipped]


def test_ranks_of_a_tuning_group_agree_on_one_setting():

    results = run_distributed(_agreeing_ranks, 2)
    assert results == [["a", "b", "y"], ["c", "b", "y"]]
