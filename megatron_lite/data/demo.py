"""The demo data set: the standard library corpus, a byte-level BPE trained on it, and two
tokenized sources (code, docstrings) ready to mix. Built once; later calls return at once."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
from megatron_lite.data.corpus import stdlib_corpus
from megatron_lite.data.preprocess import preprocess

DEMO_WEIGHTS = {"code": 0.7, "docstrings": 0.3}
_MARKER = "demo.json"
_TOKENIZER_TRAIN_BYTES = 1_500_000  # per source; more text barely changes a 2k vocabulary


@dataclass
class DemoData:
    tokenizer_dir: str
    mixture: list[tuple[str, float]]  # (prefix, weight)


def _expected(vocab_size: int, max_bytes: int) -> dict:
    return {"vocab_size": vocab_size, "max_bytes": max_bytes, "weights": DEMO_WEIGHTS, "version": 1}


def _demo_data(out_dir: Path) -> DemoData:
    return DemoData(str(out_dir / "tokenizer"), [(str(out_dir / name), w) for name, w in DEMO_WEIGHTS.items()])


def build_demo_data(out_dir: str | Path, vocab_size: int = 2048, max_bytes: int = 3_000_000, progress: bool = True) -> DemoData:
    """``max_bytes`` caps each source's text. Returns at once when a complete build with the same
    settings is already in ``out_dir``."""
    out_dir = Path(out_dir)
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _expected(vocab_size, max_bytes):
        data = _demo_data(out_dir)
        if all(Path(f"{p}.{s}").is_file() for p, _ in data.mixture for s in ("bin", "idx")):
            return data
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    corpus = stdlib_corpus(max_bytes)
    say(f"demo corpus: {len(corpus['code'])} source files, {len(corpus['docstrings'])} docstrings")
    tokenizer = _train_tokenizer(corpus, vocab_size, say)
    tokenizer.save(out_dir / "tokenizer")
    data = _demo_data(out_dir)
    for name, prefix_and_weight in zip(DEMO_WEIGHTS, data.mixture):
        raw = out_dir / f"{name}.jsonl"
        with open(raw, "w", encoding="utf-8") as f:
            for text in corpus[name]:
                f.write(json.dumps({"text": text}) + "\n")
        preprocess([raw], data.tokenizer_dir, prefix_and_weight[0], append_eod=True, progress=progress)
        raw.unlink()
    marker.write_text(json.dumps(_expected(vocab_size, max_bytes)))
    say(f"demo data ready in {out_dir} ({time.perf_counter() - start:.1f}s)")
    return data


def _train_tokenizer(corpus: dict[str, list[str]], vocab_size: int, say) -> ByteLevelBPETokenizer:
    texts = []
    for docs in corpus.values():
        used = 0
        for text in docs:
            if used > _TOKENIZER_TRAIN_BYTES:
                break
            texts.append(text)
            used += len(text)
    say(f"training a {vocab_size}-token byte-level BPE on {sum(map(len, texts)) / 1e6:.1f} MB")
    return ByteLevelBPETokenizer.train(texts, vocab_size)
