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

    def recording(q, k, v, causal=True, backend="torch", dropout_p=0.0, mask=None):
        calls.append((mask, q.dtype))
        return attention(q, k, v, causal, backend, dropout_p, mask)

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
