"""Checkpoints written before the checkpoint package existed still load, live and offline."""

from pathlib import Path

import pytest
import torch

from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import load_checkpoint, load_full_optimizer_state, load_full_state_dict, read_manifest
from megatron_lite.training.optim import build_optimizer
from megatron_lite.training.checkpoint import named_parameters
from megatron_lite.training.trainer import model_config_from_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_checkpoint"
FC = "layers.0.mlp.fc.weight"


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


def logits_of(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens[:, :-1])


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_live_load_restores_logits_optimizer_and_position(flavor, expected):
    cfg = model_config_from_manifest(read_manifest(FIXTURES / flavor))
    dims = ParallelDims.single(cfg)
    model = GPT(cfg, dims, seed=999)
    named = named_parameters([model])
    optimizer, _ = build_optimizer(named, cfg_optim(), dims.device)
    state = load_checkpoint(FIXTURES / flavor, [model], dims, optimizer, padded_vocab_size=model.padded_vocab_size)
    assert state["iteration"] == 2 and state["rng_restored"] and not state["resharded"]
    assert state["train_state"]["consumed_samples"] == 4 and state["train_state"]["scheduler"]
    assert torch.equal(logits_of(model, expected["tokens"]), expected[flavor]["logits"])
    fc_state = optimizer.state[dict(named)[FC]]
    assert torch.equal(fc_state["exp_avg"], expected[flavor]["fc_exp_avg"])
    assert torch.equal(fc_state["exp_avg_sq"], expected[flavor]["fc_exp_avg_sq"])
    assert float(fc_state["step"]) == expected[flavor]["optimizer_step"]


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_offline_read_gives_the_same_model_and_optimizer_state(flavor, expected):
    state, manifest = load_full_state_dict(FIXTURES / flavor)
    model = GPT(model_config_from_manifest(manifest), ParallelDims.single(model_config_from_manifest(manifest)), seed=7)
    model.load_state_dict(state)
    assert torch.equal(logits_of(model, expected["tokens"]), expected[flavor]["logits"])
    optimizer_state = load_full_optimizer_state(FIXTURES / flavor)
    assert torch.equal(optimizer_state["per_param"][FC]["exp_avg_sq"], expected[flavor]["fc_exp_avg_sq"])
    assert optimizer_state["groups"] and len(optimizer_state["per_param"]) == len(state)


def cfg_optim():
    from megatron_lite.config import OptimConfig

    return OptimConfig()
