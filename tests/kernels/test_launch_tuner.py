"""LaunchTuner: times each candidate once per key and reuses the fastest."""

import math

import pytest

from megatron_lite.kernels._common import LaunchTuner


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


def test_settings_that_do_not_fit_are_passed_over_and_none_fitting_is_an_error():
    clock = FakeClock({"huge": math.inf, "small": 4.0})
    tuner = LaunchTuner(timer=clock, enabled=lambda: True)
    assert tuner.pick("k", ["huge", "small"], lambda c: c) == "small"
    with pytest.raises(RuntimeError, match="no launch setting fits this device"):
        tuner.pick("k2", ["huge"] * 2, lambda c: c)


def test_disabled_or_single_candidate_takes_the_default_without_timing():
    clock = FakeClock({"a": 9.0, "b": 1.0})
    assert LaunchTuner(timer=clock, enabled=lambda: False).pick("k", ["a", "b"], lambda c: c) == "a"
    assert LaunchTuner(timer=clock, enabled=lambda: True).pick("k", ["a"], lambda c: c) == "a"
    assert clock.calls == []
