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
    with pytest.raises(ConfigError, match=r"rlhf.ppo.epochs must be positive, got 0"):
        PPOConfig(epochs=0)


@pytest.mark.parametrize("override, message", [
    ("rlhf.dpo.label_smoothing=0.5", r"rlhf.dpo.label_smoothing must be in \[0, 0.5\), got 0.5"),
    ("rlhf.ppo.gae_lambda=1.5", r"rlhf.ppo.gae_lambda must be in \[0, 1\], got 1.5"),
    ("rlhf.ppo.critic_lr=-1", r"rlhf.ppo.critic_lr must be positive, got -1"),
    ("rlhf.ppo.kl_coef=high", r"rlhf.ppo.kl_coef: expected float, got str 'high'"),
    ("rlhf.valid_fraction=1", r"rlhf.valid_fraction must be in \[0, 1\), got 1"),
    ("rlhf.dpo=0.1", r"rlhf.dpo: expected a mapping with keys"),
    # unknown keys name the nearest one at any depth
    ("rlhf.dpo.bta=0.1", r"unknown key 'rlhf.dpo.bta'; did you mean 'beta'"),
    ("rlhf.ppo.kl=0.1", r"unknown key 'rlhf.ppo.kl'; did you mean 'kl_coef'"),
    # a key of a nested section given one level up (the layout before rlhf.dpo and rlhf.ppo)
    ("rlhf.beta=0.1", r"unknown key 'rlhf.beta'; did you mean 'dpo.beta'"),
    ("rlhf.reward_model=runs/rm", r"unknown key 'rlhf.reward_model'; did you mean 'ppo.reward_model'"),
    ("rlhf.dpo_loss=ipo", r"unknown key 'rlhf.dpo_loss'; did you mean 'dpo.loss'"),
    ("rlhf.ppo_epochs=2", r"unknown key 'rlhf.ppo_epochs'; did you mean 'ppo.epochs'"),
])
def test_a_bad_rlhf_setting_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
