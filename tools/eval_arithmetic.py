"""The verifiable arithmetic demo: build its questions, and measure a checkpoint's held-out accuracy.

    python tools/eval_arithmetic.py build --level easy --count 1500 --out-dir data/arithmetic-easy
    python tools/eval_arithmetic.py eval --load runs/sft-arithmetic/checkpoint \\
        --data data/arithmetic-easy/arithmetic.jsonl --valid-fraction 0.2 --seed 1234

``eval`` answers the held-out questions (the split that ``rlhf.valid_fraction`` and
``train.seed`` leave out of the SFT and GRPO runs reading the same file) with greedy decoding,
scores each answer with ``rewards.numeric_answer`` and prints the accuracy with its standard
error (``--temperature 1 --samples 8``: the share of sampled answers that are right, as the
GRPO rollouts draw them). ``--compare OTHER`` scores a second checkpoint on the same questions and adds the paired
difference (per-question change) with its standard error, the figure that says whether RL helped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from megatron_lite.inference import generate_text
from megatron_lite.rlhf.arithmetic import LEVELS, build_arithmetic_data
from megatron_lite.rlhf.data import split_indices
from megatron_lite.rlhf.rewards import numeric_answer


def held_out_records(path: str | Path, valid_fraction: float, seed: int) -> list[dict]:
    """The records of ``path`` that a stage with these ``rlhf.valid_fraction`` and ``train.seed`` validates on."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    _, valid = split_indices(len(records), valid_fraction, seed)
    return [records[i] for i in valid]


def score_checkpoint(load: str, records: list[dict], max_new_tokens: int, batch: int, temperature: float = 0.0,
                     samples: int = 1) -> np.ndarray:
    """Per record, the share of ``samples`` answers of ``load`` (greedy at temperature 0) that the
    record's answer checks as right."""
    scores = np.zeros(len(records))
    for sample in range(samples):
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            answers = generate_text(load, [r["prompt"] for r in chunk], max_new_tokens, temperature=temperature,
                                    seed=sample, device="cpu", chat=True)
            scores[start:start + len(chunk)] += numeric_answer(None, answers, None, answer=[r["answer"] for r in chunk])
    return scores / samples


def mean_and_error(values: np.ndarray) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n))."""
    if len(values) < 2:
        raise ValueError(f"a standard error needs at least two questions, got {len(values)}; raise --valid-fraction")
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def _build(args) -> None:
    path = build_arithmetic_data(args.out_dir, count=args.count, seed=args.seed, level=args.level)
    print(f"{path}: {len(path.read_text().splitlines())} {args.level} questions")


def _eval(args) -> None:
    records = held_out_records(args.data, args.valid_fraction, args.seed)
    decoding = "greedy" if args.temperature == 0 else f"{args.samples} samples at temperature {args.temperature}"
    scores = score_checkpoint(args.load, records, args.max_new_tokens, args.batch, args.temperature, args.samples)
    accuracy, error = mean_and_error(scores)
    print(f"{args.load}: held-out accuracy {accuracy:.3f} +- {error:.3f} ({len(records)} questions, {decoding})")
    if args.compare:
        other = score_checkpoint(args.compare, records, args.max_new_tokens, args.batch, args.temperature,
                                 args.samples)
        other_accuracy, other_error = mean_and_error(other)
        change, change_error = mean_and_error(other - scores)
        print(f"{args.compare}: held-out accuracy {other_accuracy:.3f} +- {other_error:.3f}")
        print(f"change {change:+.3f} +- {change_error:.3f} (paired, {change / change_error if change_error else 0:.1f} "
              f"standard errors)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write OUT_DIR/arithmetic.jsonl")
    build.add_argument("--level", choices=sorted(LEVELS), default="easy")
    build.add_argument("--count", type=int, default=1500)
    build.add_argument("--seed", type=int, default=0, help="of the question generator")
    build.add_argument("--out-dir", required=True)
    evaluate = commands.add_parser("eval", help="held-out accuracy of a checkpoint (and the change to another)")
    evaluate.add_argument("--load", required=True, help="checkpoint directory")
    evaluate.add_argument("--compare", default="", help="a second checkpoint scored on the same questions")
    evaluate.add_argument("--data", required=True, help="the JSONL file the runs trained on")
    evaluate.add_argument("--valid-fraction", type=float, required=True, help="the runs' rlhf.valid_fraction")
    evaluate.add_argument("--seed", type=int, required=True, help="the runs' train.seed")
    evaluate.add_argument("--max-new-tokens", type=int, default=6)
    evaluate.add_argument("--batch", type=int, default=64)
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampled answers")
    evaluate.add_argument("--samples", type=int, default=1, help="answers per question when sampling")
    args = parser.parse_args(argv)
    if args.command == "build":
        if args.count < 1:
            parser.error(f"--count {args.count}: need at least one question")
        _build(args)
        return
    if args.samples < 1 or (args.temperature == 0 and args.samples > 1):
        parser.error(f"--samples {args.samples}: need at least 1, and 1 with greedy decoding (--temperature 0); "
                     f"sample with --temperature 1 for more")
    _eval(args)


if __name__ == "__main__":
    sys.exit(main())
