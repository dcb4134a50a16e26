import importlib.util
from pathlib import Path

import pytest

from tests.training.test_compile import needs_cxx

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_compile.py"
spec = importlib.util.spec_from_file_location("bench_compile", TOOL)
bench_compile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_compile)

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.device=cpu", "data.demo=false"]


@needs_cxx
def test_tiny_run_times_both_models(capsys):
    assert bench_compile.main(["--config", CONFIG, "--steps", "2", "model.vocab_size=64"] + TINY) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("eager ") and " ms/step | compiled " in line and "speedup" in line


def test_a_vocabulary_size_is_required(capsys):
    assert bench_compile.main(["--config", CONFIG, "--steps", "1"] + TINY) == 2
    assert "set model.vocab_size=N" in capsys.readouterr().err


def test_steps_must_be_positive():
    with pytest.raises(SystemExit):
        bench_compile.parse_args(["--config", CONFIG, "--steps", "0"])
