"""GRPO and the other critic-free methods: advantages, KL estimators and the clipped objective by
hand, the task end to end on a tiny model, every parallel layout against one process, and the
errors a user can cause."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_lite.__main__ import main
from megatron_lite.config import ConfigError, GRPOConfig, load_config
from megatron_lite.rlhf import GRPOTask
from megatron_lite.rlhf.data import IGNORE_INDEX, RLHFDataError
from megatron_lite.rlhf.losses import (
    AdaptiveKLController,
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_estimate,
    leave_one_out_baseline,
    returns_to_go,
)
from megatron_lite.rlhf.rewards import RewardFunctionError
from megatron_lite.training.checkpoint import CheckpointError
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.rlhf.test_stages import rm_checkpoint, sft_checkpoint, stage_config  # noqa: F401 (fixtures)

FNS = "tests.rlhf.reward_fns"


# ----------------------------------------------------------------------------- the math by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two groups of four
    mean, std = 3.0, math.sqrt((4 + 1 + 0 + 9) / 3)  # Bessel's correction, as GRPO
    grpo = group_advantages(rewards, 4, "grpo")
    assert grpo[:4].tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in (1, 2, 3, 6)])
    assert grpo[4:].tolist() == [0.0] * 4  # all-equal rewards: no signal, not a division by zero
    assert group_advantages(rewards, 4, "dr_grpo").tolist() == pytest.approx([-2, -1, 0, 3, 0, 0, 0, 0])
    # leave-one-out: the mean of the other three
    assert leave_one_out_baseline(rewards, 4)[:4].tolist() == pytest.approx([11 / 3, 10 / 3, 3, 2])
    assert group_advantages(rewards, 4, "rloo").tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 0, 4, 0, 0, 0, 0])
    # RLOO is dr_grpo scaled by n / (n - 1)
    assert torch.allclose(group_advantages(rewards, 4, "rloo"), group_advantages(rewards, 4, "dr_grpo") * 4 / 3)
    with pytest.raises(ValueError, match="group advantage kind='ppo' is not one of grpo, dr_grpo, rloo"):
        group_advantages(rewards, 4, "ppo")


def test_kl_estimators_against_a_known_kl():
    # pi and pi_ref over three tokens: the exact KL(pi || pi_ref), and the estimators' means over
    # samples from pi (weighted exactly by pi instead of sampled)
    pi, ref = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = (pi * (pi / ref).log()).sum()
    mean = {k: (pi * kl_estimate(pi.log(), ref.log(), k)).sum() for k in ("k1", "k2", "k3")}
    assert mean["k1"].item() == pytest.approx(exact.item(), rel=1e-6)  # unbiased
    assert mean["k3"].item() == pytest.approx(exact.item(), rel=1e-6)  # unbiased
    d = (pi / ref).log()
    assert mean["k2"].item() == pytest.approx((pi * d**2 / 2).sum().item())  # biased, second order
    assert (kl_estimate(pi.log(), ref.log(), "k3") >= 0).all() and (kl_estimate(pi.log(), ref.log(), "k1") < 0).any()
    assert kl_estimate(torch.tensor([-1.0]), torch.tensor([-1.0]), "k3").item() == 0.0
    with pytest.raises(ValueError, match="kl_estimator='k4' is not one of k1, k2, k3"):
        kl_estimate(pi, ref, "k4")


def test_clipped_surrogate_with_separate_bounds():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), 0.0]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    loss, clipped = clipped_surrogate(logp, old, advantages, clip_low=0.2, clip_high=0.28)
    # A > 0, ratio 1.5 -> clipped at 1.28; A < 0, ratio 1.5 -> not clipped (pessimistic);
    # A < 0, ratio 0.5 -> clipped at 0.8; ratio 1 -> the plain objective
    assert loss[0].tolist() == pytest.approx([-1.28, 1.5, 0.8, -2.0])
    assert clipped.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_aggregation_and_returns():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(per_token, mask, "token_mean", 4).item() == pytest.approx(10 / 4)
    assert aggregate(per_token, mask, "sequence_mean", 2).item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="loss_aggregation='sum' is not one of token_mean, sequence_mean"):
        aggregate(per_token, mask, "sum", 1)
    assert returns_to_go(per_token, mask).tolist() == [[6.0, 5.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]]


def test_adaptive_kl_controller_moves_towards_the_target():
    controller = AdaptiveKLController(initial=0.1, target=2.0, horizon=100)
    assert controller.update(kl=3.0, samples=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to +20%
    assert controller.update(kl=1.8, samples=10) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


# ----------------------------------------------------------------------------- the task on a tiny model


def grpo_extra(sft_checkpoint, extra=()):
    return [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true", f"rlhf.grpo.reference={sft_checkpoint}",
            f"rlhf.reward_functions=[{FNS}:distinct_tokens, {FNS}:repeats_the_word]", "rlhf.reward_weights=[0.1, 1.0]",
            "rlhf.grpo.samples_per_prompt=2", "rlhf.grpo.max_new_tokens=6", "train.global_batch_size=4",
            "train.max_steps=3", "train.eval_interval=3", "train.eval_steps=1"] + list(extra)


def test_grpo_rollout_groups_rewards_and_first_update(tiny_stage_data, tmp_path, sft_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, grpo_extra(sft_checkpoint, [
        "rlhf.grpo.samples_per_prompt=4", "train.global_batch_size=8", "rlhf.grpo.mini_batch_size=4",
        "rlhf.grpo.epochs=2", "rlhf.grpo.temperature=1.5"]))
    trainer = Trainer(cfg, task=GRPOTask)
    task = trainer.task
    assert task.prompts_per_step == 2 and task.mini_batches == 2
    indices = task.prompt_indices(trainer.train_ds, 0)
    assert len(indices) == 2 and task.prompt_indices(trainer.train_ds, 8) != indices
    batch = task.rollout(indices, seed=11)
    records, actor = task.records.records, trainer.model.chunks[0]
    lengths = batch["length"].tolist()
    with torch.no_grad():
        for row in range(8):
            prompt = records[indices[row // 4]]  # four answers to each prompt, side by side
            tokens, labels = batch["tokens"][row], batch["labels"][row]
            assert tokens[: len(prompt)].tolist() == prompt
            answer = labels[labels != IGNORE_INDEX].tolist()
            assert len(answer) == lengths[row] and 1 <= len(answer) <= 6
            assert torch.allclose(batch["logp"][row], -actor(tokens[None], labels=labels[None])[0], atol=1e-5)
            text = records.texts[indices[row // 4]]
            words = task.tokenizer.decode([t for t in answer if t != task.tokenizer.eod_id])
            expected = 0.1 * len({t for t in answer if t != task.tokenizer.eod_id})
            if text.startswith("repeat"):
                expected += float(text.split()[-1] in words)
            assert batch["rewards"][row].item() == pytest.approx(expected, rel=1e-6)
    # GRPO's advantages: per group, from the rewards, on every answer token
    expected_advantages = group_advantages(batch["rewards"], 4, "grpo")
    assert torch.allclose(batch["advantages"], expected_advantages[:, None] * batch["mask"])
    assert torch.equal(batch["kl"], torch.zeros(8))  # the policy starts as the reference
    result = task.train_step(trainer.train_ds, 0, 0)
    assert len(task.update_figures) == 2 * 2  # two epochs of two mini-batches
    first = task.update_figures[0]
    assert first["clip_fraction"] == 0.0 and first["approx_kl"] == 0.0  # ratio exactly 1 before any step
    assert task.update_figures[-1]["approx_kl"] > 0
    assert math.isfinite(result.loss) and not result.skipped
    assert {"reward", "reward_std", "reward_distinct_tokens", "reward_repeats_the_word", "kl", "entropy",
            "clip_fraction", "approx_kl", "response_length", "filtered_groups", "kl_coef", "time_generation",
            "time_scoring", "time_training"} <= set(result.extra)


def test_grpo_trains_and_logs(tiny_stage_data, tmp_path, sft_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, grpo_extra(sft_checkpoint, [
        f"checkpoint.save={tmp_path}/ck", "rlhf.grpo.kl_target=0.5", "rlhf.grpo.filter_zero_advantage=true",
        "rlhf.grpo.clip_high=0.28", "rlhf.grpo.loss_aggregation=sequence_mean"]))
    trainer = Trainer(cfg, task=GRPOTask)
    reference = trainer.task.reference.chunks[0]
    frozen = {name: p.clone() for name, p in reference.named_parameters()}
    before = [p.clone() for p in trainer.model.chunks[0].parameters()]
    result = trainer.train()
    assert len(result.losses) == 3
    assert all(torch.equal(p, frozen[name]) for name, p in reference.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.chunks[0].parameters()))
    records = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 3 and all(0 <= r["filtered_groups"] <= 2 for r in steps)
    assert steps[0]["kl_coef"] == 0.04 and steps[1]["kl_coef"] != 0.04  # adapted after the first step
    assert {"val_reward", "val_kl", "val_response_length"} <= set(records[-1])
    assert (tmp_path / "ck").is_dir()


@pytest.mark.parametrize("advantage, extra", [
    ("rloo", ["rlhf.grpo.kl_penalty=reward"]),
    ("dr_grpo", ["rlhf.grpo.kl_estimator=k2"]),
    ("reinforce_pp", ["rlhf.grpo.kl_penalty=reward"]),
    ("reinforce_pp", ["rlhf.grpo.samples_per_prompt=1"]),
])
def test_every_advantage_trains(tiny_stage_data, tmp_path, sft_checkpoint, advantage, extra):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, grpo_extra(sft_checkpoint, [
        f"rlhf.grpo.advantage={advantage}", "train.max_steps=2", "train.eval_interval=0",
        "rlhf.grpo.temperature=3", "rlhf.grpo.top_k=0"] + extra))
    trainer = Trainer(cfg, task=GRPOTask)
    indices = trainer.task.prompt_indices(trainer.train_ds, 0)
    # A rollout whose answers differ in reward (something to learn from): with six near-uniform
    # tokens every answer may score alike, so a few sampling seeds are tried.
    batches = (trainer.task.rollout(indices, seed=seed) for seed in range(3, 13))
    batch = next((b for b in batches if b["rewards"].unique().numel() > 1), None)
    assert batch is not None, "ten rollouts gave every answer the same reward"
    mask = batch["mask"].bool()
    if advantage == "reinforce_pp":  # whitened over the batch's answer tokens (float32 returns: 1e-3)
        assert batch["advantages"][mask].mean().item() == pytest.approx(0.0, abs=1e-3)
        assert batch["advantages"][mask].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    else:
        expected = group_advantages(batch["rewards"] - 0.04 * batch["kl"], 2, advantage)
        assert torch.allclose(batch["advantages"], expected[:, None] * batch["mask"], atol=1e-6)
    result = trainer.train()
    assert len(result.losses) == 2 and all(math.isfinite(loss) for loss in result.losses)


def test_a_reward_model_adds_its_score(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, grpo_extra(sft_checkpoint, [f"rlhf.grpo.reward_model={rm_checkpoint}",
                                                                        "rlhf.grpo.reward_clip=100"]))
    trainer = Trainer(cfg, task=GRPOTask)
    task = trainer.task
    indices = task.prompt_indices(trainer.train_ds, 0)
    batch = task.rollout(indices, seed=4)
    reward_model = task.reward_model.chunks[0]
    with torch.no_grad():
        for row in range(4):
            labels = batch["labels"][row]
            answer = [t for t in labels[labels != IGNORE_INDEX].tolist() if t != task.tokenizer.eod_id]
            last = int(batch["mask"][row].nonzero().max()) + 1
            text = task.records.records.texts[indices[row // 2]]
            functions = 0.1 * len(set(answer)) + (float(text.split()[-1] in task.tokenizer.decode(answer))
                                                  if text.startswith("repeat") else 0.0)
            model_score = reward_model(batch["tokens"][row][None])[0, last].item()
            assert batch["rewards"][row].item() == pytest.approx(model_score + functions, abs=1e-5)
    with pytest.raises(CheckpointError, match=r"rlhf.grpo.reward_model=.* holds a language model .* 'value' head "
                                              r"\(a reward model from python -m megatron_lite rm\)"):
        Trainer(stage_config(data, sft, tmp_path, grpo_extra(sft_checkpoint, [
            f"rlhf.grpo.reward_model={sft_checkpoint}"])), task=GRPOTask)


def test_filtered_groups_leave_the_loss(tiny_stage_data, tmp_path, sft_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, grpo_extra(sft_checkpoint, [
        "rlhf.grpo.filter_zero_advantage=true", f"rlhf.reward_functions=[{FNS}:repeats_the_word]",
        "rlhf.reward_weights=[]", "rlhf.grpo.temperature=0"]))  # greedy: both answers alike, every group equal
    trainer = Trainer(cfg, task=GRPOTask)
    batch = trainer.task.rollout(trainer.task.prompt_indices(trainer.train_ds, 0), seed=3)
    assert batch["keep"].tolist() == [0.0] * 4 and batch["loss_mask"].sum() == 0
    before = [p.clone() for p in trainer.model.chunks[0].parameters()]
    result = trainer.task.train_step(trainer.train_ds, 0, 0)
    assert result.extra["filtered_groups"] == 2 and result.loss == 0.0 and trainer.task.update_figures == []
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.chunks[0].parameters()))  # no step taken


def test_grpo_user_errors(tiny_stage_data, tmp_path, sft_checkpoint, capsys):
    data, sft, _ = tiny_stage_data
    base = grpo_extra(sft_checkpoint)
    with pytest.raises(ConfigError, match=r"rlhf.grpo.samples_per_prompt=3: each data-parallel rank samples whole "
                                          r"groups, so train.global_batch_size=4 \(answers per step\) must be a "
                                          r"multiple of samples_per_prompt x dp = 3 x 1 = 3"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.grpo.samples_per_prompt=3"]), task=GRPOTask)
    with pytest.raises(ConfigError, match=r"rlhf.grpo.mini_batch_size=3 must divide train.global_batch_size=4 and "
                                          r"be a multiple of train.micro_batch_size x dp = 2"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.grpo.mini_batch_size=3"]), task=GRPOTask)
    with pytest.raises(ConfigError, match="grpo needs rlhf.grpo.reference"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.grpo.reference="]), task=GRPOTask)
    with pytest.raises(ConfigError, match=r"grpo has no reward: set rlhf.reward_functions"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.reward_functions=[]", "rlhf.reward_weights=[]"]),
                task=GRPOTask)
    with pytest.raises(ConfigError, match=r"rlhf.reward_functions\[0\]='nowhere:fn' does not import"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.reward_functions=[nowhere:fn]",
                                                          "rlhf.reward_weights=[]"]), task=GRPOTask)
    with pytest.raises(ConfigError, match="grpo samples rollouts one token at a time"):
        Trainer(stage_config(data, sft, tmp_path, base + ["parallel.sequence_parallel=true"]), task=GRPOTask)
    with pytest.raises(RLHFDataError, match="no room for a prompt: model.seq_length minus rlhf.grpo.max_new_tokens"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.grpo.max_new_tokens=32"]), task=GRPOTask)
    with pytest.raises(ConfigError, match="rlhf.grpo.advantage=grpo compares the answers of a prompt: set "
                                          "rlhf.grpo.samples_per_prompt >= 2"):
        GRPOConfig(samples_per_prompt=1)
    with pytest.raises(ConfigError, match="rlhf.grpo.filter_zero_advantage compares the answers of a group"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.grpo.samples_per_prompt=1",
                                                          "rlhf.grpo.advantage=reinforce_pp",
                                                          "rlhf.grpo.filter_zero_advantage=true"]), task=GRPOTask)
    for override, message in [("rlhf.grpo.advantage=ppo", "rlhf.grpo.advantage='ppo' is not one of grpo, dr_grpo"),
                              ("rlhf.grpo.kl_estimator=k4", "rlhf.grpo.kl_estimator='k4' is not one of k1, k2, k3"),
                              ("rlhf.grpo.kl_penalty=both", "rlhf.grpo.kl_penalty='both' is not one of loss, reward"),
                              ("rlhf.grpo.loss_aggregation=sum", "rlhf.grpo.loss_aggregation='sum' is not one of"),
                              ("rlhf.grpo.clip_low=1", "rlhf.grpo.clip_low must be below 1"),
                              ("rlhf.grpo.clip_high=-0.1", "rlhf.grpo.clip_high must be >= 0, got -0.1"),
                              ("rlhf.grpo.n=4", "unknown key 'rlhf.grpo.n'")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    # a function failing mid-run stops it naming the function and the records
    cfg = stage_config(data, sft, tmp_path, base + [f"rlhf.reward_functions=[{FNS}:not_a_number]",
                                                    "rlhf.reward_weights=[]"])
    with pytest.raises(RewardFunctionError, match=rf"reward function {FNS}:not_a_number returned nan for the record "
                                                  rf".*sft.jsonl:\d+"):
        Trainer(cfg, task=GRPOTask).train()
    config = tmp_path / "grpo.yaml"
    config.write_text("rlhf:\n  grpo:\n    samples_per_prompt: 3\n")
    assert main(["grpo", "--config", str(config), f"rlhf.data={sft}", f"data.tokenizer={data.tokenizer_dir}",
                 f"rlhf.grpo.reference={sft_checkpoint}", f"rlhf.reward_functions=[{FNS}:answer_tokens]",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.device=cpu"]) == 2
    assert "rlhf.grpo.samples_per_prompt=3: each data-parallel rank samples whole groups" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parallel layouts


def fixed_group_answers(patch) -> list:
    """Replace the sampler by one that still runs the real (collective) generation but answers row
    i with the prompt's last one or two tokens (by the row's parity) and end-of-text, so every
    layout trains on the same rollouts and the two answers of a group score differently."""
    import megatron_lite.rlhf.rollout as rollout

    real, made = rollout.generate, []

    def answer(model, prompts, max_new_tokens, *args, eod_id=None, **kwargs):
        made.append(real(model, prompts, max_new_tokens, *args, eod_id=eod_id, **kwargs))
        return [prompt[-1 - row % 2 :] + [eod_id] for row, prompt in enumerate(prompts)]

    patch.setattr(rollout, "generate", answer)
    return made


GRPO_LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": [],
                "dp2 zero1": ["parallel.zero1=true"]}
PARITY = ["train.micro_batch_size=1", "rlhf.grpo.mini_batch_size=2", "rlhf.grpo.epochs=2", "rlhf.grpo.kl_target=0.1", "rlhf.grpo.clip_high=0.3"]


def grpo_step_figures(run_dir) -> list[tuple]:
    records = [json.loads(line) for line in open(f"{run_dir}/log/metrics.jsonl")]
    return [(r["reward"], r["reward_std"], r["kl"], r["kl_coef"], r["clip_fraction"], r["approx_kl"],
             r["response_length"]) for r in records if "clip_fraction" in r]


def _parallel_grpo_runs(rank, world_size, tiny_stage_data, sft_checkpoint, root):
    data, sft, _ = tiny_stage_data
    out = {}
    for name, layout in GRPO_LAYOUTS.items():
        run_dir = f"{root}/grpo-{name.replace(' ', '-')}"
        trainer = Trainer(stage_config(data, sft, run_dir, grpo_extra(sft_checkpoint, PARITY + layout)), task=GRPOTask)
        with pytest.MonkeyPatch.context() as patch:
            fixed_group_answers(patch)
            result = trainer.train()
        out[name] = {"losses": result.losses, "val": result.val_losses}
        if rank == 0:
            out[name]["steps"] = grpo_step_figures(run_dir)
    return out


def test_grpo_every_layout_matches_one_process(tiny_stage_data, sft_checkpoint, tmp_path, monkeypatch):
    data, sft, _ = tiny_stage_data
    trainer = Trainer(stage_config(data, sft, tmp_path / "single", grpo_extra(sft_checkpoint, PARITY)), task=GRPOTask)
    made = fixed_group_answers(monkeypatch)
    single = trainer.train()
    assert len(made) == 3 + 1  # three training rollouts and one validation batch, all really generated
    expected_steps = grpo_step_figures(tmp_path / "single")
    assert len(expected_steps) == 3 and all(reward_std > 0 for _, reward_std, *_ in expected_steps)
    assert expected_steps[-1][2] != 0 and expected_steps[1][3] != expected_steps[0][3]  # KL and its coefficient move
    results = run_distributed(_parallel_grpo_runs, 2, tiny_stage_data, sft_checkpoint, str(tmp_path))
    for name, run in results[0].items():
        assert results[1][name]["losses"] == run["losses"], name  # every rank reports the same loss
        assert run["losses"] == pytest.approx(single.losses, rel=1e-4, abs=1e-5), name
        for got, want in zip(run["steps"], expected_steps, strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
        assert [v for _, v in run["val"]] == pytest.approx([v for _, v in single.val_losses], rel=1e-4), name
