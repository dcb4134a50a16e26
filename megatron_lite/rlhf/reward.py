"""Reward model: the transformer with a value head, trained on ranked answers (InstructGPT's K-way
formulation; a preference pair is a ranking of two).

The reward of an answer is the value head's output at its last token (the closing end-of-text
when it fits). One batch element is one prompt with all K of its answers, scored in the same
step; its loss is the mean over the K(K-1)/2 ranked pairs of -log sigmoid(r_better - r_worse),
and the batch's loss the mean over prompts, so a prompt with many answers weighs as much as a
pair and its answers are not seen as K(K-1)/2 separate samples (which overfits, InstructGPT
found). Tied answers make no pair. Validation reports the loss with the accuracy (how often the
better answer scores higher) and the mean margin, both over all pairs. A reward model usually
starts from the SFT checkpoint: its vocabulary head is dropped and the value head starts fresh
(``checkpoint.finetune=true``). With ``rlhf.pack`` the K answers of every prompt of a micro-batch
are packed as documents (``rlhf.packing``), in the answer-major order of the unpacked rows, and
each reward read at its document's last token; a record's padding answers (fewer than K) take no
room and are in no pair, so the losses are those of the unpacked rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.losses import ranked_reward_loss, sum_over_pairs, values_at
from megatron_lite.rlhf.packing import PackedRows, last_token_values
from megatron_lite.rlhf.stage import RecordStage, is_packed
from megatron_lite.training.step import chunk_inputs


def answers_first(stacked: torch.Tensor) -> torch.Tensor:
    """(b, K, ...) per prompt -> (K * b, ...) answer-major: every prompt's best answer, then every
    prompt's second, ...; with pairs, the chosen answers then the rejected ones."""
    return stacked.transpose(0, 1).flatten(0, 1)


def per_prompt(values: torch.Tensor, num_answers: int) -> torch.Tensor:
    """(K * b,) answer-major -> (b, K)."""
    return values.view(num_answers, -1).t()


def packed_answers(items: list[dict], length: Callable[[dict, int], int]) -> list:
    """Ranked records' answers to pack, answer-major as the unpacked rows: (tokens, labels,
    length(item, k)) of answer k of each item, length 0 for a padding answer (it has no labels)."""
    num_answers = items[0]["labels"].shape[0]
    return [(item["tokens"][k], item["labels"][k], length(item, k) if (item["labels"][k] != IGNORE_INDEX).any() else 0)
            for k in range(num_answers) for item in items]


def pair_differences(values: torch.Tensor) -> torch.Tensor:
    """(b, K) -> (b, K, K): values[:, j] - values[:, k] at [:, j, k]."""
    return values[:, :, None] - values[:, None, :]


class RewardModelTask(RecordStage):
    name = "rm"
    head = "value"
    dataset_kind = "preference"
    evaluation_names = ("loss", "accuracy", "margin", "pairs")

    @property
    def sequences_per_record(self) -> int:
        return self.records.records.num_answers

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, dict]:
        """tokens (K b, T) answer-major, and what the loss reads: the reward positions (K b,) and
        which answer of a prompt is ranked above which (b, K, K)."""
        tokens, last = self.records.stack(indices, "tokens"), self.records.stack(indices, "last")
        return answers_first(tokens), {"last": answers_first(last), "better": self.records.stack(indices, "better")}

    def packed_sequences(self, indices: list[int]) -> list:
        """Every answer up to its reward position, answer-major as ``collate``'s rows."""
        return packed_answers([self.records[i] for i in indices], lambda item, k: int(item["last"][k]) + 1)

    def collate_packed(self, indices: list[int], rows: PackedRows) -> tuple[torch.Tensor, dict]:
        tokens, target = super().collate_packed(indices, rows)
        return tokens, {**target, "better": self.records.stack(indices, "better")}

    def rewards(self, chunk, inputs: torch.Tensor, target: dict) -> torch.Tensor:
        """(b, K) the reward of every answer of every prompt (0 for a packed padding answer, which
        is in no pair)."""
        if is_packed(target):
            values = last_token_values(chunk(inputs, **chunk_inputs(target)), target)
        else:
            values = values_at(chunk(inputs), target["last"])
        return per_prompt(values, target["better"].shape[1])

    def loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        return ranked_reward_loss(self.rewards(chunk, inputs, target), target["better"]).mean() / num_micro_batches

    def evaluation_terms(self, chunk, inputs, target, num_micro_batches) -> torch.Tensor:
        """Per prompt: its loss, and over its pairs the number ranked right, the summed margin and the count."""
        rewards, better = self.rewards(chunk, inputs, target), target["better"]
        margins = pair_differences(rewards)
        return torch.stack([ranked_reward_loss(rewards, better), sum_over_pairs((margins > 0).float(), better),
                            sum_over_pairs(margins, better), better.sum(dim=(1, 2)).float()], dim=1)

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        """The loss per prompt; accuracy and margin per pair."""
        pairs = max(sums["pairs"], 1.0)
        return {"loss": sums["loss"] / max(samples, 1.0), "accuracy": sums["accuracy"] / pairs,
                "margin": sums["margin"] / pairs}
