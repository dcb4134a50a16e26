"""Weighted mixtures of datasets: the blending rule, ``BlendedDataset``, and mixture plans.

Sample ``i`` of the mixture comes from the source whose share lags its weight the most:
``argmax_d(w_d * max(i, 1) - count_d)``, the lowest index winning ties (the rule and arithmetic
of Megatron-LM's ``build_blending_indices``, so both produce the same arrays). No source is
ever a whole sample ahead of its share; with two sources, or weights that are not extreme,
none is a whole sample behind either, at any prefix. With three or more very uneven weights a
small source can lag by a little more (1.3 samples for 0.98/0.01/0.01): the rule serves the
source that lags most, not the one that would lag longest.

The rule is sequential, so numpy steps many stretches of the mixture side by side instead: the
samples are cut into equal lanes, each lane starts from a guessed count vector, and one fixed
set of numpy operations advances every lane by one sample, whatever the number of sources. The
guess is the weights times a position a few samples before the lane's first one, rounded by
largest remainder, stepped by the rule up to that first sample: a guess off by a sample or two
falls onto the rule's own counts within a few steps, because the rule serves whichever source
lags. Exactness does not depend on it: a lane is accepted only once it starts with exactly the
counts the lane before it ended with (lane 0 starts at zero); any other lane is stepped again
from those counts, and this repeats until every lane chains.

Picks are buffered a few hundred steps at a time and copied into each lane's stretch of the
outputs; by default a second thread does the copying while the next steps run (numpy releases
the GIL for both), which hides about a third of the single-threaded build time.

``plan_mixture`` says what a mixture means before any GPU time is spent: from weights (or target
token counts) per source to the tokens, documents and epochs of each source training will see.
A spec (YAML) looks like::

    total_tokens: 2.0e9        # or num_samples + seq_length
    max_epochs: 4              # warn when a source would be repeated more often
    mixture:
      - {prefix: data/web, weight: 0.7}
      - {prefix: data/code, weight: 0.3}      # or `tokens: 6.0e8` on every entry instead of weights
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from megatron_lite.data.cache import IndexCache
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.errors import UserError


def normalize_weights(weights) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or len(weights) == 0 or np.any(~np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"mixture weights must be a non-empty list of positive numbers, got {weights.tolist()}")
    return weights / weights.sum()


_LANES = 8192  # stretches of the mixture stepped side by side: enough that numpy's per-call cost vanishes
_MIN_LANE = 256  # samples per lane at least, so a short mixture does not become all guesses
_WARMUP = 8  # steps a lane takes from its guess before its first sample, so the guess settles onto the rule
_FLUSH = 256  # steps buffered before they are written out: long runs per lane make the transposing write cheap
_WINDOW = 32  # steps a re-stepped lane takes before it is checked for having rejoined its old path


def _source_dtype(num_sources: int):
    return np.int16 if num_sources < 2**15 else np.int32


def build_blending_indices(weights, num_samples: int, background_writes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(source of each sample, index of that sample within its source), shapes (num_samples,).

    ``background_writes``: copy the stepped picks into the outputs on a second thread while the
    next ones are stepped (about a third of the build's time on one thread)."""
    weights = normalize_weights(weights)
    if num_samples <= 0:
        return np.empty(0, dtype=_source_dtype(len(weights))), np.empty(0, dtype=np.int64)
    lanes = max(1, min(_LANES, num_samples // _MIN_LANE))
    length = -(-num_samples // lanes)
    first = np.arange(lanes, dtype=np.int64) * length
    start_counts = _settled_guess(weights, first)  # (sources, lanes)
    end_counts = start_counts.copy()
    source = np.empty(lanes * length, dtype=_source_dtype(len(weights)))
    within = np.empty(lanes * length, dtype=np.int64)
    by_lane = source.reshape(lanes, length), within.reshape(lanes, length)  # row j: samples of lane j
    writing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blend-writer") if background_writes else nullcontext()
    with writing as writer:
        _step_lanes(weights, first, end_counts, *by_lane, writer=writer)
    # A lane is final once it starts with the counts the lane before it ended with.
    stale = _unchained(start_counts, end_counts)
    while len(stale):
        moved = end_counts[:, stale - 1] - start_counts[:, stale]
        start_counts[:, stale] = end_counts[:, stale - 1]
        _restep_lanes(weights, first, start_counts, moved, end_counts, *by_lane, stale)
        stale = _unchained(start_counts, end_counts)
    return source[:num_samples], within[:num_samples]


def _settled_guess(weights: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Start counts (sources, lanes): exact zeros for lane 0; for the others the rule applied for
    _WARMUP steps from a guess made _WARMUP samples earlier, which lands on the rule's own counts
    far more often than the guess itself (a guess only has to be close; see the module docstring)."""
    counts = _guess_counts(weights, first)
    later = first[1:]
    if len(later) and _WARMUP and later[0] >= _WARMUP:
        earlier = later - _WARMUP
        settled = _guess_counts(weights, earlier)
        discard_source = np.empty((len(earlier), _WARMUP), dtype=_source_dtype(len(weights)))
        _step_lanes(weights, earlier, settled, discard_source, np.empty((len(earlier), _WARMUP), dtype=np.int64))
        counts[:, 1:] = settled
    return counts


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
                within: np.ndarray, offset: int = 0, writer: ThreadPoolExecutor | None = None) -> None:
    """Apply the rule for source.shape[1] samples in every lane: sample first[j] + offset + t
    comes from source[j, t], its index there is within[j, t]. counts (sources, lanes), float64
    holding exact integers, is advanced in place.

    With a ``writer`` thread, buffered picks are written out there while the next ones are
    stepped (numpy releases the GIL for the copies), from two alternating buffers."""
    steps = source.shape[1]
    lanes = _LaneStepper(weights, counts, first + offset, buffered=min(_FLUSH, steps), buffers=2 if writer else 1)
    pending: list[Future | None] = [None] * len(lanes.picked)
    for t in range(steps):
        row = t % lanes.buffered
        lanes.step(row, first_sample=t == 0 and offset == 0)
        if row == lanes.buffered - 1 or t == steps - 1:
            done, filled = slice(t - row, t + 1), lanes.current
            if writer is None:
                lanes.write(source, within, done, filled)
                continue
            pending[filled] = writer.submit(lanes.write, source, within, done, filled)
            lanes.current = (filled + 1) % len(pending)
            if pending[lanes.current] is not None:  # its buffer is about to be refilled
                pending[lanes.current].result()
    for job in pending:
        if job is not None:
            job.result()
    counts[...] = lanes.counts()


class _LaneStepper:
    """The rule applied to every lane at once, in a fixed dozen numpy calls per step whatever the
    number of sources.

    The error is computed exactly as the rule does (weight * float position - float count), so
    every comparison, ties included, comes out as in the sequential loop. Sources are stored
    last one first and ranked 1..N in that order, so among the rows at the maximum the highest
    rank is the lowest source: one max over (row at maximum) * rank picks it, and the rank times
    a row stride plus the lane is where its count lives. Picks are buffered step by step, each
    step one contiguous row, and written to the lanes' stretches in long runs."""

    def __init__(self, weights: np.ndarray, counts: np.ndarray, position: np.ndarray, buffered: int, buffers: int = 1):
        num_sources, lanes = counts.shape
        self.num_sources, self.buffered = num_sources, buffered
        row_stride = lanes + 16  # not a power of two, so the rows do not share cache sets
        rows = np.zeros((num_sources + 1, row_stride))  # row r: counts of the source ranked r; row 0 is never picked
        rows[1:, :lanes] = counts[::-1]
        self.flat_counts, self.held = rows.reshape(-1), rows[1:, :lanes]  # held: (N, lanes)
        self.stride = np.intp(row_stride)
        self.rates = weights[::-1, None].copy()  # (N, 1)
        self.rank_type = np.uint8 if num_sources < 2**8 else np.uint16 if num_sources < 2**16 else np.uint32
        self.ranks = np.arange(1, num_sources + 1, dtype=self.rank_type)[:, None]  # (N, 1)
        self.lane_index = np.arange(lanes, dtype=np.intp)
        self.position = position.astype(np.float64)
        self.errors, self.best = np.empty((num_sources, lanes)), np.empty(lanes)
        self.at_best = np.empty((num_sources, lanes), dtype=self.rank_type)
        # With one-byte ranks the comparison writes straight into the array it multiplies.
        one_byte = self.rank_type is np.uint8
        self.at_best_mask = self.at_best.view(bool) if one_byte else np.empty((num_sources, lanes), dtype=bool)
        self.slots, self.bumped = np.empty(lanes, dtype=np.intp), np.empty(lanes)
        pad = 16  # rows of a power-of-two length would fall on the same cache sets when read down a column
        # buffer b, (steps, lanes): the rank picked, and the count before the pick
        self.picked = [np.empty((buffered, lanes + pad), dtype=self.rank_type)[:, :lanes] for _ in range(buffers)]
        self.taken = [np.empty((buffered, lanes + pad))[:, :lanes] for _ in range(buffers)]
        self.current = 0  # the buffer being filled

    def step(self, row: int, first_sample: bool) -> None:
        errors, best, at_best, slots = self.errors, self.best, self.at_best, self.slots
        picked, taken = self.picked[self.current][row], self.taken[self.current][row]
        np.multiply(self.rates, np.maximum(self.position, 1.0) if first_sample else self.position, out=errors)
        np.subtract(errors, self.held, out=errors)
        np.maximum.reduce(errors, axis=0, out=best)
        np.equal(errors, best, out=self.at_best_mask)
        np.multiply(self.at_best_mask if self.rank_type is not np.uint8 else at_best, self.ranks, out=at_best)
        np.maximum.reduce(at_best, axis=0, out=picked)
        np.multiply(picked, self.stride, out=slots, casting="unsafe")
        slots += self.lane_index
        np.take(self.flat_counts, slots, out=taken, mode="wrap")  # slots are in range; "raise" would buffer the output
        np.add(taken, 1.0, out=self.bumped)
        self.flat_counts[slots] = self.bumped
        self.position += 1.0

    def write(self, source: np.ndarray, within: np.ndarray, done: slice, buffer: int) -> None:
        """Copy buffer rows 0.. into columns ``done`` of the lanes' (lanes, length) outputs."""
        rows = done.stop - done.start
        np.subtract(self.num_sources, self.picked[buffer][:rows].T, out=source[:, done], casting="unsafe")  # rank -> source
        np.copyto(within[:, done], self.taken[buffer][:rows].T, casting="unsafe")

    def counts(self) -> np.ndarray:
        return self.held[::-1]


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


# ----------------------------------------------------------------------------- planning a mixture


class MixtureError(UserError, ValueError):
    """A mixture spec the user can fix; the message names the entry."""


@dataclass
class SourcePlan:
    prefix: str
    weight: float  # normalised
    documents: int
    tokens: int  # in the dataset
    tokens_drawn: float  # by the mixture
    realised_share: float

    @property
    def epochs(self) -> float:
        return self.tokens_drawn / self.tokens if self.tokens else float("inf")


@dataclass
class MixturePlan:
    sources: list[SourcePlan]
    total_tokens: int
    num_samples: int
    max_epochs: float

    @property
    def warnings(self) -> list[str]:
        return [
            f"{s.prefix} would be repeated {s.epochs:.2f} times (more than max_epochs={self.max_epochs:g}); "
            f"lower its weight or add data"
            for s in self.sources if s.epochs > self.max_epochs
        ]

    def mixture_yaml(self) -> str:
        entries = [{"prefix": s.prefix, "weight": round(s.weight, 6)} for s in self.sources]
        return yaml.safe_dump({"data": {"mixture": entries}}, sort_keys=False)

    def table(self) -> str:
        rows = ["| source | weight | realised | documents | tokens | tokens drawn | epochs |", "|---|---|---|---|---|---|---|"]
        for s in self.sources:
            rows.append(f"| {s.prefix} | {s.weight:.4f} | {s.realised_share:.4f} | {s.documents} | {s.tokens} | "
                        f"{s.tokens_drawn:.0f} | {s.epochs:.2f} |")
        return "\n".join(rows)


def load_spec(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MixtureError(f"mixture spec {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MixtureError(f"{path} is not valid YAML ({' '.join(str(exc).split())}); fix the file") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("mixture"), list) or not spec["mixture"]:
        raise MixtureError(f"{path} must hold a mapping with a non-empty 'mixture' list of {{prefix, weight | tokens}}")
    check_entries(spec["mixture"], str(path))
    return spec


def check_entries(entries: list, where: str = "the mixture spec") -> None:
    """Each entry is ``{prefix, weight}`` or ``{prefix, tokens}`` with a positive number; ``where``
    (the spec's file) goes into the message."""
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "prefix" not in entry:
            raise MixtureError(f"{where}: mixture entry {index} must be a mapping with a 'prefix'")
        for key in ("weight", "tokens"):
            if key in entry and not _is_positive_number(entry[key]):
                raise MixtureError(f"{where}: mixture entry {index} ({entry['prefix']}) has {key}={entry[key]!r}; "
                                   f"it must be a positive number (drop the entry to leave the source out)")
    has_tokens = ["tokens" in e for e in entries]
    if any(has_tokens) and not all(has_tokens):
        raise MixtureError(f"{where}: give every mixture entry either a 'weight' or a 'tokens' target, not a mix of both")


def _is_positive_number(value) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def plan_mixture(spec: dict, seq_length: int | None = None) -> MixturePlan:
    entries = spec["mixture"]
    seq_length = int(seq_length or spec.get("seq_length", 2048))
    check_entries(entries)
    has_tokens = ["tokens" in e for e in entries]
    datasets = [IndexedDataset(e["prefix"]) for e in entries]
    if all(has_tokens):
        targets = np.array([float(e["tokens"]) for e in entries])
        total_tokens = int(spec.get("total_tokens", targets.sum()))
        raw_weights = targets
    else:
        raw_weights = np.array([float(e.get("weight", 1.0)) for e in entries])
        total_tokens = _total_tokens(spec, seq_length)
    try:
        weights = normalize_weights(raw_weights)
    except ValueError as exc:
        raise MixtureError(str(exc)) from None
    num_samples = max(1, -(-total_tokens // seq_length))
    source, _ = build_blending_indices(raw_weights, num_samples)  # normalised once, inside
    shares = np.bincount(source, minlength=len(weights)) / num_samples
    sources = [
        SourcePlan(e["prefix"], float(w), len(ds), ds.num_tokens, float(share * num_samples * seq_length), float(share))
        for e, ds, w, share in zip(entries, datasets, weights, shares)
    ]
    return MixturePlan(sources, total_tokens, num_samples, float(spec.get("max_epochs", 4.0)))


def _total_tokens(spec: dict, seq_length: int) -> int:
    if "total_tokens" in spec:
        return int(float(spec["total_tokens"]))
    if "num_samples" in spec:
        return int(spec["num_samples"]) * seq_length
    raise MixtureError("the spec needs 'total_tokens' (or 'num_samples') when entries give weights")
