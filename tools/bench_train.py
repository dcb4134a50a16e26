"""Training throughput of a config on this device: tokens/s, TFLOP/s per device and MFU.

    python tools/bench_train.py --config configs/gpt2-124m.yaml --synthetic model.vocab_size=50257
    torchrun --nproc_per_node=8 tools/bench_train.py --config configs/gpt2-1.3b.yaml --synthetic model.vocab_size=50257

Runs ``--warmup`` steps (compilation, allocator growth; not timed) then ``--steps`` timed
steps through the real trainer, and records the result in the ``## Training throughput``
section of docs/benchmarks.md (other sections of that file are left as they are).
``--synthetic`` trains on uniformly random tokens, so no data set is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from megatron_lite.cli import run_reporting
from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.metrics import device_name
from megatron_lite.training.trainer import Trainer

SECTION = "## Training throughput"
TABLE_HEADER = (
    "| date | config | device | tp/pp/dp | precision | micro x global batch | seq | tokens/s | TFLOP/s per device | MFU | peak memory GiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)


class SyntheticTokens:
    """Random token sequences of length seq_length + 1, reproducible per index."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 0):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index))
        return rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--synthetic", action="store_true", help="random tokens instead of the config's data")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="markdown file to record the result in")
    parser.add_argument("--no-record", action="store_true", help="print only; leave the docs file alone")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--fit-micro-batch", type=float, default=0.0, metavar="GIB",
                        help="train with the largest power-of-two micro-batch (global batch = one micro-batch per "
                             "dp rank) whose peak memory the planner puts under this many GiB (0: as configured)")
    parser.add_argument("--jsonl", default="", help="append the result as one JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.fit_micro_batch < 0:
        parser.error(f"--fit-micro-batch must be a positive number of GiB (or 0: off), got {args.fit_micro_batch:g}")
    return args


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def largest_fitting_micro_batch(cfg, limit_gib: float, largest: int = 64):
    """The config with the largest power-of-two micro-batch whose planned peak fits ``limit_gib``, one
    micro-batch per dp rank per step; (config, planned peak bytes)."""
    from megatron_lite.training.planner import plan_memory

    best = None
    micro_batch = 1
    while micro_batch <= largest:
        dp = world_size() // (cfg.parallel.tp * cfg.parallel.pp)
        train = dataclasses.replace(cfg.train, micro_batch_size=micro_batch, global_batch_size=micro_batch * dp)
        candidate = dataclasses.replace(cfg, train=train)
        peak = plan_memory(candidate, world_size()).peak
        if peak > limit_gib * 2**30:
            break
        best = (candidate, peak)
        micro_batch *= 2
    if best is None:
        raise ConfigError(f"even micro-batch 1 needs more than {limit_gib:g} GiB by the planner; use recompute, "
                          f"tensor or pipeline parallelism, or a larger --fit-micro-batch")
    return best


def run(args: argparse.Namespace) -> dict | None:
    log_dir = tempfile.mkdtemp(prefix="bench_train_")
    overrides = list(args.overrides) + [
        f"train.max_steps={args.warmup + args.steps}", "train.eval_interval=0", "train.max_tokens=0",
        "checkpoint.save=", "checkpoint.load=", "log.interval=1", "log.tensorboard=false", f"log.dir={log_dir}",
        "optim.warmup_steps=0", "optim.decay_steps=null",
    ]
    cfg = load_config(args.config, overrides)
    if args.fit_micro_batch > 0:
        cfg, _ = largest_fitting_micro_batch(cfg, args.fit_micro_batch)
    planned = planned_peak_gib(cfg)
    datasets = None
    if args.synthetic:
        if cfg.model.vocab_size <= 0:
            raise ConfigError("--synthetic needs model.vocab_size=N (for example model.vocab_size=50257 for GPT-2)")
        samples = cfg.train.global_batch_size * cfg.train.max_steps
        datasets = (SyntheticTokens(cfg.model.vocab_size, cfg.model.seq_length, samples, cfg.train.seed), None)
    trainer = Trainer(cfg, datasets=datasets)
    trainer.train()
    if not trainer.is_logging_rank:
        return None
    records = [json.loads(line) for line in open(Path(log_dir) / "metrics.jsonl")]
    timed = [r for r in records if r["step"] > args.warmup]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)  # each record covers one step
    tokens_per_s = tokens_per_step * len(timed) / seconds
    tflops = tokens_per_s * trainer.metrics.flops_per_token / trainer.dims.world_size / 1e12
    peak = trainer.metrics.peak
    d = trainer.dims
    return {
        "date": datetime.date.today().isoformat(),
        "config": Path(args.config).name + ("" if not args.overrides else " " + " ".join(args.overrides)),
        "device": f"{trainer.dims.world_size} x {device_name(d.device)}",
        "layout": f"{d.tp}/{d.pp}/{d.dp}",
        "precision": cfg.train.precision,
        "batch": f"{cfg.train.micro_batch_size} x {cfg.train.global_batch_size}",
        "seq": cfg.model.seq_length,
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "memory_gib": max(r["memory_gib"] for r in timed),
        "planned_gib": planned,
        "synthetic": args.synthetic,
    }


def planned_peak_gib(cfg) -> float | None:
    """The memory planner's peak for this run, None where it cannot say (the vocabulary comes from data)."""
    from megatron_lite.training.planner import plan_memory

    if cfg.model.vocab_size <= 0:
        return None
    return plan_memory(cfg, world_size()).peak / 2**30


def table_row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    config = r["config"] + (" (synthetic)" if r["synthetic"] else "")
    return (
        f"| {r['date']} | {config} | {r['device']} | {r['layout']} | {r['precision']} | {r['batch']} | {r['seq']} | "
        f"{r['tokens_per_s']:,.0f} | {r['tflops']:.2f} | {mfu} | {r['memory_gib']:.2f} |\n"
    )


def record_result(docs: Path, row: str) -> None:
    """Append ``row`` to the section's table, creating the file or the section when missing."""
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    if not any(line.rstrip() == SECTION for line in lines):
        sep = "" if text.endswith("\n") else "\n"
        docs.parent.mkdir(parents=True, exist_ok=True)
        intro = (
            "Measured with `tools/bench_train.py` through the real trainer; warm-up steps excluded. TFLOP/s\n"
            "counts 6 x matmul parameters + attention per token; MFU divides by the device's dense 16-bit\n"
            "tensor-core peak (half of it for fp32 runs, which use TF32), n/a on CPUs.\n\n"
        )
        docs.write_text(text + sep + "\n" + SECTION + "\n\n" + intro + TABLE_HEADER + row)
        return
    start = next(i for i, line in enumerate(lines) if line.rstrip() == SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    last_table_line = max((i for i in range(start, end) if lines[i].startswith("|")), default=None)
    if last_table_line is None:
        lines[end:end] = ["\n", TABLE_HEADER, row]
    else:
        lines.insert(last_table_line + 1, row)
    docs.write_text("".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    return run_reporting(lambda: bench(args))


def bench(args: argparse.Namespace) -> int:
    result = run(args)
    if result is not None:
        row = table_row(result)
        print(TABLE_HEADER + row, end="")
        if result["planned_gib"] is not None:
            print(f"memory: planned peak {result['planned_gib']:.2f} GiB, measured {result['memory_gib']:.2f} GiB")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
        if not args.no_record:
            record_result(Path(args.docs), row)
            print(f"recorded in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
