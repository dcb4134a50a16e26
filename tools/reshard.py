"""Rewrite a checkpoint for another (tp, pp) layout, offline, in one process.

    python tools/reshard.py --load runs/demo/checkpoint --output runs/demo-tp2pp2 --tp 2 --pp 2
    python tools/reshard.py --load CKPT/iter_0000300 --output CKPT-pp4 --tp 1 --pp 4 --virtual-pp 2

Weights and the optimizer state (full per parameter, so any dp and ZeRO-1 on or off can load
it) are merged to one tensor each and cut again for the new layout; the step, learning-rate
schedule, loss scale and data position are kept, so training resumes where it stopped. The
RNG streams belong to ranks of the old layout and are not carried over (dropout draws then
differ from an uninterrupted run). Every source file's checksum is verified before anything
is written. Loading a checkpoint at another layout reshards on the
fly too; this tool does it once, ahead of a large run.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", required=True, help="checkpoint save directory (follows 'latest') or one iter_* dir")
    parser.add_argument("--output", required=True, help="save directory for the resharded checkpoint")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel degree of the new layout")
    parser.add_argument("--pp", type=int, required=True, help="pipeline-parallel degree of the new layout")
    parser.add_argument("--virtual-pp", type=int, default=1, help="model chunks per pipeline stage (default 1)")
    parser.add_argument("--weights-only", action="store_true", help="drop the optimizer and training state")
    return parser


def reshard(load: str, output: str, tp: int, pp: int, virtual_pp: int = 1, weights_only: bool = False):
    """Write ``load`` at layout (tp, pp, virtual_pp) into the save directory ``output``; returns
    the new iteration directory."""
    from megatron_lite.training.checkpoint import (
        load_full_optimizer_state,
        load_full_state_dict,
        resolve_checkpoint_dir,
        save_full_state_dict,
    )

    source = resolve_checkpoint_dir(load)
    weights, manifest = load_full_state_dict(source, verify=True)  # a damaged source must not be copied on
    config = dict(manifest.config)
    # stage_layers describes the old pipeline; the new one splits the layers evenly
    config["parallel"] = {**config.get("parallel", {}), "virtual_pp": virtual_pp, "stage_layers": None}
    optimizer_state = None if weights_only else load_full_optimizer_state(source)
    tokenizer = source / "tokenizer"
    return save_full_state_dict(
        weights, config, output, tp=tp, pp=pp, tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
        iteration=manifest.iteration, optimizer_state=optimizer_state,
        train_state=None if weights_only else manifest.train_state,
    )


def main(argv: list[str] | None = None) -> int:
    from megatron_lite.cli import run_timed

    args = build_parser().parse_args(argv)

    def rewrite() -> str:
        out = reshard(args.load, args.output, args.tp, args.pp, args.virtual_pp, args.weights_only)
        return f"wrote {out} at tp={args.tp} pp={args.pp} virtual_pp={args.virtual_pp}"

    return run_timed(rewrite)


if __name__ == "__main__":
    sys.exit(main())
