"""GPT samples: documents packed end to end into windows of ``seq_length + 1`` tokens.

Three index arrays, built with numpy and cached (see ``cache.py``):

    document order  (epochs * docs,)     each epoch's documents, shuffled, epochs concatenated
    sample starts   (num_samples + 1, 2) (position in document order, token offset) of token
                                         k * seq_length of the packed stream
    sample order    (num_samples,)       a shuffle of the samples

Sample j holds stream tokens [j * seq_length, (j + 1) * seq_length], both ends included: the
extra token is the last label, and consecutive samples share one token, as in Megatron-LM.
"""

from __future__ import annotations

import numpy as np

from megatron_lite.data.cache import IndexCache
from megatron_lite.data.indexed import IndexedDataset


def parse_split(split: str) -> np.ndarray:
    """``"949,50,1"`` -> fractions (3,) summing to 1."""
    parts = [float(p) for p in split.replace("/", ",").split(",")]
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split {split!r} must be three non-negative weights such as '949,50,1'")
    return np.asarray(parts) / sum(parts)


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Contiguous, non-overlapping [start, end) document ranges for train, valid, test.

    A split with a positive weight gets at least one document when there are enough, so a
    small corpus still has a validation and a test set."""
    fractions = parse_split(split)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(fractions)]) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    sizes = np.diff(bounds)
    if num_documents >= np.count_nonzero(fractions):
        for index in np.flatnonzero((fractions > 0) & (sizes == 0)):
            sizes[np.argmax(sizes)] -= 1
            sizes[index] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def build_document_order(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)


def build_sample_starts(lengths: np.ndarray, document_order: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(num_samples + 1, 2): where token k * seq_length of the packed stream lies, as (slot in
    document_order, offset in that document); int32 when the stream allows, as Megatron-LM's."""
    sizes = lengths[document_order].astype(np.int64, copy=False)
    stream_ends = np.cumsum(sizes)  # (E*D,) end of each document in the stream
    last_position = num_samples * seq_length
    used = min(len(sizes), int(np.searchsorted(stream_ends, last_position, side="right")) + 1)  # documents holding a position
    sizes, stream_ends = sizes[:used], stream_ends[:used]
    # A position belongs to the first document that ends after it; counting the positions
    # before each document end gives every document's share in one linear pass.
    before_end = np.minimum((stream_ends - 1) // seq_length + 1, num_samples + 1)
    small = used < 2**31 and (num_samples + 1) * seq_length < 2**31
    dtype = np.int32 if small else np.int64
    # Each document's (slot, stream start) repeated once per position it holds, then the
    # start turned into the offset of that position inside the document.
    per_document = np.diff(before_end, prepend=0)
    pairs = np.empty((len(sizes), 2), dtype=dtype)
    pairs[:, 0] = np.arange(len(sizes))
    pairs[:, 1] = stream_ends - sizes
    starts = np.repeat(pairs, per_document, axis=0)
    positions = np.arange(0, (num_samples + 1) * seq_length, seq_length, dtype=dtype)
    np.subtract(positions, starts[:, 1], out=starts[:, 1])
    return starts


def epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose stream holds ``num_samples`` windows (num_samples * seq_length + 1 tokens)."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


class GPTDataset:
    """``ds[i]`` -> int64 array (seq_length + 1,). ``len(ds)`` is every sample the epochs hold."""

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_length: int, num_samples: int,
                 seed: int, cache: IndexCache | None = None, name: str = "train"):
        self.indexed = indexed
        self.seq_length = seq_length
        start, end = document_range
        lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)
        tokens_per_epoch = int(lengths[start:end].sum())
        if tokens_per_epoch == 0:
            raise ValueError(
                f"the {name} split of {indexed.prefix} (documents {start}..{end}) holds no tokens; "
                f"give it a larger share in data.split or add data"
            )
        self.num_epochs = epochs_needed(tokens_per_epoch, seq_length, num_samples)
        description = {
            "kind": "gpt", "prefix": indexed.prefix, "documents": [start, end], "data": _fingerprint(lengths),
            "seq_length": seq_length, "num_samples": num_samples, "seed": seed,
        }
        build = lambda: self._build(lengths, np.arange(start, end), tokens_per_epoch, seed)  # noqa: E731
        arrays = cache.get_or_build(description, build, f"gpt-{name}") if cache is not None else build()
        self.document_order, self.sample_starts, self.sample_order = arrays["documents"], arrays["starts"], arrays["order"]

    def _build(self, lengths, documents, tokens_per_epoch: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        order = build_document_order(documents, self.num_epochs, rng)
        total = (self.num_epochs * tokens_per_epoch - 1) // self.seq_length
        starts = build_sample_starts(lengths, order, self.seq_length, total)
        return {"documents": order, "starts": starts, "order": rng.permutation(total).astype(np.int64)}

    def __len__(self) -> int:
        return len(self.sample_order)

    def __getitem__(self, index: int) -> np.ndarray:
        sample = int(self.sample_order[index])
        first_slot, first_offset = (int(v) for v in self.sample_starts[sample])
        last_slot, last_offset = (int(v) for v in self.sample_starts[sample + 1])
        get, order = self.indexed.get, self.document_order
        if first_slot == last_slot:
            return get(int(order[first_slot]), first_offset, last_offset - first_offset + 1).astype(np.int64)
        pieces = [get(int(order[first_slot]), first_offset)]
        pieces += [get(int(order[slot])) for slot in range(first_slot + 1, last_slot)]
        pieces.append(get(int(order[last_slot]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)


def _fingerprint(lengths: np.ndarray) -> str:
    """Identifies the data behind a prefix, so a rebuilt dataset never reuses stale indices."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(lengths).tobytes()).hexdigest()[:16]
