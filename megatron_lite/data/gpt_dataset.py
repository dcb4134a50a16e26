"""GPT samples: documents packed end to end into windows of ``seq_length + 1`` tokens.

Three index arrays, built with numpy and cached (see ``cache.py``):

    document order  (epochs * docs,)     each epoch's documents, shuffled, epochs concatenated
    sample starts   (num_samples + 1, 2) (position in document order, token offset) of token
                                         k * seq_length of the packed stream
    sample order    (num_samples,)       a shuffle of the samples

Sample j holds stream tokens [j * seq_length, (j + 1) * seq_length], both ends included: the
extra token is the last label, and consecutive samples share one token, as in Megatron-LM.

With document masking (``data.document_mask``), ``document_layout`` reads the documents of a
sample's input tokens off its end-of-document (EOD) tokens: per-token document ids and position
ids that restart at each document (Megatron-LM's reset_attention_mask and reset_position_ids).

``build_datasets`` turns a (resolved) ``DataConfig`` into a run's train / valid / test datasets:
one ``GPTDataset`` per source and split, blended (``blend.py``) when there are several sources.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from megatron_lite.config import ConfigError, DataConfig, MixtureEntry
from megatron_lite.data.blend import BlendedDataset
from megatron_lite.data.cache import IndexCache
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetError


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
    sizes = np.take(lengths, document_order)
    if sizes.dtype.kind != "i":  # unsigned lengths could not take the -1 below
        sizes = sizes.astype(np.int64)
    # last[d + 1]: stream position of the last token of document d; last[0] = -1, before the stream.
    last = np.empty(len(sizes) + 1, dtype=np.int64)
    last[0] = -1
    if len(sizes):
        sizes[0] -= 1  # a copy: the running sum then gives last positions, not ends
        np.cumsum(sizes, dtype=np.int64, out=last[1:])
    if last[-1] < num_samples * seq_length:
        raise ValueError(f"the documents hold {last[-1] + 1} tokens, too few for {num_samples} samples of "
                         f"{seq_length} tokens plus one; ask for fewer samples or give more documents")
    small = len(sizes) < 2**31 and (num_samples + 1) * seq_length < 2**31
    dtype = np.int32 if small else np.int64
    if num_samples < len(sizes):
        return _starts_by_counting(last, seq_length, num_samples, dtype)
    return _starts_by_repeating(last, seq_length, num_samples, dtype)


def _windows(positions: np.ndarray, seq_length: int) -> np.ndarray:
    """positions // seq_length for positions >= 0; a shift when seq_length is a power of two
    (integer division is several times slower)."""
    if seq_length & (seq_length - 1) == 0:
        return np.right_shift(positions, seq_length.bit_length() - 1)
    return np.floor_divide(positions, seq_length)


def _starts_by_counting(last: np.ndarray, seq_length: int, num_samples: int, dtype) -> np.ndarray:
    """Fewer samples than documents. Sample k starts in the document after those whose last token
    lies before k * seq_length, that is in a window before k: a histogram of the windows holding
    the documents' last tokens and a running sum over the samples give every slot, with one pass
    over the documents and the rest over the shorter list of samples."""
    # Only documents ending before the last sample start count; the one holding it may end far beyond.
    before_last = int(np.searchsorted(last, num_samples * seq_length, side="left")) - 1
    window_of_last = _windows(last[1 : before_last + 1], seq_length)  # (documents before,) all < num_samples
    ending_in = np.bincount(window_of_last, minlength=num_samples)
    slots = np.empty(num_samples + 1, dtype=np.int64)
    slots[0] = 0
    np.cumsum(ending_in, out=slots[1:])
    starts = np.empty((num_samples + 1, 2), dtype=dtype)
    starts[:, 0] = slots
    # Offset in the document: the sample's position minus the document's first position, last[slot] + 1.
    positions = np.arange(-1, (num_samples + 1) * seq_length - 1, seq_length, dtype=np.int64)  # k * seq_length - 1
    np.subtract(positions, np.take(last, slots), out=starts[:, 1], casting="unsafe")
    return starts


def _starts_by_repeating(last: np.ndarray, seq_length: int, num_samples: int, dtype) -> np.ndarray:
    """At least as many samples as documents: each document's (slot, first position) repeated
    once per sample start it holds, then positions turned into offsets."""
    # Documents up to the one holding the last sample start.
    used = min(len(last) - 1, int(np.searchsorted(last, num_samples * seq_length, side="left")))
    starts_before_end = _windows(last[1 : used + 1], seq_length)
    starts_before_end += 1
    np.minimum(starts_before_end, num_samples + 1, out=starts_before_end)
    per_document = np.empty_like(starts_before_end)
    per_document[:1] = starts_before_end[:1]
    np.subtract(starts_before_end[1:], starts_before_end[:-1], out=per_document[1:])
    if dtype == np.int32 and sys.byteorder == "little":
        return _repeat_packed_pairs(last, used, per_document, seq_length, num_samples)
    pairs = np.empty((used, 2), dtype=dtype)
    pairs[:, 0] = np.arange(used)
    pairs[:, 1] = last[:used] + 1
    starts = np.repeat(pairs, per_document, axis=0)
    positions = np.arange(0, (num_samples + 1) * seq_length, seq_length, dtype=dtype)
    np.subtract(positions, starts[:, 1], out=starts[:, 1])
    return starts


_CHUNK = 1 << 16  # samples per pass when adding positions: small enough to stay in cache


def _repeat_packed_pairs(last: np.ndarray, used: int, per_document: np.ndarray, seq_length: int,
                         num_samples: int) -> np.ndarray:
    """The int32 pairs (slot, offset) handled as one int64 each, slot in the low word: a
    document's slot minus its first position shifted into the high word is repeated once per
    sample start it holds, then each sample's position (shifted) is added, leaving
    position - first position = offset in the high word. Contiguous passes, no column
    arithmetic; the caller guarantees every value fits in 31 bits."""
    packed = np.arange(used, dtype=np.int64)
    packed -= (last[:used] + 1) << 32
    starts = np.repeat(packed, per_document)  # (num_samples + 1,)
    step = np.int64(seq_length) << 32
    ramp = np.arange(_CHUNK, dtype=np.int64) * step
    positions = np.empty(_CHUNK, dtype=np.int64)
    for lo in range(0, num_samples + 1, _CHUNK):
        chunk = starts[lo : lo + _CHUNK]
        np.add(ramp[: len(chunk)], np.int64(lo) * step, out=positions[: len(chunk)])
        chunk += positions[: len(chunk)]
    return starts.view(np.int32).reshape(num_samples + 1, 2)


def document_layout(tokens: np.ndarray, eod_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Input tokens (..., T) -> (document ids int32, position ids int64), each (..., T).

    An EOD token belongs to the document it ends; the next position starts a new one. Ids count
    the documents of the row from 0; positions count from 0 in each document (a document cut
    by the sample's start counts from the sample's first token)."""
    is_eod = tokens == eod_id
    ends_before = np.cumsum(is_eod, axis=-1) - is_eod  # EODs strictly before each position
    positions = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int64), tokens.shape)
    starts = np.zeros(tokens.shape, dtype=np.int64)
    starts[..., 1:] = np.where(is_eod[..., :-1], positions[..., 1:], 0)  # a document starts after each EOD
    first_position = np.maximum.accumulate(starts, axis=-1)
    return ends_before.astype(np.int32), positions - first_position


