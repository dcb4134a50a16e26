"""Weighted mixtures of datasets.

Sample ``i`` of the mixture comes from the source whose share lags its weight the most:
``argmax_d(w_d * max(i, 1) - count_d)``, the lowest index winning ties (the rule and arithmetic
of Megatron-LM's ``build_blending_indices``, so both produce the same arrays). No source is
ever a whole sample ahead of its share; with two sources, or weights that are not extreme,
none is a whole sample behind either, at any prefix. With three or more very uneven weights a
small source can lag by a little more (1.3 samples for 0.98/0.01/0.01): the rule serves the
source that lags most, not the one that would lag longest.

The rule is sequential, but it is the unique fixed point of "choose each sample from the counts
implied by the current guess", and a guess that is right up to position p yields one right up
to p + 1 at least. Starting from a good guess (sources ordered by when they fall behind), a
few vectorised sweeps per block fix every position, so no compiled helper is needed. When one
source dominates, the guess is poor but the sequence is long runs of that source, so the rule
is stepped run by run instead, each run's length solved from the linear growth of the errors.
"""

from __future__ import annotations

import numpy as np

from megatron_lite.data.cache import IndexCache

_MAX_SWEEPS = 32  # per block, before switching to stepping run by run
_RUNS_PER_SWEEP = 16  # step run by run when the guess changes source less often than every 16 samples
_BLOCK = 1 << 16  # samples per block: a repair sweep re-checks the rest of its block, so blocks stay small


