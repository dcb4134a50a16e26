"""Checkpoint faults: damaged and missing files, missing RNG streams, vocabulary and head-kind
mismatches. Each is injected into a tiny single-process checkpoint; a tensor-parallel load is
checked as one rank of the grid, which needs no process group."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_lite.config import ConfigError, ParallelConfig, load_config
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import (
    CheckpointError, LoadPolicy, load_checkpoint, load_full_state_dict, read_manifest,
)
from megatron_lite.training.trained_model import build_trained_model, load_frozen_model
from tests.distributed import run_distributed
from tools import reshard

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "model.make_vocab_size_divisible_by=8", "train.device=cpu", "model.dropout=0.1"]
SHARD = "model_tp00_pp000.pt"
LEGACY = Path(__file__).parents[1] / "training" / "fixtures" / "legacy_checkpoint" / "gpt2"


def tiny_cfg(vocab_size=100, extra=()):
    return load_config(None, TINY + [f"model.vocab_size={vocab_size}", *extra])


def save_run(save_dir, vocab_size=100, steps=(2, 4), head="lm", tokenizer_dir=None):
    """A tiny model's checkpoints at each of ``steps``; returns the model."""
    cfg = tiny_cfg(vocab_size)
    model = build_trained_model(cfg, ParallelDims.single(), head)
    for step in steps:
        model.save(save_dir, step=step, consumed_samples=4 * step, config=cfg.to_dict(), tokenizer_dir=tokenizer_dir)
    return model


def resume(load_dir, vocab_size=100, extra=(), weights_only=False, head="lm"):
    cfg = tiny_cfg(vocab_size, extra)
    model = build_trained_model(cfg, ParallelDims.single(), head)
    model.load(load_dir, weights_only=weights_only)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A save directory with complete iterations 2 and 4 and a tokenizer copy; tests damage copies."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = root / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text('{"a": 0}')
    save_run(root / "ck", tokenizer_dir=tokenizer)
    return root / "ck"


@pytest.fixture
def damaged(run, tmp_path):
    copy = tmp_path / "ck"
    shutil.copytree(run, copy)
    return copy


def test_the_manifest_says_what_the_checkpoint_holds(run):
    manifest = read_manifest(run)
    assert manifest.vocab_size == 100 and manifest.head == "lm" and len(manifest.tokenizer["sha256"]) == 64
    assert set(manifest.file_checks) == {SHARD, "rng/rank00000.pt"}
    assert manifest.file_checks[SHARD]["size"] == (run / "iter_0000004" / SHARD).stat().st_size


@pytest.mark.parametrize("fault", ["truncate", "empty", "delete"])
def test_a_damaged_shard_is_named_with_the_complete_iterations(damaged, fault):
    shard = damaged / "iter_0000004" / SHARD
    if fault == "delete":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[: 0 if fault == "empty" else 1000])
    with pytest.raises(CheckpointError) as caught:
        resume(damaged)
    message = str(caught.value)
    assert SHARD in message and "load the previous iteration" in message
    assert "complete iterations" in message and "iter_0000002" in message
    assert ("is missing" if fault == "delete" else "truncated or damaged") in message


