"""Convert a Hugging Face GPT-2, Llama, Mistral, Qwen2 or Qwen3 model directory into a megatron-lite checkpoint.

    python tools/convert_from_hf.py --hf hf/model --output ckpt/model --tp 2 --pp 2

The checkpoint carries the model's tokenizer (byte-level BPE ``tokenizer.json`` or SentencePiece
``tokenizer.model``), so ``python -m megatron_lite generate --load ckpt/model`` works on it, and
``pretrain`` fine-tunes from it with ``checkpoint.load=ckpt/model checkpoint.finetune=true``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors + tokenizer)")
    parser.add_argument("--output", required=True, help="checkpoint save directory to write")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of the written shards")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree of the written shards")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weight dtype to write (auto: as stored in the Hugging Face files)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="vocabulary padding multiple (model.make_vocab_size_divisible_by)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_lite.cli import run_timed
    from megatron_lite.convert import convert_from_hf

    args = build_parser().parse_args(argv)

    def convert() -> str:
        out = convert_from_hf(args.hf, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype,
                              make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        return f"wrote {out} at tp={args.tp} pp={args.pp}"

    return run_timed(convert)


if __name__ == "__main__":
    sys.exit(main())
