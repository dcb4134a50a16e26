"""Bytes handed to collectives and point-to-point sends, per group kind.

Every communicating call in ``parallel.pipeline`` and ``parallel.data_parallel`` takes an
optional ``CommStats`` and records what it issued, so a benchmark or a test can compare a
step's traffic with the analytical count (and see that nothing was sent when nothing should be).

Two numbers per call: ``payload`` is the size of the tensor handed to the call; ``sent`` is
what one rank puts on the wire under the bandwidth-optimal ring algorithms (an all-reduce of
S bytes over n ranks sends 2(n-1)/n x S, a reduce-scatter or all-gather of a full buffer of
S bytes sends (n-1)/n x S, a point-to-point send sends S).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

GROUP_KINDS = ("tp", "pp", "dp", "embedding")

_RING_FACTORS = {
    "all_reduce": lambda n: 2.0 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "send": lambda n: 1.0,
}


@dataclass
class CommStats:
    payload_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sent_bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, kind: str, op: str, nbytes: int, group_size: int) -> None:
        """One call of ``op`` on a group of ``kind``; ``nbytes`` is the full buffer's size."""
        if kind not in GROUP_KINDS:
            raise ValueError(f"unknown group kind {kind!r}; expected one of {', '.join(GROUP_KINDS)}")
        if op not in _RING_FACTORS:
            raise ValueError(f"unknown communication op {op!r}; expected one of {', '.join(_RING_FACTORS)}")
        self.payload_bytes[kind] += int(nbytes)
        self.sent_bytes[kind] += _RING_FACTORS[op](group_size) * nbytes
        self.calls[f"{kind}.{op}"] += 1

    def reset(self) -> None:
        self.payload_bytes.clear()
        self.sent_bytes.clear()
        self.calls.clear()

    def as_dict(self) -> dict[str, dict]:
        return {
            "payload_bytes": dict(self.payload_bytes),
            "sent_bytes": dict(self.sent_bytes),
            "calls": dict(self.calls),
        }


def record(stats: CommStats | None, kind: str, op: str, nbytes: int, group_size: int) -> None:
    """``stats.record`` that accepts ``None`` (no accounting), so callers stay one line."""
    if stats is not None:
        stats.record(kind, op, nbytes, group_size)
