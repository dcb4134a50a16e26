"""Report what a data mixture means: tokens, documents and epochs per source, the realised
mixture, and a ``data.mixture`` block to paste into a training config.

    python tools/mix_data.py mixture.yaml [--seq-length 2048]
"""

from __future__ import annotations

import argparse
import sys

from megatron_lite.cli import run_reporting
from megatron_lite.data.blend import load_spec, plan_mixture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", help="YAML with 'mixture' (prefix + weight or tokens) and 'total_tokens'")
    parser.add_argument("--seq-length", type=int, default=None, help="sample length (default: spec's seq_length or 2048)")
    args = parser.parse_args(argv)
    return run_reporting(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    plan = plan_mixture(load_spec(args.spec), args.seq_length)
    print(f"{plan.total_tokens} tokens = {plan.num_samples} samples\n")
    print(plan.table())
    for warning in plan.warnings:
        print(f"warning: {warning}")
    print("\n" + plan.mixture_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
