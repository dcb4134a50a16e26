"""What document masks cost (or save): training tokens/s with and without them, and the masked kernels.

    python tools/bench_docmask.py train --config configs/demo.yaml model.seq_length=512   # CPU or GPU
    python tools/bench_docmask.py kernels --out-dir OUT                                    # GPU: S = 8k, 32k
    python tools/bench_docmask.py kernels --smoke --out-dir OUT                            # CPU: interpreter
    python tools/bench_docmask.py kernels --torch-only --seqs 512,2048 --tokens 4096 --heads 4 --head-dim 32 \
        --mean-document 128 --out-dir OUT                                                  # CPU: the torch paths

``train`` runs the real trainer twice on the same synthetic packed documents (random tokens, an
EOD token ending documents of log-normal lengths around ``--mean-document``), with
``data.document_mask`` false then true, and records both throughputs in the "Document-masked
attention" section of docs/benchmarks.md. ``kernels`` times the attention backends on ragged
documents (``tools/kernel_bench/docmask.py``) and writes Markdown and JSON under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton

from kernel_bench.docmask import as_json, docmask_markdown, ragged_lengths, run_docmask  # noqa: E402

from benchmark_docs import record_table_row  # noqa: E402
from megatron_lite.cli import run_reporting  # noqa: E402
from megatron_lite.config import ConfigError, load_config  # noqa: E402
from megatron_lite.training.metrics import device_name  # noqa: E402
from megatron_lite.training.trainer import LanguageModelTask, Trainer  # noqa: E402

SECTION = "## Document-masked attention"
TABLE_HEADER = (
    "| date | config | device | attention | seq | mean document | tokens/s without masks | tokens/s with masks | ratio |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)
EOD = 0  # the synthetic documents' end-of-document token


class PackedSyntheticDocuments:
    """Rows of seq_length + 1 random tokens in 1..vocab-1, with EOD ending ragged documents."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, mean_document: int, seed: int = 0):
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.mean_document, self.seed = mean_document, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index))
        row = rng.integers(1, self.vocab_size, self.seq_length + 1, dtype=np.int64)
        ends = np.cumsum(ragged_lengths(self.seq_length + 1, self.mean_document, rng)) - 1
        row[ends] = EOD
        return row


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    train = modes.add_parser("train", help="training tokens/s with and without document masks")
    train.add_argument("--config", required=True)
    train.add_argument("--steps", type=int, default=5, help="timed steps")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    train.add_argument("--mean-document", type=int, default=128, help="mean document length in tokens")
    train.add_argument("--docs", default="docs/benchmarks.md", help="markdown file to record the result in")
    train.add_argument("--no-record", action="store_true", help="print only; leave the docs file alone")
    train.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    kernels = modes.add_parser("kernels", help="document-masked attention kernels on ragged documents")
    kernels.add_argument("--smoke", action="store_true", help="tiny shapes (Triton through the interpreter on CPU)")
    kernels.add_argument("--torch-only", action="store_true", help="only the torch paths (runs on a CPU at full size)")
    kernels.add_argument("--seqs", default="8192,32768")
    kernels.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens / S)")
    kernels.add_argument("--heads", type=int, default=16)
    kernels.add_argument("--head-dim", type=int, default=128)
    kernels.add_argument("--mean-document", type=int, default=2048, help="mean document length in tokens")
    kernels.add_argument("--out-dir", default="docs")
    kernels.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.mode == "train" and (args.steps < 1 or args.warmup < 0):
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.mode == "kernels" and not torch.cuda.is_available() and not (args.smoke or args.torch_only):
        parser.error("no CUDA GPU: only kernels --smoke (Triton through the interpreter) or --torch-only runs here")
    return args


# ----------------------------------------------------------------------------- training throughput


def train_tokens_per_s(args: argparse.Namespace, document_mask: bool) -> tuple[float, object]:
    log_dir = tempfile.mkdtemp(prefix="bench_docmask_")
    overrides = list(args.overrides) + [
        f"train.max_steps={args.warmup + args.steps}", "train.eval_interval=0", "train.max_tokens=0",
        "checkpoint.save=", "checkpoint.load=", "log.interval=1", "log.tensorboard=false", f"log.dir={log_dir}",
        "optim.warmup_steps=0", "optim.decay_steps=null", f"data.document_mask={str(document_mask).lower()}",
    ]
    cfg = load_config(args.config, overrides)
    if cfg.model.vocab_size <= 0:
        raise ConfigError("the synthetic documents need model.vocab_size=N (for example model.vocab_size=2048)")
    samples = cfg.train.global_batch_size * cfg.train.max_steps
    data = PackedSyntheticDocuments(cfg.model.vocab_size, cfg.model.seq_length, samples, args.mean_document)
    trainer = Trainer(cfg, datasets=(data, None), task=functools.partial(LanguageModelTask, eod_id=EOD))
    trainer.train()
    records = [json.loads(line) for line in open(Path(log_dir) / "metrics.jsonl")]
    timed = [r for r in records if r["step"] > args.warmup]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)
    return tokens_per_step * len(timed) / seconds, trainer


def bench_train(args: argparse.Namespace) -> int:
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    without, _ = train_tokens_per_s(args, document_mask=False)
    with_masks, trainer = train_tokens_per_s(args, document_mask=True)
    cfg = trainer.cfg
    config = Path(args.config).name + ("" if not args.overrides else " " + " ".join(args.overrides))
    row = (f"| {datetime.date.today().isoformat()} | {config} | {trainer.dims.world_size} x "
           f"{device_name(trainer.dims.device)} | {cfg.model.attention_backend} | {cfg.model.seq_length} | "
           f"{args.mean_document} | {without:,.0f} | {with_masks:,.0f} | {with_masks / without:.2f} |\n")
    print(TABLE_HEADER + row, end="")
    if not args.no_record:
        record_row(Path(args.docs), row)
        print(f"recorded in {args.docs}")
    return 0


def record_row(docs: Path, row: str) -> None:
    record_table_row(docs, SECTION, TABLE_HEADER, row)


# ----------------------------------------------------------------------------- kernels


def bench_kernels(args: argparse.Namespace) -> int:
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    seqs, tokens, heads, head_dim, mean = [int(s) for s in args.seqs.split(",")], args.tokens, args.heads, \
        args.head_dim, args.mean_document
    if args.smoke:  # the interpreter runs every program in Python
        seqs, tokens, heads, head_dim, mean = [48], 96, 2, 32, 16
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    results = run_docmask(seqs, tokens, heads, head_dim, mean, dtype, device, with_triton=not args.torch_only)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_docmask_smoke" if args.smoke else "bench_docmask"
    (out_dir / f"{stem}.md").write_text("\n".join(docmask_markdown(results, name, str(dtype).replace("torch.", "")))
                                        + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps({"device": name, "results": as_json(results)}, indent=1))
    print(f"wrote {out_dir / stem}.md and .json")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_reporting(lambda: bench_train(args) if args.mode == "train" else bench_kernels(args))


if __name__ == "__main__":
    sys.exit(main())
