from pathlib import Path

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.model.gpt import num_parameters
from megatron_lite.model.layout_check import validate_layout

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "gpt2-124m.yaml", "gpt2-350m.yaml", "gpt2-1.3b.yaml", "llama-1b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    world = cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.pp
    assert validate_layout(cfg.parallel, cfg.model, world) == 1


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_demo_admits_tp2_pp2(flavor):
    extra = ["model.num_kv_heads=2"] if flavor == "llama" else []
    cfg = load_config(Path(CONFIGS[0].parent / "demo.yaml"), ["parallel.tp=2", "parallel.pp=2", f"model.flavor={flavor}"] + extra)
    assert validate_layout(cfg.parallel, cfg.model, world_size=8) == 2


@pytest.mark.parametrize(
    "name, vocab, millions",
    [("gpt2-124m", 50257, 124), ("gpt2-350m", 50257, 355), ("gpt2-1.3b", 50257, 1316), ("llama-1b", 128256, 1236)],
)
def test_real_sizes_have_published_parameter_counts(name, vocab, millions):
    cfg = load_config(CONFIGS[0].parent / f"{name}.yaml", [f"model.vocab_size={vocab}"])
    count = num_parameters(cfg.model, vocab)  # published counts use the unpadded vocabulary
    assert count / 1e6 == pytest.approx(millions, rel=0.01)


def test_trainer_config_errors():
    with pytest.raises(ConfigError, match=r"optim.schedule='step' is not one of cosine, linear, constant, wsd"):
        load_config(None, ["optim.schedule=step"])
    with pytest.raises(ConfigError, match=r"optim.min_lr must be in \[0, optim.lr\]"):
        load_config(None, ["optim.lr=1e-4", "optim.min_lr=1e-3"])
    with pytest.raises(ConfigError, match=r"train.precision='fp8' is not one of fp32, bf16, fp16"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"checkpoint.interval must be >= 0"):
        load_config(None, ["checkpoint.interval=-1"])
    with pytest.raises(ConfigError, match=r"log.interval must be positive"):
        load_config(None, ["log.interval=0"])
    with pytest.raises(ConfigError, match=r"optim.fused='cuda' is not one of auto, torch, apex, none"):
        load_config(None, ["optim.fused=cuda"])
    with pytest.raises(ConfigError, match=r"train.max_tokens must be >= 0"):
        load_config(None, ["train.max_tokens=-5"])
    with pytest.raises(ConfigError, match=r"train.eval_steps must be positive"):
        load_config(None, ["train.eval_steps=0"])
    with pytest.raises(ConfigError, match=r"optim.beta2 must be in \[0, 1\)"):
        load_config(None, ["optim.beta2=1.0"])
    with pytest.raises(ConfigError, match=r"train.loss_scale_window must be positive"):
        load_config(None, ["train.loss_scale_window=0"])
