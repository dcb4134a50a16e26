import struct

import numpy as np
import pytest

from megatron_lite.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    token_dtype,
    write_indexed_dataset,
)


def make_docs(rng, count, high):
    return [rng.integers(0, high, size=rng.integers(0, 40)) for _ in range(count)]


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65536), (np.int32, 200_000)])
def test_write_read_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    docs = make_docs(rng, 50, high)
    write_indexed_dataset(tmp_path / "ds", docs, dtype)
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == 50 and ds.num_tokens == sum(len(d) for d in docs)
    for index, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[index], doc)
    big = max(range(50), key=lambda i: len(docs[i]))
    np.testing.assert_array_equal(ds.get(big, 2, 5), docs[big][2:7])


def test_dtype_choice():
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32 and token_dtype(128256) == np.int32


def test_index_bytes_follow_megatron_layout(tmp_path):
    write_indexed_dataset(tmp_path / "ds", [[1, 2, 3], [4, 5]], np.uint16)
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 2)  # sequences
        + struct.pack("<Q", 3)  # document index entries
        + np.array([3, 2], np.int32).tobytes()
        + np.array([0, 6], np.int64).tobytes()  # byte offsets
        + np.array([0, 1, 2], np.int64).tobytes()
    )
    assert (tmp_path / "ds.idx").read_bytes() == expected
    assert (tmp_path / "ds.bin").read_bytes() == np.array([1, 2, 3, 4, 5], np.uint16).tobytes()


def test_empty_dataset(tmp_path):
    write_indexed_dataset(tmp_path / "empty", [], np.uint16)
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_tokens == 0


def corrupt(tmp_path, offset: int, data: bytes):
    write_indexed_dataset(tmp_path / "ds", [[1, 2, 3], [4, 5]], np.uint16)
    raw = bytearray((tmp_path / "ds.idx").read_bytes())
    raw[offset : offset + len(data)] = data
    (tmp_path / "ds.idx").write_bytes(bytes(raw))
    return tmp_path / "ds"


def test_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(IndexedDatasetError, match=r"ds.idx does not start with the magic"):
        IndexedDataset(corrupt(tmp_path, 0, b"NOTMAGIC!"))
    with pytest.raises(IndexedDatasetError, match=r"ds.idx has index version 2"):
        IndexedDataset(corrupt(tmp_path, 9, struct.pack("<Q", 2)))
    with pytest.raises(IndexedDatasetError, match=r"ds.idx has unknown dtype code 9"):
        IndexedDataset(corrupt(tmp_path, 17, b"\x09"))
    with pytest.raises(IndexedDatasetError, match=r"header \(3 sequences, 3 document entries\) implies"):
        IndexedDataset(corrupt(tmp_path, 18, struct.pack("<Q", 3)))
    with pytest.raises(IndexedDatasetError, match="invalid document index"):
        IndexedDataset(corrupt(tmp_path, 34 + 8 + 16 + 8, struct.pack("<q", 5)))
    prefix = corrupt(tmp_path, 0, b"")
    (tmp_path / "ds.idx").write_bytes((tmp_path / "ds.idx").read_bytes()[:20])
    with pytest.raises(IndexedDatasetError, match="shorter than the 34-byte header"):
        IndexedDataset(prefix)


def test_bin_size_mismatch_and_missing_files(tmp_path):
    write_indexed_dataset(tmp_path / "ds", [[1, 2, 3], [4, 5]], np.uint16)
    with open(tmp_path / "ds.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"ds.bin is 12 bytes but .*ds.idx describes 10 bytes"):
        IndexedDataset(tmp_path / "ds")
    (tmp_path / "ds.bin").unlink()
    with pytest.raises(IndexedDatasetError, match=r"ds.bin does not exist; build .* tools/preprocess_data.py"):
        IndexedDataset(tmp_path / "ds")


def test_token_overflow_is_rejected(tmp_path):
    with pytest.raises(IndexedDatasetError, match="does not fit uint16"):
        write_indexed_dataset(tmp_path / "ds", [[70000]], np.uint16)
