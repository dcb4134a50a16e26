"""The fine-tuning stages (sft, rm, dpo) end to end on a tiny model: their losses against direct
computations, the checkpoint hand-over between stages, resuming, every parallel layout against
one process, and the errors a user can cause."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.__main__ import generate_text, main
from megatron_lite.config import ConfigError, load_config
from megatron_lite.rlhf import DPOTrainer, RewardModelTrainer, SFTTrainer
from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.dpo import REFERENCE_FILE
from megatron_lite.rlhf.losses import dpo_loss, masked_token_mean, pairwise_reward_loss, sequence_log_probs
from megatron_lite.training.checkpoint import CheckpointError, load_full_state_dict
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
    SFTTrainer(stage_config(data, sft, run, [f"checkpoint.save={run}/ck"])).train()
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
    labels = torch.tensor([[IGNORE_INDEX, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 7]])
    assert masked_token_mean(token_loss, labels).item() == pytest.approx(4.0)
    assert sequence_log_probs(token_loss).tolist() == [-6.0, -6.0]
    with pytest.raises(ValueError, match="dpo loss kind='hinge' is not one of sigmoid, ipo"):
        dpo_loss(policy_chosen, policy_rejected, reference, reference, beta=0.5, kind="hinge")


def test_sft_loss_is_the_answer_token_mean(tiny_stage_data, tmp_path, sft_checkpoint):
    data, sft, _ = tiny_stage_data
    trainer = SFTTrainer(stage_config(data, sft, tmp_path))
    model, vocab = trainer.model_chunks[0], trainer.cfg.model.vocab_size
    micro = trainer.micro_batches(trainer.train_ds, 0)
    expected = []
    with torch.no_grad():
        for tokens, labels in micro:
            assert (labels != IGNORE_INDEX).any() and (labels == IGNORE_INDEX).any()  # answers and prompts
            logits = model(tokens)[..., :vocab]
            expected.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX))
    assert trainer.parallel_step.evaluate(micro, trainer._autocast()) == pytest.approx(
        torch.stack(expected).mean().item(), rel=1e-5)
    result = trainer.train()
    assert result.losses[-1] < result.losses[0] - 0.25
    record = validation_record(tmp_path)
    assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))  # a token mean: perplexity
    assert (sft_checkpoint / "latest").exists() or any(sft_checkpoint.iterdir())


def test_reward_model_starts_from_the_sft_checkpoint(tiny_stage_data, tmp_path, sft_checkpoint):
    data, _, pairs = tiny_stage_data
    cfg = stage_config(data, pairs, tmp_path, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true",
                                               f"checkpoint.save={tmp_path}/ck", "train.max_steps=12"])
    trainer = RewardModelTrainer(cfg)
    model = trainer.model_chunks[0]
    assert model.value_head is not None and model.output is None
    saved, _ = load_full_state_dict(sft_checkpoint)
    for name, param in trainer.named_params:
        if not name.startswith("value_head."):
            assert torch.equal(param.detach(), saved[name]), name  # the transformer is the SFT model's
    tokens, last = trainer.micro_batches(trainer.train_ds, 0)[0]
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


def test_dpo_reference_first_step_and_resume(tiny_stage_data, tmp_path, sft_checkpoint):
    data, _, pairs = tiny_stage_data
    common = [f"checkpoint.save={tmp_path}/ck", "optim.lr=1e-3"]
    cfg = stage_config(data, pairs, tmp_path, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true"] + common)
    trainer = DPOTrainer(cfg)
    # the reference table holds the loaded model's log-probabilities of both answers of every record
    model = trainer.model_chunks[0]
    record = trainer.records[1]
    with torch.no_grad():
        for column, side in enumerate(("chosen", "rejected")):
            tokens = torch.from_numpy(record[f"{side}_tokens"])[None]
            labels = torch.from_numpy(record[f"{side}_labels"])[None]
            direct = -model(tokens, labels=labels).sum().item()
            assert trainer.reference[1, column].item() == pytest.approx(direct, rel=1e-5)
    assert torch.equal(torch.load(tmp_path / "ck" / REFERENCE_FILE), trainer.reference)
    result = trainer.train()
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: h = 0
    assert result.losses[-1] < math.log(2)
    record = validation_record(tmp_path)
    assert {"val_accuracy", "val_margin", "val_chosen_reward", "val_rejected_reward"} <= set(record)

    # resuming reads the saved reference instead of recomputing it from moved weights
    resumed = DPOTrainer(stage_config(data, pairs, tmp_path / "resumed", [f"checkpoint.load={tmp_path}/ck",
                                                                          f"train.max_steps={STEPS + 2}"] + common))
    assert resumed.step == STEPS and torch.equal(resumed.reference, trainer.reference)
    assert len(resumed.train().losses) == 2

    with pytest.raises(ConfigError, match=f"needs the reference log-probs saved with the run \\({REFERENCE_FILE}\\)"
                                          ".*set checkpoint.finetune=true"):
        DPOTrainer(stage_config(data, pairs, tmp_path / "bad", [f"checkpoint.load={sft_checkpoint}"]))


def test_generate_chat_answers_a_user_turn(tiny_stage_data, sft_checkpoint):
    # the SFT model (6 steps) has not learned much, but the chat form must encode and stop at end-of-text
    texts = generate_text(sft_checkpoint, ["repeat alpha"], 8, temperature=0.0, device="cpu", chat=True)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_user_errors(tiny_stage_data, tmp_path, capsys):
    data, sft, pairs = tiny_stage_data
    with pytest.raises(ConfigError, match="rlhf.data is empty; set it to a JSONL file for the sft stage"):
        SFTTrainer(stage_config(data, "", tmp_path))
    with pytest.raises(ConfigError, match=f"rlhf.data={tmp_path}/none.jsonl does not exist"):
        SFTTrainer(stage_config(data, tmp_path / "none.jsonl", tmp_path))
    with pytest.raises(ConfigError, match="rlhf.valid_fraction=0.0 holds out no record"):
        SFTTrainer(stage_config(data, sft, tmp_path, ["rlhf.valid_fraction=0"]))
    with pytest.raises(ConfigError, match="rlhf.label_smoothing applies to rlhf.dpo_loss=sigmoid only"):
        load_config(None, ["rlhf.dpo_loss=ipo", "rlhf.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="rlhf.dpo_loss='hinge' is not one of sigmoid, ipo"):
        load_config(None, ["rlhf.dpo_loss=hinge"])
    config = tmp_path / "rm.yaml"
    config.write_text("rlhf:\n  data: ''\n")
    assert main(["rm", "--config", str(config), f"data.tokenizer={data.tokenizer_dir}", "model.vocab_size=0",
                 "train.device=cpu"]) == 2
    assert "rlhf.data is empty; set it to a JSONL file for the rm stage" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parallel layouts

LAYOUTS = {
    "tp2 sequence-parallel": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "dp2": [],
}
STAGES = {"sft": SFTTrainer, "rm": RewardModelTrainer, "dpo": DPOTrainer}


def _stage_args(tiny_stage_data, sft_checkpoint, stage):
    data, sft, pairs = tiny_stage_data
    if stage == "sft":
        return data, sft, []
    return data, pairs, [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true"]


def _parallel_stage_runs(rank, world_size, tiny_stage_data, sft_checkpoint, root):
    out = {}
    for stage, trainer_class in STAGES.items():
        data, records, extra = _stage_args(tiny_stage_data, sft_checkpoint, stage)
        for name, layout in LAYOUTS.items():
            run_dir = f"{root}/{stage}-{name.replace(' ', '-')}"
            result = trainer_class(stage_config(data, records, run_dir, extra + layout)).train()
            out[(stage, name)] = {"losses": result.losses, "val": result.val_losses}
    return out


def test_every_layout_matches_one_process(tiny_stage_data, sft_checkpoint, tmp_path):
    single = {}
    for stage, trainer_class in STAGES.items():
        data, records, extra = _stage_args(tiny_stage_data, sft_checkpoint, stage)
        result = trainer_class(stage_config(data, records, tmp_path / f"single-{stage}", extra)).train()
        single[stage] = {"losses": result.losses, "val": result.val_losses}
    results = run_distributed(_parallel_stage_runs, 2, tiny_stage_data, sft_checkpoint, str(tmp_path))
    for (stage, name), run in results[0].items():
        assert results[1][(stage, name)] == run, (stage, name)  # every rank reports the same figures
        assert run["losses"] == pytest.approx(single[stage]["losses"], rel=1e-5), (stage, name)
        assert [v for _, v in run["val"]] == pytest.approx([v for _, v in single[stage]["val"]], rel=1e-5), (stage, name)
