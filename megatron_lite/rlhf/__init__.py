"""Fine-tuning stages on the pretraining core: supervised fine-tuning, reward model, DPO, PPO."""

from megatron_lite.rlhf.dpo import DPOTrainer
from megatron_lite.rlhf.ppo import PPOTrainer
from megatron_lite.rlhf.reward import RewardModelTrainer
from megatron_lite.rlhf.sft import SFTTrainer

STAGES = {"sft": SFTTrainer, "rm": RewardModelTrainer, "dpo": DPOTrainer, "ppo": PPOTrainer}

__all__ = ["DPOTrainer", "PPOTrainer", "RewardModelTrainer", "SFTTrainer", "STAGES"]
