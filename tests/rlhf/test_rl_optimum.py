"""The RL losses optimise the right thing: a toy whose KL-regularised optimum is known in closed form.

A tabular policy answers with L tokens from a vocabulary of V (one logit row per position, the
rows of the reference near-uniform); the reward counts the target token. Maximising
E[r] - beta * KL(pi || pi_ref) over answers has the optimum pi*(y) ~ pi_ref(y) exp(r(y) / beta),
which for a reward that is a sum over positions factorises: per position
p*(a) ~ p_ref(a) exp(1[a = target] / beta). The same loss functions the tasks use
(``rlhf.losses``) drive the tabular policy by sampled answers and Adam: each algorithm must land
within 10% of the optimum's target rate and KL, computed exactly from the policy's table.

GRPO's KL term in the loss (k3, no importance weight, as GRPO writes it) is the gradient of the
*reverse* KL(pi_ref || pi) in expectation, so its fixed point is p(a) = p_ref(a) / (1 - (r(a) - r_bar) / beta)
rather than p*; that fixed point is checked exactly, and its target rate within 10% of p*'s.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lite.rlhf.losses import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_estimate,
    ppo_policy_loss,
    whiten,
)

V, L, TARGET = 4, 3, 0
P_REF = torch.tensor([0.25, 0.2, 0.25, 0.3], dtype=torch.float64)
R = (torch.arange(V) == TARGET).double()  # per-position reward of each token


def optimum(beta: float) -> torch.Tensor:
    """p*(a) ~ p_ref(a) exp(r(a) / beta), one position's distribution."""
    p = P_REF * torch.exp(R / beta)
    return p / p.sum()


def reverse_kl_fixed_point(beta: float) -> torch.Tensor:
    """The stationary point of E[r] - beta KL(p_ref || p): p(a) (r(a) - r_bar) = beta (p(a) - p_ref(a)),
    i.e. p(a) = p_ref(a) / (1 - (r(a) - r_bar) / beta), r_bar = p(target); solved by bisection on r_bar."""
    low, high = 0.0, 1.0
    for _ in range(200):
        r_bar = (low + high) / 2
        p = P_REF / (1 - (R - r_bar) / beta)
        low, high = (r_bar, high) if p[TARGET] > r_bar else (low, r_bar)
    return p / p.sum()


def rate_and_kl(p: torch.Tensor) -> tuple[float, float]:
    """(target rate, KL(pi || pi_ref) per answer) of a per-position distribution, or of (L, V) rows."""
    rows = p.expand(L, V) if p.dim() == 1 else p
    return rows[:, TARGET].mean().item(), (rows * (rows / P_REF).log()).sum().item()


