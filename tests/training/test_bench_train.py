import importlib.util
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_train.py"
spec = importlib.util.spec_from_file_location("bench_train", TOOL)
bench_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train)

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "model.vocab_size=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.device=cpu",
        "data.demo=false"]


def test_synthetic_tokens_are_reproducible_and_in_range():
    data = bench_train.SyntheticTokens(vocab_size=50, seq_length=8, num_samples=10)
    assert len(data) == 10 and data[3].shape == (9,) and data[3].dtype == np.int64
    assert np.array_equal(data[3], data[3]) and not np.array_equal(data[3], data[4])
    assert data[7].min() >= 0 and data[7].max() < 50


def test_cpu_run_records_a_row_and_keeps_other_sections(tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Kernels\n\n| a |\n|---|\n| 1 |\n\n## Parallelism\n\ntext\n")
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    argv = ["--config", str(config), "--synthetic", "--steps", "2", "--warmup", "1", "--docs", str(docs)] + TINY
    assert bench_train.main(argv) == 0
    assert bench_train.main(argv) == 0  # a second run appends to the same table
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n## Kernels\n\n| a |\n|---|\n| 1 |\n\n## Parallelism\n\ntext\n")
    section = text.split("## Training throughput", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| 20")]
    assert len(rows) == 2 and "demo.yaml" in rows[0] and "(synthetic)" in rows[0] and "| 1/1/1 | fp32 | 2 x 4 | 16 |" in rows[0]
    tokens_per_s = float(rows[0].split("|")[8].replace(",", ""))
    assert tokens_per_s > 0
    assert "recorded in" in capsys.readouterr().out


def test_synthetic_needs_vocab_size(tmp_path, capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    argv = ["--config", str(config), "--synthetic", "--no-record", "data.demo=false", "train.device=cpu"]
    assert bench_train.main(argv) == 2
    assert "--synthetic needs model.vocab_size=N" in capsys.readouterr().err


def test_fit_micro_batch_takes_the_largest_that_the_planner_fits(tmp_path, capsys):
    import json

    from megatron_lite.config import load_config
    from megatron_lite.training.planner import plan_memory

    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    cfg = load_config(config, TINY)
    peaks = {mb: plan_memory(bench_train.largest_fitting_micro_batch(cfg, 100.0, largest=mb)[0], 1).peak
             for mb in (1, 2, 4)}
    limit = (peaks[2] + peaks[4]) / 2 / 2**30  # room for 2 but not 4
    chosen, peak = bench_train.largest_fitting_micro_batch(cfg, limit)
    assert (chosen.train.micro_batch_size, chosen.train.global_batch_size, peak) == (2, 2, peaks[2])
    out = tmp_path / "runs.jsonl"
    argv = ["--config", str(config), "--synthetic", "--steps", "1", "--warmup", "0", "--no-record",
            "--fit-micro-batch", str(limit), "--jsonl", str(out)] + TINY
    assert bench_train.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["batch"] == "2 x 2" and result["planned_gib"] == pytest.approx(peaks[2] / 2**30)
    assert "planned peak" in capsys.readouterr().out


def test_fit_micro_batch_refuses_what_never_fits(capsys):
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    argv = ["--config", str(config), "--synthetic", "--no-record", "--fit-micro-batch", "0.000001"] + TINY
    assert bench_train.main(argv) == 2
    assert "even micro-batch 1 needs more than" in capsys.readouterr().err
