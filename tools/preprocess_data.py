"""Tokenize text / jsonl into Megatron ``PREFIX.bin``/``PREFIX.idx``, or inspect such a pair.

    python tools/preprocess_data.py --input a.jsonl b.jsonl --tokenizer tok/ --output-prefix data/web --workers 4
    python tools/preprocess_data.py --inspect data/web --tokenizer tok/
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.cli import run_reporting
from megatron_lite.data.preprocess import (BAD_UTF8_POLICIES, DEFAULT_ALLOWED_SPECIAL, PreprocessStats, inspect_dataset,
                                           preprocess)
from megatron_lite.data.tokenizer import SPECIAL_MODES
from megatron_lite.data.tokenizer_dir import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help=".jsonl (one document per line) or text files")
    parser.add_argument("--tokenizer", help="tokenizer directory (ours, GPT-2 vocab.json+merges.txt, tokenizer.json, tokenizer.model)")
    parser.add_argument("--output-prefix", help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="jsonl fields to tokenize (one dataset per key)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document token")
    parser.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed jsonl lines")
    parser.add_argument("--text-unit", choices=("file", "line"), default="file", help="documents in plain-text input")
    parser.add_argument("--allowed-special", choices=SPECIAL_MODES, default=DEFAULT_ALLOWED_SPECIAL,
                        help="special-token strings such as <|endoftext|> inside documents: 'none' (default) encodes "
                             "them as plain text, so quoting one cannot inject a document boundary; 'all' encodes "
                             "them as the special tokens' ids, as Hugging Face tokenizers do (for text already "
                             "written in the tokenizer's markup, e.g. rendered chat transcripts)")
    parser.add_argument("--on-bad-utf8", choices=BAD_UTF8_POLICIES, default="error",
                        help="bytes that are not UTF-8: 'error' (default) names the file and line, 'replace' "
                             "writes U+FFFD for them, 'skip' drops the line (a whole file with --text-unit file); "
                             "the summary counts what was replaced or skipped")
    parser.add_argument("--inspect", metavar="PREFIX", help="print statistics and the first documents of PREFIX")
    parser.add_argument("--num-samples", type=int, default=3, help="documents to decode with --inspect")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not args.inspect and not (args.input and args.tokenizer and args.output_prefix):
        parser.error("--input, --tokenizer and --output-prefix are required (or use --inspect PREFIX)")
    return run_reporting(lambda: inspect(args) if args.inspect else tokenize(args))


def inspect(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    print(inspect_dataset(args.inspect, tokenizer, args.num_samples))
    return 0


def tokenize(args: argparse.Namespace) -> int:
    stats = preprocess(args.input, args.tokenizer, args.output_prefix, tuple(args.json_keys), args.workers,
                       args.append_eod, args.skip_bad_lines, args.text_unit, progress=not args.quiet,
                       allowed_special=args.allowed_special, on_bad_utf8=args.on_bad_utf8)
    print(f"wrote {args.output_prefix}: {stats.documents} documents, {stats.tokens} tokens, "
          f"{stats.bad_lines} bad lines skipped, {stats.empty_documents} empty documents dropped, "
          f"{_bad_utf8_summary(stats)}{stats.bytes_read / 1e6:.1f} MB in {stats.seconds:.1f}s")
    return 0


def _bad_utf8_summary(stats: PreprocessStats) -> str:
    if stats.bad_utf8_replaced:
        return f"{stats.bad_utf8_replaced} lines with non-UTF-8 bytes replaced (U+FFFD), "
    if stats.bad_utf8_skipped:
        return f"{stats.bad_utf8_skipped} lines with non-UTF-8 bytes skipped, "
    return ""


if __name__ == "__main__":
    sys.exit(main())
