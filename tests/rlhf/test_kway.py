"""InstructGPT's K-way reward model and ranked DPO: ranked records, the K-way loss against its
pairs taken one by one, both stages on a file mixing rankings and pairs, every parallel layout
against one process, and the errors a malformed ranked record causes."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from megatron_lite.config import ConfigError
from megatron_lite.data import load_tokenizer
from megatron_lite.rlhf import DPOTask, RewardModelTask, SFTTask
from megatron_lite.rlhf.data import (
    IGNORE_INDEX,
    PromptDataset,
    RankedDataset,
    RLHFDataError,
    prompt_ids,
    ranked_answers,
)
from megatron_lite.rlhf.losses import dpo_loss, mean_over_pairs, pairwise_reward_loss, ranked_reward_loss, sum_over_pairs
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.rlhf.conftest import WORDS
from tests.rlhf.test_stages import LAYOUTS, stage_config, validation_record

USER = [{"role": "user", "content": "q"}]


def ranking_record(i: int) -> dict:
    """Every third record a pair, every third a best-first list of three, every third four answers
    ranked out of order with a tie between the two worst."""
    word, other = WORDS[i % len(WORDS)], WORDS[(i + 1) % len(WORDS)]
    prompt = f"repeat {word}" if i < len(WORDS) else f"say {word} twice"
    if i % 3 == 0:
        return {"prompt": prompt, "chosen": f"{word} {word}", "rejected": other}
    if i % 3 == 1:
        return {"prompt": prompt, "responses": [f"{word} {word}", word, other]}
    return {"prompt": prompt, "responses": [other, f"{word} {word}", word, f"{other} {other}"], "ranks": [2, 0, 1, 2]}


@pytest.fixture(scope="module")
def tok(tiny_stage_data):
    return load_tokenizer(tiny_stage_data[0].tokenizer_dir)


@pytest.fixture(scope="module")
def ranked_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranked") / "ranked.jsonl"
    path.write_text("".join(json.dumps(ranking_record(i)) + "\n" for i in range(2 * len(WORDS))))
    return path


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_stage_data, tmp_path_factory):
    data, sft, _ = tiny_stage_data
    run = tmp_path_factory.mktemp("kway-sft")
    Trainer(stage_config(data, sft, run, [f"checkpoint.save={run}/ck"]), task=SFTTask).train()
    return run / "ck"


def finetune(sft_checkpoint) -> list[str]:
    return [f"checkpoint.load={sft_checkpoint}", "checkpoint.finetune=true"]


# ----------------------------------------------------------------------------- the losses


def ranked_pairs(better: torch.Tensor) -> list[tuple[int, int, int]]:
    """(prompt, better answer, worse answer) of every ranked pair."""
    return [tuple(index) for index in better.nonzero().tolist()]


def test_kway_loss_is_the_mean_over_its_pairs_one_by_one():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 4, generator=generator)
    ranks = torch.tensor([[0.0, 1, 2, 3], [0, 0, 1, math.inf], [1, 0, 3, 2]])  # a tie; a padding answer
    better = ranks[:, :, None] < ranks[:, None, :]
    better[1, :, 3] = False
    by_prompt = {b: [] for b in range(3)}
    for b, j, k in ranked_pairs(better):
        by_prompt[b].append(pairwise_reward_loss(rewards[b, j], rewards[b, k]))
    assert [len(pairs) for pairs in by_prompt.values()] == [6, 2, 6]  # K(K-1)/2; the tie and the padding make none
    expected = torch.stack([torch.stack(pairs).mean() for pairs in by_prompt.values()])
    assert torch.allclose(ranked_reward_loss(rewards, better), expected, rtol=1e-6)
    assert sum_over_pairs(rewards[:, :, None] - rewards[:, None, :], better)[1].item() == pytest.approx(
        (rewards[1, 0] + rewards[1, 1] - 2 * rewards[1, 2]).item(), rel=1e-6)  # pairs (0, 2), (1, 2)


def test_kway_loss_with_two_answers_is_the_pairwise_loss_exactly():
    chosen, rejected = torch.randn(5, generator=torch.Generator().manual_seed(1)).mul(3), torch.randn(5)
    better = torch.tensor([[False, True], [False, False]]).expand(5, 2, 2)
    kway = ranked_reward_loss(torch.stack([chosen, rejected], dim=1), better)
    assert torch.equal(kway, pairwise_reward_loss(chosen, rejected))
    assert torch.equal(kway.mean(), pairwise_reward_loss(chosen, rejected).mean())
    # DPO on the pair grid, averaged over the one pair, is DPO's pair loss bit for bit
    policy, reference = torch.randn(5, 2), torch.randn(5, 2)
    grid, _, _ = dpo_loss(policy[:, :, None], policy[:, None, :], reference[:, :, None], reference[:, None, :], 0.1)
    pair, _, _ = dpo_loss(policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], 0.1)
    assert torch.equal(mean_over_pairs(grid, better), pair)


# ----------------------------------------------------------------------------- records


def test_ranked_records_order_answers_best_first_and_ties_make_no_pair(tok, tmp_path):
    assert ranked_answers({"prompt": "q", "responses": ["a", "b", "c"]}, "f:1") == (USER, ["a", "b", "c"], [0, 1, 2])
    assert ranked_answers({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [3, 1, 3]}, "f:1") == (
        USER, ["b", "a", "c"], [1, 3, 3])
    assert ranked_answers({"prompt": "q", "chosen": "a", "rejected": "b"}, "f:1") == (USER, ["a", "b"], [0, 1])
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert ranked_answers({"messages": history, "responses": ["x", "y"]}, "f:1")[0] == history

    records = [{"prompt": "q", "chosen": "yes", "rejected": "no"},
               {"prompt": "q", "responses": ["c", "a", "b"], "ranks": [1, 0, 1]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = RankedDataset(path, tok, 24)
    assert (len(ds), ds.num_answers, ds.sources) == (2, 3, [f"{path}:1", f"{path}:2"])
    pair, ranked = ds[0], ds[1]
    assert pair["tokens"].shape == pair["labels"].shape == (3, 24) and pair["tokens"].dtype == np.int64
    assert pair["better"].tolist() == [[False, True, False], [False, False, False], [False, False, False]]
    # the missing third answer of a pair is an empty row: pad tokens, no labels
    assert (pair["tokens"][2] == tok.pad_id).all() and (pair["labels"][2] == IGNORE_INDEX).all() and pair["last"][2] == 0
    assert ranked["better"].tolist() == [[False, True, True], [False, False, False], [False, False, False]]
    prompt = prompt_ids(tok, USER)
    for row, text in enumerate(["a", "c", "b"]):  # best first; the tied "c" and "b" keep their order
        ids = prompt + tok.encode(text, allowed_special="none") + [tok.eod_id]
        assert ranked["tokens"][row, : len(ids)].tolist() == ids and ranked["last"][row] == len(ids) - 1
        assert ranked["labels"][row, len(prompt) - 1 : len(ids) - 1].tolist() == ids[len(prompt):]


def test_ppo_reads_the_prompts_of_ranked_records(tok, ranked_file):
    prompts = PromptDataset(ranked_file, tok, 64)
    assert len(prompts) == 2 * len(WORDS)
    assert prompts[1] == prompt_ids(tok, [{"role": "user", "content": f"repeat {WORDS[1]}"}])


def test_ranked_dataset_drops_a_record_whose_prompt_fills_the_sequence(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "q", "responses": ["a", "b an answer far too long for eight tokens"]}) + "\n"
                    + json.dumps({"prompt": "x" * 40, "responses": ["a", "b", "c"]}) + "\n")
    ds = RankedDataset(path, tok, 8)
    assert (len(ds), ds.num_truncated, ds.num_dropped, ds.num_answers) == (1, 1, 1, 2)
    assert ds[0]["last"][1] == 7 and tok.eod_id not in ds[0]["tokens"][1].tolist()
    only_long = tmp_path / "only_long.jsonl"
    only_long.write_text(json.dumps({"prompt": "x" * 40, "responses": ["a", "b"]}) + "\n")
    with pytest.raises(RLHFDataError, match=r"only_long\.jsonl: all 1 of 1 records were dropped: with seq_length=8 "
                                            r"no token of the answers is left"):
        RankedDataset(only_long, tok, 8)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(RLHFDataError, match=r"empty\.jsonl holds no records; write one JSON object per line"):
        RankedDataset(empty, tok, 8)


BAD_RANKED = [
    ({"prompt": "q", "responses": ["only one"]},
     r"'responses' holds 1 answer\(s\); a ranked record needs a list of at least two answers, best first"),
    ({"prompt": "q", "responses": "a b"}, r"'responses' holds a str; a ranked record needs a list of at least two"),
    ({"prompt": "q", "responses": ["a", 7]}, r"'responses' item 1 holds int, not a string; write every answer as a JSON"),
    ({"prompt": "q", "responses": ["a", "b", "a"]}, r"'responses' items 0 and 2 are the same text.*give each answer once"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1, 2]},
     r"'ranks' holds 3 entries but 'responses' holds 2 answers; give one integer rank per answer \(lower = better\)"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": {"a": 0}}, r"'ranks' holds a dict but 'responses' holds 2"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, "1"]},
     r"'ranks' item 1 is '1', not an integer; write ranks as integers, lower = better"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [0.5, 1]}, r"'ranks' item 0 is 0\.5, not an integer"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [True, False]}, r"'ranks' item 0 is True, not an integer"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]},
     r"every answer has rank 1, so no answer is preferred to another; rank at least two answers differently"),
    ({"prompt": "q", "responses": ["a", "b"], "chosen": "a"},
     r"holds both 'responses' and 'chosen'/'rejected'; use one form"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "ranks": [0, 1]}, r"'ranks' without 'responses'"),
    ({"responses": ["a", "b"]}, r"no 'prompt' or 'messages' \(keys: 'responses'\)"),
    ({"prompt": "q", "messages": USER, "responses": ["a", "b"]}, r"holds both 'messages' and 'prompt'"),
]


@pytest.mark.parametrize("record, message", BAD_RANKED)
def test_malformed_ranked_records_name_file_line_key_and_fix(tok, tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "responses": ["a", "b"]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RLHFDataError, match=rf"bad\.jsonl:2: {message}"):
        RankedDataset(path, tok, 32)


# ----------------------------------------------------------------------------- the stages


def direct_rewards(model, micro) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rewards (b, K), better) of every micro-batch, read answer by answer from the model."""
    out = []
    for tokens, target in micro:
        k = target["better"].shape[1]
        b = tokens.shape[0] // k
        rewards = torch.empty(b, k)
        for prompt, answer in itertools.product(range(b), range(k)):
            row = answer * b + prompt  # answer-major
            rewards[prompt, answer] = model(tokens[row : row + 1])[0, target["last"][row]]
        out.append((rewards, target["better"]))
    return out


