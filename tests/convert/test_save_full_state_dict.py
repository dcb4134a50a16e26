"""Writing full weights at a (tp, pp) layout: what convert_from_hf (and resharding) rely on."""

from __future__ import annotations

import pytest
import torch

from megatron_lite.config import Config, ConfigError, ModelConfig
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_full_state_dict,
    read_manifest,
    save_full_state_dict,
)
from tests.convert.conftest import randomize_
from tests.convert.workers import TINY


def _random_model(**fields) -> GPT:
    cfg = ModelConfig(**TINY, vocab_size=100, **fields)
    model = GPT(cfg)
    randomize_([model], 1, 0, cfg.vocab_size, cfg.tie_embeddings)
    return model


def test_layout_shards_and_loads_back_exactly(tmp_path):
    model = _random_model(flavor="llama", num_kv_heads=2, tie_embeddings=True)
    config = Config(model=model.config).to_dict()
    ckpt = save_full_state_dict(model.state_dict(), config, tmp_path / "ck", tp=2, pp=2, iteration=7)
    manifest = read_manifest(tmp_path / "ck")
    assert ckpt.name == "iter_0000007" and manifest.iteration == 7 and not manifest.has_optimizer
    assert manifest.layout.tp == 2 and manifest.layout.pp == 2 and manifest.padded_vocab_size == 128
    assert manifest.files["model_tp01_pp000.pt"] == ["embedding.word.weight", "layers.0.attention.proj.weight",
                                                        "layers.0.attention.qkv.weight", "layers.0.attention_norm.weight",
                                                        "layers.0.mlp.fc.weight", "layers.0.mlp.proj.weight",
                                                        "layers.0.mlp_norm.weight"]
    assert "output.weight" in manifest.files["model_tp00_pp001.pt"]  # the tied head's copy, as the trainer saves it
    assert manifest.params["layers.1.mlp.fc.weight"].to_dict() == {
        "partition_dim": 0, "partition_chunks": 2, "shape": [256, 32], "dtype": "float32"}
    shard = torch.load(ckpt / "model_tp01_pp001.pt", weights_only=True)["model"]
    full_fc = model.state_dict()["layers.1.mlp.fc.weight"]  # [gate; up], 128 rows each: rank 1 holds the second half of each
    assert torch.equal(shard["layers.1.mlp.fc.weight"], torch.cat([full_fc[64:128], full_fc[192:256]]))

    state, _ = load_full_state_dict(ckpt)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[n][: t.shape[0]], t) for n, t in model.state_dict().items())
    fresh = GPT(model.config, seed=5)
    load_checkpoint(ckpt, [fresh], ParallelDims.single(), weights_only=True,
                    padded_vocab_size=fresh.padded_vocab_size)
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in fresh.state_dict().items())


def test_vocabulary_padding_is_fitted_to_the_layout(tmp_path):
    model = _random_model(flavor="gpt2", tie_embeddings=False)
    state = dict(model.state_dict())
    exact = state["output.weight"][:100]
    state["embedding.word.weight"] = torch.cat([state["embedding.word.weight"], torch.zeros(400, 32)])  # 512 rows
    state["output.weight"] = exact  # no padding at all
    ckpt = save_full_state_dict(state, Config(model=model.config).to_dict(), tmp_path / "ck")
    saved, manifest = load_full_state_dict(ckpt)
    assert manifest.padded_vocab_size == 112
    assert saved["embedding.word.weight"].shape == (112, 32) and saved["output.weight"].shape == (112, 32)
    assert torch.equal(saved["output.weight"][:100], exact) and not saved["output.weight"][100:].any()


def test_incomplete_or_mismatched_weights_are_refused(tmp_path):
    model = _random_model(flavor="gpt2")
    config = Config(model=model.config).to_dict()
    state = dict(model.state_dict())
    del state["layers.1.mlp.fc.bias"]
    with pytest.raises(CheckpointError, match="layers.1.mlp.fc.bias is missing from the weights to save"):
        save_full_state_dict(state, config, tmp_path / "a")
    state = {**model.state_dict(), "layers.0.mlp.fc.weight": torch.zeros(64, 32)}
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.fc.weight: .* shape \[64, 32\], the model expects \[128, 32\]"):
        save_full_state_dict(state, config, tmp_path / "b")
    state = {**model.state_dict(), "embedding.word.weight": torch.zeros(90, 32)}  # fewer rows than the vocabulary
    with pytest.raises(CheckpointError, match=r"embedding.word.weight: .* shape \[90, 32\]"):
        save_full_state_dict(state, config, tmp_path / "c")
    with pytest.raises(ConfigError, match="model.vocab_size must be set"):
        save_full_state_dict(model.state_dict(), {**config, "model": {**config["model"], "vocab_size": 0}}, tmp_path / "d")
    with pytest.raises(ConfigError, match="num_layers=2 does not split evenly over 3 pipeline chunks"):
        save_full_state_dict(model.state_dict(), config, tmp_path / "e", pp=3)
    assert not (tmp_path / "a" / "latest").exists()
