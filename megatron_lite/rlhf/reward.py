"""Reward model: the transformer with a value head, trained on preference pairs.

The reward of an answer is the value head's output at its last token (the closing end-of-text
when it fits). The loss is Bradley-Terry's -log sigmoid(r_chosen - r_rejected); validation reports
it with the accuracy (how often the chosen answer scores higher) and the mean margin. A reward
model usually starts from the SFT checkpoint: its vocabulary head is dropped and the value head
starts fresh (``checkpoint.finetune=true``). With ``rlhf.pack`` a micro-batch's answers are packed as
documents (``rlhf.packing``) and each reward read at its document's last token.
"""

from __future__ import annotations

import torch

from megatron_lite.rlhf.losses import pairwise_reward_loss, values_at
from megatron_lite.rlhf.packing import last_token_values
from megatron_lite.rlhf.stage import RecordStage, is_packed
from megatron_lite.training.step import chunk_inputs


class RewardModelTask(RecordStage):
    name = "rm"
    head = "value"
    dataset_kind = "preference"
    evaluation_names = ("loss", "accuracy", "margin")
    sequences_per_record = 2

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen answers first, then rejected: tokens (2b, T) and the reward positions (2b,)."""
        return self.records.pairs(indices, "tokens"), self.records.pairs(indices, "last")

    def packed_sequences(self, indices: list[int]) -> list:
        """Every chosen answer, then every rejected one, each up to its reward position."""
        records = [self.records[i] for i in indices]
        return [(r[f"{side}_tokens"], r[f"{side}_labels"], int(r[f"{side}_last"]) + 1)
                for side in ("chosen", "rejected") for r in records]

    def rewards(self, chunk, inputs: torch.Tensor, last) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and the rejected answers' rewards; ``last`` the reward positions (2b,), or a
        packed micro-batch's target."""
        if is_packed(last):
            return last_token_values(chunk(inputs, **chunk_inputs(last)), last).chunk(2)
        return values_at(chunk(inputs), last).chunk(2)

    def loss(self, chunk, inputs, last, num_micro_batches: int) -> torch.Tensor:
        chosen, rejected = self.rewards(chunk, inputs, last)
        return pairwise_reward_loss(chosen, rejected).mean() / num_micro_batches

    def evaluation_terms(self, chunk, inputs, last, num_micro_batches) -> torch.Tensor:
        chosen, rejected = self.rewards(chunk, inputs, last)
        margin = chosen - rejected
        return torch.stack([pairwise_reward_loss(chosen, rejected), (margin > 0).float(), margin], dim=1)
