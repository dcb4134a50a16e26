"""Supervised fine-tuning: next-token loss on the assistant's answers only.

Each record is a conversation; the prompt (system and user turns, role tokens) is context and
carries no loss. The loss of a step is the mean over every answer token of the global batch, so
each token weighs the same whatever micro-batch or data-parallel rank it falls in: a micro-batch
contributes its summed token loss divided by the answer tokens per data-parallel rank (the
global count, all-reduced once per step, over dp), and the data-parallel average completes the
mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.stage import Epochs, RecordStage


class SFTTask(RecordStage):
    name = "sft"
    dataset_kind = "sft"
    evaluation_names = ("token_loss", "tokens")

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.records.stack(indices, "tokens"), self.records.stack(indices, "labels")

    def micro_batches(self, epochs: Epochs, first_sample: int) -> list:
        micro = super().micro_batches(epochs, first_sample)
        answer_tokens = sum((labels != IGNORE_INDEX).sum() for _, labels in micro).double()
        if self.dims.dp > 1:
            dist.all_reduce(answer_tokens, group=self.dims.dp_group)
        per_rank = answer_tokens / self.dims.dp
        return [(tokens, {"labels": labels, "tokens_per_rank": per_rank}) for tokens, labels in micro]

    def loss(self, chunk, inputs: torch.Tensor, target: dict, num_micro_batches: int) -> torch.Tensor:
        token_loss = chunk(inputs, labels=target["labels"]).float()  # 0 off the answers
        return token_loss.sum() / target["tokens_per_rank"].clamp(min=1).float()

    def evaluation_terms(self, chunk, inputs, target, num_micro_batches) -> torch.Tensor:
        labels = target["labels"]
        token_loss = chunk(inputs, labels=labels).float()
        return torch.stack([token_loss.sum(dim=-1), (labels != IGNORE_INDEX).sum(dim=-1).float()], dim=1)

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        return {"loss": sums["token_loss"] / max(sums["tokens"], 1.0)}  # a token mean: perplexity applies
