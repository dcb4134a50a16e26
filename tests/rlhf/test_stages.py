"""The fine-tuning stages (sft, rm, dpo) end to end on a tiny model: their losses against direct
computations, the checkpoint hand-over between stages, resuming, every parallel layout against
one process, and the errors a user can cause."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.__main__ import main
from megatron_lite.config import ConfigError, load_config
from megatron_lite.convert.hf import ConversionError, convert_to_hf
from megatron_lite.inference import generate_text
from megatron_lite.rlhf import DPOTask, PPOTask, RewardModelTask, SFTTask
from megatron_lite.rlhf.data import IGNORE_INDEX, RLHFDataError
from megatron_lite.rlhf.dpo import REFERENCE_FILE
from megatron_lite.rlhf.losses import dpo_loss, pairwise_reward_loss, sequence_log_probs
from megatron_lite.training.checkpoint import CheckpointError, load_full_state_dict
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed

STEPS = 6


def stage_config(data, records, run_dir, extra=()):
    return load_config(None, [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=32",
        "model.make_vocab_size_divisible_by=16",
        f"data.tokenizer={data.tokenizer_dir}", f"rlhf.data={records}", "rlhf.valid_fraction=0.25",
        "train.micro_batch_size=2", "train.global_batch_size=4", f"train.max_steps={STEPS}",
        f"train.eval_interval={STEPS}", "train.eval_steps=2", "train.seed=3", "train.device=cpu",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=1",
        f"log.dir={run_dir}/log", "log.interval=1", "log.tensorboard=false",
    ] + list(extra))


def validation_record(run_dir) -> dict:
    records = [json.loads(line) for line in open(run_dir / "log" / "metrics.jsonl")]
    return [r for r in records if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_stage_data, tmp_path_factory):
    data, sft, _ = tiny_stage_data
    run = tmp_path_factory.mktemp("sft")
    Trainer(stage_config(data, sft, run, [f"checkpoint.save={run}/ck"]), task=SFTTask).train()
    return run / "ck"


def test_losses_by_hand():
    policy_chosen, policy_rejected = torch.tensor([-1.0]), torch.tensor([-2.0])
    reference = torch.tensor([-1.5])
    # h = (-1 + 1.5) - (-2 + 1.5) = 1
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference, reference, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert (chosen.item(), rejected.item()) == pytest.approx((0.25, -0.25))
    smoothed, _, _ = dpo_loss(policy_chosen, policy_rejected, reference, reference, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)))
    ipo, _, _ = dpo_loss(policy_chosen, policy_rejected, reference, reference, beta=0.25, kind="ipo")
    assert ipo.item() == pytest.approx((1 - 2) ** 2)
    assert pairwise_reward_loss(torch.tensor(1.0), torch.tensor(3.0)).item() == pytest.approx(math.log1p(math.exp(2)))
    token_loss = torch.tensor([[0.0, 2.0, 4.0], [0.0, 0.0, 6.0]])
    assert sequence_log_probs(token_loss).tolist() == [-6.0, -6.0]
    with pytest.raises(ValueError, match="dpo loss kind='hinge' is not one of sigmoid, ipo"):
        dpo_loss(policy_chosen, policy_rejected, reference, reference, beta=0.5, kind="hinge")


def test_sft_loss_is_the_answer_token_mean_of_the_global_batch(tiny_stage_data, tmp_path, sft_checkpoint):
    data, sft, _ = tiny_stage_data
    trainer = Trainer(stage_config(data, sft, tmp_path), task=SFTTask)
    model, vocab = trainer.model.chunks[0], trainer.cfg.model.vocab_size
    micro = trainer.task.micro_batches(trainer.train_ds, 0)
    tokens = torch.cat([t for t, _ in micro])
    labels = torch.cat([target["labels"] for _, target in micro])
    assert (labels != IGNORE_INDEX).any() and (labels == IGNORE_INDEX).any()  # answers and prompts
    counts = [(target["labels"] != IGNORE_INDEX).sum().item() for _, target in micro]
    assert counts[0] != counts[1]  # so a mean of micro-batch means would differ from the token mean
    with torch.no_grad():
        logits = model(tokens)[..., :vocab]
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    evaluated = trainer.model.parallel_step.evaluate(micro, trainer.model.autocast())
    assert evaluated == pytest.approx(expected.item(), rel=1e-5)
    result = trainer.train()
    assert result.losses[-1] < result.losses[0] - 0.25
    record = validation_record(tmp_path)
    assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))  # a token mean: perplexity
    assert (sft_checkpoint / "latest").exists() or any(sft_checkpoint.iterdir())


def test_reward_model_starts_from_the_sft_checkpoint(tiny_stage_data, tmp_path, sft_checkpoint):
    data, _, pairs = tiny_stage_data
    cfg = stage_config(data, pairs, tmp_path, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true",
                                               f"checkpoint.save={tmp_path}/ck", "train.max_steps=12"])
    trainer = Trainer(cfg, task=RewardModelTask)
    model = trainer.model.chunks[0]
    assert model.value_head is not None and model.output is None
    saved, _ = load_full_state_dict(sft_checkpoint)
    for name, param in trainer.model.named_params:
        if not name.startswith("value_head."):
            assert torch.equal(param.detach(), saved[name]), name  # the transformer is the SFT model's
    tokens, target = trainer.task.micro_batches(trainer.train_ds, 0)[0]
    last = target["last"]
    with torch.no_grad():
        values = model(tokens)
        # the reward reads the answer's last real token: what follows it (padding) cannot change it
        padded = tokens.clone()
        for row, position in enumerate(last.tolist()):
            padded[row, position + 1:] = 1
        assert torch.allclose(model(padded).gather(1, last[:, None]), values.gather(1, last[:, None]), atol=1e-6)
    result = trainer.train()
    assert result.losses[-1] < result.losses[0]
    record = validation_record(tmp_path)
    assert set(record) >= {"val_loss", "val_accuracy", "val_margin"} and 0 <= record["val_accuracy"] <= 1
    with pytest.raises(CheckpointError, match="is a reward model .* cannot generate"):
        generate_text(tmp_path / "ck", ["repeat alpha"], 4, device="cpu")
    with pytest.raises(ConversionError, match="holds a value head .* writes causal language models"):
        convert_to_hf(tmp_path / "ck", tmp_path / "hf")


def test_dpo_reference_first_step_and_resume(tiny_stage_data, tmp_path, sft_checkpoint):
    data, _, pairs = tiny_stage_data
    common = [f"checkpoint.save={tmp_path}/ck", "optim.lr=1e-3"]
    cfg = stage_config(data, pairs, tmp_path, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true"] + common)
    trainer = Trainer(cfg, task=DPOTask)
    # the reference table holds the loaded model's log-probabilities of both answers of every record
    model = trainer.model.chunks[0]
    record = trainer.task.records[1]
    with torch.no_grad():
        for column in range(2):  # chosen, rejected
            tokens = torch.from_numpy(record["tokens"][column])[None]
            labels = torch.from_numpy(record["labels"][column])[None]
            direct = -model(tokens, labels=labels).sum().item()
            assert trainer.task.reference[1, column].item() == pytest.approx(direct, rel=1e-5)
    assert torch.equal(torch.load(tmp_path / "ck" / REFERENCE_FILE), trainer.task.reference)
    result = trainer.train()
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: h = 0
    assert result.losses[-1] < math.log(2)
    record = validation_record(tmp_path)
    assert {"val_accuracy", "val_margin", "val_chosen_reward", "val_rejected_reward"} <= set(record)

    # resuming reads the saved reference instead of recomputing it from moved weights
    resumed = Trainer(stage_config(data, pairs, tmp_path / "resumed", [f"checkpoint.load={tmp_path}/ck",
                                                                      f"train.max_steps={STEPS + 2}"] + common),
                      task=DPOTask)
    assert resumed.step == STEPS and torch.equal(resumed.task.reference, trainer.task.reference)
    assert len(resumed.train().losses) == 2

    with pytest.raises(ConfigError, match=f"needs the reference log-probs saved with the run \\({REFERENCE_FILE}\\)"
                                          ".*set checkpoint.finetune=true"):
        Trainer(stage_config(data, pairs, tmp_path / "bad", [f"checkpoint.load={sft_checkpoint}"]), task=DPOTask)


def test_dpo_nll_weight_adds_the_chosen_answers_token_loss(tiny_stage_data, tmp_path, sft_checkpoint):
    data, _, pairs = tiny_stage_data
    cfg = stage_config(data, pairs, tmp_path, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true",
                                               "rlhf.dpo.nll_weight=0.5"])
    trainer = Trainer(cfg, task=DPOTask)
    model = trainer.model.chunks[0]
    tokens, target = trainer.task.micro_batches(trainer.train_ds, 0)[0]
    with torch.no_grad():
        with_nll, _, _ = trainer.task.prompt_losses(model, tokens, target)
        trainer.cfg.rlhf.dpo.nll_weight = 0.0
        plain, _, _ = trainer.task.prompt_losses(model, tokens, target)
        pairs_in_batch = tokens.shape[0] // 2
        chosen_labels = target["labels"][:pairs_in_batch]
        logits = model(tokens[:pairs_in_batch])[..., : trainer.cfg.model.vocab_size]
        nll = F.cross_entropy(logits.transpose(1, 2), chosen_labels, ignore_index=IGNORE_INDEX, reduction="none")
        mean_nll = nll.sum(dim=1) / (chosen_labels != IGNORE_INDEX).sum(dim=1)
    assert torch.allclose(with_nll, plain + 0.5 * mean_nll, rtol=1e-5)


def test_generate_chat_answers_a_user_turn(tiny_stage_data, sft_checkpoint):
    # the SFT model (6 steps) has not learned much, but the chat form must encode and stop at end-of-text
    texts = generate_text(sft_checkpoint, ["repeat alpha"], 8, temperature=0.0, device="cpu", chat=True)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_user_errors(tiny_stage_data, tmp_path, capsys):
    data, sft, pairs = tiny_stage_data
    with pytest.raises(ConfigError, match="rlhf.data is empty; set it to a JSONL file for the sft stage"):
        Trainer(stage_config(data, "", tmp_path), task=SFTTask)
    with pytest.raises(ConfigError, match=f"rlhf.data={tmp_path}/none.jsonl does not exist"):
        Trainer(stage_config(data, tmp_path / "none.jsonl", tmp_path), task=SFTTask)
    with pytest.raises(ConfigError, match="rlhf.valid_fraction=0.0 holds out no record"):
        Trainer(stage_config(data, sft, tmp_path, ["rlhf.valid_fraction=0"]), task=SFTTask)
    with pytest.raises(ConfigError, match="rlhf.dpo.label_smoothing applies to rlhf.dpo.loss=sigmoid only"):
        load_config(None, ["rlhf.dpo.loss=ipo", "rlhf.dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="rlhf.dpo.loss='hinge' is not one of sigmoid, ipo"):
        load_config(None, ["rlhf.dpo.loss=hinge"])
    with pytest.raises(ConfigError, match="rlhf.dpo.nll_weight must be >= 0, got -1"):
        load_config(None, ["rlhf.dpo.nll_weight=-1"])
    config = tmp_path / "rm.yaml"
    config.write_text("rlhf:\n  data: ''\n")
    assert main(["rm", "--config", str(config), f"data.tokenizer={data.tokenizer_dir}", "model.vocab_size=0",
                 "train.device=cpu"]) == 2
    assert "rlhf.data is empty; set it to a JSONL file for the rm stage" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    assert main(["sft", "--config", str(config), f"rlhf.data={broken}", f"data.tokenizer={data.tokenizer_dir}",
                 "train.device=cpu"]) == 2
    assert f"error: {broken}:2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parallel layouts

LAYOUTS = {
    "tp2 sequence-parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "dp2": [],
}
STAGES = {"sft": SFTTask, "rm": RewardModelTask, "dpo": DPOTask}


def _stage_args(tiny_stage_data, sft_checkpoint, stage):
    data, sft, pairs = tiny_stage_data
    if stage == "sft":
        return data, sft, []
    return data, pairs, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true"]


def _parallel_stage_runs(rank, world_size, tiny_stage_data, sft_checkpoint, root):
    out = {}
    for stage, task in STAGES.items():
        data, records, extra = _stage_args(tiny_stage_data, sft_checkpoint, stage)
        for name, layout in LAYOUTS.items():
            run_dir = f"{root}/{stage}-{name.replace(' ', '-')}"
            result = Trainer(stage_config(data, records, run_dir, extra + layout), task=task).train()
            out[(stage, name)] = {"losses": result.losses, "val": result.val_losses}
    return out


def test_every_layout_matches_one_process(tiny_stage_data, sft_checkpoint, tmp_path):
    single = {}
    for stage, task in STAGES.items():
        data, records, extra = _stage_args(tiny_stage_data, sft_checkpoint, stage)
        result = Trainer(stage_config(data, records, tmp_path / f"single-{stage}", extra), task=task).train()
        single[stage] = {"losses": result.losses, "val": result.val_losses}
    results = run_distributed(_parallel_stage_runs, 2, tiny_stage_data, sft_checkpoint, str(tmp_path))
    for (stage, name), run in results[0].items():
        assert results[1][(stage, name)] == run, (stage, name)  # every rank reports the same figures
        assert run["losses"] == pytest.approx(single[stage]["losses"], rel=1e-5), (stage, name)
        assert [v for _, v in run["val"]] == pytest.approx([v for _, v in single[stage]["val"]], rel=1e-5), (stage, name)


# ----------------------------------------------------------------------------- PPO


def test_gae_and_ppo_losses_by_hand():
    from megatron_lite.rlhf.losses import clipped_value_loss, gae, ppo_policy_loss

    # one prompt position, three answer positions, one padding position
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 9.0]])  # outside the mask: ignored
    values = torch.tensor([[9.0, 0.5, 0.4, 0.3, 9.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d3 = 1.0 - 0.3  # the episode ends after the last answer token
    d2 = -0.2 + 0.9 * 0.3 - 0.4
    d1 = 0.1 + 0.9 * 0.4 - 0.5
    expected = [0.0, d1 + 0.72 * (d2 + 0.72 * d3), d2 + 0.72 * d3, d3, 0.0]
    assert advantages[0].tolist() == pytest.approx(expected)
    assert returns[0].tolist() == pytest.approx([0.0, expected[1] + 0.5, expected[2] + 0.4, expected[3] + 0.3, 0.0])

    old = torch.zeros(1, 2)
    both = torch.ones(1, 2)
    # ratio e^0.5 > 1.2 with a positive advantage: clipped at 1.2; with a negative one: not clipped
    logp = torch.full((1, 2), 0.5)
    assert ppo_policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), both, clip=0.2).item() == pytest.approx(
        (-1.2 + math.exp(0.5)) / 2)
    values, old_values, returns = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    # the clipped value (0.5) is further from the return than the new one (2.0 vs 1.0: 1.0; 0.5: 0.5): max wins
    assert clipped_value_loss(values, old_values, returns, torch.ones(1, 1), clip=0.5).item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def rm_checkpoint(tiny_stage_data, tmp_path_factory, sft_checkpoint):
    data, _, pairs = tiny_stage_data
    run = tmp_path_factory.mktemp("rm")
    cfg = stage_config(data, pairs, run, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true",
                                          f"checkpoint.save={run}/ck"])
    Trainer(cfg, task=RewardModelTask).train()
    return run / "ck"


def ppo_extra(sft_checkpoint, rm_checkpoint, extra=()):
    return [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true", f"rlhf.ppo.reference={sft_checkpoint}",
            f"rlhf.ppo.reward_model={rm_checkpoint}", "rlhf.ppo.max_new_tokens=8", "train.max_steps=3",
            "train.eval_interval=3", "train.eval_steps=1"] + list(extra)


def test_ppo_holds_an_actor_a_critic_and_two_frozen_models(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, rm_checkpoint, ["rlhf.ppo.critic_lr=1e-4"]))
    trainer = Trainer(cfg, task=PPOTask)
    task = trainer.task
    assert task.actor is trainer.model and not task.actor.frozen and task.actor.scheduler.optim.lr == 3e-3
    assert task.critic.scheduler.optim.lr == 1e-4 and task.critic.scheduler.optim.min_lr == 1e-4  # below optim.min_lr
    assert task.reference.frozen and task.reward_model.frozen and task.reward_model.chunks[0].value_head is not None
    assert task.saved_beside() == {"critic": task.critic}


def test_ppo_rollout_scores_and_update(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    from megatron_lite.rlhf.ppo import CRITIC_DIR

    data, sft, _ = tiny_stage_data
    common = [f"checkpoint.save={tmp_path}/ck", "optim.lr=1e-3"]
    trainer = Trainer(stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, rm_checkpoint, common)), task=PPOTask)
    prompts = trainer.task.prompts(trainer.train_ds, 0)
    batch = trainer.task.rollout(trainer.task.prompt_indices(trainer.train_ds, 0), seed=5)
    actor, reward_model = trainer.model.chunks[0], trainer.task.reward_model.chunks[0]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            tokens, labels = batch["tokens"][row], batch["labels"][row]
            assert tokens[: len(prompt)].tolist() == prompt
            answer = labels[labels != IGNORE_INDEX].tolist()
            assert 1 <= len(answer) <= 8 and tokens[len(prompt) : len(prompt) + len(answer)].tolist() == answer
            # the stored log-probs are the actor's, the score is the reward model's at the last token
            direct = -actor(tokens[None], labels=labels[None])[0]
            assert torch.allclose(batch["logp"][row], direct, atol=1e-5)
            last = len(prompt) + len(answer) - 1
            assert batch["score"][row].item() == pytest.approx(reward_model(tokens[None])[0, last].item(), abs=1e-5)
    mask = batch["mask"].bool()
    assert torch.equal(batch["kl"], torch.zeros_like(batch["kl"]))  # the actor starts as the reference
    assert batch["advantages"][mask].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert batch["advantages"][mask].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert (batch["advantages"][~mask] == 0).all() and (batch["returns"][~mask] == 0).all()

    reference = trainer.task.reference.chunks[0]
    frozen = {name: p.clone() for name, p in reference.named_parameters()}
    critic_before = [p.clone() for p in trainer.task.critic.chunks[0].parameters()]
    result = trainer.train()
    assert len(result.losses) == 3
    assert all(torch.equal(p, frozen[name]) for name, p in reference.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.task.critic.chunks[0].parameters()))
    records = [json.loads(line) for line in open(tmp_path / "log" / "metrics.jsonl")]
    assert {"reward", "kl", "critic_loss", "response_length"} <= set(records[0])
    assert {"val_reward", "val_kl", "val_response_length"} <= set(records[-1])
    assert (tmp_path / "ck" / CRITIC_DIR).is_dir()

    # resuming loads the actor and the critic with their optimizers
    resumed = Trainer(stage_config(data, sft, tmp_path / "resumed", ppo_extra(
        sft_checkpoint, rm_checkpoint, [f"checkpoint.load={tmp_path}/ck", "checkpoint.finetune=false",
                                        "train.max_steps=4"] + common[1:])), task=PPOTask)
    assert resumed.step == 3
    for a, b in zip(resumed.task.critic.chunks[0].parameters(), trainer.task.critic.chunks[0].parameters()):
        assert torch.equal(a, b)


def test_ppo_ptx_adds_the_weighted_pretraining_loss(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):
    from megatron_lite.training.setup import local_batch, split_micro_batches

    data, sft, _ = tiny_stage_data
    mixture = "[" + ", ".join(f"{{prefix: {p}, weight: {w}}}" for p, w in data.mixture) + "]"
    cfg = stage_config(data, sft, tmp_path, ppo_extra(sft_checkpoint, rm_checkpoint, [
        "rlhf.ppo.ptx_coef=0.5", f"data.mixture={mixture}", f"data.cache_dir={tmp_path}/cache", "train.max_steps=2"]))
    trainer = Trainer(cfg, task=PPOTask)
    tokens, labels = split_micro_batches(local_batch(trainer.task.ptx_ds, 0, 4, trainer.dims), 2, trainer.dims.device)[0]
    model = trainer.model.chunks[0]
    with torch.no_grad():
        ptx = trainer.task.loss(model, tokens, {"kind": "ptx", "labels": labels, "count": 2}, 99)
        assert ptx.item() == pytest.approx(0.5 * model(tokens, labels=labels).mean().item() / 2, rel=1e-6)
    assert len(trainer.train().losses) == 2


def test_ppo_user_errors(tiny_stage_data, tmp_path, sft_checkpoint, rm_checkpoint):

    data, sft, _ = tiny_stage_data
    base = ppo_extra(sft_checkpoint, rm_checkpoint)
    with pytest.raises(ConfigError, match="ppo samples rollouts one token at a time.* set parallel.sequence_parallel="
                                          "false and parallel.virtual_pp=1"):
        Trainer(stage_config(data, sft, tmp_path, base + ["parallel.sequence_parallel=true"]), task=PPOTask)
    with pytest.raises(ConfigError, match="ppo needs rlhf.ppo.reward_model"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.ppo.reward_model="]), task=PPOTask)
    with pytest.raises(ConfigError, match="PPO-ptx\\) mixes in pretraining batches: set data.mixture"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.ppo.ptx_coef=0.1"]), task=PPOTask)
    with pytest.raises(ConfigError, match="resuming ppo from .* needs the critic saved with it"):
        Trainer(stage_config(data, sft, tmp_path, base + ["checkpoint.finetune=false"]), task=PPOTask)
    with pytest.raises(RLHFDataError, match="no room for a prompt: model.seq_length minus rlhf.ppo.max_new_tokens is 0"):
        Trainer(stage_config(data, sft, tmp_path, base + ["rlhf.ppo.max_new_tokens=32"]), task=PPOTask)
    with pytest.raises(ConfigError, match="rlhf.ppo.top_p must be in \\(0, 1\\], got 0"):
        load_config(None, ["rlhf.ppo.top_p=0"])


def fixed_answers(monkeypatch_target) -> list:
    """Replace PPO's sampler by one that still runs the real (collective) generation but answers
    every prompt with its own last two tokens and end-of-text, so every layout trains on the same
    rollouts whatever near-ties greedy decoding meets. Returns the real generations made."""
    import megatron_lite.rlhf.rollout as rollout

    real, made = rollout.generate, []

    def answer(model, prompts, max_new_tokens, *args, eod_id=None, **kwargs):
        made.append(real(model, prompts, max_new_tokens, *args, eod_id=eod_id, **kwargs))
        return [prompt[-2:] + [eod_id] for prompt in prompts]

    monkeypatch_target.setattr(rollout, "generate", answer)
    return made


def _parallel_ppo_runs(rank, world_size, tiny_stage_data, sft_checkpoint, rm_checkpoint, root):
    from megatron_lite.model.generation import generate

    data, sft, _ = tiny_stage_data
    out = {}
    for name, layout in {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": []}.items():
        cfg = stage_config(data, sft, f"{root}/ppo-{name}", ppo_extra(sft_checkpoint, rm_checkpoint) + layout)
        trainer = Trainer(cfg, task=PPOTask)
        # greedy answers of the SFT model through this layout's generation (every rank the same)
        prompts = trainer.task.prompts(trainer.train_ds, 0)
        greedy = generate(trainer.model.chunks[0], prompts, 6, temperature=0.0, eod_id=trainer.tokenizer.eod_id)
        with pytest.MonkeyPatch.context() as patch:
            fixed_answers(patch)
            result = trainer.train()
        out[name] = {"losses": result.losses, "val": result.val_losses, "prompts": prompts, "greedy": greedy}
        if rank == 0:
            out[name]["steps"] = ppo_step_figures(f"{root}/ppo-{name}")
    return out


def ppo_step_figures(run_dir) -> list[tuple[float, float, float]]:
    records = [json.loads(line) for line in open(f"{run_dir}/log/metrics.jsonl")]
    return [(r["reward"], r["kl"], r["critic_loss"]) for r in records if "critic_loss" in r]


def assert_greedy(model, prompts, answers, slack=1e-4):
    """Each answer token is the single-process model's top choice after its prefix (within
    ``slack`` of the largest logit: another layout's rounding may break a near-tie the other way)."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            for k, token in enumerate(answer):
                logits = model(torch.tensor([prompt + answer[:k]]))[0, -1, :vocab]
                assert logits[token] >= logits.max() - slack, (prompt, answer, k)


