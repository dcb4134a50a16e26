"""Per-rank random streams for dropout under tensor parallelism.

Dropout never draws from the default generator. A tracker holds two named streams per rank:

- ``REPLICATED_STREAM`` for activations every tp rank holds whole (the residual stream without
  sequence parallelism): seeded the same on every tp rank, so all ranks drop the same elements;
- ``TP_STREAM`` for sharded activations (attention heads, sequence shards): seeded per tp rank, so
  each rank drops different elements of its shard.

Both are offset per pipeline stage and per context-parallel rank (cp ranks hold different tokens
of a sequence: the same draws on each would drop the same offsets of different tokens).
``tracker.fork(name)`` swaps a stream in for the duration of a block and leaves the default
generator as it found it. A model builds one ``ParallelDropout`` per
dropout site, which knows its stream, so ``forward`` passes no random state around.

Activation recomputation runs a forward twice and must drop the same elements both times:
``tracker.recompute_contexts()`` gives the pair of contexts that records the streams around the
first run and replays them around the second (torch's checkpoint restores only the default and
CUDA generators, not these streams).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Offsets keep the sharded stream apart from the replicated one and stages apart from each other.
TP_STREAM_OFFSET = 2718
PP_STAGE_OFFSET = 100
CP_RANK_OFFSET = 1_000_003
TP_STREAM = "tensor-parallel"
REPLICATED_STREAM = "replicated"


class RNGStatesTracker:
    """Named generator states that ``fork(name)`` swaps in for the duration of a block."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, seed: int) -> None:
        """A new stream in the state the default generator would have after ``torch.manual_seed(seed)``."""
        if name in self._states:
            raise ValueError(f"random stream {name!r} already exists")
        self._states[name] = self._seeded(seed)

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

    def recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(record, replay) for one recomputed region: ``record`` wraps the original forward and notes
        every stream's state at its start; ``replay`` wraps the recomputed forward, starts the streams
        from those states, and afterwards puts back the states they had before the replay, so the
        streams go on as if nothing had been recomputed."""
        recorded: dict[str, dict[str, torch.Tensor]] = {}

        @contextlib.contextmanager
        def record() -> Iterator[None]:
            recorded.update(self.get_states())
            yield

        @contextlib.contextmanager
        def replay() -> Iterator[None]:
            if not recorded:
                raise RuntimeError("replaying random streams that were never recorded: enter record() first")
            current = self._states
            self._states = {name: {k: v.clone() for k, v in state.items()} for name, state in recorded.items()}
            try:
                yield
            finally:
                self._states = current

        return record(), replay()

    def get_states(self) -> dict[str, Any]:
        return {name: {k: v.clone() for k, v in state.items()} for name, state in self._states.items()}

    def set_states(self, states: dict[str, Any]) -> None:
        """Restore saved streams. Call it after restoring the default generator: a tracker saved before
        the replicated stream existed had replicated dropout draw from the default generator, so that
        stream continues from the default generator's restored state, as the old code would have."""
        self._states = {name: {k: v.clone() for k, v in state.items()} for name, state in states.items()}
        if REPLICATED_STREAM not in self._states:
            self._states[REPLICATED_STREAM] = self._capture()

    def _seeded(self, seed: int) -> dict[str, torch.Tensor]:
        # Fresh generators: seeding the default one would touch every CUDA device's state.
        state = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.Generator(self.device).manual_seed(seed).get_state()
        return state

    def _capture(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def model_parallel_rng_tracker(
    seed: int, tp_rank: int, pp_rank: int, device: torch.device | str = "cpu", cp_rank: int = 0
) -> RNGStatesTracker:
    """The rank's dropout streams: replicated (seed + 100 x pp_rank + 1000003 x cp_rank on every tp
    rank) and per tp rank."""
    stage_seed = seed + PP_STAGE_OFFSET * pp_rank + CP_RANK_OFFSET * cp_rank
    tracker = RNGStatesTracker(device)
    tracker.add(REPLICATED_STREAM, stage_seed)
    tracker.add(TP_STREAM, stage_seed + TP_STREAM_OFFSET + tp_rank)
    return tracker


class ParallelDropout(nn.Module):
    """Dropout drawing from the tracker stream its activation needs: ``sharded`` (each tp rank holds a
    different part: attention probabilities, a sequence shard) or replicated (every tp rank holds it whole)."""

    def __init__(self, p: float, tracker: RNGStatesTracker, sharded: bool):
        super().__init__()
        self.p, self.tracker = p, tracker
        self.stream = TP_STREAM if sharded else REPLICATED_STREAM

    @property
    def rate(self) -> float:
        """The drop probability now: ``p`` in training, 0 in eval."""
        return self.p if self.training else 0.0

    def random_stream(self) -> contextlib.AbstractContextManager:
        """The block in which to draw this site's mask (for ops that drop inside, such as attention)."""
        return self.tracker.fork(self.stream) if self.rate > 0 else contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0:
            return x
        with self.random_stream():
            return F.dropout(x, self.rate, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, stream={self.stream!r}"
