"""Benchmark the data pipeline against the reference implementations, in one run.

    python tools/bench_data.py [--text-mb 2] [--vocab-size 8192] [--append docs/benchmarks.md]

Tokenizer encode speed and training time next to Hugging Face ``tokenizers`` on the same
vocabulary and text; blending and sample-index build times next to Megatron-LM's compiled
helpers (``megatron.core.datasets.helpers_cpp``) when that package is importable. Prints Markdown.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # single-thread Hugging Face numbers unless asked

import numpy as np

from megatron_lite.data.blend import build_blending_indices
from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
from megatron_lite.data.corpus import stdlib_corpus
from megatron_lite.data.gpt_dataset import build_sample_starts
from megatron_lite.data.indexed import IndexedDataset, write_indexed_dataset


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def timed_alternately(runs: dict, repeat: int) -> tuple[dict, dict]:
    """Best time and last output of each of ``runs``, taking them in turn ``repeat`` times, so a
    slow spell of a shared machine falls on all of them rather than on one."""
    best, outputs = {name: float("inf") for name in runs}, {}
    for _ in range(repeat):
        for name, fn in runs.items():
            took, outputs[name] = timed(fn)
            best[name] = min(best[name], took)
    return best, outputs


def megatron_helpers():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
        return helpers_cpp
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available here"
        return str(exc).splitlines()[0]


_POOL_TOKENIZER = {}


def _pool_init(directory: str) -> None:
    from megatron_lite.data import load_tokenizer

    _POOL_TOKENIZER["tok"] = load_tokenizer(directory)


def _pool_encode(texts: list[str]) -> int:
    return sum(len(_POOL_TOKENIZER["tok"].encode(t)) for t in texts)


def bench_tokenizer(texts: list[str], vocab_size: int, rows: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    train_texts = texts
    ours_train, ours = timed(lambda: ByteLevelBPETokenizer.train(train_texts, vocab_size))
    hf_trainer = Tokenizer(models.BPE())
    hf_trainer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    hf_train, _ = timed(lambda: hf_trainer.train_from_iterator(train_texts, trainer))
    rows.append(f"| BPE training, vocab {vocab_size}, {megabytes:.1f} MB | {ours_train:.2f} s | {hf_train:.2f} s "
                f"(tokenizers BpeTrainer, 1 thread) | {hf_train / ours_train:.2f}x |")

    with tempfile.TemporaryDirectory() as tmp:
        ours.save(tmp)
        hf = Tokenizer(models.BPE.from_file(f"{tmp}/vocab.json", f"{tmp}/merges.txt"))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        fresh = ByteLevelBPETokenizer.load(tmp)
        cold, ours_ids = timed(lambda: [fresh.encode(t) for t in texts])
        warm, _ = timed(lambda: [fresh.encode(t) for t in texts], repeat=2)
        hf_time, hf_ids = timed(lambda: [hf.encode(t).ids for t in texts], repeat=2)
        assert ours_ids == hf_ids, "encodings differ from Hugging Face"
        chunks = [texts[i::16] for i in range(16)]
        with mp.get_context("spawn").Pool(2, initializer=_pool_init, initargs=(tmp,)) as pool:
            pool.map(_pool_encode, [["warm up"]] * 2)
            two, _ = timed(lambda: pool.map(_pool_encode, chunks))
    rows.append(f"| encode, cold cache (1 process) | {megabytes / cold:.2f} MB/s | {megabytes / hf_time:.2f} MB/s "
                f"(tokenizers, 1 thread) | {hf_time / cold:.2f}x |")
    rows.append(f"| encode, warm cache (1 process) | {megabytes / warm:.2f} MB/s | {megabytes / hf_time:.2f} MB/s | {hf_time / warm:.2f}x |")
    rows.append(f"| encode, 2 worker processes | {megabytes / two:.2f} MB/s | {megabytes / hf_time:.2f} MB/s (1 thread) | "
                f"{hf_time / two:.2f}x |")
    rows.append(f"| ids identical to tokenizers on {len(texts)} documents | yes | | |")
    bench_no_repeat_encode(no_repeat_texts(texts, int(megabytes * 1e6)), vocab_size, ours, rows)


def no_repeat_texts(texts: list[str], num_bytes: int, seed: int = 0) -> list[str]:
    """Documents of identifiers glued from two or three words of ``texts`` (``parseHeaderValue``),
    each identifier used once, so the per-word cache of an encoder never hits."""
    words = sorted({word for text in texts for word in re.findall(r"[A-Za-z]{3,}", text)})
    rng = random.Random(seed)
    seen, identifiers, size = set(), [], 0
    while size < num_bytes:
        parts = rng.sample(words, rng.randint(2, 3))
        identifier = parts[0].lower() + "".join(part.capitalize() for part in parts[1:])
        if identifier not in seen:
            seen.add(identifier)
            identifiers.append(identifier)
            size += len(identifier) + 1
    return [" ".join(identifiers[i : i + 50]) for i in range(0, len(identifiers), 50)]


def bench_no_repeat_encode(texts: list[str], vocab_size: int, ours: ByteLevelBPETokenizer, rows: list[str],
                           repeat: int = 3) -> None:
    """Every word misses the cache: each timing starts from freshly loaded tokenizers (Hugging
    Face's BPE keeps a word cache too), taking ours and theirs in turn."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    best = {"ours": float("inf"), "hf": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        ours.save(tmp)
        for _ in range(repeat):
            fresh = ByteLevelBPETokenizer.load(tmp)
            took, ours_ids = timed(lambda: [fresh.encode(t) for t in texts])
            best["ours"] = min(best["ours"], took)
            hf = Tokenizer(models.BPE.from_file(f"{tmp}/vocab.json", f"{tmp}/merges.txt"))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            took, hf_ids = timed(lambda: [hf.encode(t).ids for t in texts])
            best["hf"] = min(best["hf"], took)
            assert ours_ids == hf_ids, "encodings of the no-repeat text differ from Hugging Face"
    rows.append(f"| encode, no word repeated ({megabytes:.1f} MB of unique identifiers, vocab {vocab_size}, cold "
                f"caches) | {megabytes / best['ours']:.2f} MB/s | {megabytes / best['hf']:.2f} MB/s (tokenizers, "
                f"1 thread) | {best['hf'] / best['ours']:.2f}x |")


def reference_blend(helpers, weights: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Fresh (lazily zeroed) outputs on every run, so the reference pays for first touching its
    # memory as build_blending_indices does.
    source, within = np.zeros(n, np.int16), np.zeros(n, np.int64)
    helpers.build_blending_indices(source, within, weights, len(weights), n, False)
    return source, within


def bench_indices(helpers, rows: list[str]) -> None:
    n = 10_000_000
    mixtures = {"0.5/0.3/0.2": [0.5, 0.3, 0.2], "0.98/0.01/0.01": [0.98, 0.01, 0.01],
                "0.4/0.25/0.15/0.1/0.05/0.03/0.01/0.01": [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01],
                "Dirichlet(1) x4, seed 1": np.random.default_rng(1).dirichlet(np.ones(4)).tolist(),
                "Dirichlet(1) x6, seed 0": np.random.default_rng(0).dirichlet(np.ones(6)).tolist()}
    for label, weights in mixtures.items():
        normalized = np.asarray(weights, float) / np.sum(weights)
        runs = {"ours": lambda: build_blending_indices(weights, n),
                "one thread": lambda: build_blending_indices(weights, n, background_writes=False)}
        if not isinstance(helpers, str):
            runs["reference"] = lambda: reference_blend(helpers, normalized, n)
        best, outputs = timed_alternately(runs, repeat=5)
        ours_blend, one_thread = best["ours"], best["one thread"]
        source, within = outputs["ours"]
        if isinstance(helpers, str):
            rows.append(f"| blending indices, 10M samples, weights {label} | {ours_blend:.2f} s "
                        f"({one_thread:.2f} s on one thread) | not available: {helpers} | |")
            continue
        ref, (ref_source, ref_within) = best["reference"], outputs["reference"]
        same = np.array_equal(source, ref_source) and np.array_equal(within, ref_within)
        rows.append(f"| blending indices, 10M samples, weights {label} | {ours_blend:.2f} s ({one_thread:.2f} s on "
                    f"one thread) | {ref:.3f} s (helpers_cpp; identical: {'yes' if same else 'NO'}) | "
                    f"{ref / ours_blend:.2f}x ({ref / one_thread:.2f}x) |")
    rng = np.random.default_rng(0)
    sizes = np.maximum(1, rng.lognormal(6.5, 1.0, size=200_000)).astype(np.int32)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes, dtype=np.int64), 100_000_000) + 1]
    tokens = int(sizes.sum(dtype=np.int64))
    order = rng.permutation(len(sizes)).astype(np.int32)
    for seq_length in (2048, 128):
        num_samples = (tokens - 1) // seq_length
        label = f"sample index, {tokens / 1e6:.0f}M tokens, seq {seq_length}"
        if isinstance(helpers, str):
            ours, starts = timed(lambda: build_sample_starts(sizes, order, seq_length, num_samples), repeat=25)
            rows.append(f"| {label} | {ours * 1e3:.2f} ms | not available | |")
            continue
        best, outputs = timed_alternately({
            "ours": lambda: build_sample_starts(sizes, order, seq_length, num_samples),
            "reference": lambda: helpers.build_sample_idx_int32(sizes, order, seq_length, 1, tokens, True, 1),
        }, repeat=25)
        (ours, starts), (ref, ref_index) = (best["ours"], outputs["ours"]), (best["reference"], outputs["reference"])
        same = np.array_equal(starts, ref_index)
        rows.append(f"| {label} | {ours * 1e3:.2f} ms | {ref * 1e3:.2f} ms (identical: {'yes' if same else 'NO'}) | {ref / ours:.2f}x |")