def test_ppo_every_layout_matches_one_process(tiny_stage_data, sft_checkpoint, rm_checkpoint, tmp_path, monkeypatch):

    data, sft, _ = tiny_stage_data
    cfg = stage_config(data, sft, tmp_path / "single", ppo_extra(sft_checkpoint, rm_checkpoint))
    trainer = Trainer(cfg, task=PPOTask)
    sft_model = trainer.model.chunks[0]
    sft_state = {k: v.clone() for k, v in sft_model.state_dict().items()}
    made = fixed_answers(monkeypatch)
    single = trainer.train()
    assert len(made) == 3 + 1  # three training rollouts and one validation batch, all really generated
    results = run_distributed(_parallel_ppo_runs, 2, tiny_stage_data, sft_checkpoint, rm_checkpoint, str(tmp_path))
    expected_steps = ppo_step_figures(tmp_path / "single")
    assert len(expected_steps) == 3 and all(critic_loss > 0 for _, _, critic_loss in expected_steps)
    sft_model.load_state_dict(sft_state)
    for name, run in results[0].items():
        assert results[1][name]["losses"] == run["losses"], name  # every rank reports the same loss
        if name != "dp2":  # both ranks hold one replica: the same prompts, the same tokens
            assert results[1][name]["greedy"] == run["greedy"], name
        for rank_result in results:
            assert_greedy(sft_model, rank_result[name]["prompts"], rank_result[name]["greedy"])
        # the actor's loss sits near 0 (whitened advantages at a ratio near 1): compared absolutely
        assert run["losses"] == pytest.approx(single.losses, rel=1e-4, abs=1e-5), name
        for got, want in zip(run["steps"], expected_steps):  # reward, KL, critic loss of every step
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
        assert [v for _, v in run["val"]] == pytest.approx([v for _, v in single.val_losses], rel=1e-4), name
