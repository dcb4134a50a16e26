"""Train a byte-level BPE or SentencePiece BPE tokenizer from text / jsonl files.

    python tools/train_tokenizer.py --input corpus.jsonl --output tok/ --vocab-size 32000
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_lite.cli import run_reporting
from megatron_lite.data.train_tokenizer import TOKENIZER_TYPES, parse_special_tokens, train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="text files (one document each) or .jsonl files")
    parser.add_argument("--output", required=True, help="tokenizer directory to write")
    parser.add_argument("--type", choices=TOKENIZER_TYPES, default="bytelevel")
    parser.add_argument("--vocab-size", type=int, default=32000, help="total ids, special tokens included")
    parser.add_argument("--json-key", default="text", help="field holding the text in jsonl input")
    parser.add_argument("--special-tokens", nargs="*", metavar="ROLE=TEXT",
                        help="override special tokens (roles: eod, pad, system, user, assistant)")
    parser.add_argument("--max-bytes", type=int, default=0, help="train on at most this many characters (0: all)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    return run_reporting(lambda: train(args))


def train(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    special = parse_special_tokens(args.special_tokens)
    tok = train_tokenizer(args.input, args.output, args.type, args.vocab_size, special, args.json_key,
                          args.max_bytes, progress=not args.quiet)
    print(f"saved a {args.type} tokenizer with {tok.vocab_size} ids to {args.output} "
          f"({time.perf_counter() - start:.1f}s); special ids: {tok.special_ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
