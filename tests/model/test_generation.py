import pytest
import torch

from megatron_lite.config import ModelConfig, ParallelConfig
from megatron_lite.model.generation import KVCache, generate, sample
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.pipeline import my_layer_ranges
from tests.distributed import run_distributed


def tiny_model(flavor: str) -> GPT:
    cfg = ModelConfig(
        flavor=flavor, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2 if flavor == "llama" else None,
        seq_length=32, vocab_size=40, make_vocab_size_divisible_by=16, init_std=0.2,
    )
    return GPT(cfg, seed=3)


def greedy_without_cache(model: GPT, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([tokens]))[0, -1, :40]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_cached_batched_greedy_equals_cache_free_forward(flavor):
    model = tiny_model(flavor).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [20, 21, 22]]
    out = generate(model, prompts, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        expected = [greedy_without_cache(model, p, 8) for p in prompts]
    assert out == expected
    assert len(set(map(tuple, out))) > 1  # the rows really differ


def test_padding_logits_are_never_sampled():
    model = tiny_model("gpt2")
    with torch.no_grad():
        # Make every padding column the largest logit by far.
        model.embedding.word.weight[40:] = 5 * model.embedding.word.weight[:8].sign()
    prompts = [[1, 2], [3]]
    assert model(torch.tensor([[1, 2]]))[0, -1].argmax() >= 40
    for temperature, top_k, top_p in [(0, 0, 1.0), (1.0, 0, 1.0), (2.0, 5, 1.0), (1.0, 0, 0.9)]:
        out = generate(model, prompts, 6, temperature=temperature, top_k=top_k, top_p=top_p, seed=1)
        assert all(0 <= t < 40 for row in out for t in row)


def test_stop_at_eod_and_seeded_sampling():
    model = tiny_model("llama")
    greedy = generate(model, [[5, 6]], 6, temperature=0)[0]
    eod = greedy[2]
    stopped = generate(model, [[5, 6], [7]], 6, temperature=0, eod_id=eod)
    assert stopped[0] == greedy[: greedy.index(eod) + 1]
    a = generate(model, [[5, 6]], 6, temperature=1.0, seed=11)
    b = generate(model, [[5, 6]], 6, temperature=1.0, seed=11)
    assert a == b and len(a[0]) == 6


def test_top_k_and_top_p_restrict_the_choice():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(200, 1)
    picked = set(sample(logits, 1.0, 2, 1.0, g).tolist())
    assert picked == {1, 2}
    probs = torch.softmax(logits[0], -1)  # 0.45, 0.41, then 0.1, ...: top_p=0.8 keeps two
    assert probs[1] + probs[2] > 0.8 > probs[1]
    assert set(sample(logits, 1.0, 0, 0.8, g).tolist()) == {1, 2}
    assert set(sample(logits, 1.0, 0, 0.3, g).tolist()) == {1}


def test_generate_errors():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="model.seq_length=32"):
        generate(model, [[1] * 30], 5)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 40\)"):
        generate(model, [[45]], 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 2)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        generate(model, [[1]], 2, top_p=0)
    first = GPT(model.config, layer_range=range(0, 1), post_process=False)
    with pytest.raises(ValueError, match="generate needs the whole model, or at pp > 1 one chunk per stage"):
        generate(first, [[1]], 2)


def test_generate_refuses_sequence_parallel_models():
    model = tiny_model("llama")
    sharded = GPT(model.config, ParallelDims(sequence_parallel=True))
    with pytest.raises(ValueError, match="does not run with sequence parallelism"):
        generate(sharded, [[1]], 2)


