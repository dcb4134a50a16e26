import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import load_tokenizer
from megatron_lite.data.corpus import docstrings_of, stdlib_corpus
from megatron_lite.data.demo import build_demo_data
from megatron_lite.data.indexed import IndexedDataset, write_indexed_dataset
from megatron_lite.data.blend import MixtureError, plan_mixture

ROOT = Path(__file__).resolve().parents[2]


def test_corpus_is_deterministic_and_capped(corpus):
    again = stdlib_corpus(max_bytes=150_000)
    assert again == corpus
    for name in ("code", "docstrings"):
        size = sum(len(t.encode()) for t in corpus[name])
        assert 100_000 < size <= 150_000
    assert any("def " in t for t in corpus["code"])
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        stdlib_corpus(0)


def test_docstrings_come_from_ast():
    source = '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n        x = "not a docstring"\n'
    assert sorted(docstrings_of(source)) == ["Class doc.", "Method doc.", "Module doc."]
    assert docstrings_of("def broken(:\n") == []


def test_demo_data_builds_once(tmp_path):
    demo = build_demo_data(tmp_path / "demo", vocab_size=400, max_bytes=60_000, progress=False)
    tok = load_tokenizer(demo.tokenizer_dir)
    assert tok.vocab_size == 400 and [w for _, w in demo.mixture] == [0.7, 0.3]
    for prefix, _ in demo.mixture:
        ds = IndexedDataset(prefix)
        assert len(ds) > 0 and ds[0][-1] == tok.eod_id
    stamp = Path(f"{demo.mixture[0][0]}.bin").stat().st_mtime_ns
    again = build_demo_data(tmp_path / "demo", vocab_size=400, max_bytes=60_000, progress=False)
    assert again == demo and Path(f"{demo.mixture[0][0]}.bin").stat().st_mtime_ns == stamp


def test_mixture_plan_reports_epochs_and_warns(tmp_path):
    write_indexed_dataset(tmp_path / "big", [np.arange(100)] * 10, np.uint16)  # 1000 tokens
    write_indexed_dataset(tmp_path / "small", [np.arange(50)] * 2, np.uint16)  # 100 tokens
    spec = {"total_tokens": 2000, "seq_length": 10, "max_epochs": 3,
            "mixture": [{"prefix": str(tmp_path / "big"), "weight": 3}, {"prefix": str(tmp_path / "small"), "weight": 1}]}
    plan = plan_mixture(spec)
    big, small = plan.sources
    assert plan.num_samples == 200 and (big.weight, small.weight) == (0.75, 0.25)
    assert (big.documents, big.tokens, small.tokens) == (10, 1000, 100)
    assert big.tokens_drawn == 1500 and small.epochs == 5.0 and big.realised_share == 0.75
    assert len(plan.warnings) == 1 and "small would be repeated 5.00 times" in plan.warnings[0]
    by_tokens = plan_mixture({"mixture": [{"prefix": str(tmp_path / "big"), "tokens": 900},
                                          {"prefix": str(tmp_path / "small"), "tokens": 100}], "seq_length": 10})
    assert by_tokens.total_tokens == 1000 and by_tokens.sources[1].weight == pytest.approx(0.1)
    with pytest.raises(MixtureError, match="either a 'weight' or a 'tokens'"):
        plan_mixture({"mixture": [{"prefix": str(tmp_path / "big"), "tokens": 9}, {"prefix": str(tmp_path / "small")}]})
    with pytest.raises(MixtureError, match="needs 'total_tokens'"):
        plan_mixture({"mixture": [{"prefix": str(tmp_path / "big"), "weight": 1}]})
    spec_file = tmp_path / "mix.yaml"
    spec_file.write_text(json.dumps(spec))
    out = subprocess.run([sys.executable, str(ROOT / "tools/mix_data.py"), str(spec_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stdout and "mixture:" in out.stdout and "| 0.7500 | 0.7500 | 10 | 1000 | 1500 | 1.50 |" in out.stdout


def test_train_tokenizer_command(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"document number {i} about tokenizers"}) for i in range(200)))
    cmd = [sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--input", str(src), "--output", str(tmp_path / "tok"),
           "--vocab-size", "300", "--special-tokens", "eod=<|end|>", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == 300 and tok.decode([tok.eod_id]) == "<|end|>"
    assert tok.decode(tok.encode(" document number 7")) == " document number 7"
    bad = subprocess.run(cmd[:-3] + ["--special-tokens", "oops", "--quiet"], capture_output=True, text=True)
    assert bad.returncode == 2 and "must be ROLE=TEXT" in bad.stderr