class TabularPolicy(torch.nn.Module):
    """One logit row per answer position, starting at the reference."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(P_REF.log().float().repeat(L, 1))  # (L, V)

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.double(), dim=-1)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(torch.softmax(self.logits, -1), count, replacement=True, generator=generator).t()

    def log_probs(self, answers: torch.Tensor) -> torch.Tensor:
        """(B, L) answers -> (B, L) log pi of each token."""
        table = torch.log_softmax(self.logits, dim=-1)  # (L, V)
        return table[torch.arange(L), answers]


def reference_log_probs(answers: torch.Tensor) -> torch.Tensor:
    return P_REF.log().float()[answers]


def count_reward(answers: torch.Tensor) -> torch.Tensor:
    return (answers == TARGET).float().sum(dim=1)


def optimiser(params, steps: int, lr: float):
    opt = torch.optim.Adam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 50)


def train_group_method(beta: float, advantage: str, kl_penalty: str, steps: int = 400, groups: int = 64,
                       n: int = 8, lr: float = 0.05, seed: int = 0) -> TabularPolicy:
    """GRPO / RLOO as the task runs them: groups of n answers, group advantages, the clipped
    surrogate (two mini-batch epochs per rollout) with the KL in the reward (k1) or in the loss (k3)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = TabularPolicy()
    opt, schedule = optimiser(policy.parameters(), steps, lr)
    for _ in range(steps):
        answers = policy.sample(groups * n, generator)
        mask = torch.ones(groups * n, L)
        with torch.no_grad():
            old = policy.log_probs(answers)
        reference = reference_log_probs(answers)
        rewards = count_reward(answers)
        if kl_penalty == "reward":
            rewards = rewards - beta * (old - reference).sum(dim=1)
        advantages = group_advantages(rewards, n, advantage)[:, None] * mask
        for _ in range(2):
            logp = policy.log_probs(answers)
            per_token, _ = clipped_surrogate(logp, old, advantages, 0.2, 0.2)
            if kl_penalty == "loss":
                per_token = per_token + beta * kl_estimate(logp, reference, "k3")
            loss = aggregate(per_token, mask, "token_mean", mask.sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    return policy


def train_ppo(beta: float, steps: int = 400, batch: int = 512, lr: float = 0.05, seed: int = 0) -> TabularPolicy:
    """PPO as PPOTask runs it: per-token KL in the reward, the score on the last token, GAE over a
    critic (a table over position and targets so far: the state's value), whitened advantages,
    the clipped surrogate and the clipped value loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = TabularPolicy()
    critic = torch.zeros(L, L + 1, requires_grad=True)  # (position, targets so far)
    opt, schedule = optimiser(list(policy.parameters()) + [critic], steps, lr)
    rows = torch.arange(L)
    for _ in range(steps):
        answers = policy.sample(batch, generator)
        mask = torch.ones(batch, L)
        so_far = torch.cumsum((answers == TARGET).long(), dim=1) - (answers == TARGET).long()  # before each token
        with torch.no_grad():
            old = policy.log_probs(answers)
            old_values = critic[rows, so_far]
        token_rewards = -beta * (old - reference_log_probs(answers))
        token_rewards[:, -1] += count_reward(answers)
        advantages, returns = gae(token_rewards, old_values, mask, gamma=1.0, lam=0.95)
        advantages = whiten(advantages, mask)
        for _ in range(2):
            logp = policy.log_probs(answers)
            values = critic[rows, so_far]
            loss = ppo_policy_loss(logp, old, advantages, mask, 0.2) + \
                clipped_value_loss(values, old_values, returns, mask, 0.5)
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    return policy


def train_dpo(beta: float, pairs: int = 20000, steps: int = 300, lr: float = 0.05, seed: int = 0) -> TabularPolicy:
    """DPO on pairs of reference answers labelled by Bradley-Terry on the same reward: its optimum
    is the same p*."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    first = torch.multinomial(P_REF.float(), pairs * L, replacement=True, generator=generator).view(pairs, L)
    second = torch.multinomial(P_REF.float(), pairs * L, replacement=True, generator=generator).view(pairs, L)
    prefers_first = torch.rand(pairs, generator=generator) < torch.sigmoid(count_reward(first) - count_reward(second))
    chosen = torch.where(prefers_first[:, None], first, second)
    rejected = torch.where(prefers_first[:, None], second, first)
    reference_chosen = reference_log_probs(chosen).sum(dim=1)
    reference_rejected = reference_log_probs(rejected).sum(dim=1)
    policy = TabularPolicy()
    opt, schedule = optimiser(policy.parameters(), steps, lr)
    for _ in range(steps):
        loss, _, _ = dpo_loss(policy.log_probs(chosen).sum(dim=1), policy.log_probs(rejected).sum(dim=1),
                              reference_chosen, reference_rejected, beta)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        schedule.step()
    return policy


def assert_near(policy: TabularPolicy, target: torch.Tensor, what: str, rel: float = 0.10) -> None:
    got_rate, got_kl = rate_and_kl(policy.probs())
    want_rate, want_kl = rate_and_kl(target)
    assert got_rate == pytest.approx(want_rate, rel=rel), f"{what}: target rate {got_rate:.4f} vs {want_rate:.4f}"
    assert got_kl == pytest.approx(want_kl, rel=rel), f"{what}: KL {got_kl:.4f} vs {want_kl:.4f}"


def test_the_closed_forms():
    rate, kl = rate_and_kl(optimum(1.0))
    assert rate == pytest.approx(0.25 * math.e / (0.25 * math.e + 0.75))
    # the optimum's value E[r] - beta KL beats its neighbours
    best = L * rate - kl
    for shift in (-0.05, 0.05):
        p = optimum(1.0).clone()
        p[TARGET] += shift
        p[1:] *= (1 - p[TARGET]) / p[1:].sum()
        other_rate, other_kl = rate_and_kl(p)
        assert L * other_rate - other_kl < best
    q = reverse_kl_fixed_point(1.0)
    assert (q * (R - q[TARGET])).tolist() == pytest.approx((1.0 * (q - P_REF)).tolist(), abs=1e-9)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_rloo_with_kl_in_the_reward_reaches_the_optimum(beta):
    assert_near(train_group_method(beta, "rloo", "reward"), optimum(beta), f"rloo beta={beta}")


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_ppo_reaches_the_optimum(beta):
    assert_near(train_ppo(beta), optimum(beta), f"ppo beta={beta}")


def test_grpo_with_k3_in_the_loss_reaches_its_fixed_point():
    beta = 1.0
    policy = train_group_method(beta, "rloo", "loss")
    assert_near(policy, reverse_kl_fixed_point(beta), "k3 in the loss")
    rate, _ = rate_and_kl(policy.probs())
    assert rate == pytest.approx(rate_and_kl(optimum(beta))[0], rel=0.10)  # the target rate of p* too


def test_small_beta_saturates_the_reward():
    for policy in (train_group_method(0.02, "grpo", "loss", steps=200), train_group_method(0.02, "rloo", "reward",
                                                                                            steps=200)):
        rate, _ = rate_and_kl(policy.probs())
        assert rate > 0.95


def test_dpo_on_preferences_from_the_reward_approaches_the_optimum():
    assert_near(train_dpo(1.0), optimum(1.0), "dpo")
