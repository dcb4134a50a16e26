"""``TrainedModel``: what one build gives (trained or frozen, its own learning rate), and its
checkpoint round trip."""

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import DataPosition
from megatron_lite.training.optim import torch_fused_adamw_supports
from megatron_lite.training.trained_model import build_trained_model, load_frozen_model

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "model.vocab_size=100", "model.make_vocab_size_divisible_by=8", "train.device=cpu",
        "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=0", "optim.schedule=constant"]


def tiny(overrides=()):
    cfg = load_config(None, TINY + list(overrides))
    return cfg, ParallelDims.single()


FUSED_OR_NOT = "torch AdamW (fused)" if torch_fused_adamw_supports(torch.device("cpu"), torch.float32) else "torch AdamW"


def micro_batches(cfg, seed=0):
    tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_length + 1),
                           generator=torch.Generator().manual_seed(seed))
    return [(tokens[i : i + 2, :-1], tokens[i : i + 2, 1:]) for i in (0, 2)]


def test_a_trained_model_steps_and_a_frozen_one_only_scores():
    cfg, dims = tiny()
    model = build_trained_model(cfg, dims)
    assert not model.frozen and model.optimizer is not None and model.optimizer_kind == FUSED_OR_NOT
    assert model.scheduler.lr == pytest.approx(1e-3) and model.scaler is not None
    assert [p for _, p in model.named_params] == list(model.chunks[0].parameters())
    before = {name: p.detach().clone() for name, p in model.named_params}
    loss, grad_norm, skipped = model.train_on(micro_batches(cfg))
    assert loss > 0 and grad_norm > 0 and not skipped
    assert any(not torch.equal(before[name], p) for name, p in model.named_params)

    frozen = build_trained_model(cfg, dims, head="value", frozen=True)
    assert frozen.frozen and frozen.optimizer is None and frozen.scheduler is None and frozen.scaler is None
    assert not any(p.requires_grad for _, p in frozen.named_params)
    assert not frozen.chunks[0].training
    with frozen.evaluating():
        (values,) = frozen.forward_outputs(micro_batches(cfg)[:1], lambda chunk, inputs, target, n: chunk(inputs))
    assert values.shape == (2, cfg.model.seq_length) and not frozen.chunks[0].training  # stays in eval mode
    with model.evaluating():
        assert not model.chunks[0].training
    assert model.chunks[0].training  # a trained model returns to training mode


def test_its_own_learning_rate_lowers_the_minimum_to_it():
    cfg, dims = tiny()
    critic = build_trained_model(cfg, dims, head="value", lr=5e-5)
    assert critic.scheduler.optim.lr == pytest.approx(5e-5) and critic.scheduler.optim.min_lr == pytest.approx(5e-5)
    assert [group["lr"] for group in critic.optimizer.param_groups] == pytest.approx([5e-5, 5e-5])
    assert cfg.optim.lr == pytest.approx(1e-3)  # the run's own settings are untouched
    higher = build_trained_model(cfg, dims, lr=2e-3)
    assert higher.scheduler.optim.min_lr == pytest.approx(1e-4)


def test_save_and_load_resume_the_optimizer_schedule_and_position(tmp_path):
    cfg, dims = tiny(["optim.schedule=cosine", "train.max_steps=10"])
    model = build_trained_model(cfg, dims)
    for seed in range(2):
        model.train_on(micro_batches(cfg, seed))
        model.scheduler.step()
    path = model.save(tmp_path / "ck", step=2, consumed_samples=8, config=cfg.to_dict(), tokenizer_dir=None)
    assert path.name == "iter_0000002"
    saved = {name: p.detach().clone() for name, p in model.named_params}

    fresh = build_trained_model(cfg, dims)
    assert fresh.load(tmp_path / "ck", weights_only=False) == DataPosition(step=2, consumed_samples=8)
    assert fresh.scheduler.state_dict() == model.scheduler.state_dict()
    assert all(torch.equal(saved[name], p) for name, p in fresh.named_params)
    assert fresh.train_on(micro_batches(cfg, 5)) == model.train_on(micro_batches(cfg, 5))  # the optimizer resumed too

    assert build_trained_model(cfg, dims).load(tmp_path / "ck", weights_only=True) is None
    frozen = load_frozen_model(cfg, dims, tmp_path / "ck", "lm", "rlhf.ppo.reference")
    assert frozen.frozen and all(torch.equal(saved[name], p) for name, p in frozen.named_params)
