"""What packing fine-tuning records (``rlhf.pack``) gains: record tokens/s and padding fraction
without and with it, the real trainer on the same records.

    python tools/bench_packing.py --config configs/sft.yaml --cpu-threads 1 checkpoint.load=
    python tools/bench_packing.py --config configs/dpo.yaml --stage dpo --no-record checkpoint.load=

Each run trains ``--warmup`` untimed then ``--steps`` timed steps from the same seed, once with
``rlhf.pack=false`` and once with ``rlhf.pack=true``. Both train on the same records, so the
figure that compares them is the record tokens (every token of every packed sequence, padding
excluded) per second of step time; the padding fraction is the share of the rows' token slots
holding no record token. The row goes to the "Packed fine-tuning batches" section of
docs/benchmarks.md unless ``--no-record``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmark_docs import record_table_row
from megatron_lite.cli import run_reporting
from megatron_lite.config import load_config
from megatron_lite.rlhf import STAGES
from megatron_lite.training.metrics import device_name
from megatron_lite.training.trainer import Trainer

SECTION = "## Packed fine-tuning batches"
TABLE_HEADER = (
    "| date | config | stage | device | seq | records / micro-batch | padding unpacked | padding packed "
    "| record tokens/s unpacked | record tokens/s packed | ratio |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--stage", default="sft", choices=("sft", "rm", "dpo"))
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="markdown file to record the result in")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the docs file alone")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return args


def step_layout(trainer: Trainer, step: int) -> tuple[int, int]:
    """(record tokens, token slots) of the rows run step ``step`` trains on."""
    task, gb = trainer.task, trainer.cfg.train.global_batch_size
    micro = task.micro_batches(trainer.train_ds, step * gb)
    indices = task.records.local_indices(trainer.train_ds, step * gb)
    record_tokens = sum(length for _, _, length in task.packed_sequences(indices))
    return record_tokens, sum(tokens.numel() for tokens, _ in micro)


def run(args: argparse.Namespace, pack: bool) -> dict:
    """Train warmup + steps; the timed steps' record tokens/s and padding fraction."""
    log_dir = tempfile.mkdtemp(prefix="bench_packing_")
    cfg = load_config(args.config, list(args.overrides) + [
        f"train.max_steps={args.warmup + args.steps}", "train.eval_interval=0", "train.max_tokens=0",
        "checkpoint.save=", "log.interval=1", "log.tensorboard=false", f"log.dir={log_dir}",
        f"rlhf.pack={str(pack).lower()}",
    ])
    trainer = Trainer(cfg, task=STAGES[args.stage])
    timed = range(args.warmup, args.warmup + args.steps)
    record_tokens, slots = (sum(column) for column in zip(*(step_layout(trainer, step) for step in timed)))
    trainer.train()
    metrics = [json.loads(line) for line in open(Path(log_dir) / "metrics.jsonl")]
    # the trainer's tokens/s counts the padded slots of an unpacked step: its step time
    seconds = sum(trainer.task.tokens_per_step() / r["tokens_per_s"] for r in metrics if r["step"] > args.warmup)
    return {"tokens_per_s": record_tokens / seconds, "padding": 1 - record_tokens / slots, "trainer": trainer}


def bench(args: argparse.Namespace) -> int:
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    plain, packed = run(args, pack=False), run(args, pack=True)
    cfg, dims = packed["trainer"].cfg, packed["trainer"].dims
    config = Path(args.config).name + ("" if not args.overrides else " " + " ".join(args.overrides))
    row = (f"| {datetime.date.today().isoformat()} | {config} | {args.stage} | {dims.world_size} x "
           f"{device_name(dims.device)} | {cfg.model.seq_length} | "
           f"{cfg.train.micro_batch_size} | {plain['padding']:.1%} | {packed['padding']:.1%} | "
           f"{plain['tokens_per_s']:,.0f} | {packed['tokens_per_s']:,.0f} | "
           f"{packed['tokens_per_s'] / plain['tokens_per_s']:.2f} |\n")
    print(TABLE_HEADER + row, end="")
    if not args.no_record:
        record_row(Path(args.docs), row)
        print(f"recorded in {args.docs}")
    return 0


def record_row(docs: Path, row: str) -> None:
    record_table_row(docs, SECTION, TABLE_HEADER, row)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting(lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
