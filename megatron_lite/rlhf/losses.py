"""The losses of the fine-tuning stages and RL algorithms, on per-token losses and per-position values.

Everything here is plain tensor math on what the model's last stage returns: per-token cross
entropy (B, T) from the language-model head (0 where the label is ignored), or one value per
position (B, T) from the value head. Nothing gathers logits. The one collective is whitening's
optional sum of its statistics over a data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def sequence_log_probs(token_loss: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) per sequence (B,): minus the summed cross entropy of the labelled
    tokens (ignored positions already contribute 0)."""
    return -token_loss.sum(dim=-1)


def values_at(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, T) per-position values -> (B,) the value at each sequence's index ``last``."""
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected) per pair."""
    return -F.logsigmoid(chosen - rejected)


def sum_over_pairs(pair_values: torch.Tensor, better: torch.Tensor) -> torch.Tensor:
    """(B, K, K) values of every ordered pair of a prompt's answers -> (B,) their sum over the
    pairs where ``better[b, j, k]`` (answer j ranked above answer k)."""
    return torch.where(better, pair_values, torch.zeros_like(pair_values)).sum(dim=(1, 2))


def mean_over_pairs(pair_values: torch.Tensor, better: torch.Tensor) -> torch.Tensor:
    """(B,) the mean over each prompt's ranked pairs; every prompt has at least one."""
    return sum_over_pairs(pair_values, better) / better.sum(dim=(1, 2))


def ranked_reward_loss(rewards: torch.Tensor, better: torch.Tensor) -> torch.Tensor:
    """InstructGPT's K-way loss per prompt (B,): the mean of -log sigmoid(r_better - r_worse) over
    the pairs of its (B, K) rewards that ``better`` (B, K, K) ranks. With K = 2 and one pair it is
    ``pairwise_reward_loss`` of that pair, exactly."""
    return mean_over_pairs(pairwise_reward_loss(rewards[:, :, None], rewards[:, None, :]), better)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards beta * (log pi - log pi_ref) of both answers.

    sigmoid (DPO): -log sigmoid(beta * h), h the difference of the two log-ratios; with
    ``label_smoothing`` e (conservative DPO) each label is taken as flipped with probability e:
    -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    ipo: (h - 1 / (2 beta))^2, which keeps the log-ratio gap finite on deterministic preferences.
    """
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss kind={kind!r} is not one of sigmoid, ipo")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ----------------------------------------------------------------------------- PPO


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over answer positions (mask) of (B, T) tensors; the
    value after the last answer token is 0 (the episode ends). Returns (advantages, returns),
    zero outside the mask."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, group=None) -> torch.Tensor:
    """Zero mean and unit variance over the masked entries, of every rank of ``group`` when given
    (the data-parallel replicas: statistics of the global batch); zero outside the mask."""
    stats = torch.stack([(values * mask).sum(), (values**2 * mask).sum(), mask.sum()]).double()
    if group is not None:
        dist.all_reduce(stats, group=group)
    mean = stats[0] / stats[2].clamp(min=1)
    var = (stats[1] / stats[2].clamp(min=1) - mean**2).clamp(min=0)
    return ((values - mean) * torch.rsqrt(var + 1e-8) * mask).float()


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> torch.Tensor:
    """PPO's clipped surrogate, averaged over the answer tokens."""
    surrogate, _ = clipped_surrogate(logp, old_logp, advantages, clip, clip)
    return (surrogate * mask).sum() / mask.sum().clamp(min=1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within ``clip`` of the rollout's values."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- critic-free RL (GRPO, RLOO, ...)


def kl_estimate(logp: torch.Tensor, reference_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimates of KL(pi || pi_ref) from tokens sampled from pi, with d = log pi - log pi_ref:
    k1 = d (unbiased, can be negative), k2 = d^2 / 2 (low variance, biased), k3 = e^-d - 1 + d
    (unbiased and never negative: GRPO's choice)."""
    d = logp - reference_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"kl_estimator={estimator!r} is not one of k1, k2, k3")


def leave_one_out_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards in consecutive groups -> each answer's mean reward of the other answers of its group."""
    groups = rewards.view(-1, group_size)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str, eps: float = 1e-6) -> torch.Tensor:
    """(B,) per-answer advantages from rewards in consecutive groups of ``group_size`` answers to one
    prompt. grpo: (r - group mean) / (group std + eps), the std with Bessel's correction;
    dr_grpo: r - group mean (no std: a group of near-equal rewards is not blown up);
    rloo: r - the mean of the group's other answers. A group of equal rewards gets 0 throughout."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if kind == "grpo":
        return (centred / (groups.std(dim=1, keepdim=True) + eps)).reshape(-1)
    if kind == "dr_grpo":
        return centred.reshape(-1)
    if kind == "rloo":
        return rewards - leave_one_out_baseline(rewards, group_size)
    raise ValueError(f"group advantage kind={kind!r} is not one of grpo, dr_grpo, rloo")


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token rewards -> the undiscounted sum of each token's reward and all after it, 0 off the mask."""
    rewards = rewards * mask
    return (rewards.flip(1).cumsum(1).flip(1)) * mask


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the clipped objective's loss -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)
    and whether the clipped term was the one taken (1.0) or not (0.0)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, kind: str, count: torch.Tensor | float) -> torch.Tensor:
    """Sum a micro-batch's per-token losses into its share of the batch loss. token_mean: the
    masked sum over ``count``, the tokens of the whole batch per dp rank (every token weighs the
    same); sequence_mean: each answer's token mean, summed over ``count``, the answers per dp rank
    (every answer weighs the same, its tokens 1/length each)."""
    masked = per_token * mask
    if kind == "token_mean":
        return masked.sum() / count
    if kind == "sequence_mean":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / count
    raise ValueError(f"loss_aggregation={kind!r} is not one of token_mean, sequence_mean")


class AdaptiveKLController:
    """The KL coefficient of Ziegler et al. (2019): after each batch of ``samples`` answers whose
    mean KL was ``kl``, the coefficient moves by the proportional error (clipped to +-20%) times
    samples / horizon, so it settles where the policy's KL sits at ``target``."""

    def __init__(self, *, initial: float, target: float, horizon: int):
        self.value, self.target, self.horizon = initial, target, horizon

    def update(self, kl: float, samples: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * samples / self.horizon
        return self.value
