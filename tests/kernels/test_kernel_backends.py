"""Backend probes, the start-up check, and the functions behind each backend name."""

import sys
import types

import pytest
import torch

from megatron_lite.kernels import backends, reference


def test_triton_runs_here_under_the_interpreter_or_a_gpu():
    assert backends.triton_available()
    assert backends.describe()["triton"] is True


def test_triton_without_gpu_or_interpreter_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not backends.triton_available()
    with pytest.raises(backends.BackendUnavailableError,
                       match=r"model.attention_backend=triton but triton cannot run here: there is no CUDA GPU"):
        backends.require_backend("attention", "triton")
    with pytest.raises(backends.BackendUnavailableError,
                       match=r"model.loss_backend=triton but triton cannot run here: .* or use torch$"):
        backends.require_backend("loss", "triton")


def test_missing_flash_attn_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails as if not installed
    assert not backends.flash_attn_available()
    with pytest.raises(backends.BackendUnavailableError) as info:
        backends.require_backend("attention", "flash_attn")
    assert str(info.value) == ("model.attention_backend=flash_attn but flash_attn is not importable: "
                               "pip install flash-attn or use torch|triton")


def test_unrelated_apex_package_is_not_nvidia_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # the PyPI web package has no normalization
    monkeypatch.delitem(sys.modules, "apex.normalization", raising=False)
    assert not backends.apex_available()
    message = r"model.norm_backend=apex but NVIDIA apex .* or use torch\|triton"
    with pytest.raises(backends.BackendUnavailableError, match=message):
        backends.require_backend("norm", "apex")


def _fake_module(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_apex_norm_functions_call_the_fused_affine_ops(monkeypatch):
    calls = []
    apex = _fake_module(monkeypatch, "apex")
    apex.normalization = _fake_module(monkeypatch, "apex.normalization", FusedLayerNorm=object, FusedRMSNorm=object)
    apex.normalization.fused_layer_norm = _fake_module(
        monkeypatch, "apex.normalization.fused_layer_norm",
        fused_layer_norm_affine=lambda x, w, b, shape, eps: calls.append(("ln", b, tuple(shape), eps)) or x,
        fused_rms_norm_affine=lambda x, w, shape, eps: calls.append(("rms", None, tuple(shape), eps)) or x,
    )
    assert backends.apex_available()
    backends.require_backend("norm", "apex")
    apex_layer_norm, apex_rms_norm = backends.norm_functions("apex")
    x, w = torch.randn(2, 8), torch.ones(8)
    apex_layer_norm(x, w, None, 1e-5)
    apex_rms_norm(x, w, 1e-6)
    assert calls[0][0] == "ln" and torch.equal(calls[0][1], torch.zeros(8)) and calls[0][2:] == ((8,), 1e-5)
    assert calls[1] == ("rms", None, (8,), 1e-6)


def test_flash_attn_function_passes_layout_and_flags(monkeypatch):
    seen = {}

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        seen.update(shapes=(q.shape, k.shape), scale=softmax_scale, causal=causal)
        return q

    _fake_module(monkeypatch, "flash_attn", flash_attn_func=flash_attn_func)
    fn = backends.attention_function("flash_attn")
    q, k = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8)
    fn(q, k, k, causal=True, softmax_scale=0.5)
    assert seen == {"shapes": (q.shape, k.shape), "scale": 0.5, "causal": True}


def test_torch_attention_backend_matches_the_reference():
    q = torch.randn(2, 11, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, 11, 2, 16, dtype=torch.float64), torch.randn(2, 11, 2, 16, dtype=torch.float64)
    sdpa = backends.attention_function("torch")
    for causal in (True, False):
        torch.testing.assert_close(sdpa(q, k, v, causal, 0.2), reference.flash_attention(q, k, v, causal, 0.2))


def test_backend_functions_by_name():
    from megatron_lite.kernels import flash_attention, layer_norm, rms_norm

    assert backends.attention_function("triton") is flash_attention
    assert backends.norm_functions("triton") == (layer_norm, rms_norm)
    assert backends.norm_functions("torch") == (reference.layer_norm, reference.rms_norm)


@pytest.mark.parametrize("kind,name,message", [
    ("attention", "xformers", "unknown attention backend 'xformers'; use one of torch, triton, flash_attn"),
    ("norm", "flash_attn", "unknown norm backend 'flash_attn'; use one of torch, triton, apex"),
    ("loss", "apex", "unknown loss backend 'apex'; use one of torch, triton"),
    ("elementwise", "apex", "unknown elementwise backend 'apex'; use one of torch, triton"),
    ("mlp", "torch", "unknown backend kind 'mlp'; use one of attention, norm, loss, elementwise"),
])
def test_unknown_names_are_rejected(kind, name, message):
    with pytest.raises(ValueError, match=message):
        backends.require_backend(kind, name)
