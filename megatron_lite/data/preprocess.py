"""Text or jsonl -> tokenized ``PREFIX.bin``/``PREFIX.idx``, in parallel, with progress.

Workers tokenize batches of lines; the parent writes them in input order, so the output is the
same for any number of workers. Output goes to temporary names and is renamed only after
both files are complete: an interrupted run leaves nothing under the final names.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetWriter, remove_dataset, token_dtype
from megatron_lite.data.tokenizer import SPECIAL_MODES, Tokenizer
from megatron_lite.data.tokenizer_dir import load_tokenizer
from megatron_lite.errors import UserError

_BATCH_DOCS = 64
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Raw corpora are read with special-token strings as plain text: a web page or source file that
# mentions "<|endoftext|>" is quoting it, and splitting it out would inject a document boundary
# (or a chat-role token) that the author never wrote. Corpora already in a tokenizer's own markup
# (chat transcripts rendered with <|user|> ...) opt in with allowed_special="all".
DEFAULT_ALLOWED_SPECIAL = "none"
# Bytes that are not UTF-8: "error" names the file and line (the default, as the fine-tuning
# loaders do), "replace" writes U+FFFD for them, "skip" drops the line (or the text file).
BAD_UTF8_POLICIES = ("error", "replace", "skip")


class PreprocessError(UserError, ValueError):
    """Bad input (missing file, malformed line, missing key); the message names file and line."""


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    bad_utf8_replaced: int = 0  # lines (or text files) whose undecodable bytes became U+FFFD
    bad_utf8_skipped: int = 0
    empty_documents: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass
class _Job:
    json_keys: tuple[str, ...]
    append_eod: bool
    dtype: type
    allowed_special: str


_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, job: _Job) -> None:
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_dir)
    _WORKER["job"] = job


def _tokenize_batch(batch: list[tuple[str, int, str, bool]]) -> tuple[list[list[np.ndarray]], list[str], int]:
    """(file, line number, raw text, is_json) items -> per-document arrays per key, error messages, bytes."""
    tok: Tokenizer = _WORKER["tokenizer"]
    job: _Job = _WORKER["job"]
    docs, errors, nbytes = [], [], 0
    for source, line_number, raw, is_json in batch:
        nbytes += len(raw.encode("utf-8"))
        try:
            texts = _texts_of(raw, job.json_keys) if is_json else [raw]
        except PreprocessError as exc:
            errors.append(f"{source}:{line_number}: {exc}")
            continue
        arrays = []
        for text in texts:
            ids = tok.encode(text, job.allowed_special)
            if job.append_eod:
                ids.append(tok.eod_id)
            arrays.append(np.asarray(ids, dtype=job.dtype))
        docs.append(arrays)
    return docs, errors, nbytes


def _texts_of(raw: str, keys: tuple[str, ...]) -> list[str]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PreprocessError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise PreprocessError(f"expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in keys:
        if key not in record:
            raise PreprocessError(f"no key {key!r} (keys: {', '.join(map(str, record)) or 'none'}); set --json-keys")
        if not isinstance(record[key], str):
            raise PreprocessError(f"key {key!r} holds {type(record[key]).__name__}, not a string")
        texts.append(record[key])
    return texts


def _read_items(paths: list[Path], text_unit: str, on_bad_utf8: str,
                stats: PreprocessStats) -> Iterator[tuple[str, int, str, bool]]:
    for path in paths:
        is_json = path.suffix.lower() in _JSON_SUFFIXES
        with open(path, "rb") as f:
            if not is_json and text_unit == "file":
                text = _decode(f.read(), path, 1, on_bad_utf8, stats)
                if text is not None:
                    yield str(path), 1, text.replace("\r\n", "\n").replace("\r", "\n"), False
                continue
            for number, raw in enumerate(f, start=1):
                line = _decode(raw, path, number, on_bad_utf8, stats)
                line = line.removesuffix("\n").removesuffix("\r") if line is not None else ""
                if line.strip():
                    yield str(path), number, line, is_json


def _decode(raw: bytes, path: Path, first_line: int, on_bad_utf8: str, stats: PreprocessStats) -> str | None:
    """``raw`` as text under the bad-UTF-8 policy; None when the policy skips it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if on_bad_utf8 == "replace":
            stats.bad_utf8_replaced += 1
            return raw.decode("utf-8", errors="replace")
        if on_bad_utf8 == "skip":
            stats.bad_utf8_skipped += 1
            return None
        line = first_line + raw.count(b"\n", 0, exc.start)
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PreprocessError(
            f"{path}:{line}: byte 0x{raw[exc.start]:02x} at column {column} is not UTF-8; fix the file, or pass "
            f"--on-bad-utf8 replace (write U+FFFD for such bytes) or --on-bad-utf8 skip (drop such lines)"
        ) from None


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def output_prefixes(output_prefix: str, json_keys: tuple[str, ...]) -> list[str]:
    """One dataset per json key: ``PREFIX`` for a single key, ``PREFIX_<key>`` for several."""
    return [output_prefix] if len(json_keys) == 1 else [f"{output_prefix}_{key}" for key in json_keys]