def test_cache_without_a_mask_is_causal_from_the_cached_positions():
    model = tiny_model("llama").eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    cfg = model.config
    cache = KVCache(model.layer_range, 1, 7, cfg.num_kv_heads, cfg.head_dim, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids)
        first = model(ids[:, :4], kv_cache=cache)
        rest = model(ids[:, 4:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, rtol=1e-5, atol=1e-5)


def _pipelined_generation(rank: int, world_size: int) -> list[list[int]]:
    reference = tiny_model("llama")
    dims = ParallelDims.initialize(ParallelConfig(pp=2))
    stage = GPT(reference.config, dims, my_layer_ranges(reference.config.num_layers, dims)[0],
                pre_process=dims.is_first_stage, post_process=dims.is_last_stage, seed=3)
    prompts = [[1, 2, 3], [4]]
    out = generate(stage, prompts, 5, temperature=0)
    assert out == generate(reference, prompts, 5, temperature=0)
    return out


def test_generation_through_a_pipeline_matches_one_model():
    """At pp=2 each token's hidden states go stage to stage through the pipeline's send and receive."""
    first, last = run_distributed(_pipelined_generation, 2)
    assert first == last and all(len(row) == 5 for row in first)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_each_step_builds_one_attention_bias_for_every_layer(flavor, monkeypatch):
    """The mask reaches attention as an additive bias in the queries' dtype, the same tensor in every
    layer of a step: nothing converts a boolean mask per layer."""
    from megatron_lite.model import ops

    model = tiny_model(flavor).eval()
    calls = []
    attention = ops.attention

    def recording(q, k, v, causal=True, backend="torch", dropout_p=0.0, mask=None, *args, **kwargs):
        calls.append((mask, q.dtype))
        return attention(q, k, v, causal, backend, dropout_p, mask, *args, **kwargs)

    monkeypatch.setattr(ops, "attention", recording)
    steps, layers = 5, model.config.num_layers
    generate(model, [[1, 2, 3], [4]], max_new_tokens=steps, temperature=0)
    assert len(calls) == steps * layers  # the prompt, then one forward per new token but the last
    for step in range(steps):
        masks = [mask for mask, _ in calls[step * layers : (step + 1) * layers]]
        assert all(mask is masks[0] for mask in masks)
        assert masks[0].dtype == calls[step * layers][1]
    assert len({id(mask) for mask, _ in calls}) == steps
    assert calls[0][0][0, 0].isneginf().any()  # the prompt's causal part and the short row's padding are hidden


def test_kv_cache_causal_mask_is_an_additive_bias():
    cache = KVCache(range(1), batch=1, max_length=8, kv_heads=1, head_dim=2, device="cpu", dtype=torch.float64)
    cache.length = 2
    bias = cache.causal_mask(3, "cpu")  # (1, 1, 3, 5)
    assert bias.dtype == torch.float64 and bias.shape == (1, 1, 3, 5)
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(bias[0, 0] == 0, expected) and bias[0, 0][~expected].isneginf().all()
# ----------------------------------------------------------------------------- compaction and length buckets

RAGGED = [[3], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [18, 19, 20]]


def _rows_per_forward(model: GPT) -> tuple[list[tuple[int, int, int]], object]:
    """Records (rows, new tokens, cached positions) of every forward of ``model``; returns the list
    and the hook handle."""
    shapes: list[tuple[int, int, int]] = []

    def record(module, args, kwargs):
        shapes.append((*args[0].shape[:2], kwargs["kv_cache"].length))

    return shapes, model.register_forward_pre_hook(record, with_kwargs=True)


def _an_eod_that_stops_some_rows_early(model: GPT, prompts, steps: int) -> int:
    """A token that some greedy answers emit before their last step and others never emit."""
    answers = generate(model, prompts, steps, temperature=0)
    for token in sorted({t for a in answers for t in a[:-2]}):
        if any(token not in a for a in answers):
            return token
    raise AssertionError("no token stops only some rows")


def test_finished_rows_leave_the_batch_and_answers_keep_the_callers_order():
    model = tiny_model("llama").eval()
    eod = _an_eod_that_stops_some_rows_early(model, RAGGED, 10)
    with torch.no_grad():
        expected = [greedy_without_cache(model, p, 10) for p in RAGGED]
    expected = [a[: a.index(eod) + 1] if eod in a else a for a in expected]

    shapes, handle = _rows_per_forward(model)
    compacted = generate(model, RAGGED, 10, temperature=0, eod_id=eod)
    handle.remove()
    assert compacted == expected
    decode_rows = [rows for rows, _, _ in shapes[1:]]
    assert shapes[0] == (5, 8, 0) and all(tokens == 1 for _, tokens, _ in shapes[1:])
    assert decode_rows == sorted(decode_rows, reverse=True) and decode_rows[-1] < 5  # rows only ever leave
    # Every forward row is a row still generating: the steps run equal the tokens emitted.
    assert sum(decode_rows) + 5 == sum(len(a) for a in expected)

    shapes, handle = _rows_per_forward(model)
    assert generate(model, RAGGED, 10, temperature=0, eod_id=eod, compact=False) == expected
    handle.remove()
    assert {rows for rows, _, _ in shapes} == {5} and sum(rows for rows, _, _ in shapes[1:]) > sum(decode_rows)


def test_length_buckets_cut_the_padding_and_restore_the_order():
    model = tiny_model("gpt2").eval()
    shapes, handle = _rows_per_forward(model)
    out = generate(model, RAGGED, 4, temperature=0, batch_size=2)
    handle.remove()
    prefills = [(rows, tokens) for rows, tokens, cached in shapes if cached == 0]
    assert prefills == [(2, 8), (2, 3), (1, 1)]  # lengths 8, 7 | 3, 2 | 1: 3 padding tokens instead of 19
    assert out == generate(model, RAGGED, 4, temperature=0)
    assert out == [generate(model, [p], 4, temperature=0)[0] for p in RAGGED]


def test_sampled_answers_do_not_depend_on_batching_or_compaction():
    model = tiny_model("llama")
    eod = _an_eod_that_stops_some_rows_early(model, RAGGED, 10)
    reference = generate(model, RAGGED, 10, temperature=1.0, eod_id=eod, seed=5, compact=False)
    for batch_size in (None, 1, 2, 3):
        assert generate(model, RAGGED, 10, temperature=1.0, eod_id=eod, seed=5, batch_size=batch_size) == reference
    assert generate(model, RAGGED, 10, temperature=1.0, eod_id=eod, seed=6) != reference
    assert len({tuple(a) for a in generate(model, [[4, 5]] * 8, 6, temperature=1.0, seed=5)}) > 1  # rows draw apart


def test_sampled_first_tokens_follow_the_softmax():
    model = tiny_model("gpt2").eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([[7, 8]]))[0, -1, :40].float() / 1.5, -1)
    draws = 4000
    first = [a[0] for a in generate(model, [[7, 8]] * draws, 1, temperature=1.5, seed=2)]
    counts = torch.bincount(torch.tensor(first), minlength=40).double()
    expected = probs.double() * draws
    seen = expected > 20  # a chi-square test on the tokens drawn often enough to count
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum().item()
    assert chi2 < 2 * int(seen.sum()) + 20, chi2  # far above the mean (degrees of freedom) only if skewed


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        generate(tiny_model("gpt2"), [[1]], 2, batch_size=0)


