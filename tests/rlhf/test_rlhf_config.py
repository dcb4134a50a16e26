"""The ``rlhf`` section: shared record settings plus one nested section per algorithm, each
validating itself, with unknown keys pointed to where they live."""

import pytest
import yaml

from megatron_lite.config import ConfigError, DPOConfig, PPOConfig, load_config


def test_nested_sections_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"rlhf": {"valid_fraction": 0.1, "dpo": {"beta": 0.3, "loss": "ipo"}}}))
    cfg = load_config(path, ["rlhf.dpo.beta=0.5", "rlhf.ppo.kl_coef=0.2", "rlhf.ppo.critic_lr=1e-5"])
    assert cfg.rlhf.valid_fraction == 0.1
    assert cfg.rlhf.dpo == DPOConfig(beta=0.5, loss="ipo")
    assert cfg.rlhf.ppo.kl_coef == 0.2 and cfg.rlhf.ppo.critic_lr == 1e-5 and cfg.rlhf.ppo.epochs == 1
    assert cfg.to_dict()["rlhf"]["ppo"]["kl_coef"] == 0.2  # saved nested, as written


def test_each_section_validates_itself():
    with pytest.raises(ConfigError, match=r"rlhf.dpo.beta must be positive, got 0"):
        DPOConfig(beta=0)
    with pytest.raises(ConfigError, match=r"rlhf.dpo.label_smoothing must be in \[0, 0.5\), got 0.5"):
        load_config(None, ["rlhf.dpo.label_smoothing=0.5"])
    with pytest.raises(ConfigError, match=r"rlhf.ppo.epochs must be positive, got 0"):
        PPOConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"rlhf.ppo.gae_lambda must be in \[0, 1\], got 1.5"):
        load_config(None, ["rlhf.ppo.gae_lambda=1.5"])
    with pytest.raises(ConfigError, match=r"rlhf.ppo.critic_lr must be positive, got -1"):
        load_config(None, ["rlhf.ppo.critic_lr=-1"])
    with pytest.raises(ConfigError, match=r"rlhf.ppo.kl_coef: expected float, got str 'high'"):
        load_config(None, ["rlhf.ppo.kl_coef=high"])
    with pytest.raises(ConfigError, match=r"rlhf.valid_fraction must be in \[0, 1\), got 1"):
        load_config(None, ["rlhf.valid_fraction=1"])
    with pytest.raises(ConfigError, match=r"rlhf.dpo: expected a mapping with keys"):
        load_config(None, ["rlhf.dpo=0.1"])


def test_unknown_keys_name_the_nearest_one_at_any_depth():
    with pytest.raises(ConfigError, match=r"unknown key 'rlhf.dpo.bta'; did you mean 'beta'"):
        load_config(None, ["rlhf.dpo.bta=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'rlhf.ppo.kl'; did you mean 'kl_coef'"):
        load_config(None, ["rlhf.ppo.kl=0.1"])
    # a key of a nested section given one level up (the layout before rlhf.dpo and rlhf.ppo)
    with pytest.raises(ConfigError, match=r"unknown key 'rlhf.beta'; did you mean 'dpo.beta'"):
        load_config(None, ["rlhf.beta=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'rlhf.reward_model'; did you mean 'ppo.reward_model'"):
        load_config(None, ["rlhf.reward_model=runs/rm"])
    with pytest.raises(ConfigError, match=r"unknown key 'rlhf.dpo_loss'; did you mean 'dpo.loss'"):
        load_config(None, ["rlhf.dpo_loss=ipo"])
    with pytest.raises(ConfigError, match=r"unknown key 'rlhf.ppo_epochs'; did you mean 'ppo.epochs'"):
        load_config(None, ["rlhf.ppo_epochs=2"])
