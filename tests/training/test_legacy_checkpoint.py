"""Checkpoints written before the checkpoint package existed still load, live and offline."""

from pathlib import Path

import pytest
import torch

from megatron_lite.config import OptimConfig
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import (
    Checkpointer,
    DataPosition,
    load_full_optimizer_state,
    load_full_state_dict,
    named_parameters,
    read_manifest,
)
from megatron_lite.training.optim import build_optimizer

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
    cfg = read_manifest(FIXTURES / flavor).model_config()
    dims = ParallelDims.single()
    model = GPT(cfg, dims, seed=999)
    named = named_parameters([model])
    optimizer, _ = build_optimizer(named, OptimConfig(), dims.device)
    position = Checkpointer([model], dims, optimizer).load(FIXTURES / flavor)
    assert position == DataPosition(step=2, consumed_samples=4)
    assert torch.equal(logits_of(model, expected["tokens"]), expected[flavor]["logits"])
    fc_state = optimizer.state[dict(named)[FC]]
    assert torch.equal(fc_state["exp_avg"], expected[flavor]["fc_exp_avg"])
    assert torch.equal(fc_state["exp_avg_sq"], expected[flavor]["fc_exp_avg_sq"])
    assert float(fc_state["step"]) == expected[flavor]["optimizer_step"]


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_offline_read_gives_the_same_model_and_optimizer_state(flavor, expected):
    state, manifest = load_full_state_dict(FIXTURES / flavor)
    model = GPT(manifest.model_config(), ParallelDims.single(), seed=7)
    model.load_state_dict(state)
    assert torch.equal(logits_of(model, expected["tokens"]), expected[flavor]["logits"])
    optimizer_state = load_full_optimizer_state(FIXTURES / flavor)
    assert torch.equal(optimizer_state["per_param"][FC]["exp_avg_sq"], expected[flavor]["fc_exp_avg_sq"])
    assert optimizer_state["groups"] and len(optimizer_state["per_param"]) == len(state)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_manifest_rewrites_the_legacy_file_unchanged(flavor):
    text = (read_manifest(FIXTURES / flavor).to_json())
    assert text == (FIXTURES / flavor / "iter_0000002" / "manifest.json").read_text()
