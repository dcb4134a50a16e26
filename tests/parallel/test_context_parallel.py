"""Context parallelism: the load-balanced split, attention across cp ranks against one process
(both backends, grouped-query, document masks), training layouts with cp against one process
(fp32, relative 1e-5), checkpoints saved at cp=2 resumed at cp=1, and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig
from megatron_lite.kernels.eager import attention as eager_attention
from megatron_lite.model.layout_check import validate_layout
from megatron_lite.parallel.context_parallel import (
    ContextParallel,
    _to_sequence_order,
    chunk_mask,
    context_parallel_attention,
    local_positions,
    split_sequence,
)
from megatron_lite.parallel.dims import ParallelDims, group_ranks, validate_grid
from megatron_lite.parallel.random import REPLICATED_STREAM
from megatron_lite.model.gpt import GPT
from megatron_lite.training.checkpoint import iteration_dir_name, load_checkpoint
from megatron_lite.training.setup import setup_dims, split_micro_batches
from tests.distributed import run_distributed
from tests.parallel.test_parity import (  # noqa: F401 - references is a fixture
    SAVED_STEP,
    _check_against_reference,
    _checkpoint_dir,
    _config,
    _train,
    references,
)

# ----------------------------------------------------------------------------- the split


def test_each_rank_holds_chunks_i_and_2cp_minus_1_minus_i():
    tokens = torch.arange(16).view(1, 16)
    assert split_sequence(tokens, 0, 2).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert split_sequence(tokens, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert split_sequence(tokens, 1, 4).tolist() == [[2, 3, 12, 13]]
    assert local_positions(4, 3, 4).tolist() == [6, 7, 8, 9]
    gathered = torch.cat([split_sequence(tokens, r, 4) for r in range(4)], dim=1)
    assert torch.equal(_to_sequence_order(gathered, 4), tokens)


def test_micro_batches_carry_the_local_chunks_of_tokens_and_labels():
    batch = torch.arange(2 * 9).view(2, 9)  # (B, T + 1), T = 8
    (tokens, labels), = split_micro_batches(batch, 2, torch.device("cpu"), cp_rank=1, cp=2)
    assert tokens.tolist() == [[2, 3, 4, 5], [11, 12, 13, 14]]
    assert labels.tolist() == [[3, 4, 5, 6], [12, 13, 14, 15]]


def test_chunk_mask_is_bottom_right_causal_and_within_documents():
    assert chunk_mask(1, 2).tolist() == [[[[True, True, True, False], [True, True, True, True]]]]
    documents = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = chunk_mask(2, 2, documents)  # queries at positions 4, 5 over keys 0..5
    assert mask.tolist() == [[[[False, False, True, True, True, False], [False] * 5 + [True]]]]


def test_grid_puts_cp_between_tp_and_dp():
    groups = group_ranks(tp=2, dp=2, pp=2, cp=2)  # rank = t + 2 (c + 2 (d + 2 p))
    assert groups["tp"][:2] == [[0, 1], [2, 3]]
    assert groups["cp"][:2] == [[0, 2], [1, 3]]
    assert groups["dp"][:2] == [[0, 4], [1, 5]]
    assert groups["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["pp"][0] == [0, 8]
    dims = ParallelDims(tp=2, cp=2, dp=2, pp=2, rank=11)
    assert (dims.tp_rank, dims.cp_rank, dims.dp_rank, dims.pp_rank) == (1, 1, 0, 1)
    assert dims.world_size == 16 and dims.cp_ranks == [9, 11] and dims.dp_ranks == [11, 15]
    assert dims.dp_cp_ranks == [9, 11, 13, 15] and dims.pp_ranks == [3, 11] and dims.tp_ranks == [10, 11]
    assert validate_grid(ParallelConfig(tp=2, cp=2), 8) == 2


def test_cp_ranks_draw_different_dropout_masks():
    def drawn(dims: ParallelDims) -> torch.Tensor:
        with GPT(_model(), dims).rng_tracker.fork(REPLICATED_STREAM):
            return torch.rand(8)

    assert not torch.equal(drawn(ParallelDims(cp=2, rank=0)), drawn(ParallelDims(cp=2, rank=1)))
    assert torch.equal(drawn(ParallelDims(cp=2, rank=0)), drawn(ParallelDims()))  # cp rank 0: the streams without cp


# ----------------------------------------------------------------------------- bad input


def _model(**kw) -> ModelConfig:
    values = dict(flavor="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=100,
                  seq_length=32)
    values.update(kw)
    return ModelConfig(**values)


@pytest.mark.parametrize(
    "parallel, model_kw, world, message",
    [
        (dict(cp=2), dict(seq_length=30), 2,
         r"parallel.cp=2 splits model.seq_length into 2 x cp = 4 chunks, but its length 30 is not a multiple of 4; "
         r"set model.seq_length to a multiple of 4 or change parallel.cp"),
        (dict(cp=4, tp=2, sequence_parallel=True), dict(seq_length=20), 8,
         r"parallel.cp=4 splits model.seq_length into 2 x cp = 8 chunks, but its length 20"),
        (dict(cp=2, tp=4, sequence_parallel=True), dict(seq_length=36, num_kv_heads=4), 8,
         r"splits each cp rank's model.seq_length / parallel.cp = 18 tokens over parallel.tp=4.*"
         r"multiple of 2 x cp x tp = 16"),
        (dict(cp=2, tp=2), {}, 6,
         r"world size 6 is not divisible by parallel.tp x parallel.cp x parallel.pp = 2 x 2 x 1 = 4; "
         r"launch a multiple of 4 processes or change tp/cp/pp"),
        (dict(cp=3), dict(seq_length=36), 4, r"world size 4 is not divisible by .* = 3"),
    ],
)
def test_bad_cp_layouts_say_what_to_change(parallel, model_kw, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(ParallelConfig(**parallel), _model(**model_kw), world)


def test_bad_cp_values_and_batches():
    with pytest.raises(ConfigError, match="parallel.cp must be >= 1, got 0"):
        ParallelConfig(cp=0)
    with pytest.raises(ConfigError, match="its length 10 is not a multiple of 4"):
        split_micro_batches(torch.zeros(2, 11, dtype=torch.long), 2, torch.device("cpu"), cp_rank=0, cp=2)
    context = ContextParallel(group=None, rank=0, size=2)
    q = torch.zeros(1, 4, 2, 8)
    # refused before the K/V all-gather (no process group is needed to see it)
    with pytest.raises(ConfigError, match="model.attention_backend=triton has no attention dropout; set "
                                          "model.dropout=0"):
        context_parallel_attention(q, q, q, context, "triton", dropout_p=0.1)
    with pytest.raises(ConfigError, match="context parallelism runs attention on the torch or triton backend, not "
                                          "'flash_attn'"):
        context_parallel_attention(q, q, q, context, "flash_attn")


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_fine_tuning_and_rl_stages_refuse_context_parallelism(stage, tmp_path):
    from megatron_lite.rlhf import STAGES
    from megatron_lite.training.trainer import Trainer

    cfg = _config(str(tmp_path), stage, "llama", ["parallel.cp=2"])
    with pytest.raises(ConfigError, match="parallel.cp=2: context parallelism runs pretraining only .*; "
                                          "set parallel.cp=1"):
        Trainer(cfg, ParallelDims(cp=2), task=STAGES[stage])


def test_generation_refuses_context_parallelism():
    from megatron_lite.model.generation import KVCache

    model = GPT(_model(), ParallelDims(cp=2))
    cache = KVCache(model.layers, 1, 8, 2, 16, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=r"generation \(a KV cache\) does not run under context parallelism; "
                                          r"set parallel.cp=1"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)


# ----------------------------------------------------------------------------- attention across ranks

B, T, HEADS, KV_HEADS, HEAD_DIM = 2, 16, 4, 2, 8


def _reference(q, k, v, weights, documents=None):
    """One process: causal (and same-document) attention, its output and q/k/v gradients."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    mask = chunk_mask(0, T, documents) if documents is not None else None  # chunk 0 of length T: plain causal
    out = eager_attention(q, k, v, causal=True, mask=mask)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _cp_attention(q, k, v, weights, context, backend, documents=None):
    """This cp rank's share of the same computation, every tensor split like the tokens."""
    def split(t):
        return split_sequence(t, context.rank, context.size)

    q, k, v = (split(t).clone().requires_grad_() for t in (q, k, v))
    local_docs = split(documents) if documents is not None else None
    out = context_parallel_attention(q, k, v, context, backend, document_ids=local_docs)
    (out * split(weights)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _attention_worker(rank: int, world_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, HEADS, HEAD_DIM, generator=generator)
    k, v = (torch.randn(B, T, KV_HEADS, HEAD_DIM, generator=generator) for _ in range(2))
    weights = torch.randn(B, T, HEADS, HEAD_DIM, generator=generator)
    # ragged documents, different per sample, crossing chunk and rank boundaries
    documents = torch.tensor([[0] * 3 + [1] * 7 + [2] * 6, [0] * 9 + [1] * 1 + [2] * 6])
    groups = {4: dist.new_group([0, 1, 2, 3]), 2: [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]}
    errors = {}
    for size, group in groups.items():
        context = ContextParallel(group=group, rank=dist.get_rank(group), size=size)
        for backend, docs in (("torch", None), ("torch", documents), ("triton", None), ("triton", documents)):
            expected = [split_sequence(t, context.rank, size) for t in _reference(q, k, v, weights, docs)]
            got = _cp_attention(q, k, v, weights, context, backend, docs)
            name = f"cp{size} {backend}{' documents' if docs is not None else ''}"
            for what, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
                errors[f"{name} {what}"] = ((g - e).abs().max() / e.abs().max()).item()
    return errors


def test_attention_across_cp_ranks_matches_one_process():
    for errors in run_distributed(_attention_worker, 4):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e}"


