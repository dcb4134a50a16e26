"""Weighted mixtures of datasets.

Sample ``i`` of the mixture comes from the source whose share lags its weight the most:
``argmax_d(w_d * max(i, 1) - count_d)``, the lowest index winning ties (the rule and arithmetic
of Megatron-LM's ``build_blending_indices``, so both produce the same arrays). No source is
ever a whole sample ahead of its share; with two sources, or weights that are not extreme,
none is a whole sample behind either, at any prefix. With three or more very uneven weights a
small source can lag by a little more (1.3 samples for 0.98/0.01/0.01): the rule serves the
source that lags most, not the one that would lag longest.

The rule is sequential, so numpy steps many stretches of the mixture side by side instead: the
samples are cut into equal lanes, each lane starts from a guessed count vector (its weights
times its first position, rounded by largest remainder), and one numpy operation advances
every lane by one sample. A lane whose guess was off by a sample or two still falls onto the
rule's own counts within a few steps, because the rule serves whichever source lags, so the
guess only has to be close. Exactness does not depend on it: a lane is accepted only once it
starts with exactly the counts the lane before it ended with (lane 0 starts at zero); any
other lane is stepped again from those counts, and this repeats until every lane chains.
"""

from __future__ import annotations

import numpy as np

from megatron_lite.data.cache import IndexCache


def normalize_weights(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(~np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"mixture weights must be a non-empty list of positive numbers, got {weights.tolist()}")
    return weights / weights.sum()


_LANES = 4096  # stretches of the mixture stepped side by side: enough that numpy's per-call cost vanishes
_MIN_LANE = 256  # samples per lane at least, so a short mixture does not become all guesses
_FLUSH = 64  # steps buffered before they are written out, so each lane's write is one contiguous run
_WINDOW = 32  # steps a re-stepped lane takes before it is checked for having rejoined its old path


def _source_dtype(num_sources: int):
    return np.int16 if num_sources < 2**15 else np.int32


def build_blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each sample, index of that sample within its source), shapes (num_samples,)."""
    weights = normalize_weights(weights)
    if num_samples <= 0:
        return np.empty(0, dtype=_source_dtype(len(weights))), np.empty(0, dtype=np.int64)
    lanes = max(1, min(_LANES, num_samples // _MIN_LANE))
    length = -(-num_samples // lanes)
    first = np.arange(lanes, dtype=np.int64) * length
    start_counts = _guess_counts(weights, first)  # (sources, lanes)
    end_counts = start_counts.copy()
    source = np.empty(lanes * length, dtype=_source_dtype(len(weights)))
    within = np.empty(lanes * length, dtype=np.int64)
    by_lane = source.reshape(lanes, length), within.reshape(lanes, length)  # row j: samples of lane j
    _step_lanes(weights, first, end_counts, *by_lane)
    # A lane is final once it starts with the counts the lane before it ended with.
    stale = _unchained(start_counts, end_counts)
    while len(stale):
        moved = end_counts[:, stale - 1] - start_counts[:, stale]
        start_counts[:, stale] = end_counts[:, stale - 1]
        _restep_lanes(weights, first, start_counts, moved, end_counts, *by_lane, stale)
        stale = _unchained(start_counts, end_counts)
    return source[:num_samples], within[:num_samples]


def _guess_counts(weights: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Counts (sources, lanes) as float64 near weights * first, summing exactly to first."""
    target = np.multiply.outer(weights, first.astype(np.float64))
    counts = np.floor(target)
    missing = first - counts.sum(axis=0).astype(np.int64)
    rank = np.argsort(np.argsort(counts - target, axis=0, kind="stable"), axis=0, kind="stable")
    return counts + (rank < missing[None, :])


def _unchained(start_counts: np.ndarray, end_counts: np.ndarray) -> np.ndarray:
    return np.flatnonzero((start_counts[:, 1:] != end_counts[:, :-1]).any(axis=0)) + 1


