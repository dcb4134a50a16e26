"""Train a tokenizer from text or jsonl files and save it as a self-describing directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from megatron_lite.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, TokenizerError

TOKENIZER_TYPES = ("bytelevel", "sentencepiece")


def read_texts(paths: list[str | Path], json_key: str = "text", max_bytes: int = 0) -> Iterator[str]:
    """Documents from text files (one per file) and jsonl files (``json_key`` of each line),
    stopping after ``max_bytes`` characters when it is positive."""
    used = 0
    for path in map(Path, paths):
        if not path.is_file():
            raise TokenizerError(f"input file {path} does not exist")
        for text in _texts_in(path, json_key):
            yield text
            used += len(text)
            if 0 < max_bytes <= used:
                return


def _texts_in(path: Path, json_key: str) -> Iterator[str]:
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        yield _decode(path.read_bytes(), path, 1).replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _decode(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TokenizerError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise TokenizerError(f"{path}:{number}: no string under key {json_key!r}; set --json-key")
            yield record[json_key]


def _decode(raw: bytes, path: Path, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise TokenizerError(
            f"{path}:{line}: byte 0x{raw[exc.start]:02x} is not UTF-8; convert the file to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8) or leave it out of --input"
        ) from None


def parse_special_tokens(items: list[str] | None) -> dict[str, str]:
    """``["eod=<|endoftext|>", "pad=<|pad|>"]`` -> the defaults updated with these roles."""
    special = dict(DEFAULT_SPECIAL_TOKENS)
    for item in items or []:
        role, sep, text = item.partition("=")
        if not sep or not role or not text:
            raise TokenizerError(f"special token {item!r} must be ROLE=TEXT, e.g. eod=<|endoftext|>")
        special[role] = text
    return special


def train_tokenizer(inputs: list[str | Path], output_dir: str | Path, kind: str = "bytelevel", vocab_size: int = 32000,
                    special_tokens: dict[str, str] | None = None, json_key: str = "text", max_bytes: int = 0,
                    progress: bool = True) -> Tokenizer:
    if kind not in TOKENIZER_TYPES:
        raise TokenizerError(f"tokenizer type {kind!r} is not one of {', '.join(TOKENIZER_TYPES)}")
    texts = read_texts(inputs, json_key, max_bytes)
    if kind == "sentencepiece":
        from megatron_lite.data.sentencepiece_bpe import SentencePieceTokenizer

        if special_tokens and special_tokens != DEFAULT_SPECIAL_TOKENS:
            raise TokenizerError("the sentencepiece backend uses fixed special tokens (</s>, <pad>, chat roles); drop --special-tokens")
        tokenizer = SentencePieceTokenizer.train(texts, vocab_size)
    else:
        from megatron_lite.data.bytelevel import ByteLevelBPETokenizer

        tokenizer = ByteLevelBPETokenizer.train(list(texts), vocab_size, special_tokens, progress=_bar() if progress else None)
    tokenizer.save(output_dir)
    return tokenizer


def _bar():
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="merge", desc="learning merges")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
