"""The model's structure comes from config fields; ``flavor`` is a preset that fills the unset ones."""

import dataclasses

import pytest
import torch

from megatron_lite.config import FLAVOR_PRESETS, ConfigError, ModelConfig, build_dataclass, load_config
from megatron_lite.model.gpt import GPT, num_parameters

STRUCTURE = ("bias", "norm", "activation", "position_embedding", "tie_embeddings")
TINY = dict(num_layers=2, hidden_size=32, num_heads=4, seq_length=16, vocab_size=50, make_vocab_size_divisible_by=16)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_flavor_preset_fills_every_unset_field(flavor):
    cfg = ModelConfig(flavor=flavor, **TINY)
    assert {name: getattr(cfg, name) for name in STRUCTURE} == FLAVOR_PRESETS[flavor]
    assert cfg.differs_from_preset() == []


def test_presets_are_the_two_families():
    assert FLAVOR_PRESETS["gpt2"] == dict(bias=True, norm="layernorm", activation="gelu",
                                          position_embedding="learned", tie_embeddings=True)
    assert FLAVOR_PRESETS["llama"] == dict(bias=False, norm="rmsnorm", activation="swiglu",
                                           position_embedding="rope", tie_embeddings=False)


def test_explicit_fields_override_the_preset():
    cfg = load_config(None, ["model.flavor=gpt2", "model.norm=rmsnorm", "model.position_embedding=rope",
                             "model.bias=false"])
    m = cfg.model
    assert (m.norm, m.position_embedding, m.bias) == ("rmsnorm", "rope", False)
    assert (m.activation, m.tie_embeddings) == ("gelu", True), "fields left unset still come from the preset"
    assert m.differs_from_preset() == ["bias", "norm", "position_embedding"]
    assert m.ffn_hidden_size == 4 * m.hidden_size


def test_ffn_default_follows_the_activation():
    assert ModelConfig(flavor="gpt2", activation="swiglu", **TINY).ffn_hidden_size == 64 * ((8 * 32 // 3 + 63) // 64)
    assert ModelConfig(flavor="llama", activation="gelu", **TINY).ffn_hidden_size == 4 * 32


def test_a_saved_config_with_only_flavor_resolves_to_the_same_fields():
    """Manifests and YAML files written before the structure fields existed hold only ``flavor``."""
    for flavor in FLAVOR_PRESETS:
        old = build_dataclass(ModelConfig, dict(flavor=flavor, **TINY), "model")
        assert old == ModelConfig(flavor=flavor, **TINY)
        again = build_dataclass(ModelConfig, dataclasses.asdict(old), "model")
        assert again == old, "a resolved config saved and read back is unchanged"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.norm=batchnorm"], r"model.norm='batchnorm' is not one of layernorm, rmsnorm"),
        (["model.activation=relu"], r"model.activation='relu' is not one of gelu, swiglu"),
        (["model.position_embedding=alibi"], r"model.position_embedding='alibi' is not one of learned, rope"),
        (["model.position_embedding=rope", "model.hidden_size=36", "model.num_heads=4"],
         r"model.position_embedding=rope rotates pairs of head dimensions, but the head dim "
         r"\(hidden_size / num_heads = 36 / 4\) is odd; choose an even head dim or position_embedding=learned"),
    ],
)
def test_invalid_structure_says_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_mixed_structure_builds_and_counts_its_parameters():
    cfg = ModelConfig(flavor="gpt2", norm="rmsnorm", activation="swiglu", position_embedding="rope", **TINY)
    model = GPT(cfg)
    names = dict(model.named_parameters())
    assert "embedding.position.weight" not in names and "final_norm.bias" not in names
    assert "layers.0.attention.qkv.bias" in names and model.output is None  # biases and tied head from gpt2
    assert names["layers.0.mlp.fc.weight"].shape == (2 * cfg.ffn_hidden_size, 32)
    assert sum(p.numel() for p in names.values()) == num_parameters(cfg, 64)
    ids = torch.randint(0, 50, (2, 8))
    assert model(ids, labels=ids).shape == (2, 8)