def _step_lanes(weights: np.ndarray, first: np.ndarray, counts: np.ndarray, source: np.ndarray,
                within: np.ndarray, offset: int = 0) -> None:
    """Apply the rule for source.shape[1] samples in every lane: sample first[j] + offset + t
    comes from source[j, t], its index there is within[j, t]. counts (sources, lanes), float64
    holding exact integers, is advanced in place.

    The error is computed exactly as the rule does (weight * float position - float count),
    so every comparison, ties included, comes out as in the sequential loop."""
    num_sources, lanes = counts.shape
    steps = source.shape[1]
    position = (first + offset).astype(np.float64)
    errors = np.empty((num_sources, lanes))
    best = np.empty(lanes)
    tie = np.empty(lanes, dtype=bool)
    chosen = np.empty(lanes, dtype=source.dtype)
    slots = np.empty(lanes, dtype=np.intp)
    lane_count = np.intp(lanes)
    flat_counts = counts.reshape(-1)
    lane_offsets = np.arange(lanes)
    picked = np.empty((_FLUSH, lanes), dtype=source.dtype)
    taken = np.empty((_FLUSH, lanes), dtype=within.dtype)
    for t in range(steps):
        np.multiply.outer(weights, position if t or offset else np.maximum(position, 1.0), out=errors)
        np.subtract(errors, counts, out=errors)
        np.copyto(best, errors[0])
        for d in range(1, num_sources):
            np.maximum(best, errors[d], out=best)
        chosen.fill(num_sources - 1)  # some source attains the maximum; the lowest such one wins
        for d in range(num_sources - 2, -1, -1):
            np.equal(errors[d], best, out=tie)
            np.copyto(chosen, d, where=tie)
        row = t % _FLUSH
        picked[row] = chosen
        np.multiply(chosen, lane_count, out=slots)
        slots += lane_offsets
        count = flat_counts[slots]
        taken[row] = count
        count += 1.0
        flat_counts[slots] = count
        position += 1.0
        if row == _FLUSH - 1 or t == steps - 1:
            done = slice(t - row, t + 1)
            source[:, done], within[:, done] = picked[: row + 1].T, taken[: row + 1].T


def _restep_lanes(weights, first, start_counts, moved, end_counts, source, within, lanes: np.ndarray) -> None:
    """Step ``lanes`` again from their corrected start counts (``moved`` from where their recorded
    picks started). A lane that reaches the counts its recorded picks had at the same step follows
    them from there on, so only the steps before that point are rewritten; one that never does
    is stepped to its end."""
    length, num_sources = source.shape[1], len(weights)
    counts = start_counts[:, lanes].copy()
    apart = moved.copy()  # new counts minus recorded counts, at the current step
    active = np.arange(len(lanes))
    for offset in range(0, length, _WINDOW):
        steps = slice(offset, min(offset + _WINDOW, length))
        rows = lanes[active]
        old_source = source[rows, steps]
        new_source, new_within = np.empty_like(old_source), np.empty(old_source.shape, dtype=within.dtype)
        block = counts[:, active].copy()
        _step_lanes(weights, first[rows], block, new_source, new_within, offset=offset)
        counts[:, active] = block
        source[rows, steps], within[rows, steps] = new_source, new_within
        for d in range(num_sources):
            apart[d, active] += (new_source == d).sum(axis=1) - (old_source == d).sum(axis=1)
        active = active[apart[:, active].any(axis=0)]
        if not len(active):
            break
    # Lanes that rejoined end where their recorded picks ended; the others where they were stepped to.
    end_counts[:, lanes[active]] = counts[:, active]


def blending_indices_reference(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule written as a plain loop; tests check the vectorised version against it."""
    weights = normalize_weights(weights)
    counts = np.zeros(len(weights), dtype=np.int64)
    source = np.empty(num_samples, dtype=np.int64)
    within = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        errors = weights * max(i, 1.0) - counts
        chosen = int(np.argmax(errors))
        source[i], within[i] = chosen, counts[chosen]
        counts[chosen] += 1
    return source, within


class BlendedDataset:
    """Samples drawn from several datasets in the proportions of ``weights``."""

    def __init__(self, datasets: list, weights, num_samples: int, cache: IndexCache | None = None, description: dict | None = None):
        self.datasets = datasets
        self.weights = normalize_weights(weights)
        if len(datasets) != len(self.weights):
            raise ValueError(f"{len(datasets)} datasets but {len(self.weights)} weights")
        key = {"kind": "blend", "weights": self.weights.tolist(), "num_samples": num_samples, "sources": description}
        # The raw weights: normalising twice can move a weight by one ulp and change picks.
        build = lambda: dict(zip(("source", "within"), build_blending_indices(weights, num_samples)))  # noqa: E731
        arrays = cache.get_or_build(key, build, "blend") if cache is not None else build()
        self.source_index, self.sample_index = arrays["source"], arrays["within"]
        self._check_sizes()

    def _check_sizes(self) -> None:
        needed = np.bincount(self.source_index, minlength=len(self.datasets))
        for d, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count > len(dataset):
                raise ValueError(f"mixture source {d} provides {len(dataset)} samples but the mixture draws {count}")

    def __len__(self) -> int:
        return len(self.source_index)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.datasets[int(self.source_index[index])][int(self.sample_index[index])]
