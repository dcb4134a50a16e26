"""Per-rank random streams for dropout under tensor parallelism.

Replicated activations (the residual stream without sequence parallelism) must drop
the same elements on every tp rank, so they use the default generator, seeded
identically across tp. Sharded activations (attention heads, sequence shards) must
drop different elements per rank, so they run inside ``tracker.fork()``, which swaps
in a stream seeded per tp rank.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

# Offsets keep the sharded stream apart from the default one and stages apart from each other.
TP_STREAM_OFFSET = 2718
PP_STAGE_OFFSET = 100
TP_STREAM = "tensor-parallel"


class RNGStatesTracker:
    """Named generator states that ``fork(name)`` swaps in for the duration of a block."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"random stream {name!r} already exists")
        saved = self._capture()
        torch.manual_seed(seed)
        self._states[name] = self._capture()
        self._restore(saved)

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM) -> Iterator[None]:
        if name not in self._states:
            raise KeyError(f"random stream {name!r} was never added; known: {sorted(self._states)}")
        saved = self._capture()
        self._restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._capture()
            self._restore(saved)

    def get_states(self) -> dict[str, Any]:
        return {name: {k: v.clone() for k, v in state.items()} for name, state in self._states.items()}

    def set_states(self, states: dict[str, Any]) -> None:
        self._states = {name: {k: v.clone() for k, v in state.items()} for name, state in states.items()}

    def _capture(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int, device: torch.device | str = "cpu") -> RNGStatesTracker:
    """Seed the default generator (shared over tp) and return a tracker holding the per-tp-rank stream."""
    stage_seed = seed + PP_STAGE_OFFSET * pp_rank
    torch.manual_seed(stage_seed)
    tracker = RNGStatesTracker(device)
    tracker.add(TP_STREAM, stage_seed + TP_STREAM_OFFSET + tp_rank)
    return tracker
