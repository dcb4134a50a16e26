import pytest

from megatron_lite.config import ConfigError, load_config, parse_overrides


def test_defaults_and_overrides():
    cfg = load_config(None, ["parallel.tp=2", "model.flavor=llama", "optim.lr=1e-3", "model.num_kv_heads=2"])
    assert cfg.parallel.tp == 2
    assert cfg.model.flavor == "llama"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.tie_embeddings is False
    assert cfg.model.ffn_hidden_size % 64 == 0


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_layer'; did you mean 'num_layers'"):
        load_config(None, ["model.num_layer=3"])
    with pytest.raises(ConfigError, match=r"unknown section 'modle'; did you mean 'model'"):
        load_config(None, ["modle.num_layers=3"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"model.num_layers: expected int, got str 'four'"):
        load_config(None, ["model.num_layers=four"])
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel: expected bool"):
        load_config(None, ["parallel.sequence_parallel=3"])


def test_invalid_shapes():
    with pytest.raises(ConfigError, match="not divisible by model.num_heads=3"):
        load_config(None, ["model.hidden_size=64", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="not divisible by model.num_kv_heads=3"):
        load_config(None, ["model.flavor=llama", "model.num_heads=4", "model.num_kv_heads=3"])
    with pytest.raises(ConfigError, match="not a multiple of"):
        load_config(None, ["train.micro_batch_size=3", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="model.loss_backend='apex' is not one of torch, triton"):
        load_config(None, ["model.loss_backend=apex"])
    with pytest.raises(ConfigError, match="model.elementwise_backend='cuda' is not one of torch, triton"):
        load_config(None, ["model.elementwise_backend=cuda"])
    with pytest.raises(ConfigError, match="model.flavor='bert' is not one of gpt2, llama"):
        load_config(None, ["model.flavor=bert"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["parallel.tp"])
    with pytest.raises(ConfigError, match="must name a section and a key"):
        parse_overrides(["tp=2"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
