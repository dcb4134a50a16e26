"""tools/eval_arithmetic.py: the questions it builds, the held-out split it scores, its figures."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.rlhf.arithmetic import arithmetic_records
from megatron_lite.rlhf.data import split_indices

TOOL = Path(__file__).resolve().parents[2] / "tools" / "eval_arithmetic.py"
spec = importlib.util.spec_from_file_location("eval_arithmetic", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def test_build_writes_the_level_asked_for(tmp_path, capsys):
    tool.main(["build", "--level", "easy", "--count", "25", "--out-dir", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "arithmetic.jsonl").read_text().splitlines()]
    assert lines == arithmetic_records(25, seed=0, level="easy")
    assert "25 easy questions" in capsys.readouterr().out


def test_build_refuses_no_questions(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main(["build", "--count", "0", "--out-dir", str(tmp_path)])
    assert "--count 0: need at least one question" in capsys.readouterr().err


def test_held_out_records_are_the_stages_validation_split(tmp_path):
    records = arithmetic_records(50, seed=0, level="easy")
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = tool.held_out_records(path, 0.2, seed=1234)
    _, valid = split_indices(50, 0.2, 1234)
    assert len(held_out) == 10 and held_out == [records[i] for i in valid]


def test_mean_and_standard_error():
    mean, error = tool.mean_and_error(np.array([1.0, 0.0, 1.0, 0.0]))
    assert mean == 0.5 and error == pytest.approx(np.sqrt(1 / 3) / 2)
    with pytest.raises(ValueError, match="needs at least two questions, got 1; raise --valid-fraction"):
        tool.mean_and_error(np.array([1.0]))


def test_greedy_decoding_takes_one_sample(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main(["eval", "--load", str(tmp_path), "--data", str(tmp_path / "a.jsonl"), "--valid-fraction", "0.2",
                   "--seed", "1", "--samples", "4"])
    assert "--samples 4: need at least 1, and 1 with greedy decoding" in capsys.readouterr().err
