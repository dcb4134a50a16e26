import numpy as np
import pytest

from megatron_lite.config import ConfigError, DataConfig
from megatron_lite.data import build_datasets
from megatron_lite.data.blend import BlendedDataset
from megatron_lite.data.cache import IndexCache
from megatron_lite.data.gpt_dataset import (
    GPTDataset,
    build_sample_starts,
    document_layout,
    split_document_ranges,
)
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetError, write_indexed_dataset
from tests.distributed import run_distributed


def write_numbered(prefix, num_docs=60, seed=0, base=0):
    """Documents whose tokens encode (document, position) so a sample shows where it came from."""
    rng = np.random.default_rng(seed)
    docs = [base + 100 * d + np.arange(rng.integers(1, 40)) % 100 for d in range(num_docs)]
    write_indexed_dataset(prefix, docs, np.int32)
    return docs


def stream_of(dataset: GPTDataset) -> np.ndarray:
    return np.concatenate([dataset.indexed[int(d)] for d in dataset.document_order])


def test_samples_are_windows_of_the_packed_stream(tmp_path):
    write_numbered(tmp_path / "d")
    ds = GPTDataset(IndexedDataset(tmp_path / "d"), (0, 60), seq_length=16, num_samples=50, seed=3)
    stream = stream_of(ds)
    for i in range(len(ds)):
        j = int(ds.sample_order[i])
        sample = ds[i]
        assert sample.dtype == np.int64 and sample.shape == (17,)
        np.testing.assert_array_equal(sample, stream[j * 16 : j * 16 + 17])
    assert len(ds) == (len(stream) - 1) // 16


def test_multiple_epochs_each_a_shuffle_of_all_documents(tmp_path):
    docs = write_numbered(tmp_path / "d", num_docs=20)
    tokens = sum(len(d) for d in docs)
    wanted = 3 * tokens // 8 + 1  # one sample more than three epochs hold
    ds = GPTDataset(IndexedDataset(tmp_path / "d"), (0, 20), seq_length=8, num_samples=wanted, seed=1)
    assert len(ds) >= wanted and ds.num_epochs == 4
    epochs = np.asarray(ds.document_order).reshape(4, 20)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(20))
    assert not all((epochs[0] == e).all() for e in epochs[1:])
    assert sorted(np.asarray(ds.sample_order).tolist()) == list(range(len(ds)))


def test_indices_deterministic_and_cache_consistent(tmp_path):
    write_numbered(tmp_path / "d")
    indexed = IndexedDataset(tmp_path / "d")
    a = GPTDataset(indexed, (0, 50), 16, 70, seed=7)
    b = GPTDataset(indexed, (0, 50), 16, 70, seed=7)
    cache = IndexCache(tmp_path / "cache")
    c = GPTDataset(indexed, (0, 50), 16, 70, seed=7, cache=cache)
    d = GPTDataset(indexed, (0, 50), 16, 70, seed=7, cache=cache)
    assert cache.builds == 1 and cache.hits == 2
    for other in (b, c, d):
        for name in ("document_order", "sample_starts", "sample_order"):
            np.testing.assert_array_equal(getattr(a, name), getattr(other, name))
    other_seed = GPTDataset(indexed, (0, 50), 16, 70, seed=8, cache=cache)
    assert cache.builds == 2
    assert not np.array_equal(a.sample_order, other_seed.sample_order)


def sample_starts_by_walking(lengths, order, seq_length, num_samples):
    """Token k * seq_length of the packed stream located by walking the documents one token count at a time."""
    starts, slot, offset = [], 0, 0
    for k in range(num_samples + 1):
        target = k * seq_length
        while offset + int(lengths[order[slot]]) <= target:
            offset += int(lengths[order[slot]])
            slot += 1
        starts.append((slot, target - offset))
    return np.array(starts)


