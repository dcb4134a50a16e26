"""The RL losses optimise the right thing: a toy whose KL-regularised optimum is known in closed form.

A tabular policy answers with L tokens from a vocabulary of V (one logit row per position, the
rows of the reference near-uniform); the reward counts the target token. Maximising
E[r] - beta * KL(pi || pi_ref) over answers has the optimum pi*(y) ~ pi_ref(y) exp(r(y) / beta),
which for a reward that is a sum over positions factorises: per position
p*(a) ~ p_ref(a) exp(1[a = target] / beta). The same loss functions the tasks use
(``rlhf.losses``) drive the tabular policy by sampled answers and Adam: each algorithm must land
within 10% of the optimum's target rate and KL, computed exactly from the policy's table.

With an end-of-text token answers have any length up to L (the reward counts the targets before
the end), and the optimum is no longer the same at every position: p*_t(a) ~ p_ref(a) exp(r(a) / beta) Z_{t+1}
for a token that continues, p*_t(end) ~ p_ref(end), with Z_t = sum_a p_ref(a) exp(r(a) / beta) Z_{t+1}
+ p_ref(end) and Z_L = 1, computed by dynamic programming from the last position back.

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


def rate_and_kl(p: torch.Tensor, p_ref: torch.Tensor = P_REF, end: int | None = None) -> tuple[float, float]:
    """(targets per position, KL(pi || pi_ref) per answer) of a per-position distribution or of
    (L, V) rows; with an ``end`` token, positions after it are not reached (exact expectations)."""
    rows = p.expand(L, len(p_ref)) if p.dim() == 1 else p
    alive = torch.ones(L, dtype=torch.float64)
    if end is not None:
        alive[1:] = torch.cumprod(1 - rows[:-1, end], dim=0)
    per_position_kl = (rows * (rows / p_ref).log()).sum(dim=1)
    return (alive * rows[:, TARGET]).sum().item() / L, (alive * per_position_kl).sum().item()


def optimum_with_end(beta: float, p_ref: torch.Tensor, end: int) -> torch.Tensor:
    """(L, V) p*_t by dynamic programming from the last position back (see the module docstring)."""
    reward = (torch.arange(len(p_ref)) == TARGET).double()
    rows, z_next = [], 1.0
    for _ in range(L):
        weights = p_ref * torch.exp(reward / beta) * z_next
        weights[end] = p_ref[end]
        rows.append(weights / weights.sum())
        z_next = weights.sum()
    return torch.stack(rows[::-1])


class TabularPolicy(torch.nn.Module):
    """One logit row per answer position, starting at the reference ``p_ref``."""

    def __init__(self, p_ref: torch.Tensor = P_REF):
        super().__init__()
        self.logits = torch.nn.Parameter(p_ref.log().float().repeat(L, 1))  # (L, V)

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.double(), dim=-1)

    @torch.no_grad()
    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(torch.softmax(self.logits, -1), count, replacement=True, generator=generator).t()

    def log_probs(self, answers: torch.Tensor) -> torch.Tensor:
        """(B, L) answers -> (B, L) log pi of each token."""
        table = torch.log_softmax(self.logits, dim=-1)  # (L, V)
        return table[torch.arange(L), answers]


def reference_log_probs(answers: torch.Tensor, p_ref: torch.Tensor = P_REF) -> torch.Tensor:
    return p_ref.log().float()[answers]


def count_reward(answers: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    hits = (answers == TARGET).float()
    return (hits if mask is None else hits * mask).sum(dim=1)


def answer_mask(answers: torch.Tensor, end: int | None) -> torch.Tensor:
    """(B, L) 1.0 up to and including the first end token (every position without one)."""
    if end is None:
        return torch.ones(answers.shape)
    ended_before = torch.cumsum((answers == end).float(), dim=1) - (answers == end).float()
    return (ended_before == 0).float()


def optimiser(params, steps: int, lr: float):
    opt = torch.optim.Adam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 50)


def train_group_method(beta: float, advantage: str, kl_penalty: str, steps: int = 200, groups: int = 32,
                       n: int = 8, lr: float = 0.05, seed: int = 0, p_ref: torch.Tensor = P_REF,
                       end: int | None = None) -> TabularPolicy:
    """GRPO / RLOO as the task runs them: groups of n answers, group advantages, the clipped
    surrogate (two mini-batch epochs per rollout) with the KL in the reward (k1) or in the loss (k3);
    with an ``end`` token, each answer's tokens after it are masked out."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    policy = TabularPolicy(p_ref)
    opt, schedule = optimiser(policy.parameters(), steps, lr)
    for _ in range(steps):
        answers = policy.sample(groups * n, generator)
        mask = answer_mask(answers, end)
        with torch.no_grad():
            old = policy.log_probs(answers)
        reference = reference_log_probs(answers, p_ref)
        rewards = count_reward(answers, mask)
        if kl_penalty == "reward":
            rewards = rewards - beta * ((old - reference) * mask).sum(dim=1)
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


