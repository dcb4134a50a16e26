"""The kernel registry: backend probes, the start-up check, and the functions behind each backend name."""

import sys
import types

import pytest
import torch

from megatron_lite.kernels import backends, reference


def test_triton_runs_here_under_the_interpreter_or_a_gpu():
    assert backends.triton_available()
    assert backends.availability()["triton"] is True


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
    apex_layer_norm, apex_rms_norm = backends.function("layer_norm", "apex"), backends.function("rms_norm", "apex")
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
    backends.require_backend("attention", "flash_attn")
    fn = backends.function("attention", "flash_attn")
    q, k = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8)
    fn(q, k, k, causal=True, softmax_scale=0.5)
    assert seen == {"shapes": (q.shape, k.shape), "scale": 0.5, "causal": True}


def test_torch_attention_backend_matches_the_reference():
    q = torch.randn(2, 11, 4, 16, dtype=torch.float64)
    k, v = torch.randn(2, 11, 2, 16, dtype=torch.float64), torch.randn(2, 11, 2, 16, dtype=torch.float64)
    sdpa = backends.function("attention", "torch")
    for causal in (True, False):
        torch.testing.assert_close(sdpa(q, k, v, causal, 0.2), reference.flash_attention(q, k, v, causal, 0.2))


def test_backend_functions_by_name():
    from megatron_lite.kernels import eager, flash_attention, layer_norm, rms_norm

    assert backends.function("attention", "triton") is flash_attention
    assert (backends.function("layer_norm", "triton"), backends.function("rms_norm", "triton")) == (layer_norm, rms_norm)
    # The torch backend is what the model ran before the registry: PyTorch's own ops.
    assert (backends.function("layer_norm", "torch"), backends.function("rms_norm", "torch")) == (eager.layer_norm,
                                                                                                  eager.rms_norm)
    assert backends.function("swiglu", "torch") is reference.swiglu


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


def test_config_choices_are_the_registry_keys():
    from megatron_lite.config import ModelConfig

    assert backends.choices("attention") == tuple(backends.OPS["attention"]) == ("torch", "triton", "flash_attn")
    assert backends.choices("norm") == tuple(backends.OPS["layer_norm"]) == tuple(backends.OPS["rms_norm"])
    assert backends.choices("loss") == tuple(backends.OPS["cross_entropy"])
    assert backends.choices("elementwise") == tuple(backends.OPS["swiglu"]) == tuple(backends.OPS["rope"])
    assert sorted(op for ops in backends.KINDS.values() for op in ops) == sorted(backends.OPS)
    for kind in backends.KINDS:
        for name in backends.choices(kind):
            ModelConfig(**{f"{kind}_backend": name})  # every registry name is a valid setting
        with pytest.raises(ValueError, match=f"model.{kind}_backend='nope' is not one of "
                                             f"{', '.join(backends.choices(kind))}"):
            ModelConfig(**{f"{kind}_backend": "nope"})


def test_every_entry_resolves_or_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    for op, entries in backends.OPS.items():
        for name in entries:
            if name == "flash_attn":
                with pytest.raises(backends.BackendUnavailableError, match="flash_attn.flash_attn_func cannot be imported"):
                    backends.function(op, name)
            else:
                assert callable(backends.function(op, name))


def test_describe_lists_every_op_and_marks_the_chosen_backend(monkeypatch):
    from megatron_lite.config import ModelConfig

    monkeypatch.setattr(backends, "flash_attn_available", lambda: False)
    monkeypatch.setattr(backends, "apex_available", lambda: False)
    lines = backends.describe(ModelConfig(norm_backend="triton")).splitlines()
    assert [line.split(":")[0] for line in lines] == list(backends.OPS)
    assert lines[0] == "attention: torch (chosen), triton, flash_attn (unavailable)"
    assert lines[1] == "layer_norm: torch, triton (chosen), apex (unavailable)"
    assert "(chosen)" not in backends.describe()


@pytest.mark.parametrize("op,name,message", [
    ("rms_norm", "flash_attn", "unknown rms_norm backend 'flash_attn'; use one of torch, triton, apex"),
    ("rope", "apex", "unknown rope backend 'apex'; use one of torch, triton"),
    ("softmax", "torch", "unknown kernel op 'softmax'; use one of attention, layer_norm, rms_norm, cross_entropy, "
                         "swiglu, rope"),
])
def test_unknown_op_or_backend_names_the_choices(op, name, message):
    with pytest.raises(ValueError, match=message):
        backends.function(op, name)