# ----------------------------------------------------------------------------- training layouts

# name: (flavor, overrides); the world size decides dp.
CP_WORLD_2 = {"llama cp2": ("llama", ["parallel.cp=2"])}
CP_WORLD_4 = {
    "llama cp2 dp2 zero1": ("llama", ["parallel.cp=2", "parallel.zero1=true", f"checkpoint.interval={SAVED_STEP}"]),
    "gpt2 tp2 cp2 sequence-parallel": ("gpt2", ["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"]),
    "gpt2 cp2 pp2": ("gpt2", ["parallel.cp=2", "parallel.pp=2"]),
}
CP_WORLD_8 = {
    "llama tp2 cp2 pp2": ("llama", ["parallel.tp=2", "parallel.cp=2", "parallel.pp=2",
                                    f"checkpoint.interval={SAVED_STEP}"]),
}


def _train_cp_layouts(rank: int, world_size: int, root: str, runs: dict) -> dict:
    out = {}
    for name, (flavor, overrides) in runs.items():
        cfg = _config(root, name, flavor, overrides)
        dims = setup_dims(cfg)
        result = _train(cfg, dims)
        # cp ranks hold copies of the same parameters, like dp replicas: the merge checks they agree.
        result["coords"] = (dims.tp_rank, dims.pp_rank, dims.dp_rank * dims.cp + dims.cp_rank)
        out[name] = result
    return out


