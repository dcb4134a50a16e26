"""Critic-free RL on groups of answers: GRPO, Dr. GRPO, RLOO and REINFORCE++ (``python -m megatron_lite grpo``).

Two models of one architecture on the same tp x pp x dp grid (settings under ``rlhf.grpo``):
the policy being trained (``checkpoint.load``, usually the SFT model) and the frozen reference of
the KL term (``reference``); optionally a frozen reward model (``reward_model``). Rewards come
from ``rlhf.reward_functions`` (``rlhf.rewards``), plus the reward model's score when one is set.

``train.global_batch_size`` counts answers: a step takes global_batch_size / n prompts and samples
n = ``samples_per_prompt`` answers to each, a group. Each data-parallel rank samples whole groups,
so a group's statistics never cross ranks. One step:

1. rollout: the policy samples the groups (KV cache, ``temperature``, top-k, top-p);
2. scoring: the policy's and the reference's log-probability of every answer token, the reward
   functions on the decoded answers, the reward model's score; the combined reward is clipped to
   +-``reward_clip``;
3. advantages (``advantage``): grpo (group mean and std), dr_grpo (group mean only), rloo
   (leave-one-out mean), or reinforce_pp (per-token returns whitened over the global batch). The
   KL term is either in the loss (``kl_penalty: loss``, ``kl_estimator`` k1 | k2 | k3, weighted
   by ``kl_coef``) or subtracted from the reward (``kl_penalty: reward``, the sampled log-ratio);
   ``kl_target`` > 0 adapts ``kl_coef`` towards that KL per answer. ``filter_zero_advantage``
   drops groups whose answers all scored alike (they teach nothing but dilute the mean);
4. ``epochs`` passes over the rollout in mini-batches of ``mini_batch_size`` answers (mini-batch
   k of K takes every K-th answer from k: the same answers at any dp), one optimizer step each,
   on the clipped objective with the ratio kept in [1 - ``clip_low``, 1 + ``clip_high``] (DAPO's
   clip-higher when clip_high > clip_low), its per-token terms aggregated by
   ``loss_aggregation`` (token_mean: every token of the mini-batch alike; sequence_mean: each
   answer's token mean, every answer alike).

The adaptive KL coefficient is not saved with checkpoints: a resumed run starts again from
``kl_coef``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.collectives import all_reduce, sum_over_replicas
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.rlhf.data import PromptDataset, chat_format
from megatron_lite.rlhf.losses import (
    AdaptiveKLController,
    aggregate,
    clipped_surrogate,
    group_advantages,
    kl_estimate,
    returns_to_go,
    whiten,
)
from megatron_lite.rlhf.rewards import load_reward_functions, score_answers
from megatron_lite.rlhf.rollout import (
    Sampling,
    answer_batch,
    from_last_stage,
    mini_batch_count,
    rollout_figures,
    sample_answers,
    score,
    score_at_last,
    token_log_probs,
)
from megatron_lite.rlhf.stage import Epochs, StageRecords
from megatron_lite.training.trained_model import TrainedModel, load_frozen_model
from megatron_lite.training.trainer import StepResult

# Figures of one optimizer step, summed over the replicas: clipped tokens, tokens, and the sum of
# (log ratio)^2 / 2, the approx-KL between the updated and the rollout policy.
_UPDATE_FIGURES = ("clipped", "tokens", "approx_kl")


def check_group_layout(cfg: Config, dp: int) -> int:
    """Prompts per step, when the batch holds whole groups on every dp rank; else an error naming the key."""
    n, answers = cfg.rlhf.grpo.samples_per_prompt, cfg.train.global_batch_size
    if answers % (n * dp) != 0:
        raise ConfigError(
            f"rlhf.grpo.samples_per_prompt={n}: each data-parallel rank samples whole groups, so "
            f"train.global_batch_size={answers} (answers per step) must be a multiple of samples_per_prompt x dp = "
            f"{n} x {dp} = {n * dp}; change train.global_batch_size or rlhf.grpo.samples_per_prompt")
    return answers // n


class GRPOTask:
    head = "lm"

    def __init__(self, cfg: Config, dims: ParallelDims, tokenizer):
        settings = cfg.rlhf.grpo
        if cfg.parallel.sequence_parallel or cfg.parallel.virtual_pp > 1:
            raise ConfigError(
                "grpo samples rollouts one token at a time, which sequence parallelism cannot split and an "
                "interleaved pipeline cannot stage: set parallel.sequence_parallel=false and parallel.virtual_pp=1")
        if not settings.reference:
            raise ConfigError("grpo needs rlhf.grpo.reference: a checkpoint directory (the SFT model the KL term "
                              "measures against)")
        self.functions = load_reward_functions(cfg.rlhf.reward_functions, cfg.rlhf.reward_weights)
        if not self.functions and not settings.reward_model:
            raise ConfigError("grpo has no reward: set rlhf.reward_functions (e.g. "
                              "['megatron_lite.rlhf.rewards:numeric_answer']) or rlhf.grpo.reward_model")
        if settings.filter_zero_advantage and settings.samples_per_prompt < 2:
            raise ConfigError("rlhf.grpo.filter_zero_advantage compares the answers of a group: set "
                              "rlhf.grpo.samples_per_prompt >= 2 or filter_zero_advantage=false")
        self.prompts_per_step = check_group_layout(cfg, dims.dp)
        self.mini_batches = mini_batch_count("rlhf.grpo.mini_batch_size", settings.mini_batch_size, cfg, dims.dp)
        self.cfg, self.dims, self.tokenizer, self.settings = cfg, dims, tokenizer, settings
        self.sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
        self.kl_controller = (AdaptiveKLController(initial=settings.kl_coef, target=settings.kl_target,
                                                   horizon=settings.kl_horizon) if settings.kl_target > 0 else None)
        self.kl_coef = settings.kl_coef
        self.records: StageRecords | None = None
        self.actor = self.reference = self.reward_model = None
        self.update_figures: list[dict[str, float]] = []  # per optimizer step of the last train_step
        self._update_sums = None

    # ------------------------------------------------------------------ data and models

    def datasets(self) -> tuple:
        # the demo's verifiable questions: their answers are what reward functions check
        self.records = StageRecords(self.cfg, self.dims, "grpo", "arithmetic", self._open_prompts)
        return self.records.train, self.records.valid

    def _open_prompts(self, path: Path) -> PromptDataset:
        room = self.cfg.model.seq_length - self.settings.max_new_tokens
        chat = chat_format(self.cfg.rlhf.chat_template, self.tokenizer, self.cfg.data.tokenizer)
        records = PromptDataset(path, self.tokenizer, room, chat, answer_key="rlhf.grpo.max_new_tokens")
        if self.dims.rank == 0 and records.num_dropped:
            print(f"{path}: {len(records)} prompts kept, {records.num_dropped} longer than {room} tokens dropped "
                  f"(model.seq_length - rlhf.grpo.max_new_tokens)", flush=True)
        return records

    def start(self, actor: TrainedModel) -> None:
        cfg, settings = self.cfg, self.settings
        self.actor = actor
        self.reference = load_frozen_model(cfg, self.dims, settings.reference, "lm", "rlhf.grpo.reference")
        if settings.reward_model:
            self.reward_model = load_frozen_model(cfg, self.dims, settings.reward_model, "value",
                                                  "rlhf.grpo.reward_model")

    def saved_beside(self) -> dict[str, TrainedModel]:
        return {}

    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def prompt_indices(self, epochs: Epochs, first_sample: int) -> list[int]:
        """This dp rank's prompts of the step starting at run sample (answer) ``first_sample``."""
        per_rank = self.prompts_per_step // self.dims.dp
        start = first_sample // self.settings.samples_per_prompt + self.dims.dp_rank * per_rank
        return [epochs[j] for j in range(start, start + per_rank)]

    # ------------------------------------------------------------------ rollout

    def rollout(self, indices: list[int], seed: int) -> dict:
        """Sample a group per prompt, score it and compute the advantages: every tensor of the
        update (log-probs live on the last pipeline stage, rewards and advantages on every stage)."""
        n, records, device = self.settings.samples_per_prompt, self.records.records, self.dims.device
        rows = [i for i in indices for _ in range(n)]  # a group's answers sit next to each other
        prompts = [records[i] for i in rows]
        started = time.perf_counter()
        answers = sample_answers(self.actor, prompts, self.sampling, self.tokenizer.eod_id, seed)
        generated = time.perf_counter()
        batch = answer_batch(prompts, answers, self.cfg.model.seq_length, self.tokenizer.pad_id, device)
        with self.actor.evaluating():
            logp = score(self.actor, batch, self.cfg.train.micro_batch_size, token_log_probs)
        reference_logp = score(self.reference, batch, self.cfg.train.micro_batch_size, token_log_probs)
        rewards, per_function = self._rewards(rows, answers, batch)
        scored = time.perf_counter()
        mask = batch.mask
        log_ratio = (logp - reference_logp) * mask  # the sampled KL (k1) per token, last stage only
        sequence_kl = from_last_stage(log_ratio.sum(dim=1), self.dims)
        advantages, keep = self._advantages(rewards, log_ratio, sequence_kl, mask)
        return {"tokens": batch.tokens, "labels": batch.labels, "mask": mask, "loss_mask": mask * keep[:, None],
                "logp": logp, "reference_logp": reference_logp, "advantages": advantages, "rewards": rewards,
                "per_function": per_function, "kl": sequence_kl, "keep": keep,
                "entropy": -(logp * mask).sum(dim=1), "length": mask.sum(dim=1),
                "seconds": {"generation": generated - started, "scoring": scored - generated}}

    def _rewards(self, rows: list[int], answers: list[list[int]], batch) -> tuple[torch.Tensor, dict]:
        """(B,) combined rewards on every stage, clipped; each function's values by name."""
        total, per_function = score_answers(self.functions, self.records.records, rows, answers, self.tokenizer)
        total = total.to(self.dims.device)
        if self.reward_model is not None:
            model_score = score(self.reward_model, batch, self.cfg.train.micro_batch_size, score_at_last)
            total = total + from_last_stage(model_score, self.dims).double()
        clip = self.settings.reward_clip
        return total.clamp(-clip, clip).float(), per_function

    def _advantages(self, rewards: torch.Tensor, log_ratio: torch.Tensor, sequence_kl: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T) per-token advantages, (B,) 1.0 for answers of groups kept in the update)."""
        settings, n = self.settings, self.settings.samples_per_prompt
        kl_in_reward = settings.kl_penalty == "reward"
        groups = rewards.view(-1, n)
        keep = torch.ones_like(rewards)
        if settings.filter_zero_advantage:  # all answers of the group scored alike
            keep = (groups.max(dim=1).values > groups.min(dim=1).values).float().repeat_interleave(n)
        if settings.advantage == "reinforce_pp":
            token_rewards = -self.kl_coef * log_ratio if kl_in_reward else torch.zeros_like(mask)
            last = mask.cumsum(dim=1).argmax(dim=1)  # each row's last answer position
            token_rewards[torch.arange(len(rewards), device=mask.device), last] += rewards
            token_rewards = from_last_stage(token_rewards, self.dims)  # the per-token KL lives on the last stage
            dp_group = self.dims.dp_group if self.dims.dp > 1 else None
            return whiten(returns_to_go(token_rewards, mask), mask * keep[:, None], dp_group), keep
        judged = rewards - self.kl_coef * sequence_kl if kl_in_reward else rewards
        return group_advantages(judged, n, settings.advantage)[:, None] * mask, keep

    def _sampling_seed(self, step: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + step * 1009 + self.dims.dp_rank) % (2**63)

    # ------------------------------------------------------------------ the update

    def train_step(self, epochs: Epochs, first_sample: int, step: int) -> StepResult:
        batch = self.rollout(self.prompt_indices(epochs, first_sample), self._sampling_seed(step))
        started = time.perf_counter()
        device = self.dims.device
        grad_norm, skipped = torch.zeros((), device=device), torch.zeros((), dtype=torch.bool, device=device)
        self.update_figures, losses = [], []
        for _ in range(self.settings.epochs):
            for k in range(self.mini_batches):  # every K-th answer from k: see mini_batch_count
                result = self._optimizer_step(batch, slice(k, None, self.mini_batches))
                if result is not None:
                    losses.append(result[0])
                    grad_norm, skipped = result[1], skipped | result[2]
        figures = self._step_figures(batch)
        figures["time_training"] = time.perf_counter() - started
        if self.kl_controller is not None:
            self.kl_coef = self.kl_controller.update(figures["kl"], self.cfg.train.global_batch_size)
        loss = torch.stack(losses).mean() if losses else torch.zeros((), device=device)
        return StepResult(loss, grad_norm, skipped, figures)

    def _optimizer_step(self, batch: dict, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """One optimizer step on the rollout's ``rows`` (this rank's part of a mini-batch); None
        when the whole mini-batch was filtered out (nothing to learn: no step)."""
        settings, dims, size = self.settings, self.dims, self.cfg.train.micro_batch_size
        loss_mask = batch["loss_mask"][rows]
        # token_mean weighs every token of the global mini-batch alike, sequence_mean every kept answer
        count = loss_mask.sum() if settings.loss_aggregation == "token_mean" else (loss_mask.sum(dim=1) > 0).sum()
        count = all_reduce(count.double().reshape(1), dims.dp_group if dims.dp > 1 else None)
        if count.item() == 0:
            return None
        keys = ("labels", "logp", "reference_logp", "advantages", "loss_mask")
        tokens, part = batch["tokens"][rows], {k: batch[k][rows] for k in keys}
        micro = [(tokens[i : i + size], {**{k: v[i : i + size] for k, v in part.items()},
                                         "count": (count / dims.dp).float(), "kl_coef": self.kl_coef})
                 for i in range(0, tokens.shape[0], size)]
        self._update_sums = torch.zeros(len(_UPDATE_FIGURES), dtype=torch.float64, device=dims.device)
        result = self.actor.train_on(micro)
        sums = sum_over_replicas(self._update_sums, dims)
        self.update_figures.append({"clip_fraction": (sums[0] / sums[1].clamp(min=1)).item(),
                                    "approx_kl": (sums[2] / sums[1].clamp(min=1)).item()})
        return result

    def loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        """The clipped objective (plus the KL term when it is in the loss) of one micro-batch,
        its share of the mini-batch's aggregate."""
        settings, mask = self.settings, target["loss_mask"]
        logp = -chunk(inputs, labels=target["labels"]).float()
        per_token, clipped = clipped_surrogate(logp, target["logp"], target["advantages"], settings.clip_low,
                                               settings.clip_high)
        if settings.kl_penalty == "loss":
            per_token = per_token + target["kl_coef"] * kl_estimate(logp, target["reference_logp"],
                                                                    settings.kl_estimator)
        if self._update_sums is not None:
            with torch.no_grad():
                log_ratio = (logp - target["logp"]) * mask
                self._update_sums += torch.stack([(clipped * mask).sum(), mask.sum(),
                                                  (0.5 * log_ratio**2).sum()]).double()
        return aggregate(per_token, mask, settings.loss_aggregation, target["count"])

    # ------------------------------------------------------------------ figures

    def _step_figures(self, batch: dict) -> dict[str, float]:
        """Global means: reward (and its std), each function's reward over the answers it judged,
        KL to the reference, entropy per token (sampled), answer length, kept groups; the update's
        clip fraction and approx-KL (last optimizer step); seconds per phase."""
        figures = rollout_figures(self.dims, batch, self.functions)
        n = self.settings.samples_per_prompt
        dropped = sum_over_replicas((1 - batch["keep"]).sum().double().reshape(1), self.dims) / n
        figures["filtered_groups"] = dropped.item()
        figures["kl_coef"] = self.kl_coef
        if self.update_figures:
            figures.update(self.update_figures[-1])
        figures.update({f"time_{k}": v for k, v in batch["seconds"].items()})
        return figures

    # ------------------------------------------------------------------ validation

    def evaluate(self, epochs: Epochs) -> dict[str, float]:
        """Rollouts on ``train.eval_steps`` batches of held-out prompts (same seed each time): the
        mean reward (the run's validation value), each function's reward, KL and answer length."""
        figures: dict[str, float] = {}
        eval_steps, answers = self.cfg.train.eval_steps, self.cfg.train.global_batch_size
        for i in range(eval_steps):
            batch = self.rollout(self.prompt_indices(epochs, i * answers), seed=self.cfg.train.seed + 7919 * i)
            means = rollout_figures(self.dims, batch, self.functions)
            figures = {k: figures.get(k, 0.0) + v / eval_steps for k, v in means.items()}
        return figures
