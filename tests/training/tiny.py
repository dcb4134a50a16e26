"""Tiny trainer configs over the session's tiny corpus (see conftest.py)."""

from __future__ import annotations

from megatron_lite.config import load_config
from megatron_lite.data.demo import build_demo_data

TINY_MODEL = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
    "model.make_vocab_size_divisible_by=16",
]


def build_tiny_data(directory):
    """The demo builder on ~200 kB of the standard library with a 300-token vocabulary (seconds)."""
    return build_demo_data(directory, vocab_size=300, max_bytes=200_000, progress=False)


def tiny_overrides(data, run_dir, extra=()) -> list[str]:
    mixture = "[" + ", ".join(f"{{prefix: {p}, weight: {w}}}" for p, w in data.mixture) + "]"
    return TINY_MODEL + [
        f"data.tokenizer={data.tokenizer_dir}",
        f"data.mixture={mixture}",
        f"data.cache_dir={run_dir}/index-cache",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=8",
        "train.eval_interval=4", "train.eval_steps=2", "optim.warmup_steps=2", "optim.lr=3e-3",
        f"log.dir={run_dir}/log", "log.interval=1", "log.tensorboard=false", "train.device=cpu",
    ] + list(extra)


def tiny_config(data, run_dir, extra=()):
    return load_config(None, tiny_overrides(data, run_dir, extra))