def preprocess(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    output_prefix: str | Path,
    json_keys: tuple[str, ...] = ("text",),
    workers: int = 1,
    append_eod: bool = True,
    skip_bad_lines: bool = False,
    text_unit: str = "file",
    progress: bool = True,
    allowed_special: str = DEFAULT_ALLOWED_SPECIAL,
    on_bad_utf8: str = "error",
) -> PreprocessStats:
    """Tokenize ``inputs`` (jsonl: one document per line; plain text: one per file or per line).

    ``allowed_special``: "none" encodes special-token strings in the documents as plain text,
    "all" as the special tokens' ids (see ``Tokenizer.encode``). ``on_bad_utf8``: what bytes that
    are not UTF-8 do, one of ``BAD_UTF8_POLICIES`` (the stats count what was replaced or skipped)."""
    paths = _check_inputs(inputs, text_unit, workers, allowed_special, on_bad_utf8)
    tokenizer = load_tokenizer(tokenizer_dir)
    job = _Job(tuple(json_keys), append_eod, token_dtype(tokenizer.vocab_size), allowed_special)
    prefixes = output_prefixes(str(output_prefix), job.json_keys)
    temps = [f"{p}.tmp{os.getpid()}" for p in prefixes]
    writers = _open_writers(temps, job.dtype, output_prefix)
    stats = PreprocessStats()
    start = last_shown = time.perf_counter()
    try:
        batches = _batches(_read_items(paths, text_unit, on_bad_utf8, stats), _BATCH_DOCS)
        for docs, errors, nbytes in _run_batches(batches, str(tokenizer_dir), job, workers):
            _note_errors(errors, skip_bad_lines, stats)
            _write_docs(docs, writers, stats)
            stats.bytes_read += nbytes
            last_shown = _show(progress, stats, start, last_shown)
        _show(progress, stats, start, 0.0)
        for writer, temp in zip(writers, temps):
            writer.finalize(f"{temp}.idx")
        for temp, prefix in zip(temps, prefixes):
            _publish(temp, prefix)
    finally:
        for writer, temp in zip(writers, temps):
            writer._file.close()
            remove_dataset(temp)
        if progress:
            print(flush=True)
    stats.seconds = time.perf_counter() - start
    return stats


def _check_inputs(inputs, text_unit: str, workers: int, allowed_special: str, on_bad_utf8: str) -> list[Path]:
    if text_unit not in ("file", "line"):
        raise PreprocessError(f"text_unit={text_unit!r} must be 'file' (one document per text file) or 'line'")
    if allowed_special not in SPECIAL_MODES:
        raise PreprocessError(
            f"allowed_special={allowed_special!r} must be 'none' (special-token strings in documents stay plain "
            f"text) or 'all' (they become the special tokens' ids)"
        )
    if on_bad_utf8 not in BAD_UTF8_POLICIES:
        raise PreprocessError(f"on_bad_utf8={on_bad_utf8!r} is not one of {', '.join(BAD_UTF8_POLICIES)}")
    if workers < 1:
        raise PreprocessError(f"workers={workers} must be at least 1")
    if not inputs:
        raise PreprocessError("no input files given; pass --input FILE [FILE ...]")
    paths = [Path(p) for p in inputs]
    for path in paths:
        if not path.is_file():
            raise PreprocessError(f"input file {path} does not exist")
    return paths


