"""Packed fine-tuning batches (rlhf.pack): the best-fit layout by hand, per-record losses equal to
unpacked batches for SFT, DPO and the reward model (truncated records, and rankings of three
answers with padded pairs, included), whole runs equal to unpacked ones, every parallel layout
equal to one process, less padding on ragged records, the benchmark's smoke run, and the errors a
user can cause."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.config import ConfigError
from megatron_lite.rlhf import DPOTask, PPOTask, RewardModelTask, SFTTask
from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.packing import (PackingError, best_fit_rows, last_token_values, pack_micro_batches, pack_rows,
                                        padding_fraction, sequence_sums, trained_length)
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.rlhf.conftest import WORDS
from tests.rlhf.test_stages import stage_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import bench_packing  # noqa: E402

PACK = ["rlhf.pack=true"]
LONGER = ["model.seq_length=64"]  # the tiny tokenizer's records take 15 to 30 tokens: room for two or more


def sequence(length: int, first: int, trained_from: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens, labels, length) padded to 16: tokens first, first + 1, ...; labels from ``trained_from``."""
    tokens = np.zeros(16, dtype=np.int64)
    tokens[:length] = np.arange(first, first + length)
    labels = np.full(16, IGNORE_INDEX, dtype=np.int64)
    labels[trained_from:length] = tokens[trained_from:length] + 1
    return tokens, labels, length


# ----------------------------------------------------------------------------- the layout


def test_best_fit_decreasing_by_hand():
    # longest first: 7 opens row 0, 6 row 1 (7 + 6 > 10), 4 fits row 1 exactly (free 4 vs row 0's 3),
    # 3 fills row 0, 2 opens row 2 (both full), 2 joins it
    assert best_fit_rows([3, 7, 2, 6, 4, 2], capacity=10) == [[1, 0], [3, 4], [2, 5]]
    # equal lengths keep the seeded record order
    assert best_fit_rows([2, 2, 2], capacity=4) == [[0, 1], [2]]
    assert best_fit_rows([2, 2, 2], capacity=4) == best_fit_rows([2, 2, 2], capacity=4)


