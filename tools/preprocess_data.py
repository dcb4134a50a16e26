"""Tokenize text / jsonl into Megatron ``PREFIX.bin``/``PREFIX.idx``, or inspect such a pair.

    python tools/preprocess_data.py --input a.jsonl b.jsonl --tokenizer tok/ --output-prefix data/web --workers 4
    python tools/preprocess_data.py --inspect data/web --tokenizer tok/
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.data.indexed import IndexedDatasetError
from megatron_lite.data.preprocess import DEFAULT_ALLOWED_SPECIAL, PreprocessError, inspect_dataset, preprocess
from megatron_lite.data.tokenizer import SPECIAL_MODES, TokenizerError
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
    parser.add_argument("--inspect", metavar="PREFIX", help="print statistics and the first documents of PREFIX")
    parser.add_argument("--num-samples", type=int, default=3, help="documents to decode with --inspect")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.inspect:
            tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
            print(inspect_dataset(args.inspect, tokenizer, args.num_samples))
            return 0
        if not (args.input and args.tokenizer and args.output_prefix):
            parser.error("--input, --tokenizer and --output-prefix are required (or use --inspect PREFIX)")
        stats = preprocess(args.input, args.tokenizer, args.output_prefix, tuple(args.json_keys), args.workers,
                           args.append_eod, args.skip_bad_lines, args.text_unit, progress=not args.quiet,
                           allowed_special=args.allowed_special)
    except (PreprocessError, TokenizerError, IndexedDatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}: {stats.documents} documents, {stats.tokens} tokens, "
          f"{stats.bad_lines} bad lines skipped, {stats.empty_documents} empty documents dropped, "
          f"{stats.bytes_read / 1e6:.1f} MB in {stats.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