def train_ppo(beta: float, steps: int = 200, batch: int = 256, lr: float = 0.05, seed: int = 0) -> TabularPolicy:
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


def train_dpo(beta: float, pairs: int = 20000, steps: int = 200, lr: float = 0.05, seed: int = 0) -> TabularPolicy:
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


def assert_near(policy: TabularPolicy, target: torch.Tensor, what: str, rel: float = 0.10,
                p_ref: torch.Tensor = P_REF, end: int | None = None) -> None:
    got_rate, got_kl = rate_and_kl(policy.probs(), p_ref, end)
    want_rate, want_kl = rate_and_kl(target, p_ref, end)
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


P_REF_END = torch.tensor([0.2, 0.2, 0.2, 0.25, 0.15], dtype=torch.float64)  # the last token ends the answer
END = 4


def test_the_optimum_with_an_end_token_by_dynamic_programming():
    beta = 1.0
    p = optimum_with_end(beta, P_REF_END, END)
    # the last position cannot continue: its optimum is the fixed-length one
    last = P_REF_END * torch.exp((torch.arange(5) == TARGET).double() / beta)
    last[END] = P_REF_END[END]
    assert torch.allclose(p[-1], last / last.sum())
    # earlier, continuing is worth more (more targets to come): the end token is rarer
    assert (p[:-1, END] < p[-1, END]).all() and (p[1:, END] >= p[:-1, END]).all()
    # brute force over every answer: pi*(y) ~ pi_ref(y) exp(r(y) / beta), then its rate and KL
    rate, kl = rate_and_kl(p, P_REF_END, END)
    answers = torch.cartesian_prod(*[torch.arange(5)] * L)
    mask = answer_mask(answers, END).double()
    log_ref = (P_REF_END.log()[answers] * mask).sum(dim=1)
    first_end = [tuple(row[: int(m.sum())].tolist()) for row, m in zip(answers, mask)]
    keep = torch.tensor([first_end.index(prefix) == i for i, prefix in enumerate(first_end)])  # one per answer
    rewards = count_reward(answers, mask).double()
    weights = torch.exp(log_ref + rewards / beta)[keep]
    weights /= weights.sum()
    assert (weights * rewards[keep]).sum().item() / L == pytest.approx(rate, rel=1e-9)
    log_z = torch.log(torch.exp(log_ref + rewards / beta)[keep].sum())
    assert (weights * (rewards[keep] / beta - log_z)).sum().item() == pytest.approx(kl, rel=1e-9)  # E[log pi*/pi_ref]


def test_rloo_reaches_the_optimum_with_an_end_token():
    beta = 1.0
    policy = train_group_method(beta, "rloo", "reward", p_ref=P_REF_END, end=END)
    assert_near(policy, optimum_with_end(beta, P_REF_END, END), "rloo with end", p_ref=P_REF_END, end=END)
