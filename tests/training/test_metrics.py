import json

import pytest
import torch

from megatron_lite.config import LogConfig
from megatron_lite.training.metrics import Metrics, peak_tflops


def test_peak_table_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp16") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0  # TF32 tensor cores
    assert peak_tflops("cpu (2 threads)", "bf16") is None


def test_logged_steps_console_jsonl_and_tensorboard(tmp_path, capsys):
    log = LogConfig(dir=str(tmp_path), interval=2, tensorboard=True)
    metrics = Metrics(log, True, torch.device("cpu"), "bf16", flops_per_token=1e9, num_devices=2, max_steps=5, peak=100.0)
    assert metrics.step(1, 3.0, 1e-3, 0.5, tokens=1000) is None  # not a logging step
    record = metrics.step(2, 2.5, 2e-3, 0.25, tokens=1000)
    metrics.step(3, 2.4, 2e-3, 0.25, tokens=1000)
    last = metrics.step(5, 2.0, 1e-3, 0.2, tokens=1000)  # the final step is always logged
    metrics.evaluation(5, 2.0)
    metrics.close()
    assert record["step"] == 2 and record["loss"] == 2.5 and record["grad_norm"] == 0.25
    # two steps' tokens over the window; per-device TFLOP/s and MFU follow from it
    assert record["tflops_per_device"] == pytest.approx(record["tokens_per_s"] * 1e9 / 2 / 1e12)
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 100.0)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [2, 5, 5]
    assert lines[2] == {"step": 5, "val_loss": 2.0, "val_ppl": pytest.approx(7.389056)}
    assert lines[1]["loss"] == last["loss"] == 2.0
    out = capsys.readouterr().out
    assert "step      2/5 | loss 2.5000 | lr 2.000e-03 | grad norm 0.250" in out and "MFU" in out
    assert "validation loss 2.0000 | perplexity 7.39" in out
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_other_ranks_write_nothing(tmp_path, capsys):
    metrics = Metrics(LogConfig(dir=str(tmp_path / "x"), interval=1), False, torch.device("cpu"), "fp32", 1.0, 1, 3)
    metrics.step(1, 1.0, 1e-3, 1.0, tokens=10)
    assert capsys.readouterr().out == "" and not (tmp_path / "x").exists()