def _check_runs(runs: dict, results: list[dict], root: str, references: dict) -> None:
    for name, (flavor, _) in runs.items():
        _check_against_reference(name, flavor, [r[name] for r in results], root, references)


def test_cp_layouts_match_single_process(references, tmp_path):
    root = str(tmp_path)
    for world_size, runs in ((2, CP_WORLD_2), (4, CP_WORLD_4)):
        _check_runs(runs, run_distributed(_train_cp_layouts, world_size, root, runs), root, references)
    # Checkpoints do not depend on cp: the cp=2 (ZeRO-1 over dp x cp) save resumes in one process.
    _check_resumed_in_one_process(root, "llama cp2 dp2 zero1", "llama", references)


def test_cp_with_tp_and_pp_on_eight_ranks_matches_single_process(references, tmp_path):
    root = str(tmp_path)
    _check_runs(CP_WORLD_8, run_distributed(_train_cp_layouts, 8, root, CP_WORLD_8), root, references)
    _check_resumed_in_one_process(root, "llama tp2 cp2 pp2", "llama", references)


def _check_resumed_in_one_process(root: str, source: str, flavor: str, references: dict) -> None:
    name = f"{source} resumed at cp1"
    load = _checkpoint_dir(root, source) / iteration_dir_name(SAVED_STEP)
    cfg = _config(root, name, flavor, [f"checkpoint.load={load}"])
    single = _train(cfg, None)
    _check_against_reference(name, flavor, [single], root, references, SAVED_STEP + 1)
    # The RNG streams belong to the saving world's ranks: another cp degree starts fresh ones.
    loaded = load_checkpoint(load, [GPT(cfg.model)], ParallelDims.single())
    assert loaded["iteration"] == SAVED_STEP and not loaded["rng_restored"]


# ----------------------------------------------------------------------------- document masks, trained