def _open_writers(temps: list[str], dtype: type, output_prefix) -> list[IndexedDatasetWriter]:
    try:
        Path(temps[0]).parent.mkdir(parents=True, exist_ok=True)
        return [IndexedDatasetWriter(f"{t}.bin", dtype) for t in temps]
    except OSError as exc:
        raise PreprocessError(
            f"cannot write {output_prefix}.bin ({exc.strerror}: {exc.filename}); pass an --output-prefix in a writable directory"
        ) from None


def _run_batches(batches, tokenizer_dir: str, job: _Job, workers: int):
    if workers == 1:
        _init_worker(tokenizer_dir, job)
        yield from map(_tokenize_batch, batches)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir, job)) as pool:
        yield from pool.imap(_tokenize_batch, batches, chunksize=4)


def _note_errors(errors: list[str], skip_bad_lines: bool, stats: PreprocessStats) -> None:
    if errors and not skip_bad_lines:
        raise PreprocessError(f"{errors[0]}; fix the line or pass --skip-bad-lines to skip such lines")
    stats.bad_lines += len(errors)


def _write_docs(docs: list[list[np.ndarray]], writers: list[IndexedDatasetWriter], stats: PreprocessStats) -> None:
    for arrays in docs:
        if all(a.size == 0 for a in arrays):
            stats.empty_documents += 1
            continue
        for writer, array in zip(writers, arrays):
            writer.add_document(array)
        stats.documents += 1
        stats.tokens += int(arrays[0].size)


def _publish(temp: str, prefix: str) -> None:
    """The .idx goes last: while it is missing, readers see no dataset rather than a torn one."""
    remove_dataset(prefix)
    os.replace(f"{temp}.bin", f"{prefix}.bin")
    os.replace(f"{temp}.idx", f"{prefix}.idx")


def _show(progress: bool, stats: PreprocessStats, start: float, last_shown: float) -> float:
    """One status line, redrawn at most twice a second; returns when it was last drawn."""
    now = time.perf_counter()
    if not progress or now - last_shown < 0.5:
        return last_shown
    elapsed = max(time.perf_counter() - start, 1e-9)
    print(
        f"\r{stats.documents} docs, {stats.tokens} tokens | {stats.documents / elapsed:.0f} docs/s, "
        f"{stats.bytes_read / elapsed / 1e6:.2f} MB/s",
        end="",
        flush=True,
    )
    return now


def inspect_dataset(prefix: str | Path, tokenizer: Tokenizer | None = None, num_samples: int = 3, bins: int = 10,
                    max_chars: int = 300) -> str:
    """A report: document and token counts, a length histogram, the first documents decoded."""
    ds = IndexedDataset(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    lines = [f"{prefix}: {len(ds)} documents, {ds.num_tokens} tokens, dtype {ds.dtype}"]
    if len(lengths):
        lines.append(f"length min {lengths.min()}, mean {lengths.mean():.1f}, median {int(np.median(lengths))}, max {lengths.max()}")
        counts, edges = np.histogram(lengths, bins=min(bins, max(1, len(np.unique(lengths)))))
        widest = max(counts.max(), 1)
        for count, low, high in zip(counts, edges, edges[1:]):
            lines.append(f"  [{low:9.0f}, {high:9.0f}) {count:8d} {'#' * int(40 * count / widest)}")
    for index in range(min(num_samples, len(ds))):
        tokens = ds[index]
        shown = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens[:50]))
        lines.append(f"--- document {index} ({len(tokens)} tokens) ---")
        lines.append(shown[:max_chars] + ("..." if len(shown) > max_chars else ""))
    return "\n".join(lines)
