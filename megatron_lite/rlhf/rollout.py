"""The pieces of an RL rollout, for any algorithm that samples answers and scores them (PPO, and
GRPO and its relatives with their own advantages and loss).

1. ``sample_answers``: the policy samples an answer to each prompt (KV cache; an answer that
   reaches end-of-text leaves the batch, so the rest decode on fewer rows; at pp > 1 each
   token's hidden states go stage to stage and the last stage's choice is broadcast back; the tp
   ranks of a replica sample the same tokens);
2. ``answer_batch``: prompt + answer rows padded to the sequence length, with the answer tokens
   as labels and the index of each row's last token;
3. ``score``: one forward-only pass of a model (trained or frozen) over those rows through its
   parallel step, with one of the scoring functions below; the figures live on the last pipeline
   stage (zeros elsewhere);
4. ``per_token_kl``, ``from_last_stage`` and ``rollout_figures`` for the rewards and the logged
   figures; ``mini_batch_count`` for the update's optimizer steps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_lite.config import Config, ConfigError
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
    """The policy's answer to each prompt (ending at end-of-text, or at ``max_new_tokens``); each
    prompt draws from its own stream of ``seed``, so an answer does not depend on when the others end."""
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


def from_last_stage(values: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """Figures the last pipeline stage holds (scores, log-probs) -> the same on every stage of the
    replica, for decisions all stages must agree on (advantages, which groups to keep). In place."""
    if not dims.is_last_stage:
        values.zero_()
    return all_reduce(values, dims.pp_group)


def rollout_figures(dims: ParallelDims, batch: dict, functions) -> dict[str, float]:
    """Global figures of a rollout ``batch`` ((B,) "rewards", "kl", "entropy" (summed -log pi),
    "length"; "per_function" values by name): the reward's mean and std, each reward function's
    mean over the answers it judged (absent when it judged none), the KL and length per answer,
    and the sampled entropy per answer token."""
    rewards = batch["rewards"].double()
    columns = [rewards.sum(), (rewards**2).sum(), torch.tensor(float(len(rewards))), batch["kl"].double().sum(),
               batch["entropy"].double().sum(), batch["length"].double().sum()]
    for function in functions:
        judged = [v for v in batch["per_function"][function.name] if v is not None]
        columns += [torch.tensor(float(sum(judged))), torch.tensor(float(len(judged)))]
    sums = sum_over_replicas(torch.stack([c.to(dims.device).double() for c in columns]), dims).tolist()
    count, tokens = sums[2], max(sums[5], 1.0)
    mean = sums[0] / count
    figures = {"reward": mean, "reward_std": max(sums[1] / count - mean**2, 0.0) ** 0.5, "kl": sums[3] / count,
               "entropy": sums[4] / tokens, "response_length": sums[5] / count}
    for k, function in enumerate(functions):
        judged_sum, judged = sums[6 + 2 * k], sums[7 + 2 * k]
        if judged:
            figures[f"reward_{function.short_name}"] = judged_sum / judged
    return figures


def mini_batch_count(key: str, mini_batch_size: int, cfg: Config, dp: int) -> int:
    """How many optimizer steps one rollout batch makes with ``mini_batch_size`` answers per step
    (the config key ``key``; 0 = the whole batch). Mini-batch k of K takes every K-th answer from
    k on every rank, so a mini-batch holds the same answers at any dp; it must split into whole
    micro-batches on every rank."""
    answers, per_step = cfg.train.global_batch_size, cfg.train.micro_batch_size * dp
    mini = mini_batch_size or answers
    if answers % mini != 0 or mini % per_step != 0:
        raise ConfigError(
            f"{key}={mini} must divide train.global_batch_size={answers} and be a multiple of "
            f"train.micro_batch_size x dp = {per_step}; pick such a size, or 0 for the whole batch in one step")
    return answers // mini
