"""The pieces of an RL rollout, for any algorithm that samples answers and scores them (PPO today;
GRPO or RLOO would reuse them with their own advantages and loss).

1. ``sample_answers``: the policy samples an answer to each prompt (KV cache; at pp > 1 each
   token's hidden states go stage to stage and the last stage's choice is broadcast back; the tp
   ranks of a replica sample the same tokens);
2. ``answer_batch``: prompt + answer rows padded to the sequence length, with the answer tokens
   as labels and the index of each row's last token;
3. ``score``: one forward-only pass of a model (trained or frozen) over those rows through its
   parallel step, with one of the scoring functions below; the figures live on the last pipeline
   stage (zeros elsewhere);
4. ``per_token_kl`` and ``global_means`` for the rewards and the logged figures.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_lite.model.generation import generate
from megatron_lite.parallel.collectives import all_reduce, sum_over_replicas
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.losses import values_at
from megatron_lite.training.trained_model import TrainedModel


class Sampling(NamedTuple):
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float


class AnswerBatch(NamedTuple):
    tokens: torch.Tensor  # (B, T): prompt, answer, then padding
    labels: torch.Tensor  # (B, T): the answer tokens at the positions that predict them, else IGNORE_INDEX
    last: torch.Tensor  # (B,): the index of each row's last token

    @property
    def mask(self) -> torch.Tensor:
        """(B, T) 1.0 at the positions that predict an answer token."""
        return (self.labels != IGNORE_INDEX).float()

    def micro_batches(self, size: int) -> list:
        """(tokens, {"labels", "last"}) micro-batches of ``size`` rows, for ``score``."""
        return [(self.tokens[i : i + size], {"labels": self.labels[i : i + size], "last": self.last[i : i + size]})
                for i in range(0, self.tokens.shape[0], size)]


@torch.no_grad()
def sample_answers(policy: TrainedModel, prompts: list[list[int]], sampling: Sampling, eod_id: int,
                   seed: int) -> list[list[int]]:
    """The policy's answer to each prompt (ending at end-of-text, or at ``max_new_tokens``)."""
    return generate(policy.chunks[0], prompts, sampling.max_new_tokens, sampling.temperature, sampling.top_k,
                    sampling.top_p, eod_id=eod_id, seed=seed)


def answer_batch(prompts: list[list[int]], answers: list[list[int]], seq_length: int, pad_id: int,
                 device: torch.device) -> AnswerBatch:
    tokens = torch.full((len(prompts), seq_length), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), seq_length), IGNORE_INDEX, dtype=torch.long)
    last = torch.zeros(len(prompts), dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        sequence = prompt + answer
        tokens[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)  # position t predicts t + 1
        last[row] = len(sequence) - 1
    return AnswerBatch(tokens.to(device), labels.to(device), last.to(device))


# ----------------------------------------------------------------------------- scoring (last stage)


def token_log_probs(chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
    """log pi of each answer token, (b, T), 0 off the answers."""
    return -chunk(inputs, labels=target["labels"]).float()


def position_values(chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
    """A value head's output at every position, (b, T)."""
    return chunk(inputs).float()


def score_at_last(chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
    """A value head's output at each row's last token, (b,): a reward model's score."""
    return values_at(chunk(inputs).float(), target["last"])


@torch.no_grad()
def score(model: TrainedModel, batch: AnswerBatch, micro_batch_size: int, fn) -> torch.Tensor:
    """``fn`` over the rows, concatenated: (B,) for ``score_at_last``, else (B, T); zeros on
    pipeline stages other than the last."""
    outputs = model.forward_outputs(batch.micro_batches(micro_batch_size), fn)
    if outputs:  # the last pipeline stage
        return torch.cat([o.float() for o in outputs])
    shape = batch.last.shape if fn is score_at_last else batch.tokens.shape
    return torch.zeros(shape, device=batch.tokens.device)


def per_token_kl(logp: torch.Tensor, reference_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sampled estimate log pi - log pi_ref of each answer token, (B, T), 0 off the answers."""
    return (logp - reference_logp) * mask


def global_means(dims: ParallelDims, **per_sample: torch.Tensor) -> dict[str, float]:
    """Means over the global batch of per-sample (B,) tensors held by the last pipeline stage."""
    columns = torch.stack([t.double() for t in per_sample.values()], dim=1)  # (B, k)
    sums = sum_over_replicas(torch.cat([columns.sum(dim=0), columns.new_tensor([columns.shape[0]])]), dims)
    return {name: (sums[i] / sums[-1]).item() for i, name in enumerate(per_sample)}


def from_last_stage(values: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Figures the last pipeline stage holds (scores, log-probs) -> the same on every stage of the
    replica, for decisions all stages must agree on (advantages, which groups to keep). In place."""
    if not dims.is_last_stage:
        values.zero_()
    return all_reduce(values, dims.pp_group)