def normalize_weights(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(~np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"mixture weights must be a non-empty list of positive numbers, got {weights.tolist()}")
    return weights / weights.sum()


def build_blending_indices(weights, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each sample, index of that sample within its source), shapes (num_samples,)."""
    weights = normalize_weights(weights)
    num_sources = len(weights)
    source = np.empty(num_samples, dtype=np.int16 if num_sources < 2**15 else np.int32)
    within = np.empty(num_samples, dtype=np.int64)
    counts = np.zeros(num_sources, dtype=np.int64)
    for start in range(0, num_samples, _BLOCK):
        stop = min(start + _BLOCK, num_samples)
        block = _solve_block(weights, counts, start, stop)
        onehot = block[None, :] == np.arange(num_sources)[:, None]  # (D, n)
        before = np.cumsum(onehot, axis=1) - onehot + counts[:, None]  # picks of each source before i
        within[start:stop] = before[block, np.arange(stop - start)]
        source[start:stop] = block
        counts += onehot.sum(axis=1)
    return source, within


def _solve_block(weights: np.ndarray, counts: np.ndarray, start: int, stop: int) -> np.ndarray:
    steps = np.maximum(np.arange(start, stop, dtype=np.float64), 1.0)  # (n,)
    guess = _initial_guess(weights, counts, start, stop)
    if np.count_nonzero(np.diff(guess)) * _RUNS_PER_SWEEP < len(guess):
        return _simulate_runs(weights, counts, start, stop)  # few, long runs: step run by run
    sources = np.arange(len(weights))[:, None]
    settled = 0  # guess[:settled] is known to be the greedy choice
    for _ in range(_MAX_SWEEPS):
        onehot = guess[None, settled:] == sources  # (D, m)
        before = np.cumsum(onehot, axis=1) - onehot + (counts[:, None] + _prefix_counts(guess[:settled], len(weights)))
        errors = weights[:, None] * steps[None, settled:] - before  # (D, m)
        chosen = _first_argmax(errors)
        mismatch = np.flatnonzero(chosen != guess[settled:])
        if len(mismatch) == 0:
            return guess
        settled = _repair(guess, chosen, mismatch, settled)
    # Very uneven weights defeat the guess (small sources wait behind the large one).
    guess[settled:] = _simulate_runs(weights, counts + _prefix_counts(guess[:settled], len(weights))[:, 0], start + settled, stop)
    return guess


def _simulate_runs(weights: np.ndarray, counts: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The rule, stepped one run of a repeated source at a time, in the same float arithmetic."""
    w, c = weights.tolist(), [float(x) for x in counts]
    out = np.empty(stop - start, dtype=np.int64)
    step = start
    while step < stop:
        best = _argmax_error(w, c, step)
        run = _run_length(w, c, best, step, stop)
        out[step - start : step - start + run] = best
        c[best] += run
        step += run
    return out


def _argmax_error(w: list[float], c: list[float], step: int) -> int:
    t = float(max(step, 1))
    best, best_error = 0, w[0] * t - c[0]
    for d in range(1, len(w)):
        error = w[d] * t - c[d]
        if error > best_error:
            best, best_error = d, error
    return best


def _run_length(w: list[float], c: list[float], best: int, step: int, stop: int) -> int:
    """How many steps in a row ``best`` keeps winning: each rival's margin shrinks linearly,
    so solve for the crossing, then confirm the last step with the rule's own arithmetic."""
    if step < 2:  # steps 0 and 1 share t = 1, which breaks the linear form
        return 1
    run = stop - step
    for d in range(len(w)):
        if d != best:
            margin = (w[best] - w[d]) * step - c[best] + c[d]  # at j = 0, shrinks by 1 - w[best] + w[d] per step
            run = min(run, int(margin / (1.0 - w[best] + w[d])) + 1)
    run = max(run, 1)
    while run > 1:
        trial = list(c)
        trial[best] += run - 1
        if _argmax_error(w, trial, step + run - 1) == best:
            break
        run -= 1
    return run


def _first_argmax(errors: np.ndarray) -> np.ndarray:
    """argmax over sources (axis 0), lowest index on ties; row by row, which beats numpy's
    strided axis-0 argmax for a handful of sources."""
    best_error = errors[0].copy()
    best = np.zeros(errors.shape[1], dtype=np.int64)
    for d in range(1, errors.shape[0]):
        wins = errors[d] > best_error
        best[wins] = d
        np.maximum(best_error, errors[d], out=best_error)
    return best


def _repair(guess: np.ndarray, chosen: np.ndarray, mismatch: np.ndarray, settled: int) -> int:
    """Fix the guess where it first disagrees with the rule; returns the new settled length.

    Most disagreements are two neighbours in the wrong order. Swapping them leaves every later
    count unchanged, so all such swaps are made at once. Otherwise the first disagreement is
    fixed by moving the chosen source's next pick forward. Either way the first disagreement
    is fixed, so each sweep settles at least one more position."""
    tail = guess[settled:]
    first = int(mismatch[0])
    swaps = mismatch[mismatch + 1 < len(tail)]
    swaps = swaps[chosen[swaps] == tail[swaps + 1]]
    if len(swaps):
        swaps = swaps[np.concatenate([[True], np.diff(swaps) > 1])]
    if len(swaps) and swaps[0] == first:
        left, right = tail[swaps].copy(), tail[swaps + 1].copy()
        tail[swaps], tail[swaps + 1] = right, left
    else:
        _move_forward(tail, first, int(chosen[first]))
    return settled + first + 1


def _move_forward(tail: np.ndarray, position: int, source: int) -> None:
    """Bring the next pick of ``source`` forward to ``position``; counts after it are unchanged."""
    later = np.flatnonzero(tail[position + 1 :] == source)
    if len(later) == 0:
        tail[position] = source
        return
    found = position + 1 + int(later[0])
    tail[position + 1 : found + 1] = tail[position:found].copy()
    tail[position] = source


def _prefix_counts(prefix: np.ndarray, num_sources: int) -> np.ndarray:
    return np.bincount(prefix, minlength=num_sources)[:, None]


def _initial_guess(weights: np.ndarray, counts: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Order upcoming picks of every source by the step at which that source falls behind
    (its k-th next pick is due around (counts_d + k) / w_d); ties to the lower source index."""
    n = stop - start
    per_source = np.ceil(weights * n).astype(np.int64) + 2
    due = [(counts[d] + np.arange(per_source[d])) / weights[d] for d in range(len(weights))]
    keys = np.concatenate(due)
    labels = np.concatenate([np.full(per_source[d], d) for d in range(len(weights))])
    order = np.lexsort((labels, keys))[:n]
    return labels[order].astype(np.int64)


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
        build = lambda: dict(zip(("source", "within"), build_blending_indices(self.weights, num_samples)))  # noqa: E731
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
