"""The losses of the fine-tuning stages, on per-token losses and per-position values.

Everything here is plain tensor math on what the model's last stage returns: per-token cross
entropy (B, T) from the language-model head (0 where the label is ignored), or one value per
position (B, T) from the value head. Nothing gathers logits.
"""

from __future__ import annotations

import torch
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
