"""PPO beyond one update per rollout: reward functions beside or instead of the reward model,
mini-batches, the adaptive KL coefficient and the figures every RLHF user reads."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lite.config import ConfigError
from megatron_lite.rlhf import PPOTask
from megatron_lite.training.trainer import Trainer
from tests.rlhf.test_stages import ppo_extra, rm_checkpoint, sft_checkpoint, stage_config  # noqa: F401 (fixtures)

FNS = "tests.rlhf.reward_fns"
FIGURES = {"reward", "reward_std", "kl", "entropy", "response_length", "clip_fraction", "approx_kl",
           "value_clip_fraction", "explained_variance", "critic_loss", "kl_coef", "time_generation", "time_scoring",
           "time_training"}


def test_reward_functions_add_to_the_reward_model(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, rm_checkpoint, [
        f"rlhf.reward_functions=[{FNS}:distinct_tokens]", "rlhf.reward_weights=[0.5]"]))
    trainer = Trainer(cfg, task=PPOTask)
    batch = trainer.task.rollout(trainer.task.prompt_indices(trainer.train_ds, 0), seed=5)
    reward_model = trainer.task.reward_model.chunks[0]
    with torch.no_grad():
        for row in range(batch["tokens"].shape[0]):
            labels = batch["labels"][row]
            answer = [t for t in labels[labels != -100].tolist() if t != trainer.tokenizer.eod_id]
            last = int(batch["mask"][row].nonzero().max()) + 1
            model_score = reward_model(batch["tokens"][row][None])[0, last].item()
            assert batch["score"][row].item() == pytest.approx(model_score + 0.5 * len(set(answer)), abs=1e-5)
    assert batch["per_function"][f"{FNS}:distinct_tokens"] == [
        float(len(set(ids))) for ids in ([t for t in row[row != -100].tolist() if t != trainer.tokenizer.eod_id]
                                         for row in batch["labels"])]


def test_ppo_on_reward_functions_alone_with_mini_batches(tiny_stage_data, tmp_path, sft_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, "", [
        f"rlhf.reward_functions=[{FNS}:distinct_tokens]", "rlhf.ppo.mini_batch_size=2", "rlhf.ppo.epochs=2",
        "rlhf.ppo.kl_target=0.5", "rlhf.ppo.temperature=2"]))
    trainer = Trainer(cfg, task=PPOTask)
    task = trainer.task
    assert task.reward_model is None and task.mini_batches == 2
    assert task.critic.chunks[0].value_head is not None  # a new value head on the SFT model
    steps = []
    real_train_on = task.actor.train_on

    def counting(micro):
        steps.append(len(micro))
        return real_train_on(micro)

    task.actor.train_on = counting
    result = trainer.train()
    assert len(result.losses) == 3 and steps == [1] * (3 * 2 * 2)  # 2 epochs x 2 mini-batches per step
    records = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    train = [r for r in records if "critic_loss" in r]
    assert all(FIGURES | {"reward_distinct_tokens"} <= set(r) for r in train)
    assert all(0 <= r["clip_fraction"] <= 1 and 0 <= r["value_clip_fraction"] <= 1 for r in train)
    assert train[0]["reward"] == pytest.approx(train[0]["reward_distinct_tokens"])  # the function is the reward
    assert train[0]["kl_coef"] == 0.05 and train[1]["kl_coef"] < 0.05  # KL 0 < target: the coefficient falls
    assert {"val_reward", "val_reward_std", "val_entropy"} <= set(records[-1])


def test_one_update_starts_at_ratio_one(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, rm_checkpoint))
    trainer = Trainer(cfg, task=PPOTask)
    result = trainer.task.train_step(trainer.train_ds, 0, 0)
    # a single optimizer step: the actor has not moved when its figures are taken
    assert result.extra["clip_fraction"] == 0.0 and result.extra["approx_kl"] == 0.0
    assert result.extra["explained_variance"] <= 1.0


def test_explained_variance_by_hand(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    data, sft, _ = tiny_stage_data
    trainer = Trainer(stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, rm_checkpoint)), task=PPOTask)
    batch = trainer.task.rollout(trainer.task.prompt_indices(trainer.train_ds, 0), seed=5)
    mask = batch["mask"].bool()
    returns, values = batch["returns"][mask].double(), batch["values"][mask].double()
    expected = 1 - (returns - values).var(unbiased=False) / returns.var(unbiased=False)
    assert trainer.task._figures(batch)["explained_variance"] == pytest.approx(expected.item(), rel=1e-6)


def test_ppo_reward_and_batch_errors(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    data, sft, _ = tiny_stage_data
    base = ppo_extra(sft_checkpoint, rm_checkpoint)
    with pytest.raises(ConfigError, match=r"rlhf.ppo.mini_batch_size=3 must divide train.global_batch_size=4 and be "
                                          r"a multiple of train.micro_batch_size x dp = 2"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.ppo.mini_batch_size=3"]), task=PPOTask)
    with pytest.raises(ConfigError, match=r"ppo needs rlhf.ppo.reward_model: .* or rlhf.reward_functions"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.ppo.reward_model="]), task=PPOTask)
    with pytest.raises(ConfigError, match=r"rlhf.reward_functions\[0\]='tests.rlhf.reward_fns:nothing': "
                                          r"tests.rlhf.reward_fns has no function 'nothing'"):
        Trainer(stage_config(data, sft, tmp_path, base + [f"rlhf.reward_functions=[{FNS}:nothing]"]), task=PPOTask)
    with pytest.raises(ConfigError, match="rlhf.ppo.kl_target must be >= 0, got -1"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.ppo.kl_target=-1"]), task=PPOTask)
