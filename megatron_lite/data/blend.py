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
to p + 1 at least. Starting from a good guess, one vectorised sweep per block usually confirms
every position, so no compiled helper is needed. Two guesses serve different mixtures:

- runs of the largest source broken by single picks of the others, taken in order of due time,
  each placed at the first step where it overtakes the largest source (solved in closed form,
  since the largest source's count is the step minus the others' picks). It is exact for most
  mixtures with one leading source, however small the others are;
- all sources' picks merged by due time (the k-th next pick of d is due at (count_d + k) / w_d),
  which suits near-equal weights, where its few misorderings are neighbour swaps.

Each block tries them in turn for a few sweeps, keeps the one that got furthest, and puts it
first for the next block. A sweep needs every source's count before every position: three
sources share one int64 cumsum, each in its own 21-bit field. Mixtures that defeat both guesses
(several uneven sources, one of them tiny) fall back to stepping the rule run by run.
"""

from __future__ import annotations

import numpy as np

from megatron_lite.data.cache import IndexCache

_MAX_SWEEPS = 32  # per block, before switching to stepping run by run
_TRIAL_SWEEPS = 4  # per guess, before keeping the one that got furthest
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
    guessers = [_due_time_guess, _dominant_guess]
    for start in range(0, num_samples, _BLOCK):
        stop = min(start + _BLOCK, num_samples)
        block, guessers, before = _solve_block(weights, counts, start, stop, guessers)
        within[start:stop] = _within_source(block, counts) if before is None else _own_count(before, block)
        source[start:stop] = block
        if before is None:
            counts += np.bincount(block, minlength=num_sources)
        else:  # the last position's counts plus its own pick: no pass over the block
            counts = before[:, -1] + (np.arange(num_sources) == block[-1])
    return source, within


def _solve_block(weights: np.ndarray, counts: np.ndarray, start: int, stop: int, guessers: list):
    """The block's picks; ``guessers`` reordered so that the one that served best goes first
    (neighbouring blocks of a mixture favour the same one); and the (D, n) counts before each
    position when the first sweep already confirmed the whole block, else None."""
    steps = np.maximum(np.arange(start, stop, dtype=np.float64), 1.0)  # (n,)
    best = None
    for rank, guesser in enumerate(guessers):
        guess = guesser(weights, counts, start, stop)
        settled, solved, before = _sweep(weights, counts, steps, guess, 0, _TRIAL_SWEEPS)
        if best is None or settled > best[1]:
            best, best_rank = (guess, settled), rank
        if solved:
            break
    guessers = [guessers[best_rank]] + guessers[:best_rank] + guessers[best_rank + 1 :]
    guess, settled = best
    if not solved:
        settled, solved, before = _sweep(weights, counts, steps, guess, settled, _MAX_SWEEPS)
    if not solved:  # very uneven weights can defeat both guesses (small sources wait behind large ones)
        guess[settled:] = _simulate_runs(weights, counts + _prefix_counts(guess[:settled], len(weights))[:, 0], start + settled, stop)
    return guess, guessers, before if solved else None


def _sweep(weights: np.ndarray, counts: np.ndarray, steps: np.ndarray, guess: np.ndarray, settled: int, max_sweeps: int):
    """Repair ``guess`` in place for up to ``max_sweeps`` sweeps; returns the settled length,
    whether all is settled, and the counts before each position if a sweep of the whole block
    confirmed it (None otherwise)."""
    for _ in range(max_sweeps):
        chosen, mismatch, before = _check(weights, counts, steps, guess, settled)
        if len(mismatch) == 0:
            return len(guess), True, before if settled == 0 else None
        settled = _repair(guess, chosen, mismatch, settled)
    return settled, False, None


def _check(weights: np.ndarray, counts: np.ndarray, steps: np.ndarray, guess: np.ndarray, settled: int):
    """The rule's choice at each unsettled position given the counts the guess implies, and the
    positions (relative to ``settled``) where it disagrees with the guess, and those counts (D, m)."""
    before = _counts_before(guess[settled:], counts + _prefix_counts(guess[:settled], len(weights))[:, 0])  # (D, m)
    errors = weights[:, None] * steps[None, settled:] - before  # (D, m)
    chosen = _first_argmax(errors)
    return chosen, np.flatnonzero(chosen != guess[settled:]), before


def _dominant_guess(weights: np.ndarray, counts: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Runs of the largest source broken by single picks of the others: those picks in order of
    due time, each at the first step where it overtakes the largest source (or right after the
    previous pick). With S picks of the others so far, source d overtakes source b once
    t * (1 - w_b + w_d) > c_d + S, since then c_b = t - S."""
    n = stop - start
    big = int(np.argmax(weights))
    others = np.flatnonzero(np.arange(len(weights)) != big)
    if len(others) == 0:
        return np.full(n, big, dtype=np.int64)
    per_source = np.ceil(weights[others] * n).astype(np.int64) + 2
    own = [counts[d] + np.arange(k) for d, k in zip(others, per_source)]  # c_d before each pick of d
    order = np.argsort(np.concatenate([c / weights[d] for d, c in zip(others, own)]), kind="stable")
    picked = np.repeat(others, per_source)[order]
    rank = np.arange(len(order))
    own_before, others_before = np.concatenate(own)[order], counts[others].sum() + rank
    step = np.floor((own_before + others_before) / (1.0 - weights[big] + weights[picked])).astype(np.int64) + 1
    # The division can land one step off where the margin crosses zero; settle it with the rule's arithmetic.
    step -= _overtakes(weights, big, picked, own_before, others_before, step - 1)
    step += ~_overtakes(weights, big, picked, own_before, others_before, step)
    positions = np.maximum.accumulate(np.maximum(step - rank, start)) + rank  # strictly increasing
    guess = np.full(n, big, dtype=np.int64)
    inside = positions < stop
    guess[positions[inside] - start] = picked[inside]
    return guess