def test_reward_model_on_pairs_keeps_the_pairwise_loss_exactly(tiny_stage_data, sft_checkpoint, tmp_path):
    data, _, pairs = tiny_stage_data
    trainer = Trainer(stage_config(data, pairs, tmp_path, finetune(sft_checkpoint)), task=RewardModelTask)
    model = trainer.model.chunks[0]
    tokens, target = trainer.task.micro_batches(trainer.train_ds, 0)[0]
    with torch.no_grad():
        chosen, rejected = model(tokens).gather(1, target["last"][:, None]).squeeze(1).chunk(2)  # chosen rows first
        assert torch.equal(trainer.task.loss(model, tokens, target, 1), pairwise_reward_loss(chosen, rejected).mean())


def test_reward_model_on_ranked_answers(tiny_stage_data, ranked_file, sft_checkpoint, tmp_path):
    data, _, _ = tiny_stage_data
    trainer = Trainer(stage_config(data, ranked_file, tmp_path, finetune(sft_checkpoint)), task=RewardModelTask)
    task, model = trainer.task, trainer.model.chunks[0]
    assert task.sequences_per_record == 4 and task.tokens_per_step() == 4 * 4 * 32
    micro = task.micro_batches(trainer.train_ds, 0)
    with torch.no_grad():
        per_micro = []
        for rewards, better in direct_rewards(model, micro):
            prompts = [torch.stack([pairwise_reward_loss(rewards[b, j], rewards[b, k])
                                    for bb, j, k in ranked_pairs(better) if bb == b]).mean() for b in range(len(rewards))]
            per_micro.append(torch.stack(prompts).mean())
    evaluated = trainer.model.parallel_step.evaluate(micro, trainer.model.autocast())
    assert evaluated == pytest.approx(torch.stack(per_micro).mean().item(), rel=1e-5)

    # validation: loss per prompt, accuracy and margin over all ranked pairs
    with torch.no_grad():
        figures = task.evaluate(trainer.valid_ds)
        losses, margins = [], []
        for i in range(trainer.cfg.train.eval_steps):
            for rewards, better in direct_rewards(model, task.micro_batches(trainer.valid_ds, i * 4)):
                losses += ranked_reward_loss(rewards, better).tolist()
                margins += [(rewards[b, j] - rewards[b, k]).item() for b, j, k in ranked_pairs(better)]
    assert len(margins) > len(losses)  # rankings of more than two answers are in the validation batches
    assert figures["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert figures["accuracy"] == pytest.approx(np.mean(np.asarray(margins) > 0))
    assert figures["margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-6)
    assert set(figures) == {"loss", "accuracy", "margin"}

    result = trainer.train()
    assert result.losses[-1] < result.losses[0]
    record = validation_record(tmp_path)
    assert {"val_loss", "val_accuracy", "val_margin"} <= set(record) and 0 <= record["val_accuracy"] <= 1


def test_dpo_on_ranked_answers_takes_every_ranked_pair(tiny_stage_data, ranked_file, sft_checkpoint, tmp_path):
    data, _, _ = tiny_stage_data
    trainer = Trainer(stage_config(data, ranked_file, tmp_path, finetune(sft_checkpoint)), task=DPOTask)
    task, model, beta = trainer.task, trainer.model.chunks[0], trainer.cfg.rlhf.dpo.beta
    assert task.reference.shape == (2 * len(WORDS), 4)
    record = task.records[2]  # four answers ranked out of order
    with torch.no_grad():
        for column in range(4):
            tokens = torch.from_numpy(record["tokens"][column])[None]
            labels = torch.from_numpy(record["labels"][column])[None]
            assert task.reference[2, column].item() == pytest.approx(-model(tokens, labels=labels).sum().item(), rel=1e-5)
    assert task.reference[0, 2:].tolist() == [0.0, 0.0]  # a pair's padding answers

    tokens, target = task.micro_batches(trainer.train_ds, 0)[0]
    moved = target | {"reference": target["reference"] + torch.linspace(-1, 1, len(target["reference"]))}
    with torch.no_grad():
        losses, _, _ = task.prompt_losses(model, tokens, moved)
        k = moved["better"].shape[1]
        policy = -model(tokens, labels=moved["labels"]).sum(dim=1).view(k, -1).t()
        reference = moved["reference"].view(k, -1).t()
        for b in range(len(losses)):
            pairs = [dpo_loss(policy[b, j], policy[b, kk], reference[b, j], reference[b, kk], beta)[0]
                     for bb, j, kk in ranked_pairs(moved["better"]) if bb == b]
            assert losses[b].item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-5)

    result = trainer.train()
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: every pair at h = 0
    assert result.losses[-1] < math.log(2)
    record = validation_record(tmp_path)
    assert {"val_accuracy", "val_margin", "val_chosen_reward", "val_rejected_reward"} <= set(record)
    assert "val_pairs" not in record
    assert record["val_margin"] == pytest.approx(record["val_chosen_reward"] - record["val_rejected_reward"], abs=1e-5)


# ----------------------------------------------------------------------------- parallel layouts

RANKED_STAGES = {"rm": RewardModelTask, "dpo": DPOTask}


def _parallel_ranked_runs(rank, world_size, tiny_stage_data, ranked_file, sft_checkpoint, root):
    data, _, _ = tiny_stage_data
    out = {}
    for (stage, task), (name, layout) in itertools.product(RANKED_STAGES.items(), LAYOUTS.items()):
        run_dir = f"{root}/{stage}-{name.replace(' ', '-')}"
        result = Trainer(stage_config(data, ranked_file, run_dir, finetune(sft_checkpoint) + layout), task=task).train()
        out[(stage, name)] = {"losses": result.losses, "val": result.val_losses}
    return out


def test_ranked_stages_in_every_layout_match_one_process(tiny_stage_data, ranked_file, sft_checkpoint, tmp_path):
    data, _, _ = tiny_stage_data
    single = {}
    for stage, task in RANKED_STAGES.items():
        result = Trainer(stage_config(data, ranked_file, tmp_path / f"single-{stage}", finetune(sft_checkpoint)),
                         task=task).train()
        single[stage] = {"losses": result.losses, "val": result.val_losses}
    results = run_distributed(_parallel_ranked_runs, 2, tiny_stage_data, ranked_file, sft_checkpoint, str(tmp_path))
    assert set(results[0]) == set(itertools.product(RANKED_STAGES, LAYOUTS))
    for (stage, name), run in results[0].items():
        assert results[1][(stage, name)] == run, (stage, name)  # every rank reports the same figures
        assert run["losses"] == pytest.approx(single[stage]["losses"], rel=1e-5), (stage, name)
        assert [v for _, v in run["val"]] == pytest.approx([v for _, v in single[stage]["val"]], rel=1e-5), (stage, name)


def test_dpo_resumed_on_rankings_of_another_size_is_refused(tiny_stage_data, ranked_file, sft_checkpoint, tmp_path):
    data, _, pairs = tiny_stage_data
    saved = [f"checkpoint.save={tmp_path}/ck", "train.max_steps=1", "train.eval_interval=0"]
    Trainer(stage_config(data, pairs, tmp_path, finetune(sft_checkpoint) + saved), task=DPOTask).train()
    with pytest.raises(ConfigError, match=rf"holds reference log-probs for {2 * len(WORDS)} records of 2 answers, "
                                          rf"but {ranked_file} has {2 * len(WORDS)} of 4; resume with the data"):
        Trainer(stage_config(data, ranked_file, tmp_path / "resumed", [f"checkpoint.load={tmp_path}/ck"]), task=DPOTask)
