import numpy as np
import pytest

from megatron_lite.data import blend
from megatron_lite.data.blend import BlendedDataset, blending_indices_reference, build_blending_indices
from megatron_lite.data.cache import IndexCache

WEIGHT_SETS = [[0.5, 0.3, 0.2], [0.7, 0.3], [1, 1, 1], [0.123, 0.456, 0.421], [1, 2, 3, 4, 5], [0.98, 0.01, 0.01], [5]]


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_vectorised_rule_equals_the_loop(weights):
    source, within = build_blending_indices(weights, 40_000)
    ref_source, ref_within = blending_indices_reference(weights, 40_000)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def prefix_deviation(source: np.ndarray, weights) -> np.ndarray:
    """(D, n): picks of each source among the first n samples minus weight * n, for n = 1..N."""
    w = np.asarray(weights, float) / sum(weights)
    counts = np.cumsum(source[None, :] == np.arange(len(w))[:, None], axis=1)
    return counts - w[:, None] * np.arange(1, len(source) + 1)[None, :]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.7, 0.3], [1, 1, 1], [0.123, 0.456, 0.421], [0.6, 0.25, 0.15], [0.001, 0.999]])
def test_every_prefix_within_one_sample_of_weights(weights):
    source, within = build_blending_indices(weights, 50_000)
    assert np.abs(prefix_deviation(source, weights)).max() < 1.0
    for d in range(len(weights)):  # the within-source index counts that source's samples 0, 1, 2, ...
        np.testing.assert_array_equal(within[source == d], np.arange(np.count_nonzero(source == d)))


@pytest.mark.parametrize("weights", [[0.98, 0.01, 0.01], [1, 2, 3, 4, 5], [0.3, 0.001, 0.2, 0.499]])
def test_skewed_weights_never_overdraw_a_source(weights):
    # The rule picks a source only when it lags the most, so no source ever gets a full sample
    # ahead of its share of the samples before the pick; with 3+ sources and very uneven
    # weights a small source can lag by slightly more than one sample (1.3 for 0.98/0.01/0.01).
    n = 50_000
    source, _ = build_blending_indices(weights, n)
    w = np.asarray(weights, float) / sum(weights)
    before_pick = np.cumsum(source[None, :] == np.arange(len(w))[:, None], axis=1)[:, :-1]  # picks in [0, i]
    assert (before_pick - w[:, None] * np.arange(1, n)[None, :]).max() < 1.0
    assert np.abs(prefix_deviation(source, weights)).max() < 1.5


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="positive numbers"):
        build_blending_indices([1.0, -1.0], 10)
    with pytest.raises(ValueError, match="positive numbers"):
        build_blending_indices([], 10)


class Numbers:
    def __init__(self, offset, size):
        self.offset, self.size = offset, size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(i)
        return np.array([self.offset + i])


def test_blended_dataset_cached_equals_uncached(tmp_path):
    parts = [Numbers(0, 400), Numbers(1000, 400)]
    plain = BlendedDataset(parts, [3, 1], 500)
    cache = IndexCache(tmp_path)
    first = BlendedDataset(parts, [3, 1], 500, cache)
    second = BlendedDataset(parts, [3, 1], 500, cache)
    assert cache.builds == 1 and cache.hits == 2
    values = [int(plain[i][0]) for i in range(500)]
    assert values == [int(first[i][0]) for i in range(500)] == [int(second[i][0]) for i in range(500)]
    assert sum(v >= 1000 for v in values) == 125
    with pytest.raises(ValueError, match="source 1 provides 100 samples but the mixture draws 125"):
        BlendedDataset([Numbers(0, 400), Numbers(1000, 100)], [3, 1], 500)


def test_blended_dataset_normalises_weights_once():
    # Normalising 0.7/0.2/0.1 a second time moves every weight by an ulp and changes pick 6, so
    # the dataset must hand the raw weights to the rule, as Megatron-LM normalises them once.
    weights = [0.7, 0.2, 0.1]
    parts = [Numbers(0, 100), Numbers(1000, 100), Numbers(2000, 100)]
    expected, _ = blending_indices_reference(weights, 50)
    assert BlendedDataset(parts, weights, 50).source_index.tolist() == expected.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_random_weights_across_block_boundaries_equal_the_loop(seed):
    # Lanes longer than the buffer of steps written at once, so counts carry from one buffer to the next.
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.5, size=int(rng.integers(2, 9)))
    n = 70_001
    source, within = build_blending_indices(weights, n)
    ref_source, ref_within = blending_indices_reference(weights, n)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


@pytest.mark.parametrize("weights", [[0.97, 0.02, 0.01], [0.05, 0.9, 0.05, 0.0001]])
def test_one_leading_source_across_block_boundaries_equals_the_loop(weights):
    source, within = build_blending_indices(weights, 70_001)
    ref_source, ref_within = blending_indices_reference(weights, 70_001)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


