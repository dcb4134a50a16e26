"""Reward model: the transformer with a value head, trained on preference pairs.

The reward of an answer is the value head's output at its last token (the closing end-of-text
when it fits). The loss is Bradley-Terry's -log sigmoid(r_chosen - r_rejected); validation reports
it with the accuracy (how often the chosen answer scores higher) and the mean margin. A reward
model usually starts from the SFT checkpoint: its vocabulary head is dropped and the value head
starts fresh (``checkpoint.finetune=true``).
"""

from __future__ import annotations

import torch

from megatron_lite.rlhf.losses import pairwise_reward_loss, values_at
from megatron_lite.rlhf.stage import RecordStage


class RewardModelTask(RecordStage):
    name = "rm"
    head = "value"
    dataset_kind = "preference"
    evaluation_names = ("loss", "accuracy", "margin")
    sequences_per_record = 2

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen answers first, then rejected: tokens (2b, T) and the reward positions (2b,)."""
        return self.records.pairs(indices, "tokens"), self.records.pairs(indices, "last")

    def rewards(self, chunk, inputs: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return values_at(chunk(inputs), last).chunk(2)

    def loss(self, chunk, inputs, last, num_micro_batches: int) -> torch.Tensor:
        chosen, rejected = self.rewards(chunk, inputs, last)
        return pairwise_reward_loss(chosen, rejected).mean() / num_micro_batches

    def evaluation_terms(self, chunk, inputs, last, num_micro_batches) -> torch.Tensor:
        chosen, rejected = self.rewards(chunk, inputs, last)
        margin = chosen - rejected
        return torch.stack([pairwise_reward_loss(chosen, rejected), (margin > 0).float(), margin], dim=1)
