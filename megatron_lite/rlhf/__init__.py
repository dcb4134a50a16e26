"""Fine-tuning stages on the pretraining core, each a task the ``Trainer`` runs: supervised
fine-tuning, reward model, DPO, PPO."""

from megatron_lite.rlhf.dpo import DPOTask
from megatron_lite.rlhf.ppo import PPOTask
from megatron_lite.rlhf.reward import RewardModelTask
from megatron_lite.rlhf.sft import SFTTask

STAGES = {"sft": SFTTask, "rm": RewardModelTask, "dpo": DPOTask, "ppo": PPOTask}

__all__ = ["DPOTask", "PPOTask", "RewardModelTask", "SFTTask", "STAGES"]