def check_end_of_document_tokens(source: IndexedDataset, eod_id: int, sampled_documents: int = 256) -> None:
    """Refuse to mask documents of a source whose documents cannot be told apart: none of up to
    ``sampled_documents`` evenly spaced documents holds the EOD token."""
    count = len(source)
    picks = np.unique(np.linspace(0, count - 1, num=min(count, sampled_documents)).astype(np.int64))
    if any(np.any(source[int(i)] == eod_id) for i in picks):
        return
    raise ConfigError(
        f"data.document_mask=true but dataset {source.prefix} holds no end-of-document token (id {eod_id}) in "
        f"{len(picks)} sampled documents, so its packed documents cannot be told apart; rebuild it with "
        f"tools/preprocess_data.py --append-eod, or set data.document_mask=false"
    )


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
            raise ConfigError(
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


# ----------------------------------------------------------------------------- a run's datasets


SPLIT_NAMES = ("train", "valid", "test")


def _open_sources(mixture: list[MixtureEntry]) -> list[IndexedDataset]:
    if not mixture:
        raise ConfigError(
            "data.mixture is empty: list the datasets to train on ([{prefix: PATH, weight: 1.0}], built with "
            "tools/preprocess_data.py), or set data.demo=true to build and use the standard-library demo data"
        )
    return [IndexedDataset(entry.prefix) for entry in mixture]


def build_datasets(data_cfg: DataConfig, seq_length: int, seed: int, num_samples: tuple[int, int, int],
                   vocab_size: int | None = None, eod_id: int | None = None):
    """(train, valid, test): a ``GPTDataset`` for a single-source mixture, a ``BlendedDataset``
    otherwise, and None for a split asked for 0 samples. Every dataset holds at least the number
    of samples asked for, repeating epochs when the data is smaller. ``data_cfg`` is read as it is:
    with ``data.demo``, resolve the config first (``training.setup.resolve``) so its mixture names
    the demo build. With ``vocab_size`` (the model's), a source holding a token id at or above it
    is refused. With ``eod_id`` (document masking), so is a source without end-of-document tokens."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    sources = _open_sources(data_cfg.mixture)
    cache = IndexCache(data_cfg.cache_dir or Path(data_cfg.mixture[0].prefix).parent / "index-cache")
    if vocab_size is not None:
        for source in sources:
            check_token_ids(source, vocab_size, cache)
    if eod_id is not None:
        for source in sources:
            check_end_of_document_tokens(source, eod_id)
    ranges = [split_document_ranges(len(source), data_cfg.split) for source in sources]
    datasets = []
    for split_index, (name, count) in enumerate(zip(SPLIT_NAMES, num_samples)):
        if count == 0:
            datasets.append(None)
            continue
        split_ranges = [r[split_index] for r in ranges]
        datasets.append(_build_split(data_cfg, sources, split_ranges, seq_length, seed, count, cache, name))
    return tuple(datasets)


def check_token_ids(source: IndexedDataset, vocab_size: int, cache: IndexCache | None = None) -> None:
    """Refuse a source with a token id the model has no embedding row for: at tp=1 it would fail
    mid-run, at tp>1 it would silently train on a padding row. The max id is cached per .bin
    (keyed by its size and modification time), so only a new or changed file is read."""
    bin_path = Path(f"{source.prefix}.bin")
    stat = bin_path.stat()
    description = {"kind": "max-token-id", "bin": str(bin_path.resolve()), "bytes": stat.st_size,
                   "mtime_ns": stat.st_mtime_ns}
    build = lambda: {"max": np.asarray([source.max_token_id()], dtype=np.int64)}  # noqa: E731
    max_id = int((cache or IndexCache(None)).get_or_build(description, build, "max-token-id")["max"][0])
    if max_id >= vocab_size:
        raise IndexedDatasetError(
            f"{bin_path} holds token id {max_id} but the model's vocabulary has {vocab_size} ids "
            f"(model.vocab_size); it was tokenized with a larger tokenizer - rebuild it with tools/preprocess_data.py "
            f"--tokenizer <data.tokenizer>, or train with model.vocab_size >= {max_id + 1}"
        )


def _build_split(data_cfg, sources, split_ranges, seq_length, seed, count, cache, name):
    if len(sources) == 1:
        return GPTDataset(sources[0], split_ranges[0], seq_length, count, seed, cache, name)
    weights = [entry.weight for entry in data_cfg.mixture]
    total = sum(weights)
    # Each source is asked for its share plus a margin; the blend checks that it was enough.
    parts = [
        GPTDataset(source, doc_range, seq_length, int(count * w / total * 1.005) + 2, seed + index, cache, f"{name}{index}")
        for index, (source, doc_range, w) in enumerate(zip(sources, split_ranges, weights))
    ]
    description = [{"prefix": s.prefix, "documents": r} for s, r in zip(sources, split_ranges)]
    return BlendedDataset(parts, weights, count, cache, {"split": name, "seed": seed, "seq_length": seq_length, "sources": description})
