"""Megatron-LM's indexed dataset: token ids in ``PREFIX.bin``, their layout in ``PREFIX.idx``.

``.idx`` layout (little endian), as Megatron-LM writes and reads it:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version (1)
    uint8     dtype code of the .bin tokens (see DTYPE_CODES)
    uint64    S, the number of sequences
    uint64    D, the number of entries in the document index (documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence byte offsets into .bin
    int64[D]  document index: document k holds sequences [doc[k], doc[k+1])

Each document written here is one sequence. Both files are memory-mapped when read.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from megatron_lite.errors import UserError


MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(UserError, ValueError):
    """A missing or corrupt .bin/.idx pair; the message names the file."""


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits, int32 otherwise (halves the file for vocabularies up to 65536)."""
    return np.uint16 if vocab_size <= 65536 else np.int32


class IndexedDatasetWriter:
    """Append documents, then ``finalize``. Writes to the given paths (callers pick temporary names)."""

    def __init__(self, bin_path: str | Path, dtype: type = np.uint16):
        self.bin_path = Path(bin_path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise IndexedDatasetError(f"dtype {self.dtype} has no Megatron dtype code; use one of {sorted(map(str, _CODE_OF))}")
        self._file = open(self.bin_path, "wb")
        self.lengths: list[int] = []

    def add_document(self, tokens) -> None:
        array = np.asarray(tokens)
        if array.size and (array.min() < np.iinfo(self.dtype).min or array.max() > np.iinfo(self.dtype).max):
            raise IndexedDatasetError(f"token id {int(array.max())} does not fit {self.dtype}; write with a wider dtype")
        self._file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self.lengths.append(int(array.size))

    def finalize(self, idx_path: str | Path) -> None:
        self._file.close()
        write_index(idx_path, np.asarray(self.lengths, dtype=np.int64), self.dtype)


def write_index(idx_path: str | Path, lengths: np.ndarray, dtype: type) -> None:
    lengths = np.asarray(lengths, dtype=np.int64)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * itemsize, out=pointers[1:])
    document_index = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[np.dtype(dtype)], len(lengths), len(document_index)))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(document_index.tobytes())


def write_indexed_dataset(prefix: str | Path, documents, dtype: type = np.uint16) -> None:
    """Write ``documents`` (sequences of ids) as ``prefix.bin``/``prefix.idx``."""
    writer = IndexedDatasetWriter(f"{prefix}.bin", dtype)
    for doc in documents:
        writer.add_document(doc)
    writer.finalize(f"{prefix}.idx")


class IndexedDataset:
    """Read-only, memory-mapped view of ``prefix.bin``/``prefix.idx``; ``ds[i]`` is document i's tokens."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise IndexedDatasetError(
                    f"{path} does not exist; build {prefix}.bin/.idx with tools/preprocess_data.py "
                    f"(or set data.demo=true to build the demo corpus)"
                )
        self._read_index(idx_path)
        self._check_bin(bin_path)
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if self.bin_bytes else np.zeros(0, self.dtype)

    def _read_index(self, path: Path) -> None:
        size = path.stat().st_size
        if size < _HEADER.size:
            raise IndexedDatasetError(f"{path} is {size} bytes, shorter than the {_HEADER.size}-byte header; the file is truncated")
        with open(path, "rb") as f:
            magic, version, code, num_sequences, num_doc_entries = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexedDatasetError(f"{path} does not start with the magic {MAGIC!r} (found {magic!r}); it is not a Megatron .idx file")
        if version != VERSION:
            raise IndexedDatasetError(f"{path} has index version {version}; only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{path} has unknown dtype code {code}; valid codes are {sorted(DTYPE_CODES)}")
        expected = _HEADER.size + num_sequences * 12 + num_doc_entries * 8
        if size != expected:
            raise IndexedDatasetError(
                f"{path} is {size} bytes but its header ({num_sequences} sequences, {num_doc_entries} document entries) "
                f"implies {expected}; the file is truncated or corrupt - rebuild it with tools/preprocess_data.py"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        mapped = np.memmap(path, mode="r", dtype=np.uint8) if size > _HEADER.size else np.zeros(size, np.uint8)
        offset = _HEADER.size
        self.sequence_lengths = mapped[offset : offset + 4 * num_sequences].view(np.int32)
        offset += 4 * num_sequences
        self.sequence_pointers = mapped[offset : offset + 8 * num_sequences].view(np.int64)
        offset += 8 * num_sequences
        self.document_indices = mapped[offset : offset + 8 * num_doc_entries].view(np.int64)
        self._check_document_indices(path, num_sequences)

    def _check_document_indices(self, path: Path, num_sequences: int) -> None:
        doc = self.document_indices
        if len(doc) == 0 or doc[0] != 0 or doc[-1] != num_sequences or np.any(np.diff(doc) < 0):
            raise IndexedDatasetError(
                f"{path} has an invalid document index (it must rise from 0 to the sequence count {num_sequences}); "
                f"the file is corrupt - rebuild it"
            )
        if np.any(self.sequence_lengths < 0):
            raise IndexedDatasetError(f"{path} holds negative sequence lengths; the file is corrupt - rebuild it")

    def _check_bin(self, path: Path) -> None:
        self.bin_bytes = path.stat().st_size
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        expected = int(pointers[-1]) + int(lengths[-1]) * self.dtype.itemsize if len(lengths) else 0
        if self.bin_bytes != expected:
            raise IndexedDatasetError(
                f"{path} is {self.bin_bytes} bytes but {path.with_suffix('.idx')} describes {expected} bytes of "
                f"{self.dtype} tokens; the pair does not match (interrupted write, or files from different runs)"
            )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def max_token_id(self) -> int:
        """The largest token id in the .bin (-1 when it holds none); reads the whole file once."""
        chunk = 1 << 26
        return max((int(self.tokens[i : i + chunk].max()) for i in range(0, len(self.tokens), chunk)), default=-1)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sequence_lengths[index])])

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``index``."""
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        end = start - offset + int(self.sequence_lengths[index]) if length is None else start + length
        return np.asarray(self.tokens[start:end])


def remove_dataset(prefix: str | Path) -> None:
    for suffix in (".bin", ".idx"):
        try:
            os.remove(f"{prefix}{suffix}")
        except FileNotFoundError:
            pass
