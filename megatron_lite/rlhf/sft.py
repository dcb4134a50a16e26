"""Supervised fine-tuning: next-token loss on the assistant's answers only.

Each record is a conversation; the prompt (system and user turns, role tokens) is context and
carries no loss. The loss of a step is the mean over every answer token of the global batch, so
each token weighs the same whatever micro-batch or data-parallel rank it falls in: a micro-batch
contributes its summed token loss divided by the answer tokens per data-parallel rank (the
global count, all-reduced once per step, over dp), and the data-parallel average completes the
mean.

With ``rlhf.pack`` a micro-batch's conversations are packed into fewer rows (``rlhf.packing``);
each answer token's loss is the same as unpacked, so the step's loss is too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.packing import trained_length
from megatron_lite.rlhf.stage import Epochs, RecordStage, per_sequence, token_losses


class SFTTask(RecordStage):
    name = "sft"
    dataset_kind = "sft"
    evaluation_names = ("token_loss", "tokens")

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, dict]:
        return self.records.stack(indices, "tokens"), {"labels": self.records.stack(indices, "labels")}

    def packed_sequences(self, indices: list[int]) -> list:
        records = [self.records[i] for i in indices]
        return [(r["tokens"], r["labels"], trained_length(r["labels"])) for r in records]

    def micro_batches(self, epochs: Epochs, first_sample: int) -> list:
        micro = super().micro_batches(epochs, first_sample)
        answer_tokens = sum((target["labels"] != IGNORE_INDEX).sum() for _, target in micro).double()
        if self.dims.dp > 1:
            dist.all_reduce(answer_tokens, group=self.dims.dp_group)
        per_rank = answer_tokens / self.dims.dp
        return [(tokens, {**target, "tokens_per_rank": per_rank}) for tokens, target in micro]

    def loss(self, chunk, inputs: torch.Tensor, target: dict, num_micro_batches: int) -> torch.Tensor:
        token_loss = token_losses(chunk, inputs, target)  # 0 off the answers
        return token_loss.sum() / target["tokens_per_rank"].clamp(min=1).float()

    def record_losses(self, chunk, inputs, target) -> tuple[torch.Tensor, torch.Tensor]:
        """Per record: the summed loss of its answer tokens and their number, (records,) each."""
        token_loss = token_losses(chunk, inputs, target)
        return per_sequence(token_loss, target), per_sequence((target["labels"] != IGNORE_INDEX).float(), target)

    def evaluation_terms(self, chunk, inputs, target, num_micro_batches) -> torch.Tensor:
        return torch.stack(self.record_losses(chunk, inputs, target), dim=1)

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        return {"loss": sums["token_loss"] / max(sums["tokens"], 1.0)}  # a token mean: perplexity applies
