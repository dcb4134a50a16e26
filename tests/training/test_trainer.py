import json
import math
import os
import signal

import pytest
import torch

from megatron_lite.config import ConfigError
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import load_full_state_dict
from megatron_lite.training.step import validate_batch_layout
from megatron_lite.training.trainer import Trainer
from megatron_lite.training.setup import setup_dims
from tests.distributed import run_distributed
from tests.training.tiny import tiny_config


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_overfits_one_batch(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, ["train.max_steps=60", "optim.schedule=constant", "optim.lr=1e-2",
                                            "train.eval_interval=0", "optim.weight_decay=0.0"])
    trainer = Trainer(cfg)
    one = trainer.train_ds[0]
    trainer.train_ds = [one] * (60 * 4)  # every step sees the same four sequences
    result = trainer.train()
    assert result.steps == 60
    assert result.losses[0] > 5.0  # ~ln(300) at initialisation
    assert result.losses[-1] < 0.5, result.losses[-10:]


def _interrupt_at(trainer, step):
    original = trainer.metrics.step

    def step_then_signal(s, *args, **kwargs):
        out = original(s, *args, **kwargs)
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer: save at the end of this step
        return out

    trainer.metrics.step = step_then_signal


def test_exact_resume_and_metrics(tiny_data, tmp_path):
    common = ["model.dropout=0.1", "checkpoint.interval=0"]  # dropout: the RNG must resume too
    full = Trainer(tiny_config(tiny_data, tmp_path / "full", common)).train()
    assert len(full.losses) == 8 and not full.interrupted

    first = Trainer(tiny_config(tiny_data, tmp_path / "a", common + [f"checkpoint.save={tmp_path}/ck"]))
    _interrupt_at(first, 3)
    part1 = first.train()
    assert part1.interrupted and part1.steps == 3
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000003"
    second = Trainer(tiny_config(tiny_data, tmp_path / "b", common + [f"checkpoint.load={tmp_path}/ck"]))
    assert second.step == 3 and second.consumed_samples == 12
    part2 = second.train()
    assert part1.losses + part2.losses == full.losses  # bit for bit
    assert part2.val_losses == [(4, full.val_losses[0][1]), (8, full.val_losses[1][1])]

    records = read_jsonl(tmp_path / "full" / "log" / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    assert [r["loss"] for r in train_records] == full.losses
    assert train_records[0]["lr"] == pytest.approx(1.5e-3) and train_records[1]["lr"] == pytest.approx(3e-3)
    for r in train_records:
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0 and r["mfu"] is None and r["tflops_per_device"] > 0
    assert [r["step"] for r in val_records] == [4, 8]
    assert val_records[1]["val_ppl"] == pytest.approx(math.exp(val_records[1]["val_loss"]))


def test_fp16_overflow_skips_step_and_halves_scale(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, ["train.precision=fp16", "train.max_steps=2", "train.eval_interval=0",
                                            "train.initial_loss_scale=1024"])
    trainer = Trainer(cfg)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_params}
    qkv = dict(trainer.model.named_params)["layers.0.attention.qkv.weight"]
    calls = {"n": 0}

    def poison_first_backward(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 1 else grad

    qkv.register_hook(poison_first_backward)
    after_step = {}
    original = trainer.metrics.step

    def capture(step, *args, **kwargs):
        after_step[step] = ({n: p.detach().clone() for n, p in trainer.model.named_params}, trainer.model.scaler.scale)
        return original(step, *args, **kwargs)

    trainer.metrics.step = capture
    trainer.train()
    params1, scale1 = after_step[1]
    assert scale1 == 512.0
    for name, value in params1.items():
        assert torch.equal(value, initial[name]), name  # the overflowing step changed nothing
    params2, scale2 = after_step[2]
    assert scale2 == 512.0 and not torch.equal(params2["layers.0.mlp.fc.weight"], initial["layers.0.mlp.fc.weight"])
    assert trainer.model.scheduler.step_count == 1  # the skipped step did not advance the schedule
    records = read_jsonl(tmp_path / "log" / "metrics.jsonl")
    assert [(r["skipped"], r["loss_scale"]) for r in records] == [(True, 512.0), (False, 512.0)]


def test_batch_layout_and_token_budget(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, ["train.global_batch_size=6"])
    with pytest.raises(ConfigError, match=r"global_batch_size=6 is not divisible by .* = 2 x 2 = 4"):
        validate_batch_layout(cfg, ParallelDims(dp=2))
    assert validate_batch_layout(cfg, ParallelDims(dp=3)) == 1
    budget = Trainer(tiny_config(tiny_data, tmp_path, ["train.max_tokens=130", "train.eval_interval=0"]))
    assert budget.total_steps == 3  # 64 tokens per step: three steps reach 130
    assert budget.train().steps == 3


def _parallel_runs(rank, world, data, root):
    losses = {}
    for name, extra in PARALLEL_RUNS.items():
        cfg = tiny_config(data, f"{root}/{name}", [e.format(root=root) for e in extra])
        dims = setup_dims(cfg)
        result = Trainer(cfg, dims).train()
        losses[name] = {"losses": result.losses, "val_losses": result.val_losses}
    return losses


PARALLEL_RUNS = {
    "tp2": ["parallel.tp=2", "train.eval_interval=0"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.eval_interval=0"],
    "dp2": ["train.eval_interval=0"],
    "pp2": ["parallel.pp=2", "checkpoint.save={root}/pp2-ck"],  # evaluation runs forward-only through the pipeline
    "pp2_afab": ["parallel.pp=2", "parallel.pipeline_schedule=afab", "train.eval_interval=0"],
}


def test_tensor_and_data_parallel_match_single_process(tiny_data, tmp_path):
    single_trainer = Trainer(tiny_config(tiny_data, tmp_path / "single"))
    single = single_trainer.train()
    results = run_distributed(_parallel_runs, 2, tiny_data, str(tmp_path))
    for name in PARALLEL_RUNS:
        assert results[0][name] == results[1][name], name  # every rank reports the same loss
        assert results[0][name]["losses"] == pytest.approx(single.losses, rel=1e-5), name
    val = [v for _, v in results[0]["pp2"]["val_losses"]]
    assert val == pytest.approx([v for _, v in single.val_losses], rel=1e-5)
    # the two stages' files merge into the single-process model (the last stage's tied copy dropped)
    merged, manifest = load_full_state_dict(tmp_path / "pp2-ck")
    assert manifest.layout.pp == 2 and sorted(manifest.files) == ["model_tp00_pp000.pt", "model_tp00_pp001.pt"]
    assert sorted(merged) == sorted(n for n, _ in single_trainer.model.named_params)
    for name, param in single_trainer.model.named_params:
        assert torch.allclose(merged[name], param.detach(), atol=1e-4), name
