import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.model.gpt import GPT
from megatron_lite.training import optim
from megatron_lite.training.checkpoint import named_parameters
from megatron_lite.training.optim import LossScaler, build_optimizer, torch_fused_adamw_supports

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16", "model.vocab_size=96"]


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_no_weight_decay_on_norms_biases_embeddings(flavor):
    cfg = load_config(None, TINY + [f"model.flavor={flavor}", "optim.weight_decay=0.1"])
    model = GPT(cfg.model)
    named = named_parameters([model])
    optimizer, _ = build_optimizer(named, cfg.optim, torch.device("cpu"))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(decay_of) == len(named)  # every parameter in exactly one group
    for name, param in named:
        no_decay = "norm" in name or name.endswith("bias") or name.startswith("embedding.")
        assert decay_of[id(param)] == (0.0 if no_decay else 0.1), name
    decayed = {n for n, p in named if decay_of[id(p)] > 0}
    assert "layers.0.attention.qkv.weight" in decayed and "layers.1.mlp.proj.weight" in decayed
    if flavor == "llama":
        assert "output.weight" in decayed  # an untied head is a projection, not a lookup table


def test_apex_requested_but_missing_is_an_error():
    cfg = load_config(None, TINY + ["optim.fused=apex"])
    named = named_parameters([GPT(cfg.model)])
    with pytest.raises(ConfigError, match="optim.fused=apex but apex.optimizers.FusedAdam is not importable"):
        build_optimizer(named, cfg.optim, torch.device("cpu"))


def test_loss_scaler_halves_on_overflow_and_grows_after_window():
    scaler = LossScaler(initial_scale=1024.0, window=3)
    scaler.update(found_inf=True)
    assert scaler.scale == 512.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 512.0
    scaler.update(False)
    assert scaler.scale == 1024.0  # a clean window doubles it
    scaler.update(False)
    scaler.update(True)  # an overflow restarts the window
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 512.0
    restored = LossScaler(initial_scale=1.0, window=3)
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.clean_steps) == (512.0, 2)
    constant = LossScaler(initial_scale=1024.0, dynamic=False)
    constant.update(True)
    assert constant.scale == 1.0


def test_torch_fused_adamw_is_chosen_where_torch_has_it():
    cfg = load_config(None, TINY)
    named = named_parameters([GPT(cfg.model)])
    cpu = torch.device("cpu")
    fused_on_cpu = torch_fused_adamw_supports(cpu, torch.float32)
    assert fused_on_cpu == (torch_version() >= (2, 4))  # torch 2.4 added the CPU kernel
    optimizer, kind = build_optimizer(named, cfg.optim, cpu)
    assert bool(optimizer.defaults["fused"]) == fused_on_cpu
    assert kind == ("torch AdamW (fused)" if fused_on_cpu else "torch AdamW")
    assert not torch_fused_adamw_supports(cpu, torch.complex64)  # torch's fused kernel takes real floats only
    assert not torch_fused_adamw_supports(cpu, torch.int64)  # no gradient at all


def test_no_fused_optimizer_when_switched_off():
    cfg = load_config(None, TINY + ["optim.fused=none"])
    optimizer, kind = build_optimizer(named_parameters([GPT(cfg.model)]), cfg.optim, torch.device("cpu"))
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is False and kind == "torch AdamW"


def test_torch_fused_requested_but_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(optim, "torch_fused_adamw_supports", lambda device, dtype: False)
    cfg = load_config(None, TINY + ["optim.fused=torch"])
    named = named_parameters([GPT(cfg.model)])
    with pytest.raises(ConfigError, match=r"optim.fused=torch but torch .* has no fused AdamW for \[torch.float32\] "
                                          r"parameters on cpu; use optim.fused=auto"):
        build_optimizer(named, cfg.optim, torch.device("cpu"))
