"""Fine-tuning stages on the pretraining core, each a task the ``Trainer`` runs: supervised
fine-tuning, reward model, DPO, PPO, and the critic-free group methods (GRPO, RLOO, ...)."""

from megatron_lite.rlhf.dpo import DPOTask
from megatron_lite.rlhf.grpo import GRPOTask
from megatron_lite.rlhf.ppo import PPOTask
from megatron_lite.rlhf.reward import RewardModelTask
from megatron_lite.rlhf.sft import SFTTask

STAGES = {"sft": SFTTask, "rm": RewardModelTask, "dpo": DPOTask, "ppo": PPOTask, "grpo": GRPOTask}

__all__ = ["DPOTask", "GRPOTask", "PPOTask", "RewardModelTask", "SFTTask", "STAGES"]
