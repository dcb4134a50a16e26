"""Smoke test of tools/bench_vs_reference.py with tiny shapes: every model trains, every call is timed."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_vs_reference.py"
spec = importlib.util.spec_from_file_location("bench_vs_reference", TOOL)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

TINY = ["--layers", "1", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--seq", "16", "--batch", "2",
        "--vocab", "64", "--steps", "1", "--warmup", "1", "--rounds", "1", "--decode-calls", "2"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run_reports_every_model_and_call(capsys):
    assert bench.main(TINY + ["--threads", "1", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"gpt2", "llama"}
    assert set(results["gpt2"]["train_tokens_per_s"]) == {"ours", "hf", "nanogpt"}
    assert set(results["llama"]["train_tokens_per_s"]) == {"ours", "hf"}
    for flavor in results.values():
        assert all(rate["wall"] > 0 and rate["cpu"] > 0 for rate in flavor["train_tokens_per_s"].values())
        assert len(flavor["decode_attention_us"]) == 3 and all(us > 0 for us in flavor["decode_attention_us"].values())


def test_markdown_table():
    args = bench.parse_args(TINY + ["--flavor", "gpt2"])
    results = {"gpt2": {"train_tokens_per_s": {"ours": {"wall": 100.0, "cpu": 60.0},
                                               "hf": {"wall": 50.0, "cpu": 40.0}},
                        "decode_attention_us": {"ours (bias built once per step)": 10.0}}}
    text = bench.markdown(args, results)
    assert "| gpt2 | hf | 50 | 2.00x | 40 | 1.50x |" in text and "| gpt2 | ours (bias built once per step) | 10.0 |" in text


def test_nanogpt_style_model_learns_its_tokens():
    torch.manual_seed(0)
    model = bench.NanoGPT(vocab=16, seq=8, hidden=32, heads=4, layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 16, (4, 8))
    first = model(ids, ids).item()
    for _ in range(20):
        model(ids, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(ids, ids).item() < first / 2


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--hidden", "30", "--heads", "4"], "--hidden (30) must divide by --heads (4)"),
    (["--warmup", "5", "--steps", "2"], "--warmup must be in [0, --steps=2]"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err