def test_a_truncated_shard_of_a_checkpoint_without_file_records_is_named(tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(LEGACY, legacy)
    shard = legacy / "iter_0000002" / SHARD
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{SHARD} cannot be read .*truncated or damaged"):
        load_full_state_dict(legacy)


def test_a_truncated_manifest_is_named(damaged):
    manifest = damaged / "iter_0000004" / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    with pytest.raises(CheckpointError, match=r"manifest.json is not valid JSON.*truncated.*iter_0000002"):
        resume(damaged)


def test_a_deleted_manifest_is_named(damaged):
    (damaged / "iter_0000004" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"iter_0000004, which has no manifest.json.*iter_0000002"):
        resume(damaged)


def test_flipped_bytes_pass_the_size_check_and_fail_the_checksum(damaged):
    shard = damaged / "iter_0000004" / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes: torch reads it without complaint
    shard.write_bytes(bytes(data))
    resume(damaged)
    with pytest.raises(CheckpointError, match=f"{SHARD} fails its checksum.*load the previous iteration"):
        resume(damaged, extra=["checkpoint.verify=true"])
    output = damaged.parent / "out"
    exit_code = reshard.main(["--load", str(damaged), "--output", str(output), "--tp", "1", "--pp", "1"])
    assert exit_code == 2 and not output.exists()


def test_reshard_writes_a_verified_checkpoint(run, tmp_path):
    assert reshard.main(["--load", str(run), "--output", str(tmp_path / "out"), "--tp", "2", "--pp", "1",
                         "--weights-only"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest.vocab_size == 100 and manifest.head == "lm" and len(manifest.file_checks) == 2
    assert manifest.tokenizer == read_manifest(run).tokenizer
    # an offline rewrite has no RNG streams to carry: resuming from it is not a missing-file error
    assert reshard.main(["--load", str(run), "--output", str(tmp_path / "tp1"), "--tp", "1", "--pp", "1",
                         "--weights-only"]) == 0
    resume(tmp_path / "tp1")


def test_a_missing_rng_file_stops_an_exact_resume_and_warns_otherwise(damaged, capsys):
    (damaged / "iter_0000004" / "rng" / "rank00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"rank00000.pt is missing.*not be exact.*checkpoint.exact_resume=false"):
        resume(damaged)
    resume(damaged, extra=["checkpoint.exact_resume=false"])
    assert "warning:" in capsys.readouterr().err
    resume(damaged, weights_only=True)  # fine-tuning never reads the streams


# ----------------------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    """A 2048-token checkpoint (tp = 1), its full embedding, and every tp = 2 load of it, run in one
    gloo launch: {case: per-rank (rows, fresh rows) or the error message}."""
    root = tmp_path_factory.mktemp("vocab")
    model = save_run(root / "ck", vocab_size=2048, steps=(1,))
    at_tp2 = run_distributed(_load_at_tp2, 2, str(root / "ck"))
    return root / "ck", model.chunks[0].embedding.word.weight.detach().clone(), at_tp2


TP2_CASES = {"refused": (1024, False), "shrunk": (1024, True), "grown": (3000, True)}


def _load_at_tp2(rank, world, load_dir):
    return {case: _load_rows(load_dir, vocab, resize, ParallelDims.initialize(ParallelConfig(tp=2)))
            for case, (vocab, resize) in TP2_CASES.items()}


def _load_rows(load_dir, vocab_size, resize, dims):
    """(embedding rows after the load, rows before it) of this rank, or the load's error message."""
    model = GPT(tiny_cfg(vocab_size).model, dims, seed=9)
    fresh = model.embedding.word.weight.detach().clone()
    try:
        load_checkpoint(load_dir, [model], dims, weights_only=resize, padded_vocab_size=model.padded_vocab_size,
                        policy=LoadPolicy(resize_vocab=resize))
    except CheckpointError as exc:
        return str(exc)
    return model.embedding.word.weight.detach().clone(), fresh


def assert_refused(message):
    assert "2048 tokens" in message and "1024" in message and "checkpoint.load" in message
    assert "checkpoint.finetune=true checkpoint.resize_vocab=true" in message


def assert_resized(saved, per_rank, new_vocab):
    shared = min(2048, new_vocab)
    for tp_rank, (rows, fresh) in enumerate(per_rank):
        start = tp_rank * rows.shape[0]  # the vocabulary is split over tp in contiguous blocks
        for local, token in enumerate(range(start, start + rows.shape[0])):
            expected = saved[token] if token < shared else fresh[local]
            assert torch.equal(rows[local], expected), (tp_rank, token)


def test_a_smaller_tokenizer_is_refused_at_the_same_and_another_tp(big_vocab):
    load_dir, _, at_tp2 = big_vocab
    assert_refused(_load_rows(load_dir, 1024, False, ParallelDims.single()))
    for rank_results in at_tp2:
        assert_refused(rank_results["refused"])


def test_resize_vocab_needs_finetune():
    with pytest.raises(ConfigError, match="checkpoint.resize_vocab=true.*checkpoint.finetune=true"):
        tiny_cfg(1024, ["checkpoint.resize_vocab=true"])


@pytest.mark.parametrize("case", ["shrunk", "grown"])
def test_resize_vocab_keeps_the_shared_rows_and_initializes_the_rest(big_vocab, case):
    load_dir, saved, at_tp2 = big_vocab
    new_vocab = TP2_CASES[case][0]
    assert_resized(saved, [_load_rows(load_dir, new_vocab, True, ParallelDims.single())], new_vocab)
    assert_resized(saved, [rank_results[case] for rank_results in at_tp2], new_vocab)
    resume(load_dir, new_vocab, ["checkpoint.finetune=true", "checkpoint.resize_vocab=true"], weights_only=True)


# ----------------------------------------------------------------------------- head kinds


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    save_run(root / "ck", steps=(1,))
    return root / "ck"


def test_a_language_model_is_refused_as_the_frozen_reward_model(language_model):
    with pytest.raises(CheckpointError) as caught:
        load_frozen_model(tiny_cfg(), ParallelDims.single(), language_model, "value", "rlhf.ppo.reward_model")
    message = str(caught.value)
    assert "rlhf.ppo.reward_model" in message and "language model" in message and "'value' head" in message


def test_a_language_model_may_start_a_value_head_for_training(language_model):
    critic = build_trained_model(tiny_cfg(), ParallelDims.single(), "value")
    critic.load(language_model, weights_only=True, source_key="rlhf.ppo.critic")  # SFT -> reward model / critic


def test_a_value_model_is_refused_as_a_policy(tmp_path):
    save_run(tmp_path / "rm", steps=(1,), head="value")
    assert json.loads((tmp_path / "rm" / "iter_0000001" / "manifest.json").read_text())["head"] == "value"
    with pytest.raises(CheckpointError, match=r"checkpoint.load=.* holds a value model.*language model is needed"):
        resume(tmp_path / "rm", weights_only=True)
    with pytest.raises(CheckpointError, match=r"rlhf.ppo.reference=.* holds a value model"):
        load_frozen_model(tiny_cfg(), ParallelDims.single(), tmp_path / "rm", "lm", "rlhf.ppo.reference")


def test_a_language_model_is_refused_when_resuming_a_value_model(language_model):
    with pytest.raises(CheckpointError, match=r"checkpoint.load=.* holds a language model.*'value' head"):
        resume(language_model, head="value")


def test_every_iteration_damaged_names_the_file_and_that_none_is_left(tmp_path):
    # Listing the other complete iterations must not re-enter the damage report of each one.
    legacy = Path(__file__).resolve().parents[1] / "training" / "fixtures" / "legacy_checkpoint" / "gpt2" / "iter_0000002"
    for name in ("iter_0000002", "iter_0000004"):
        shutil.copytree(legacy, tmp_path / name)
        (tmp_path / name / "model_tp00_pp000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"iter_0000004/model_tp00_pp000.pt is missing.*no other complete iteration"):
        load_full_state_dict(tmp_path / "iter_0000004")