def test_pack_rows_documents_positions_and_bookkeeping():
    sequences = [sequence(3, 10), sequence(5, 20, trained_from=2), sequence(4, 30)]
    packed = pack_rows(sequences, [[1, 0], [2]], num_rows=3, seq_length=8, pad_id=0)
    np.testing.assert_array_equal(packed.tokens[0], [20, 21, 22, 23, 24, 10, 11, 12])
    np.testing.assert_array_equal(packed.tokens[1], [30, 31, 32, 33, 0, 0, 0, 0])
    np.testing.assert_array_equal(packed.tokens[2], [0] * 8)  # a row only to even the micro-batches
    np.testing.assert_array_equal(packed.labels[0], [-100, -100, 23, 24, 25, -100, 12, 13])
    np.testing.assert_array_equal(packed.document_ids[:2], [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(packed.position_ids[:2], [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]])
    np.testing.assert_array_equal(packed.sequence[:2], [[1, 1, 1, 1, 1, 0, 0, 0], [2, 2, 2, 2, 3, 3, 3, 3]])
    assert (packed.sequence[2] == 3).all()
    np.testing.assert_array_equal(packed.last, [7, 4, 11])  # flat index row * 8 + column
    values = torch.arange(24, dtype=torch.float32).view(3, 8)
    target = {"sequence": torch.from_numpy(packed.sequence), "last": torch.from_numpy(packed.last)}
    assert sequence_sums(values, target).tolist() == [5 + 6 + 7, 0 + 1 + 2 + 3 + 4, 8 + 9 + 10 + 11]


def test_micro_batches_get_the_same_rows_and_packing_is_deterministic():
    groups = [[sequence(6, 1), sequence(6, 2), sequence(6, 3)], [sequence(2, 4), sequence(3, 5), sequence(2, 6)]]
    first, second = pack_micro_batches(groups, seq_length=8, pad_id=0), pack_micro_batches(groups, 8, 0)
    assert [p.tokens.shape for p in first] == [(3, 8), (3, 8)]  # the second needs one row, gets three
    for a, b in zip(first, second):
        for name in a._fields:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_empty_sequences_take_no_room_and_read_zero():
    sequences = [sequence(3, 10), sequence(0, 0), sequence(4, 30)]
    assert best_fit_rows([3, 0, 4], capacity=8) == [[2, 0]]
    packed = pack_rows(sequences, [[2, 0]], num_rows=1, seq_length=8, pad_id=0)
    np.testing.assert_array_equal(packed.tokens[0], [30, 31, 32, 33, 10, 11, 12, 0])
    np.testing.assert_array_equal(packed.last, [6, -1, 3])
    assert 1 not in packed.sequence
    values = torch.arange(8, dtype=torch.float32).view(1, 8) + 1
    target = {"sequence": torch.from_numpy(packed.sequence), "last": torch.from_numpy(packed.last)}
    assert sequence_sums(values, target).tolist() == [5 + 6 + 7, 0, 1 + 2 + 3 + 4]
    assert last_token_values(values, target).tolist() == [7, 0, 4]


def test_trained_length_and_packing_errors():
    assert trained_length(sequence(5, 1)[1]) == 5
    with pytest.raises(PackingError, match="a sequence has no trained position"):
        trained_length(np.full(4, IGNORE_INDEX))
    with pytest.raises(PackingError, match=r"sequence 1 holds 9 tokens, which does not fit a row of "
                                           r"model.seq_length=8; the datasets truncate records"):
        best_fit_rows([3, 9], capacity=8)


# ----------------------------------------------------------------------------- equal to unpacked


@pytest.mark.parametrize("backend", ["torch", "triton"])  # the packed run's; the unpacked one is torch's
def test_sft_packed_per_record_losses_equal_unpacked(tiny_stage_data, tmp_path, backend):
    data, sft, _ = tiny_stage_data
    extra = LONGER + ["train.micro_batch_size=4", "train.global_batch_size=8"]
    plain = Trainer(stage_config(data, sft, tmp_path / "plain", extra), task=SFTTask)
    packed_cfg = stage_config(data, sft, tmp_path / "packed", extra + PACK + [f"model.attention_backend={backend}"])
    packed = Trainer(packed_cfg, task=SFTTask)
    layers = packed.model.chunks[0].modules()
    assert {m.attention_backend for m in layers if hasattr(m, "attention_backend")} == {backend}
    model = plain.model.chunks[0]
    packed_model = packed.model.chunks[0]
    packed_model.load_state_dict(model.state_dict())
    plain_micro = plain.task.micro_batches(plain.train_ds, 0)
    packed_micro = packed.task.micro_batches(packed.train_ds, 0)
    assert plain_micro[0][0].shape == (4, 64) and packed_micro[0][0].shape[0] < 4  # fewer rows
    with torch.no_grad():
        for (tokens, target), (packed_tokens, packed_target) in zip(plain_micro, packed_micro):
            losses, counts = plain.task.record_losses(model, tokens, target)
            packed_losses, packed_counts = packed.task.record_losses(packed_model, packed_tokens, packed_target)
            assert torch.equal(counts, packed_counts) and (counts > 0).all()
            torch.testing.assert_close(packed_losses / packed_counts, losses / counts, rtol=1e-5, atol=1e-5)
            assert torch.equal(packed_target["tokens_per_rank"], target["tokens_per_rank"])
    autocast = plain.model.autocast()
    assert packed.model.parallel_step.evaluate(packed_micro, autocast) == pytest.approx(
        plain.model.parallel_step.evaluate(plain_micro, autocast), rel=1e-5)


def test_dpo_packed_prompt_losses_and_reference_equal_unpacked(tiny_stage_data, tmp_path):
    data, _, pairs = tiny_stage_data  # the reference is the seeded initial model, the same in both runs
    extra = LONGER + ["rlhf.dpo.nll_weight=0.5", "train.micro_batch_size=4", "train.global_batch_size=8"]
    plain = Trainer(stage_config(data, pairs, tmp_path / "plain", extra), task=DPOTask)
    packed = Trainer(stage_config(data, pairs, tmp_path / "packed", extra + PACK), task=DPOTask)
    torch.testing.assert_close(packed.task.reference, plain.task.reference, rtol=1e-5, atol=1e-5)
    model = plain.model.chunks[0]
    plain_micro = plain.task.micro_batches(plain.train_ds, 0)
    packed_micro = packed.task.micro_batches(packed.train_ds, 0)
    assert plain_micro[0][0].shape == (8, 64) and packed_micro[0][0].shape[0] < 8
    with torch.no_grad():
        for (tokens, target), (packed_tokens, packed_target) in zip(plain_micro, packed_micro):
            for want, got in zip(plain.task.prompt_losses(model, tokens, target),
                                 packed.task.prompt_losses(model, packed_tokens, packed_target)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reward_model_packed_rewards_equal_unpacked(tiny_stage_data, tmp_path):
    data, _, pairs = tiny_stage_data
    extra = LONGER + ["train.micro_batch_size=4", "train.global_batch_size=8"]
    plain = Trainer(stage_config(data, pairs, tmp_path / "plain", extra), task=RewardModelTask)
    packed = Trainer(stage_config(data, pairs, tmp_path / "packed", extra + PACK), task=RewardModelTask)
    model = plain.model.chunks[0]
    plain_micro = plain.task.micro_batches(plain.train_ds, 0)
    packed_micro = packed.task.micro_batches(packed.train_ds, 0)
    assert plain_micro[0][0].shape == (8, 64) and packed_micro[0][0].shape[0] < 8
    with torch.no_grad():
        for (tokens, target), (packed_tokens, packed_target) in zip(plain_micro, packed_micro):
            want = plain.task.rewards(model, tokens, target)
            got = packed.task.rewards(model, packed_tokens, packed_target)
            assert want.shape == (4, 2)  # (prompts, answers)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # the reward reads each answer's closing end-of-document token; pairs have no padding answer
            assert (packed_target["last"] >= 0).all()
            assert (packed_tokens.flatten()[packed_target["last"]] == packed.task.tokenizer.eod_id).all()


@pytest.fixture
def three_answers(tmp_path):
    """Rankings of three answers (K = 3) mixed with pairs, which the dataset pads with an empty answer."""
    path = tmp_path / "three.jsonl"
    with open(path, "w") as f:
        for i, word in enumerate(WORDS * 2):
            other = WORDS[(i + 1) % len(WORDS)]
            if i % 2:
                record = {"prompt": f"repeat {word}", "chosen": " ".join([word] * (1 + i % 5)), "rejected": other}
            else:
                record = {"prompt": f"repeat {word}", "responses": [f"{word} {word}", word, f"{other} {word} {other}"]}
            f.write(json.dumps(record) + "\n")
    return path


def test_ranked_answers_pack_as_unpacked(tiny_stage_data, three_answers, tmp_path):
    data, _, _ = tiny_stage_data  # the DPO reference is the seeded initial model, the same in both runs
    extra = LONGER + ["rlhf.dpo.nll_weight=0.5", "train.micro_batch_size=4", "train.global_batch_size=8"]
    for task in (RewardModelTask, DPOTask):
        plain = Trainer(stage_config(data, three_answers, tmp_path / f"{task.name}-plain", extra), task=task)
        packed = Trainer(stage_config(data, three_answers, tmp_path / f"{task.name}-packed", extra + PACK), task=task)
        assert packed.task.sequences_per_record == 3
        model = plain.model.chunks[0]
        plain_micro = plain.task.micro_batches(plain.train_ds, 0)
        packed_micro = packed.task.micro_batches(packed.train_ds, 0)
        assert plain_micro[0][0].shape == (12, 64) and packed_micro[0][0].shape[0] < 12
        padded = 0
        with torch.no_grad():
            for (tokens, target), (packed_tokens, packed_target) in zip(plain_micro, packed_micro):
                empty = packed_target["last"] < 0  # answer-major: a pair's third answer, the last b slots
                padded += int(empty.sum())
                assert not empty[:8].any() and torch.equal(empty[8:], target["better"].sum(dim=(1, 2)) == 1)
                # rm reads a reward at each answer's closing end-of-document token, dpo trains up to it
                closing = packed_tokens if task is RewardModelTask else packed_target["labels"]
                assert (closing.flatten()[packed_target["last"][~empty]] == packed.task.tokenizer.eod_id).all()
                assert torch.equal(packed_target["better"], target["better"])
                if task is RewardModelTask:
                    want = plain.task.rewards(model, tokens, target)
                    got = packed.task.rewards(model, packed_tokens, packed_target)
                    ranked = target["better"].any(dim=2) | target["better"].any(dim=1)  # answers in a pair
                    torch.testing.assert_close(got[ranked], want[ranked], rtol=1e-5, atol=1e-5)
                    assert (got[~ranked] == 0).all()
                else:
                    torch.testing.assert_close(packed_target["reference"], target["reference"])
                    for want, got in zip(plain.task.prompt_losses(model, tokens, target),
                                         packed.task.prompt_losses(model, packed_tokens, packed_target)):
                        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(packed.task.loss(model, packed_tokens, packed_target, 2),
                                           plain.task.loss(model, tokens, target, 2), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(packed.task.evaluation_terms(model, packed_tokens, packed_target, 2),
                                           plain.task.evaluation_terms(model, tokens, target, 2), rtol=1e-5, atol=1e-5)
        assert padded > 0  # the micro-batches hold pairs padded to three answers
        if task is DPOTask:
            torch.testing.assert_close(packed.task.reference, plain.task.reference, rtol=1e-5, atol=1e-5)
            records = plain.task.records
            pairs = torch.tensor([records[i]["better"].sum() == 1 for i in range(len(records))])
            assert pairs.any() and (plain.task.reference[pairs, 2] == 0).all()  # a pair's padding answer
        plain_run, packed_run = plain.train(), packed.train()
        assert packed_run.losses == pytest.approx(plain_run.losses, rel=1e-5), task.name
        assert [v for _, v in packed_run.val_losses] == pytest.approx([v for _, v in plain_run.val_losses], rel=1e-5)


def test_truncated_records_pack_as_unpacked(tiny_stage_data, ragged_records, tmp_path):
    data, _, _ = tiny_stage_data  # at 64 tokens some ragged records are cut, as unpacked: a row of their own
    extra = ["train.micro_batch_size=8", "train.global_batch_size=16", "model.seq_length=64"]
    plain = Trainer(stage_config(data, ragged_records, tmp_path / "plain", extra), task=SFTTask)
    packed = Trainer(stage_config(data, ragged_records, tmp_path / "packed", extra + PACK), task=SFTTask)
    assert plain.task.records.records.num_truncated > 0
    model = plain.model.chunks[0]
    indices = plain.task.records.local_indices(plain.train_ds, 0)
    lengths = [trained_length(plain.task.records[i]["labels"]) for i in indices]
    assert max(lengths) == 64
    with torch.no_grad():
        for (tokens, target), (packed_tokens, packed_target) in zip(plain.task.micro_batches(plain.train_ds, 0),
                                                                    packed.task.micro_batches(packed.train_ds, 0)):
            losses, counts = plain.task.record_losses(model, tokens, target)
            packed_losses, packed_counts = packed.task.record_losses(model, packed_tokens, packed_target)
            assert torch.equal(counts, packed_counts)
            torch.testing.assert_close(packed_losses, losses, rtol=1e-5, atol=1e-5)


def test_packed_runs_follow_the_unpacked_runs(tiny_stage_data, tmp_path):
    data, sft, pairs = tiny_stage_data
    extra = LONGER + ["train.micro_batch_size=4", "train.global_batch_size=8"]
    for task, records, args in ((SFTTask, sft, extra), (RewardModelTask, pairs, extra), (DPOTask, pairs, extra)):
        plain = Trainer(stage_config(data, records, tmp_path / f"{task.name}-plain", args), task=task).train()
        packed = Trainer(stage_config(data, records, tmp_path / f"{task.name}-packed", args + PACK), task=task).train()
        assert packed.losses == pytest.approx(plain.losses, rel=1e-5), task.name
        assert [v for _, v in packed.val_losses] == pytest.approx([v for _, v in plain.val_losses], rel=1e-5)


# ----------------------------------------------------------------------------- padding


@pytest.fixture
def ragged_records(tmp_path):
    """SFT records whose answers repeat a word 1 to 12 times."""
    path = tmp_path / "ragged.jsonl"
    with open(path, "w") as f:
        for i, word in enumerate(WORDS * 2):
            f.write(json.dumps({"prompt": f"repeat {word}", "response": " ".join([word] * (1 + i % 12))}) + "\n")
    return path


def test_packing_lowers_the_padding_of_ragged_records(tiny_stage_data, ragged_records, tmp_path):
    data, _, _ = tiny_stage_data
    extra = ["train.micro_batch_size=8", "train.global_batch_size=16", "model.seq_length=128"]
    plain = Trainer(stage_config(data, ragged_records, tmp_path / "plain", extra), task=SFTTask)
    packed = Trainer(stage_config(data, ragged_records, tmp_path / "packed", extra + PACK), task=SFTTask)
    indices = plain.task.records.local_indices(plain.train_ds, 0)
    lengths = [trained_length(plain.task.records[i]["labels"]) for i in indices]
    assert len(set(lengths)) > 4  # ragged
    micro = packed.task.micro_batches(packed.train_ds, 0)
    rows = sum(tokens.shape[0] for tokens, _ in micro)
    unpacked, packed_fraction = padding_fraction(len(indices), 128, lengths), padding_fraction(rows, 128, lengths)
    assert packed_fraction < unpacked - 0.3, (packed_fraction, unpacked)
    for _, target in micro:  # every record of the micro-batch is in it, once
        count = len(target["last"])
        assert set(target["sequence"].unique().tolist()) - {count} == set(range(count))


def test_bench_packing_smoke_run_records_its_row(tiny_stage_data, ragged_records, tmp_path):
    data, _, _ = tiny_stage_data
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {num_layers: 1, hidden_size: 32, num_heads: 4, seq_length: 128, make_vocab_size_divisible_by: 16}\n"
        f"data: {{tokenizer: {data.tokenizer_dir}}}\n"
        f"rlhf: {{data: {ragged_records}, valid_fraction: 0.0}}\n"
        "train: {micro_batch_size: 8, global_batch_size: 8, device: cpu}\n"
    )
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Other\n\ntext\n")
    assert bench_packing.main(["--config", str(config), "--steps", "1", "--warmup", "0", "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.index("## Other") < text.index(bench_packing.SECTION)
    row = text.splitlines()[-1].split(" | ")
    padding_unpacked, padding_packed = (float(cell.rstrip("%")) for cell in row[6:8])
    assert row[2] == "sft" and row[5] == "8" and padding_packed < padding_unpacked - 30
    with pytest.raises(SystemExit):
        bench_packing.parse_args(["--config", str(config), "--steps", "0"])


# ----------------------------------------------------------------------------- parallel layouts

LAYOUTS = {"tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"], "pp2": ["parallel.pp=2"], "dp2": []}


def _packed_stage_args(tiny_stage_data, ranked):
    _, sft, pairs = tiny_stage_data
    return {"sft": (SFTTask, sft, PACK + LONGER), "rm": (RewardModelTask, pairs, PACK + LONGER),
            "dpo": (DPOTask, pairs, PACK + LONGER), "rm-ranked": (RewardModelTask, ranked, PACK + LONGER),
            "dpo-ranked": (DPOTask, ranked, PACK + LONGER)}


def _packed_parallel_runs(rank, world_size, tiny_stage_data, ranked, root):
    out = {}
    for stage, (task, records, extra) in _packed_stage_args(tiny_stage_data, ranked).items():
        for name, layout in LAYOUTS.items():
            cfg = stage_config(tiny_stage_data[0], records, f"{root}/{stage}-{name}", extra + layout)
            result = Trainer(cfg, task=task).train()
            out[(stage, name)] = {"losses": result.losses, "val": result.val_losses}
    return out


def test_packed_layouts_match_one_process(tiny_stage_data, three_answers, tmp_path):
    single = {}
    for stage, (task, records, extra) in _packed_stage_args(tiny_stage_data, three_answers).items():
        cfg = stage_config(tiny_stage_data[0], records, tmp_path / f"single-{stage}", extra)
        result = Trainer(cfg, task=task).train()
        single[stage] = {"losses": result.losses, "val": result.val_losses}
    results = run_distributed(_packed_parallel_runs, 2, tiny_stage_data, three_answers, str(tmp_path))
    for (stage, name), run in results[0].items():
        assert results[1][(stage, name)] == run, (stage, name)
        assert run["losses"] == pytest.approx(single[stage]["losses"], rel=1e-5), (stage, name)
        val = [v for _, v in single[stage]["val"]]
        assert [v for _, v in run["val"]] == pytest.approx(val, rel=1e-5), (stage, name)


# ----------------------------------------------------------------------------- errors


def test_pack_user_errors(tiny_stage_data, tmp_path):
    data, _, pairs = tiny_stage_data
    with pytest.raises(ConfigError, match="rlhf.pack=true packs the sft, rm and dpo stages; ppo generates its "
                                          "own batches, set rlhf.pack=false"):
        Trainer(stage_config(data, pairs, tmp_path, PACK), task=PPOTask)
    with pytest.raises(ConfigError, match="rlhf.pack=true masks attention per record, which "
                                          "model.attention_backend=flash_attn cannot; use torch or triton"):
        Trainer(stage_config(data, pairs, tmp_path, PACK + ["model.attention_backend=flash_attn"]), task=DPOTask)
    with pytest.raises(ConfigError, match="rlhf.pack: expected bool"):
        stage_config(data, pairs, tmp_path, ["rlhf.pack=often"])