def check_megatron_reads_ours(rows: list[str]) -> None:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    except Exception as exc:  # noqa: BLE001
        rows.append(f"| .bin/.idx read by Megatron-LM | not checked: {str(exc).splitlines()[0]} | | |")
        return
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 60000, rng.integers(1, 300)).astype(np.uint16) for _ in range(500)]
    with tempfile.TemporaryDirectory() as tmp:
        write_indexed_dataset(f"{tmp}/ours", docs, np.uint16)
        theirs = MegatronIndexed(f"{tmp}/ours")
        ok_read = all(np.array_equal(theirs[i], docs[i]) for i in range(len(docs)))
        builder = IndexedDatasetBuilder(f"{tmp}/theirs.bin", dtype=np.int32)
        for doc in docs:
            import torch

            builder.add_document(torch.from_numpy(doc.astype(np.int32)), [len(doc)])
        builder.finalize(f"{tmp}/theirs.idx")
        mine = IndexedDataset(f"{tmp}/theirs")
        ok_back = all(np.array_equal(mine[i], docs[i]) for i in range(len(docs)))
    rows.append(f"| .bin/.idx: Megatron-LM reads ours / we read Megatron-LM's | {'yes' if ok_read else 'NO'} / "
                f"{'yes' if ok_back else 'NO'} | | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-mb", type=float, default=2.0, help="MB of standard-library text per source")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--append", help="append the Markdown to this file too")
    parser.add_argument("--only-index", action="store_true", help="only the blending and sample-index timings")
    args = parser.parse_args(argv)
    rows = ["| measurement | megatron-lite | reference | reference time / ours |", "|---|---|---|---|"]
    if not args.only_index:
        corpus = stdlib_corpus(int(args.text_mb * 1e6 / 2))
        bench_tokenizer(corpus["code"] + corpus["docstrings"], args.vocab_size, rows)
    helpers = megatron_helpers()
    bench_indices(helpers, rows)
    if not args.only_index:
        check_megatron_reads_ours(rows)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} CPU cores, "
              f"Python {platform.python_version()}, numpy {np.__version__}; text: standard-library source and "
              f"docstrings. Command: `python tools/bench_data.py "
              + ("--only-index" if args.only_index else f"--text-mb {args.text_mb:g} --vocab-size {args.vocab_size}")
              + "`.")
    report = header + "\n\n" + "\n".join(rows) + "\n"
    print(report)
    if args.append:
        path = Path(args.append)
        existing = path.read_text() if path.exists() else "# Benchmarks\n"
        if "## Data pipeline" not in existing:
            existing = existing.rstrip("\n") + "\n\n## Data pipeline\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
