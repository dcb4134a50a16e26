"""From a ``DataConfig`` to the train / valid / test datasets the training loop reads."""

from __future__ import annotations

from pathlib import Path

from megatron_lite.config import ConfigError, DataConfig, MixtureEntry
from megatron_lite.data.blend import BlendedDataset
from megatron_lite.data.cache import IndexCache
from megatron_lite.data.gpt_dataset import GPTDataset, split_document_ranges
from megatron_lite.data.indexed import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def resolve_demo(data_cfg: DataConfig, progress: bool = True) -> DataConfig:
    """With ``data.demo=true``, build the demo data if needed and fill in an empty
    ``data.tokenizer`` / ``data.mixture`` from it (the config is updated in place)."""
    if not data_cfg.demo:
        return data_cfg
    from megatron_lite.data.demo import build_demo_data

    demo = build_demo_data(data_cfg.demo_dir, vocab_size=data_cfg.demo_vocab_size, progress=progress)
    if not data_cfg.tokenizer:
        data_cfg.tokenizer = demo.tokenizer_dir
    if not data_cfg.mixture:
        data_cfg.mixture = [MixtureEntry(prefix=p, weight=w) for p, w in demo.mixture]
    return data_cfg


def _open_sources(mixture: list[MixtureEntry]) -> list[IndexedDataset]:
    if not mixture:
        raise ConfigError(
            "data.mixture is empty: list the datasets to train on ([{prefix: PATH, weight: 1.0}], built with "
            "tools/preprocess_data.py), or set data.demo=true to build and use the standard-library demo data"
        )
    return [IndexedDataset(entry.prefix) for entry in mixture]


def build_datasets(data_cfg: DataConfig, seq_length: int, seed: int, num_samples: tuple[int, int, int]):
    """(train, valid, test): a ``GPTDataset`` for a single-source mixture, a ``BlendedDataset``
    otherwise, and None for a split asked for 0 samples. Every dataset holds at least the number
    of samples asked for, repeating epochs when the data is smaller."""
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    resolve_demo(data_cfg)
    sources = _open_sources(data_cfg.mixture)
    cache = IndexCache(data_cfg.cache_dir or Path(data_cfg.mixture[0].prefix).parent / "index-cache")
    ranges = [split_document_ranges(len(source), data_cfg.split) for source in sources]
    datasets = []
    for split_index, (name, count) in enumerate(zip(SPLIT_NAMES, num_samples)):
        if count == 0:
            datasets.append(None)
            continue
        split_ranges = [r[split_index] for r in ranges]
        datasets.append(_build_split(data_cfg, sources, split_ranges, seq_length, seed, count, cache, name))
    return tuple(datasets)


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
