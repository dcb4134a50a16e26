"""Convert a megatron-lite checkpoint (any tp / pp / dp layout) into a Hugging Face model directory.

    python tools/convert_to_hf.py --load runs/demo/checkpoint --output hf/demo
    python tools/convert_to_hf.py --load CKPT/iter_0000300 --output hf/model --max-shard-size 2GB --dtype bfloat16

The result opens with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``:
``config.json`` (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM,
by model.flavor), safetensors weights (sharded with
``model.safetensors.index.json`` above ``--max-shard-size``), ``generation_config.json`` and the tokenizer
with a ``chat_template``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint save directory (follows 'latest') or one iter_* dir")
    parser.add_argument("--output", required=True, help="new (or empty) directory for the Hugging Face model")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weight dtype to write (auto: as saved)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megatron_lite.cli import run_timed
    from megatron_lite.convert import convert_to_hf

    args = build_parser().parse_args(argv)

    def convert() -> str:
        out = convert_to_hf(args.load, args.output, max_shard_size=args.max_shard_size, dtype=args.dtype)
        return f"wrote {out} ({len(list(out.glob('*.safetensors')))} weight file(s))"

    return run_timed(convert)


if __name__ == "__main__":
    sys.exit(main())