@pytest.mark.parametrize("seq_length", [1, 3, 16, 64, 400])
def test_sample_starts_equal_a_walk_over_the_documents(seq_length):
    # Short windows give more samples than documents and long ones fewer: both ways of building
    # the index are covered, with empty and long documents and a document order with repeats.
    rng = np.random.default_rng(seq_length)
    lengths = rng.integers(0, 90, size=300).astype(np.int32)
    lengths[rng.integers(0, 300, 20)] = rng.integers(200, 900, 20)
    order = np.concatenate([rng.permutation(300), rng.permutation(300)])
    tokens = int(lengths[order].sum())
    for num_samples in {(tokens - 1) // seq_length, (tokens - 1) // seq_length // 2, 1}:
        starts = build_sample_starts(lengths, order, seq_length, num_samples)
        np.testing.assert_array_equal(starts, sample_starts_by_walking(lengths, order, seq_length, num_samples))
        assert starts.dtype == np.int32 and starts.shape == (num_samples + 1, 2)
    unsigned = build_sample_starts(lengths.astype(np.uint16), order, seq_length, 1)
    np.testing.assert_array_equal(unsigned, sample_starts_by_walking(lengths, order, seq_length, 1))


def test_sample_starts_reject_a_stream_too_short():
    lengths, order = np.array([5, 4]), np.array([0, 1])
    assert build_sample_starts(lengths, order, 4, 2).tolist() == [[0, 0], [0, 4], [1, 3]]
    with pytest.raises(ValueError, match="the documents hold 9 tokens, too few for 3 samples of 3 tokens plus one"):
        build_sample_starts(lengths, order, 3, 3)


def test_split_ranges_cover_documents_without_overlap():
    assert split_document_ranges(1000, "949,50,1") == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges(10, "98,1,1") == [(0, 8), (8, 9), (9, 10)]
    assert split_document_ranges(10, "1,0,0") == [(0, 10), (10, 10), (10, 10)]


def config(tmp_path, prefixes, weights, split="80,10,10"):
    return DataConfig(mixture=[{"prefix": str(p), "weight": w} for p, w in zip(prefixes, weights)],
                      split=split, cache_dir=str(tmp_path / "cache"))


def test_build_datasets_splits_disjoint_and_blend(tmp_path):
    write_numbered(tmp_path / "a", num_docs=50, seed=0)
    write_numbered(tmp_path / "b", num_docs=50, seed=1, base=10_000)
    train, valid, test = build_datasets(config(tmp_path, [tmp_path / "a"], [1.0]), 16, 5, (30, 5, 0))
    assert isinstance(train, GPTDataset) and len(train) >= 30 and len(valid) >= 5 and test is None
    train_docs = set(np.asarray(train.document_order).tolist())
    valid_docs = set(np.asarray(valid.document_order).tolist())
    assert train_docs == set(range(40)) and valid_docs == set(range(40, 45))
    train_tokens = {int(t) // 100 for i in range(len(train)) for t in train[i]}
    valid_tokens = {int(t) // 100 for i in range(len(valid)) for t in valid[i]}
    assert train_tokens <= set(range(40)) and valid_tokens <= set(range(40, 45))

    blend_cfg = config(tmp_path, [tmp_path / "a", tmp_path / "b"], [3.0, 1.0])
    train, valid, _ = build_datasets(blend_cfg, 16, 5, (200, 20, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 200
    from_b = sum(int(train[i][0]) >= 10_000 for i in range(200))
    assert from_b == 50
    again, _, _ = build_datasets(blend_cfg, 16, 5, (200, 20, 0))
    assert all(np.array_equal(train[i], again[i]) for i in range(200))


def test_build_datasets_errors(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"missing.idx does not exist; build .*preprocess_data.py .*data.demo=true"):
        build_datasets(config(tmp_path, [tmp_path / "missing"], [1.0]), 16, 0, (1, 0, 0))
    with pytest.raises(ConfigError, match="data.mixture is empty"):
        build_datasets(DataConfig(), 16, 0, (1, 0, 0))
    write_numbered(tmp_path / "a", num_docs=10)
    with pytest.raises(ValueError, match="the test split .* holds no tokens"):
        build_datasets(config(tmp_path, [tmp_path / "a"], [1.0], split="1,0,0"), 16, 0, (1, 0, 1))


def _ranks_build(rank, world_size, prefix, cache_dir):
    import torch.distributed as dist

    indexed = IndexedDataset(prefix)
    cache = IndexCache(cache_dir)
    ds = GPTDataset(indexed, (0, 60), 16, 40, seed=11, cache=cache)
    dist.barrier()
    return {"builds": cache.builds, "order": np.asarray(ds.sample_order).tolist(), "first": ds[0].tolist()}


def test_rank_zero_builds_other_ranks_load(tmp_path):
    write_numbered(tmp_path / "d")
    results = run_distributed(_ranks_build, 2, str(tmp_path / "d"), str(tmp_path / "cache"))
    assert [r["builds"] for r in results] == [1, 0]
    assert results[0]["order"] == results[1]["order"] and results[0]["first"] == results[1]["first"]
    local = GPTDataset(IndexedDataset(tmp_path / "d"), (0, 60), 16, 40, seed=11)
    assert results[0]["order"] == np.asarray(local.sample_order).tolist()


# ----------------------------------------------------------------------------- document masking

EOD = 7


def test_document_layout_splits_after_each_eod_and_restarts_positions():
    tokens = np.array([[3, 4, EOD, 5, EOD, EOD, 6, 8],
                       [EOD, 1, 2, 3, 4, 5, 6, EOD]])
    document_ids, position_ids = document_layout(tokens, EOD)
    assert document_ids.dtype == np.int32 and position_ids.dtype == np.int64
    # The EOD token is the last token of the document it ends.
    np.testing.assert_array_equal(document_ids, [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(position_ids, [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]])
    ids, positions = document_layout(np.array([1, 2, 3]), EOD)  # no EOD: one document
    np.testing.assert_array_equal(ids, [0, 0, 0])
    np.testing.assert_array_equal(positions, [0, 1, 2])


def test_packed_samples_carry_their_documents(tmp_path):
    # Hand-made documents 10.., 20.., 30.. each ending in EOD, packed into windows of 6 (+1) tokens.
    docs = [np.array([10, 11, 12, EOD]), np.array([20, EOD]), np.array([30, 31, 32, 33, 34, EOD])]
    write_indexed_dataset(tmp_path / "d", docs, np.int32)
    ds = GPTDataset(IndexedDataset(tmp_path / "d"), (0, 3), seq_length=6, num_samples=2, seed=0)
    stream = stream_of(ds)
    for i in range(len(ds)):
        sample = ds[i]
        j = int(ds.sample_order[i])
        document_ids, position_ids = document_layout(sample[:-1], EOD)
        window = stream[j * 6 : j * 6 + 6]
        # Within a sample, a document is the run of tokens up to and including its EOD.
        starts = np.flatnonzero(np.r_[True, window[:-1] == EOD])
        expected_ids = np.cumsum(np.isin(np.arange(6), starts)) - 1
        expected_positions = np.arange(6) - starts[expected_ids]
        np.testing.assert_array_equal(document_ids, expected_ids)
        np.testing.assert_array_equal(position_ids, expected_positions)
        # Every token of a document shares its hundreds digit: the ids follow the documents.
        for d in np.unique(document_ids):
            assert len({int(t) // 10 for t in window[document_ids == d] if t != EOD}) <= 1


def test_document_mask_refuses_a_dataset_without_eod(tmp_path):
    write_numbered(tmp_path / "a", num_docs=30)  # token values are multiples of 100 plus 0..39: never 7000
    cfg = config(tmp_path, [tmp_path / "a"], [1.0])
    with pytest.raises(ConfigError, match=rf"data.document_mask=true but dataset {tmp_path / 'a'} holds no "
                                          r"end-of-document token \(id 7000\).*--append-eod.*document_mask=false"):
        build_datasets(cfg, 16, 0, (5, 0, 0), eod_id=7000)
    train, _, _ = build_datasets(cfg, 16, 0, (5, 0, 0), eod_id=0)  # document 0 starts with token 0
    assert len(train) >= 5
