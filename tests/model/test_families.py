"""The fields of today's families: RoPE scaling, q/k/v biases, per-head q/k norm, head_dim.

Each against transformers or a hand-written reference; the tensor-parallel checks are in
test_families_parallel.py, whole converted models in tests/convert/test_families_hf.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_lite.config import FLAVOR_PRESETS, ConfigError, ModelConfig, RopeScaling, load_config
from megatron_lite.model.generation import generate
from megatron_lite.model.gpt import GPT, flops_per_token, num_parameters, rope_tables
from megatron_lite.model.rope import inverse_frequencies
from megatron_lite.parallel.layout import layout_of

TINY = dict(num_layers=2, hidden_size=32, num_heads=4, seq_length=32, vocab_size=50, make_vocab_size_divisible_by=16)
LLAMA3 = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=64)
SCALINGS = {
    "linear": dict(type="linear", factor=4.0),
    "llama3": LLAMA3,
    "yarn": YARN,
    "yarn-mscale": dict(YARN, beta_fast=16.0, beta_slow=2.0, mscale=0.8, mscale_all_dim=0.5),
    "yarn-attention-factor": dict(YARN, attention_factor=1.25),
}


def _transformers_rope(scaling: dict, head_dim: int, theta: float):
    params = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=256,
                         rope_parameters=dict(params, rope_theta=theta))
    return ROPE_INIT_FUNCTIONS[params["rope_type"]](config)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("head_dim", [64, 24])
def test_scaled_inverse_frequencies_are_transformers_to_the_bit(name, head_dim):
    expected, expected_factor = _transformers_rope(SCALINGS[name], head_dim, 500000.0)
    inv_freq, factor = inverse_frequencies(head_dim, 500000.0, RopeScaling(**SCALINGS[name]))
    assert torch.equal(inv_freq, expected) and factor == pytest.approx(expected_factor, rel=1e-15)
    plain, _ = inverse_frequencies(head_dim, 500000.0)
    assert not torch.equal(inv_freq, plain), "scaling changes the frequencies"


def test_scalings_by_hand():
    plain, _ = inverse_frequencies(64, 10000.0)
    assert torch.allclose(plain.double(), 10000.0 ** -(torch.arange(0, 64, 2).double() / 64), rtol=1e-6)
    linear, _ = inverse_frequencies(64, 10000.0, RopeScaling(type="linear", factor=4.0))
    assert torch.equal(linear, plain / 4.0)
    llama3, _ = inverse_frequencies(64, 10000.0, RopeScaling(**LLAMA3))
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 64 / 4.0, wavelength > 64 / 1.0
    assert short.any() and long.any() and (~short & ~long).any()  # all three bands present
    assert torch.equal(llama3[short], plain[short]) and torch.equal(llama3[long], plain[long] / 8.0)
    middle = ~short & ~long
    assert ((llama3[middle] < plain[middle]) & (llama3[middle] > plain[middle] / 8.0)).all()
    _, factor = inverse_frequencies(64, 10000.0, RopeScaling(**YARN))
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_yarn_attention_factor_scales_the_tables():
    positions = torch.arange(10).unsqueeze(0)
    scaling = RopeScaling(**SCALINGS["yarn-attention-factor"])
    cos, sin = rope_tables(positions, 24, 10000.0, scaling)
    inv_freq, _ = inverse_frequencies(24, 10000.0, scaling)
    angles = positions[0, :, None].float() * inv_freq
    assert cos.shape == (1, 10, 1, 24)
    assert torch.equal(cos[0, :, 0], torch.cat([angles, angles], -1).cos() * 1.25)
    assert torch.equal(sin[0, :, 0, :12], angles.sin() * 1.25)


def test_rope_scaling_from_yaml_and_round_trip():
    cfg = load_config(None, ["model.flavor=llama", "model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 1, "
                                                   "high_freq_factor: 4, original_max_position_embeddings: 64}"])
    assert cfg.model.rope_scaling == RopeScaling(**LLAMA3)
    assert ModelConfig(**{**cfg.to_dict()["model"]}) == cfg.model  # saved as a mapping, read back the same
    assert load_config(None, ["model.flavor=llama", "model.rope_scaling=null"]).model.rope_scaling is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.rope_scaling={type: dynamic, factor: 2}"],
         r"model.rope_scaling.type='dynamic' is not one of linear, llama3, yarn"),
        (["model.rope_scaling={type: linear, factor: 2, fator: 3}"],
         r"unknown key 'model.rope_scaling.fator'; did you mean 'factor'\?"),
        (["model.rope_scaling={type: linear, factor: 2, beta_fast: 3}"],
         r"model.rope_scaling.beta_fast does not apply to type=linear; linear takes factor"),
        (["model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 1, high_freq_factor: 4}"],
         r"model.rope_scaling.original_max_position_embeddings is required for type=llama3"),
        (["model.rope_scaling={type: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 1, "
          "original_max_position_embeddings: 64}"],
         r"needs 0 < low_freq_factor < high_freq_factor, got 4.0 and 1.0"),
        (["model.rope_scaling={type: yarn, factor: 4}"],
         r"model.rope_scaling.original_max_position_embeddings is required for type=yarn"),
        (["model.rope_scaling={type: linear, factor: 0.5}"], r"model.rope_scaling.factor must be >= 1, got 0.5"),
        (["model.flavor=gpt2", "model.rope_scaling={type: linear, factor: 2}"],
         r"model.rope_scaling scales rotary embeddings, but model.position_embedding='learned'; "
         r"set position_embedding=rope or rope_scaling=null"),
        (["model.head_dim=0"], r"model.head_dim must be positive \(or null\), got 0"),
        (["model.head_dim=15"], r"the head dim \(model.head_dim = 15\) is odd"),
        (["model.hidden_size=30", "model.num_heads=4"],
         r"hidden_size=30 is not divisible by model.num_heads=4; .* or set model.head_dim"),
        (["model.flavor=qwen4"], r"model.flavor='qwen4' is not one of gpt2, llama, mistral, qwen2, qwen3"),
    ],
)
def test_bad_family_fields_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.flavor=llama", *overrides])


def test_family_presets_are_llama_plus_fields():
    assert FLAVOR_PRESETS["mistral"] == FLAVOR_PRESETS["llama"]
    assert FLAVOR_PRESETS["qwen2"] == dict(FLAVOR_PRESETS["llama"], qkv_bias=True)
    assert FLAVOR_PRESETS["qwen3"] == dict(FLAVOR_PRESETS["llama"], qk_norm=True)
    llama = ModelConfig(flavor="llama", **TINY)
    assert (llama.qkv_bias, llama.qk_norm, llama.head_dim, llama.rope_scaling) == (False, False, 8, None)
    qwen3 = ModelConfig(flavor="qwen3", qkv_bias=True, **TINY)
    assert (qwen3.qkv_bias, qwen3.qk_norm) == (True, True) and qwen3.differs_from_preset() == ["qkv_bias"]
    assert ModelConfig(flavor="qwen2", **TINY).differs_from_preset() == []


def _qwen3_like(**fields) -> ModelConfig:
    return ModelConfig(**{**TINY, **dict(flavor="qwen3", num_kv_heads=2, head_dim=24, qkv_bias=True, init_std=0.2),
                          **fields})


def test_head_dim_sizes_every_projection_and_the_counts():
    cfg = _qwen3_like()
    model = GPT(cfg)
    params = dict(model.named_parameters())
    assert params["layers.0.attention.qkv.weight"].shape == ((4 + 2 * 2) * 24, 32)
    assert params["layers.0.attention.qkv.bias"].shape == ((4 + 2 * 2) * 24,)
    assert params["layers.0.attention.proj.weight"].shape == (32, 4 * 24)
    assert model.layers["0"].attention.proj.bias is None and model.layers["0"].mlp.fc.bias is None
    assert params["layers.0.attention.q_norm.weight"].shape == (24,) == params["layers.0.attention.k_norm.weight"].shape
    assert layout_of(params["layers.0.attention.q_norm.weight"]).partial_over_tp
    assert sum(p.numel() for p in params.values()) == num_parameters(cfg, 64)
    plain = ModelConfig(**{**TINY, "flavor": "llama", "num_kv_heads": 2})
    # attention scores grow with num_heads x head_dim: 4 x 24 against 4 x 8
    attention = 12 * 2 * 4 * 32
    assert flops_per_token(cfg, 32) - flops_per_token(plain, 32) == pytest.approx(
        6 * (num_parameters(cfg, 64) - num_parameters(plain, 64)) + attention * (24 - 8))


def _hand_attention(model: GPT, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer 0's attention written out: separate q/k/v with biases, per-head RMSNorm, RoPE, softmax."""
    cfg, attention = model.config, model.layers["0"].attention
    B, T, _ = x.shape
    w, b = attention.qkv.weight.view(2, 4, 24, 32), attention.qkv.bias.view(2, 4, 24)  # [q, q, k, v] per kv group
    q = torch.einsum("bth,gqdh->btgqd", x, w[:, :2]) + b[:, :2]  # (B, T, 2, 2, hd)
    k = torch.einsum("bth,gdh->btgd", x, w[:, 2]) + b[:, 2]
    v = torch.einsum("bth,gdh->btgd", x, w[:, 3]) + b[:, 3]

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    q, k = rms(q.reshape(B, T, 4, 24), attention.q_norm.weight), rms(k, attention.k_norm.weight)
    cos, sin = rope_tables(positions, 24, cfg.rope_theta, cfg.rope_scaling)

    def rotate(t):
        half = torch.cat([-t[..., 12:], t[..., :12]], -1)
        return t * cos + half * sin

    q, k = rotate(q), rotate(k).repeat_interleave(2, dim=2)  # each kv head serves its 2 query heads
    v = v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(24)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, T, 96)
    return y @ attention.proj.weight.t()


