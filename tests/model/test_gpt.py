import importlib
import sys

import pytest
import torch

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.kernels import backends
from megatron_lite.model.gpt import GPT, flops_per_token, num_parameters
from megatron_lite.parallel.layout import ParamLayout, layout_of


def tiny(flavor: str, **overrides) -> ModelConfig:
    values = dict(
        flavor=flavor, num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=50,
        make_vocab_size_divisible_by=16,
    )
    if flavor == "llama":
        values["num_kv_heads"] = 2
    values.update(overrides)
    return ModelConfig(**values)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_forward_shapes_and_parameter_count(flavor):
    cfg = tiny(flavor)
    model = GPT(cfg)
    ids = torch.randint(0, 50, (3, 10))
    assert model.padded_vocab_size == 64
    assert model(ids).shape == (3, 10, 64)
    loss = model(ids, labels=ids)
    assert loss.shape == (3, 10) and loss.dtype == torch.float32
    # Near-uniform predictions at init: about log(vocab).
    assert abs(loss.mean().item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    assert sum(p.numel() for p in model.parameters()) == num_parameters(cfg, 64)
    for p in model.parameters():
        assert isinstance(getattr(p, "param_layout", None), ParamLayout) and layout_of(p).partition_chunks >= 1


def test_tie_embeddings_shares_the_head():
    gpt2 = GPT(tiny("gpt2"))
    assert gpt2.output is None and "output.weight" not in dict(gpt2.named_parameters())
    llama = GPT(tiny("llama", tie_embeddings=True))
    assert llama.output is None
    untied = GPT(tiny("gpt2", tie_embeddings=False))
    assert untied.output.weight.shape == (64, 32)
    assert not torch.equal(untied.output.weight, untied.embedding.word.weight)


def test_initialization_rules():
    cfg = tiny("gpt2", num_layers=8, hidden_size=64)
    model = GPT(cfg, seed=7)
    params = dict(model.named_parameters())
    word = params["embedding.word.weight"]
    assert torch.all(word[50:] == 0), "padding rows start at zero"
    assert abs(word[:50].std().item() - 0.02) < 0.003
    residual_std = 0.02 / (2 * 8) ** 0.5
    assert abs(params["layers.3.mlp.proj.weight"].std().item() - residual_std) < 0.2 * residual_std
    assert abs(params["layers.3.mlp.fc.weight"].std().item() - 0.02) < 0.002
    assert torch.all(params["layers.0.attention.qkv.bias"] == 0)
    assert torch.all(params["final_norm.weight"] == 1) and torch.all(params["final_norm.bias"] == 0)
    again = dict(GPT(cfg, seed=7).named_parameters())
    other = dict(GPT(cfg, seed=8).named_parameters())
    assert all(torch.equal(params[n], again[n]) for n in params)
    assert not torch.equal(params["layers.0.mlp.fc.weight"], other["layers.0.mlp.fc.weight"])


def test_init_is_independent_of_vocab_padding():
    small = dict(GPT(tiny("llama", make_vocab_size_divisible_by=8)).named_parameters())
    large = dict(GPT(tiny("llama", make_vocab_size_divisible_by=128)).named_parameters())
    assert small["embedding.word.weight"].shape[0] == 56 and large["embedding.word.weight"].shape[0] == 128
    assert torch.equal(small["embedding.word.weight"][:50], large["embedding.word.weight"][:50])
    assert torch.equal(small["output.weight"][:50], large["output.weight"][:50])
    assert torch.equal(small["layers.1.attention.qkv.weight"], large["layers.1.attention.qkv.weight"])


def test_pipeline_chunks_use_global_names_and_match_the_whole_model():
    cfg = tiny("gpt2", num_layers=4)
    whole = GPT(cfg)
    first = GPT(cfg, layer_range=range(0, 2), post_process=False)
    last = GPT(cfg, layer_range=range(2, 4), pre_process=False)
    assert "layers.3.mlp.fc.weight" in dict(last.named_parameters())
    assert layout_of(last.output.weight).tied_embedding and layout_of(first.embedding.word.weight).tied_embedding
    assert torch.equal(last.output.weight, whole.embedding.word.weight)
    assert [p is first.embedding.word.weight for p in first.tied_embedding_params()] == [True]
    assert [p is last.output.weight for p in last.tied_embedding_params()] == [True]
    assert whole.tied_embedding_params() == []
    ids = torch.randint(0, 50, (2, 8))
    hidden = first(ids)
    assert hidden.shape == (2, 8, 32)
    torch.testing.assert_close(last(hidden, labels=ids), whole(ids, labels=ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_tiny_model_overfits_one_batch(flavor):
    torch.manual_seed(0)
    model = GPT(tiny(flavor))
    ids = torch.randint(0, 50, (2, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_loss_ignores_padding_columns_and_ignore_index():
    model = GPT(tiny("gpt2"))
    ids = torch.randint(0, 50, (2, 6))
    logits = model(ids)
    reference = torch.nn.functional.cross_entropy(logits[..., :50].reshape(-1, 50), ids.reshape(-1), reduction="none")
    labels = ids.clone()
    labels[0, 0] = -100
    loss = model(ids, labels=labels)
    torch.testing.assert_close(loss.reshape(-1)[1:], reference[1:])
    assert loss[0, 0] == 0


def test_dropout_is_active_only_in_training():
    model = GPT(tiny("gpt2", dropout=0.5))
    ids = torch.randint(0, 50, (2, 8))
    model.eval()
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_flops_per_token():
    cfg = tiny("gpt2", vocab_size=64)
    matmul_params = num_parameters(cfg, 64) - 16 * 32  # the position table is no matmul
    assert flops_per_token(cfg, 16) == 6 * matmul_params + 12 * 2 * 32 * 16


def test_model_errors_name_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="vocab_size must be > 0"):
        GPT(tiny("gpt2", vocab_size=0))
    with pytest.raises(ValueError, match="outside the model's 2 layers"):
        GPT(tiny("gpt2"), layer_range=range(1, 3))
    # Pretend the optional packages are absent, whatever this machine has installed.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setattr(backends, "flash_attn_available", lambda: False)
    monkeypatch.setattr(backends, "apex_available", lambda: False)
    with pytest.raises(ConfigError, match="model.attention_backend=flash_attn .*flash.attn.*torch"):
        GPT(tiny("llama", attention_backend="flash_attn"))
    with pytest.raises(ConfigError, match="model.norm_backend=apex .*apex.*torch"):
        GPT(tiny("llama", norm_backend="apex"))
    monkeypatch.setattr(backends, "flash_attn_available", lambda: True)  # the package's check alone is not enough
    with pytest.raises(ConfigError, match="model.attention_backend=flash_attn is not available: flash_attn with"):
        GPT(tiny("llama", attention_backend="flash_attn"))
    with pytest.raises(ConfigError, match="model.attention_backend=triton has no attention dropout; set model.dropout=0"):
        GPT(tiny("llama", attention_backend="triton", dropout=0.1))


def test_triton_backend_error_when_kernels_lack_the_op(monkeypatch):
    from megatron_lite.kernels import attention, elementwise, layernorm

    loss_kernels = importlib.import_module("megatron_lite.kernels.cross_entropy")  # not the function of that name
    monkeypatch.delattr(attention, "flash_attention")
    monkeypatch.delattr(layernorm, "rms_norm")
    monkeypatch.delattr(loss_kernels, "vocab_parallel_cross_entropy")
    monkeypatch.delattr(elementwise, "apply_rotary")
    with pytest.raises(ConfigError, match="model.attention_backend=triton is not available.*flash_attention"):
        GPT(tiny("llama", attention_backend="triton"))
    with pytest.raises(ConfigError, match="model.norm_backend=triton is not available.*rms_norm"):
        GPT(tiny("llama", norm_backend="triton"))
    with pytest.raises(ConfigError, match="model.loss_backend=triton is not available.*vocab_parallel_cross_entropy"):
        GPT(tiny("llama", loss_backend="triton"))
    with pytest.raises(ConfigError, match="model.elementwise_backend=triton is not available.*swiglu, apply_rotary"):
        GPT(tiny("llama", elementwise_backend="triton"))


def test_triton_backends_match_torch_through_the_model():
    # Runs under the Triton interpreter on CPU (tests/conftest.py), on the GPU when there is one.
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 16))
    losses, grads = [], []
    for backend in ("torch", "triton"):
        model = GPT(tiny("llama", attention_backend=backend, norm_backend=backend, loss_backend=backend,
                         elementwise_backend=backend))
        loss = model(ids, labels=ids)
        loss.sum().backward()
        losses.append(loss)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_building_a_model_leaves_the_default_generator_untouched(flavor):
    torch.manual_seed(11)
    before = torch.get_rng_state()
    GPT(tiny(flavor, dropout=0.1), seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_draws_from_the_model_streams_not_the_default_generator():
    ids = torch.randint(0, 50, (2, 8))
    outputs = []
    for default_seed in (0, 1):
        torch.manual_seed(default_seed)
        model = GPT(tiny("gpt2", dropout=0.5), seed=5).train()
        outputs.append(model(ids))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
