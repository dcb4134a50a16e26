"""``resolve``: the one step that fills in what a validated config leaves open."""

from __future__ import annotations

import copy

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.data import demo
from megatron_lite.training.setup import process_group_backend, resolve
from tests.training.tiny import tiny_config


def test_resolve_returns_a_new_config_and_leaves_the_input_alone(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, ["train.device=cpu"])
    before = copy.deepcopy(cfg.to_dict())
    resolved = resolve(cfg)
    assert resolved is not cfg and resolved.model is not cfg.model
    assert cfg.to_dict() == before
    assert resolve(resolved).to_dict() == resolved.to_dict()  # resolving twice changes nothing


def test_backend(tiny_data, tmp_path):
    cpu = tiny_config(tiny_data, tmp_path, ["train.device=cpu"])
    assert process_group_backend(cpu) == "gloo" and resolve(cpu).parallel.backend == "gloo"
    chosen = tiny_config(tiny_data, tmp_path, ["train.device=cpu", "parallel.backend=nccl"])
    assert resolve(chosen).parallel.backend == "nccl"
    auto = tiny_config(tiny_data, tmp_path, ["train.device=auto"])
    assert resolve(auto).parallel.backend == "auto"  # picked when the process group starts


def test_vocab_size_from_the_tokenizer(tiny_data, tmp_path):
    assert resolve(tiny_config(tiny_data, tmp_path)).model.vocab_size == 300
    assert resolve(tiny_config(tiny_data, tmp_path, ["model.vocab_size=320"])).model.vocab_size == 320
    with pytest.raises(ConfigError, match="model.vocab_size=200 is smaller than the tokenizer's 300 tokens"):
        resolve(tiny_config(tiny_data, tmp_path, ["model.vocab_size=200"]))
    synthetic = load_config(None, ["model.vocab_size=64", "data.demo=true"])
    assert resolve(synthetic, read_data=False).model.vocab_size == 64  # no tokenizer, no demo build


def test_demo_data_paths_replace_the_data_section(tiny_data, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(demo, "build_demo_data", lambda directory, **kw: built.append((directory, kw)) or tiny_data)
    cfg = load_config(None, ["data.demo=true", f"data.demo_dir={tmp_path}/demo", "data.tokenizer=elsewhere"])
    resolved = resolve(cfg, is_logging_rank=True)
    assert resolved.data.tokenizer == str(tiny_data.tokenizer_dir)
    assert [(m.prefix, m.weight) for m in resolved.data.mixture] == [(str(p), w) for p, w in tiny_data.mixture]
    assert resolved.model.vocab_size == 300 and cfg.data.tokenizer == "elsewhere" and cfg.data.mixture == []
    assert [kw["progress"] for _, kw in built] == [True, False]  # the logging rank builds with progress
    built.clear()
    resolve(cfg, is_logging_rank=False)
    assert [kw["progress"] for _, kw in built] == [False]  # the others only look the finished build up


def test_short_run_warmup(tiny_data, tmp_path):
    long_warmup = tiny_config(tiny_data, tmp_path, ["train.max_steps=20", "optim.warmup_steps=15"])
    assert resolve(long_warmup).optim.warmup_steps == 15
    assert resolve(long_warmup, short_run_warmup=True).optim.warmup_steps == 2
    fits = tiny_config(tiny_data, tmp_path, ["train.max_steps=20", "optim.warmup_steps=10"])
    assert resolve(fits, short_run_warmup=True).optim.warmup_steps == 10


def test_resolve_validates_again(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path)
    cfg.optim.min_lr = 2 * cfg.optim.lr  # written after validation: resolve rebuilds and checks it
    with pytest.raises(ConfigError, match="optim.min_lr must be in"):
        resolve(cfg)