def _compacting_tp_pp_generation(rank: int, world_size: int) -> list[list[int]]:
    reference = tiny_model("llama")
    eod = _an_eod_that_stops_some_rows_early(reference, RAGGED, 10)
    dims = ParallelDims.initialize(ParallelConfig(tp=2, pp=2))
    stage = GPT(reference.config, dims, my_layer_ranges(reference.config.num_layers, dims)[0],
                pre_process=dims.is_first_stage, post_process=dims.is_last_stage, seed=3)
    results = []
    for temperature, batch_size in ((0.0, None), (1.0, 2)):
        out = generate(stage, RAGGED, 10, temperature=temperature, eod_id=eod, seed=4, batch_size=batch_size)
        assert out == generate(reference, RAGGED, 10, temperature=temperature, eod_id=eod, seed=4)
        results.append(out)
    assert any(len(a) < 10 for a in results[0])  # some rows really left early
    return results


def test_compaction_at_tp2_pp2_matches_one_model():
    """Every stage drops the rows the last stage's tokens finish, and the tp ranks agree."""
    outputs = run_distributed(_compacting_tp_pp_generation, 4)
    assert all(o == outputs[0] for o in outputs)


def test_padding_columns_leave_the_cache_with_the_longest_prompt():
    model = tiny_model("gpt2").eval()
    long, short = list(range(1, 11)), [11, 12]
    answers = generate(model, [long, short], 8, temperature=0)
    # An end-of-text the long prompt's answer emits early and the short one's never does.
    eod = next(t for t in answers[0][:4] if t not in answers[1])
    shapes, handle = _rows_per_forward(model)
    out = generate(model, [long, short], 8, temperature=0, eod_id=eod)
    handle.remove()
    assert out == [answers[0][: answers[0].index(eod) + 1], answers[1]]
    with torch.no_grad():
        assert out[1] == greedy_without_cache(model, short, 8)
    leaves = len(out[0])  # the decode step after the long row's last token
    cached = [c for _, _, c in shapes]
    assert cached[leaves] == cached[leaves - 1] + 1 - 8  # the 8 padding columns of the short row are gone
    assert [rows for rows, _, _ in shapes[leaves:]] == [1] * (len(shapes) - leaves)
