"""The step-parts benchmark runs end to end on tiny sizes and reports every row (no timing checked)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_lite.training.optim import torch_fused_adamw_supports

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_step_parts.py"
spec = importlib.util.spec_from_file_location("bench_step_parts", TOOL)
bench_step_parts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_step_parts)


def test_tiny_run_prints_loss_and_optimizer_rows(capsys):
    argv = ["--tokens", "16", "--vocab-size", "50", "--padded-vocab", "64", "--hidden", "8", "--layers", "1",
            "--repeat", "1"]
    assert bench_step_parts.main(argv) == 0
    out = capsys.readouterr().out
    for padded in (50, 64):
        for part in ("forward |", "forward + backward |", "kept for backward |"):
            assert f"16 tokens x vocab 50 (padded {padded}), fp32, {part}" in out
    if torch_fused_adamw_supports(torch.device("cpu"), torch.float32):
        assert "fused vs for-loop" in out and "fused vs foreach" in out
    else:
        assert "no fused AdamW on CPU" in out


def test_padded_vocab_below_vocab_is_refused():
    with pytest.raises(SystemExit):
        bench_step_parts.main(["--vocab-size", "64", "--padded-vocab", "50"])
