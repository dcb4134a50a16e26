"""``torchrun ... -m megatron_lite pretrain`` on 4 CPU processes trains like one process; the
library's own gloo launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite.config import load_config, save_config
from megatron_lite.parallel.launch import run_distributed
from megatron_lite.training.checkpoint import read_manifest
from megatron_lite.training.trainer import Trainer
from tests.training.tiny import build_tiny_data, tiny_overrides

STEPS = 2
REPO = Path(__file__).resolve().parents[2]


def _metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_pretrain_tp2_pp2_matches_one_process(tmp_path):
    data = build_tiny_data(tmp_path / "data")
    common = [f"train.max_steps={STEPS}", "train.eval_interval=0", "optim.eps=1e-5"]
    config_file = tmp_path / "tiny.yaml"
    save_config(load_config(None, tiny_overrides(data, tmp_path / "unused", common)), config_file)

    run = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "megatron_lite", "pretrain", "--config", str(config_file),
        "parallel.tp=2", "parallel.pp=2", "parallel.timeout_s=120",
        f"log.dir={run}/log", f"checkpoint.save={run}/checkpoint",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("training gpt2") == 1, "only rank 0 prints"
    assert "tp=2 pp=2 dp=1" in done.stdout

    records = _metrics(run / "log")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    torch.set_num_threads(1)
    single = Trainer(load_config(config_file, [f"log.dir={tmp_path}/single", "checkpoint.save="])).train()
    for record, loss in zip(records, single.losses):
        assert record["loss"] == pytest.approx(loss, rel=1e-5)
        assert record["grad_norm"] > 0 and record["tokens_per_s"] > 0
    manifest = read_manifest(run / "checkpoint")
    assert manifest.iteration == STEPS
    assert (manifest.layout.tp, manifest.layout.pp, manifest.layout.dp) == (2, 2, 1)
    assert len(manifest.files) == 4  # one shard per (tp, pp) rank


def _rank_and_world_or_fail(rank: int, world_size: int, failing_rank: int) -> tuple[int, int, str]:
    if rank == failing_rank:
        raise RuntimeError(f"rank {rank} gives up")
    return rank, world_size, os.environ["RANK"]


def test_gloo_launcher_returns_in_rank_order_and_reports_a_failing_rank():
    """The launcher the distributed tests and tools/bench_parallel.py share."""
    assert run_distributed(_rank_and_world_or_fail, 2, -1) == [(0, 2, "0"), (1, 2, "1")]
    with pytest.raises(AssertionError, match=r"(?s)rank 1 failed:.*RuntimeError: rank 1 gives up"):
        run_distributed(_rank_and_world_or_fail, 2, 1)