@pytest.mark.parametrize("num_samples", [0, 1, 2, 3, 17])
def test_tiny_mixtures_equal_the_loop(num_samples):
    for weights in ([0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [2, 1]):
        source, within = build_blending_indices(weights, num_samples)
        ref_source, ref_within = blending_indices_reference(weights, num_samples)
        np.testing.assert_array_equal(source, ref_source)
        np.testing.assert_array_equal(within, ref_within)


def _random_weight_sets(count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    sets = [[1, 1, 1], [1 / 3, 1 / 3, 1 / 3], [1] * 16, [0.5, 0.25, 0.25], [1e-6, 1, 1], [0.7, 0.2, 0.1]]
    for _ in range(count):
        size = int(rng.integers(2, 17))
        kind = rng.integers(3)
        if kind == 0:
            sets.append(rng.dirichlet(np.ones(size)).tolist())
        elif kind == 1:  # a few decimals, so the mixture repeats with a short period
            sets.append((rng.integers(1, 100, size) / 100).tolist())
        else:  # equal weights next to tiny ones
            sets.append([1.0] * (size - 1) + [float(rng.uniform(1e-4, 1e-2))])
    return sets


@pytest.mark.parametrize("weights", _random_weight_sets(14, seed=7))
def test_many_weight_vectors_equal_the_loop(weights):
    n = 30_000  # 117 lanes of 257 samples, each but the first starting from guessed counts
    source, within = build_blending_indices(weights, n)
    ref_source, ref_within = blending_indices_reference(weights, n)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def _megatron_helpers():
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
    except Exception:  # noqa: BLE001 - the compiled reference is optional
        return None
    return helpers_cpp


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [0.7, 0.2, 0.1], [1, 1, 1],
                                     [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01], [0.123, 0.456, 0.421]])
def test_long_mixtures_equal_megatron_helpers(weights):
    helpers = _megatron_helpers()
    if helpers is None:
        pytest.skip("megatron.core.datasets.helpers_cpp is not importable")
    n = 1_000_000
    normalized = np.asarray(weights, float) / np.sum(weights)
    ref_source, ref_within = np.zeros(n, np.int16), np.zeros(n, np.int64)
    helpers.build_blending_indices(ref_source, ref_within, normalized, len(weights), n, False)
    source, within = build_blending_indices(weights, n)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def _far_off_guess(weights, first):
    """Every lane's samples so far credited to the last source: wrong by whole lane lengths."""
    counts = np.zeros((len(weights), len(first)))
    counts[-1] = first
    return counts


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5, 1e-3], [1, 1]])
def test_exact_whatever_the_lanes_start_from(monkeypatch, weights):
    # The guess only decides how much is stepped twice: a lane is kept only once it starts where
    # the lane before it ended, so even absurd starting counts give the rule's arrays.
    monkeypatch.setattr(blend, "_guess_counts", _far_off_guess)
    source, within = build_blending_indices(weights, 20_000)
    ref_source, ref_within = blending_indices_reference(weights, 20_000)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def test_lanes_with_wrong_starts_are_stepped_again_and_rejoin(monkeypatch):
    monkeypatch.setattr(blend, "_WARMUP", 0)  # the raw guesses, so that some lanes surely start wrong
    restepped = []
    original = blend._restep_lanes

    def spy(*args):
        restepped.append(len(args[-1]))
        return original(*args)

    monkeypatch.setattr(blend, "_restep_lanes", spy)
    weights = np.random.default_rng(0).dirichlet(np.ones(6))
    source, within = build_blending_indices(weights, 40_000)
    assert restepped and restepped[0] > 0  # some lanes did start from a wrong guess
    ref_source, ref_within = blending_indices_reference(weights, 40_000)
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def true_counts_before(weights, num_samples: int, positions: np.ndarray) -> np.ndarray:
    """(sources, len(positions)): picks of each source among the samples before each position."""
    source, _ = blending_indices_reference(weights, num_samples)
    picks = np.zeros((len(weights), num_samples + 1), dtype=np.int64)
    for d in range(len(weights)):
        picks[d, 1:] = np.cumsum(source == d)
    return picks[:, positions]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [1e-6, 1, 1]])
def test_warm_up_settles_guesses_onto_the_rule(weights):
    # The rule's counts at a lane's first sample are often not the rounded weights, but a few
    # steps of the rule from a nearby guess reach them, so few lanes need stepping twice.
    w = blend.normalize_weights(weights)
    first = np.arange(0, 60_000, 257)
    truth = true_counts_before(weights, 60_000, first)
    assert (blend._guess_counts(w, first) != truth).any(axis=0).sum() > 20
    np.testing.assert_array_equal(blend._settled_guess(w, first), truth)


def test_more_sources_than_one_byte_of_ranks_equal_the_loop():
    weights = np.random.default_rng(3).uniform(0.01, 1.0, size=300)
    source, within = build_blending_indices(weights, 4_000)
    ref_source, ref_within = blending_indices_reference(weights, 4_000)
    assert source.dtype == np.int16
    np.testing.assert_array_equal(source, ref_source)
    np.testing.assert_array_equal(within, ref_within)


def test_background_writes_equal_writing_on_the_stepping_thread(monkeypatch):
    # Small flushes and few lanes: many buffers alternate between the stepping thread and the
    # writer, so a buffer refilled before its copy finished would show up as wrong picks.
    monkeypatch.setattr(blend, "_FLUSH", 8)
    monkeypatch.setattr(blend, "_LANES", 16)
    weights = [0.45, 0.3, 0.15, 0.1]
    background = build_blending_indices(weights, 10_001)
    same_thread = build_blending_indices(weights, 10_001, background_writes=False)
    reference = blending_indices_reference(weights, 10_001)
    for got, plain, want in zip(background, same_thread, reference):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(plain, want)