DOCUMENT_LAYOUTS = {  # world size -> name: (flavor, overrides); (tp, cp, pp, dp) in the name
    2: {"llama cp2 documents": ("llama", ["parallel.cp=2"]),
        # the Triton kernel (interpreted) against the torch backend's single process
        "llama cp2 documents triton": ("llama", ["parallel.cp=2", "model.attention_backend=triton"])},
    4: {"llama tp2 cp2 sequence-parallel documents": ("llama", ["parallel.tp=2", "parallel.cp=2",
                                                                "parallel.sequence_parallel=true"]),
        "gpt2 cp2 pp2 documents": ("gpt2", ["parallel.cp=2", "parallel.pp=2"])},
}


def _train_with_documents(root: str, name: str, flavor: str, overrides: list[str], distributed: bool) -> dict:
    """A document-masked run (the packed rows of tests/model/test_document_mask.py) with its losses,
    gradient norms and final parameters."""
    import functools
    import json
    from pathlib import Path

    from megatron_lite.config import load_config
    from megatron_lite.parallel.layout import layout_of
    from megatron_lite.training.trainer import LanguageModelTask, Trainer
    from tests.model import test_document_mask as packed

    log_dir = Path(root) / name.replace(" ", "_")
    cfg = load_config(None, packed.BASE + packed.FLAVORS[flavor] + overrides + [f"log.dir={log_dir}"])
    dims = setup_dims(cfg) if distributed else None
    trainer = Trainer(cfg, dims, datasets=packed._datasets(),
                      task=functools.partial(LanguageModelTask, eod_id=packed.EOD))
    result = trainer.train()
    d = trainer.dims
    metrics = map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines())
    return {"coords": (d.tp_rank, d.pp_rank, d.dp_rank * d.cp + d.cp_rank), "losses": result.losses,
            "val": result.val_losses[-1][1], "grad_norms": [r["grad_norm"] for r in metrics if "grad_norm" in r],
            "params": {n: (p.detach().clone(), layout_of(p)) for n, p in trainer.model.named_params}}


def _train_document_layouts(rank: int, world_size: int, root: str) -> dict:
    return {name: _train_with_documents(root, name, flavor, overrides, True)
            for name, (flavor, overrides) in DOCUMENT_LAYOUTS[world_size].items()}


def test_document_masks_under_cp_train_like_one_process(tmp_path):
    from tests.parallel.test_parity import _merged_params

    root = str(tmp_path)
    singles = {flavor: _train_with_documents(root, f"{flavor} single", flavor, [], False)
               for flavor in ("gpt2", "llama")}
    for world_size, runs in DOCUMENT_LAYOUTS.items():
        results = run_distributed(_train_document_layouts, world_size, root)
        for name, (flavor, _) in runs.items():
            single, per_rank = singles[flavor], [r[name] for r in results]
            for got in per_rank:
                torch.testing.assert_close(got["losses"], single["losses"], rtol=1e-5, atol=0, msg=name)
                assert abs(got["val"] - single["val"]) / single["val"] < 1e-5, name
            norms = per_rank[0]["grad_norms"]
            assert len(norms) == len(single["grad_norms"]) > 0, name
            # the first step's gradients come from identical weights: fp32 rounding only
            assert abs(norms[0] - single["grad_norms"][0]) / single["grad_norms"][0] < 1e-5, name
            torch.testing.assert_close(norms, single["grad_norms"], rtol=1e-3, atol=0, msg=name)
            _assert_same_model(_merged_params(per_rank), {n: t for n, (t, _) in single["params"].items()}, name)


def _assert_same_model(merged: dict, expected: dict, name: str) -> None:
    """The model as a whole to 1e-5 relative, each element to a hundredth of one Adam step (lr
    1e-2). Not each tensor to 1e-5: biases start at zero, and in so small a tensor the elements
    whose gradient nearly cancels move by rounding noise that Adam's normalisation enlarges."""
    from megatron_lite.training.checkpoint import TIED_COPIES

    for copy in set(merged) - set(expected):  # the last stage's copy of a tied embedding
        torch.testing.assert_close(merged.pop(copy), merged[TIED_COPIES[copy]], rtol=1e-6, atol=1e-7,
                                   msg=f"{name}: {copy}")
    assert set(merged) == set(expected), name
    difference = sum(((merged[n] - expected[n]) ** 2).sum() for n in expected) ** 0.5
    size = sum((t ** 2).sum() for t in expected.values()) ** 0.5
    assert difference / size < 1e-5, f"{name}: parameters differ by {difference / size:.2e} relative"
    for param_name, tensor in expected.items():
        torch.testing.assert_close(merged[param_name], tensor, rtol=0, atol=1e-4,
                                   msg=lambda detail: f"{name}: {param_name}\n{detail}")
