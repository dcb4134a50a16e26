"""Recomputation under every kind of parallelism trains exactly like no recomputation, with dropout.

One gloo launch of two ranks trains each layout (tp=2 with sequence parallelism, pp=2 with the
afab, 1F1B and interleaved schedules, dp=2) for two steps with the real ``Trainer`` once per
recompute mode. In each layout the losses, the gradient norms and every rank's parameters
afterwards must equal the ``none`` run's bit for bit (fp32): a recomputed forward that drew other
dropout masks, ran its collectives differently or lost a gradient would show in all three.
The same launch measures the saved-activation bytes per rank at tp=2 with and without sequence
parallelism, for the memory planner's comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_lite.config import load_config
from megatron_lite.training.activation_memory import saved_activation_bytes
from megatron_lite.training.setup import setup_dims
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed

VOCAB, SEQ, STEPS = 96, 16, 2
BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_heads=4", f"model.seq_length={SEQ}",
    f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=16", "model.dropout=0.1",
    "train.micro_batch_size=2", "train.global_batch_size=8", f"train.max_steps={STEPS}", "train.eval_interval=0",
    "train.device=cpu", "train.seed=11", "optim.lr=1e-2", "optim.warmup_steps=1", "log.interval=1",
    "log.tensorboard=false",
]
LAYOUTS = {
    "gpt2 tp2 sequence-parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "llama pp2 afab": ["model.flavor=llama", "model.num_kv_heads=2", "parallel.pp=2",
                       "parallel.pipeline_schedule=afab"],
    "llama pp2 1f1b": ["model.flavor=llama", "model.num_kv_heads=2", "parallel.pp=2"],
    "gpt2 pp2x2 interleaved": ["parallel.pp=2", "parallel.virtual_pp=2"],
    "llama dp2": ["model.flavor=llama", "model.num_kv_heads=2"],
}
MODES = {
    "none": ["train.recompute=none"],
    "selective": ["train.recompute=selective"],
    "full": ["train.recompute=full"],
    "full, first layer of each chunk": ["train.recompute=full", "train.recompute_layers=1"],
}


def _datasets() -> tuple[np.ndarray, np.ndarray]:
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(STEPS * 8 + 8, SEQ + 1))
    return rows[: STEPS * 8], rows[STEPS * 8 :]


def _measure_tp2(mode: str, sequence_parallel: bool) -> int:
    cfg = load_config(None, BASE + MODES[mode] + ["parallel.tp=2", f"parallel.sequence_parallel={sequence_parallel}"])
    return saved_activation_bytes(cfg, setup_dims(cfg))


def _train_every_mode(rank: int, world_size: int, root: str) -> dict:
    out = {("saved bytes", mode, sp): _measure_tp2(mode, sp) for mode in MODES for sp in (False, True)}
    for layout, layout_overrides in LAYOUTS.items():
        for mode, mode_overrides in MODES.items():
            log_dir = Path(root) / f"rank{rank}" / layout.replace(" ", "_") / mode.replace(" ", "_")
            cfg = load_config(None, BASE + layout_overrides + mode_overrides + [f"log.dir={log_dir}"])
            trainer = Trainer(cfg, setup_dims(cfg), datasets=_datasets())
            result = trainer.train()
            lines = (log_dir / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
            out[(layout, mode)] = {
                "losses": result.losses,
                "grad_norms": [r["grad_norm"] for r in map(json.loads, lines) if "grad_norm" in r],
                "params": {name: p.detach().clone() for name, p in trainer.model.named_params},
            }
    return out


def test_recompute_matches_none_bitwise_in_every_layout(tmp_path):
    per_rank = run_distributed(_train_every_mode, 2, str(tmp_path))
    for rank, runs in enumerate(per_rank):
        for layout in LAYOUTS:
            reference = runs[(layout, "none")]
            assert len(reference["losses"]) == STEPS and reference["params"]
            if rank == 0:
                assert len(reference["grad_norms"]) == STEPS
            for mode in MODES:
                run, where = runs[(layout, mode)], f"{layout}, {mode}, rank {rank}"
                assert run["losses"] == reference["losses"], where
                assert run["grad_norms"] == reference["grad_norms"], where
                assert run["params"].keys() == reference["params"].keys(), where
                for name, tensor in reference["params"].items():
                    assert torch.equal(run["params"][name], tensor), f"{where}: {name}"
    # Saved activations per rank: tp=2 holds half the heads and ffn columns (less than one process
    # holding all), sequence parallelism shards the residual stream too (less again); both ranks alike.
    for mode in MODES:
        single = saved_activation_bytes(load_config(None, BASE + MODES[mode]))
        tp2, tp2_sequence_parallel = (per_rank[0][("saved bytes", mode, sp)] for sp in (False, True))
        assert [r[("saved bytes", mode, sp)] for r in per_rank for sp in (False, True)] == [tp2, tp2_sequence_parallel] * 2
        assert tp2_sequence_parallel < tp2 < single, mode
