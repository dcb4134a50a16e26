"""Supervised fine-tuning: next-token loss on the assistant's answers only.

Each record is a conversation; the prompt (system and user turns, role tokens) is context and
carries no loss. The loss of a micro-batch is the mean over its answer tokens, as in Megatron-LM's
fine-tuning (a micro-batch mean, not a global-batch token mean).
"""

from __future__ import annotations

import torch

from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.losses import masked_token_mean
from megatron_lite.rlhf.stage import StageTrainer


class SFTTrainer(StageTrainer):
    dataset_kind = "sft"
    stage_name = "sft"
    evaluation_names = ("token_loss", "tokens")

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._stack(indices, "tokens"), self._stack(indices, "labels")

    def loss_fn(self, chunk, inputs: torch.Tensor, labels: torch.Tensor, num_micro_batches: int) -> torch.Tensor:
        return masked_token_mean(chunk(inputs, labels=labels).float(), labels) / num_micro_batches

    def evaluation_terms(self, chunk, inputs, labels, num_micro_batches) -> torch.Tensor:
        token_loss = chunk(inputs, labels=labels).float()
        return torch.stack([token_loss.sum(dim=-1), (labels != IGNORE_INDEX).sum(dim=-1).float()], dim=1)

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        return {"loss": sums["token_loss"] / max(sums["tokens"], 1.0)}  # a token mean: perplexity applies