def test_attention_with_every_new_field_equals_the_hand_written_one():
    cfg = _qwen3_like(rope_scaling=dict(YARN, original_max_position_embeddings=8, factor=2.0))
    model = GPT(cfg, seed=5)
    with torch.no_grad():
        for name in ("q_norm", "k_norm"):  # off their initial ones
            getattr(model.layers["0"].attention, name).weight.uniform_(0.5, 1.5)
        model.layers["0"].attention.qkv.bias.normal_()
    x = torch.randn(2, 10, 32)
    positions = torch.arange(10).expand(2, -1)
    cos_sin = rope_tables(positions, 24, cfg.rope_theta, cfg.rope_scaling)
    with torch.no_grad():
        ours = model.layers["0"].attention(x, cos_sin)
        expected = _hand_attention(model, x, positions)
    assert (ours - expected).abs().max() < 1e-5 and expected.std() > 0.1


def test_cached_greedy_generation_with_head_dim_and_scaling_equals_the_full_forward():
    cfg = _qwen3_like(rope_scaling=SCALINGS["linear"])
    model = GPT(cfg, seed=3).eval()
    prompts = [[1, 2, 3, 4, 5], [9], [20, 21, 22]]
    out = generate(model, prompts, max_new_tokens=6, temperature=0)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = list(prompt)
            for _ in range(6):
                tokens.append(int(model(torch.tensor([tokens]))[0, -1, :50].argmax()))
            expected.append(tokens[len(prompt):])
    assert out == expected and len(set(map(tuple, out))) > 1


TRITON_CHECK = textwrap.dedent("""
    import torch
    from megatron_lite.config import ModelConfig
    from megatron_lite.model.gpt import GPT

    fields = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=24, seq_length=16,
                  vocab_size=50, make_vocab_size_divisible_by=16, flavor="qwen3", qkv_bias=True, init_std=0.2,
                  rope_scaling=dict(type="yarn", factor=2.0, original_max_position_embeddings=8))
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("torch", "triton"):
        model = GPT(ModelConfig(**fields, attention_backend=backend, norm_backend=backend,
                                elementwise_backend=backend), seed=4)
        loss = model(ids, labels=ids).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_t, grads_t), (loss_k, grads_k) = results
    assert abs(loss_t - loss_k) < 1e-5, (loss_t, loss_k)
    for name, grad in grads_t.items():
        assert (grad - grads_k[name]).abs().max() < 1e-4 * max(1.0, grad.abs().max()), name
    print("same", float(loss_t))
""")


def test_triton_kernels_run_head_dim_24_qk_norm_and_scaled_tables():
    """Attention with a head dim that is not a power of two (masked), the rope kernel on yarn's
    scaled tables, the rms-norm kernel over heads: forward and backward equal the torch backend."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]