def _overtakes(weights: np.ndarray, big: int, picked: np.ndarray, own_before: np.ndarray, others_before: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Whether each picked source beats the largest one at ``step`` (ties to the lower index)."""
    t = np.maximum(step, 1).astype(np.float64)
    own = weights[picked] * t - own_before
    rival = weights[big] * t - (step - others_before)
    return (own > rival) | ((own == rival) & (picked < big))


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
    strided axis-0 argmax for a handful of sources. Overwrites errors[0]."""
    best_error = errors[0]
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


_BITS = 21  # a block's per-source counts fit in 21 bits, so three sources share one int64 cumsum
_PER_WORD = 3
_FIELD_MASK = (1 << _BITS) - 1


def _field_shifts(num_sources: int, first: int) -> np.ndarray:
    """Bit offset of each source's field in the word holding sources first..first + 2; -1 outside it."""
    shifts = np.full(num_sources, -1, dtype=np.int64)
    width = min(_PER_WORD, num_sources - first)
    shifts[first : first + width] = _BITS * np.arange(width)
    return shifts


def _packed_before(block: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Exclusive cumsum of 1 << shift over the picks inside the word (a table lookup beats a shift)."""
    ones = np.where(shifts >= 0, np.left_shift(1, np.maximum(shifts, 0)), 0).take(block)
    packed = np.cumsum(ones)
    packed -= ones
    return packed


def _counts_before(block: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(D, n): picks of each source before each position, starting from ``counts``. One cumsum
    per three sources: the per-source counts ride in separate 21-bit fields of an int64."""
    before = np.empty((len(counts), len(block)), dtype=np.int64)
    for first in range(0, len(counts), _PER_WORD):
        shifts = _field_shifts(len(counts), first)
        packed = _packed_before(block, shifts)
        for d in range(first, min(first + _PER_WORD, len(counts))):
            np.bitwise_and(np.right_shift(packed, shifts[d]), _FIELD_MASK, out=before[d])
            before[d] += counts[d]
    return before


def _within_source(block: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Index of each pick within its source: that source's picks before it."""
    within = counts.take(block)
    for first in range(0, len(counts), _PER_WORD):
        shifts = _field_shifts(len(counts), first)
        packed = _packed_before(block, shifts)
        own_shift = shifts.take(block)  # (n,)
        fields = np.bitwise_and(np.right_shift(packed, np.maximum(own_shift, 0)), _FIELD_MASK)
        within += np.where(own_shift >= 0, fields, 0) if len(counts) > _PER_WORD else fields
    return within


def _own_count(before: np.ndarray, block: np.ndarray) -> np.ndarray:
    """before[block[i], i] for every i, through flat indices (cheaper than 2-D fancy indexing)."""
    flat = block * len(block)
    flat += np.arange(len(block))
    return before.ravel().take(flat)


def _prefix_counts(prefix: np.ndarray, num_sources: int) -> np.ndarray:
    return np.bincount(prefix, minlength=num_sources)[:, None]


def _due_time_guess(weights: np.ndarray, counts: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Order upcoming picks of every source by the step at which that source falls behind
    (its k-th next pick is due around (counts_d + k) / w_d); ties to the lower source index."""
    n = stop - start
    per_source = np.ceil(weights * n).astype(np.int64) + 2
    keys = np.concatenate([(counts[d] + np.arange(per_source[d])) / weights[d] for d in range(len(weights))])
    order = np.argsort(keys, kind="stable")[:n]  # stable: equal keys stay in source order
    return np.repeat(np.arange(len(weights)), per_source)[order]


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
