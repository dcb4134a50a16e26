"""PPO and PPO-ptx: the policy answers prompts, a reward model scores the answers, and the policy
is updated with the clipped surrogate objective against a learned critic.

Four models of one architecture, each laid out on the same tp x pp x dp grid (settings under
``rlhf.ppo``):

    actor       the policy being trained (``checkpoint.load``, usually the SFT model): the run's model
    critic      a value head, trained alongside (``critic``, by default the reward model)
    reference   the frozen policy of the KL penalty (``reference``)
    reward      the frozen reward model (``reward_model``)

One step on a global batch of prompts (each dp rank its share; the tp ranks of a replica sample
the same tokens), from the pieces in ``rlhf.rollout`` and ``rlhf.losses``:

1. rollout: the actor samples an answer to each prompt (KV cache, ``temperature``, top-k,
   top-p, at most ``max_new_tokens``, stopping at end-of-text; at pp > 1 each token's
   hidden states go stage to stage and the last stage's choice is broadcast back);
2. scoring, forward only (through the pipeline at pp > 1, where the figures below live on the
   last stage): the actor's and the reference's log-probability of every answer token, the
   critic's value before each, the reward model's score at the answer's last token;
3. per-token reward: -``kl_coef`` * (log pi - log pi_ref), plus on the last answer token the
   score, clipped to +-``reward_clip``: the reward model's plus the weighted ``rlhf.reward_functions``
   (either may be absent); advantages by GAE (``gamma``, ``gae_lambda``), whitened over the
   global batch; ``kl_target`` > 0 adapts ``kl_coef`` towards that KL per answer after each step;
4. ``epochs`` passes over the rollout in mini-batches of ``mini_batch_size`` answers (every K-th
   answer from k, the same answers at any dp), one optimizer step of each model per mini-batch:
   the actor on the clipped ratio objective (plus, with ``ptx_coef`` > 0, that weight times the
   pretraining loss on a batch of ``data.mixture``: PPO-ptx), the critic on the clipped value loss.

Logged per step: reward (mean, std, per function), KL, entropy (sampled, per token), answer
length, the last update's clip fraction, approx-KL and value clip fraction, the critic's
explained variance of the returns, and the seconds spent generating, scoring and training.

The actor is saved like any run (``checkpoint.save``); the critic beside it in
``checkpoint.save/critic``, and a resumed run loads both with their optimizers (the adaptive KL
coefficient starts again from ``kl_coef``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.collectives import sum_over_replicas
from megatron_lite.rlhf.data import PromptDataset, chat_format
from megatron_lite.rlhf.losses import (
    AdaptiveKLController,
    clipped_surrogate,
    clipped_value_loss,
    gae,
    ppo_policy_loss,
    whiten,
)
from megatron_lite.rlhf.rewards import load_reward_functions, score_answers
from megatron_lite.rlhf.rollout import (
    Sampling,
    answer_batch,
    mini_batch_count,
    per_token_kl,
    position_values,
    rollout_figures,
    sample_answers,
    score,
    score_at_last,
    token_log_probs,
)
from megatron_lite.rlhf.stage import Epochs, StageRecords
from megatron_lite.training.checkpoint import resolve_checkpoint_dir
from megatron_lite.training.step import language_model_loss
from megatron_lite.training.trained_model import TrainedModel, build_trained_model, load_frozen_model
from megatron_lite.training.setup import local_batch, split_micro_batches, total_steps
from megatron_lite.training.trainer import StepResult, language_model_datasets

CRITIC_DIR = "critic"
# Figures of one optimizer step, summed over the replicas: the actor's clipped tokens, tokens and
# summed (log ratio)^2 / 2 (approx-KL to the rollout policy); the critic's clipped positions and positions.
_UPDATE_FIGURES = ("clipped", "tokens", "approx_kl", "value_clipped", "value_tokens")


class PPOTask:
    head = "lm"

    def __init__(self, cfg: Config, dims: ParallelDims, tokenizer):
        settings = cfg.rlhf.ppo
        if cfg.rlhf.pack:
            raise ConfigError("rlhf.pack=true packs the sft, rm and dpo stages; ppo generates its own batches, "
                              "set rlhf.pack=false")
        if cfg.parallel.sequence_parallel or cfg.parallel.virtual_pp > 1:
            raise ConfigError(
                "ppo samples rollouts one token at a time, which sequence parallelism cannot split and an "
                "interleaved pipeline cannot stage: set parallel.sequence_parallel=false and parallel.virtual_pp=1"
            )
        if not settings.reference:
            raise ConfigError("ppo needs rlhf.ppo.reference: a checkpoint directory (the SFT model the KL penalty "
                              "measures against)")
        self.functions = load_reward_functions(cfg.rlhf.reward_functions, cfg.rlhf.reward_weights)
        if not settings.reward_model and not self.functions:
            raise ConfigError("ppo needs rlhf.ppo.reward_model: a checkpoint directory (a reward model from "
                              "python -m megatron_lite rm), or rlhf.reward_functions")
        self.mini_batches = mini_batch_count("rlhf.ppo.mini_batch_size", settings.mini_batch_size, cfg, dims.dp)
        self.cfg, self.dims, self.tokenizer, self.settings = cfg, dims, tokenizer, settings
        self.sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
        self.kl_coef = settings.kl_coef
        self.kl_controller = (AdaptiveKLController(initial=settings.kl_coef, target=settings.kl_target,
                                                   horizon=settings.kl_horizon) if settings.kl_target > 0 else None)
        self.records: StageRecords | None = None
        self.actor = self.reference = self.reward_model = self.critic = None
        self.ptx_ds = None
        self._update_sums: torch.Tensor | None = None  # see _UPDATE_FIGURES

    # ------------------------------------------------------------------ data and models

    def datasets(self) -> tuple:
        self.records = StageRecords(self.cfg, self.dims, "ppo", "sft", self._open_prompts)
        return self.records.train, self.records.valid

    def _open_prompts(self, path: Path) -> PromptDataset:
        room = self.cfg.model.seq_length - self.settings.max_new_tokens
        chat = chat_format(self.cfg.rlhf.chat_template, self.tokenizer, self.cfg.data.tokenizer)
        records = PromptDataset(path, self.tokenizer, room, chat)
        if self.dims.rank == 0 and records.num_dropped:
            print(f"{path}: {len(records)} prompts kept, {records.num_dropped} longer than {room} tokens dropped "
                  f"(model.seq_length - rlhf.ppo.max_new_tokens)", flush=True)
        return records

    def prompt_indices(self, epochs: Epochs, first_sample: int) -> list[int]:
        return self.records.local_indices(epochs, first_sample)

    def prompts(self, epochs: Epochs, first_sample: int) -> list[list[int]]:
        return [self.records[i] for i in self.prompt_indices(epochs, first_sample)]

    def start(self, actor: TrainedModel) -> None:
        """The actor is the run's model; the reference, the reward model and the critic join it."""
        cfg, settings = self.cfg, self.settings
        self.actor = actor
        self.reference = load_frozen_model(cfg, self.dims, settings.reference, "lm", "rlhf.ppo.reference")
        if settings.reward_model:
            self.reward_model = load_frozen_model(cfg, self.dims, settings.reward_model, "value",
                                                  "rlhf.ppo.reward_model")
        self.critic = self._load_critic()
        if settings.ptx_coef > 0:
            if not cfg.data.mixture:
                raise ConfigError("rlhf.ppo.ptx_coef > 0 (PPO-ptx) mixes in pretraining batches: set data.mixture "
                                  "(or data.demo=true), or rlhf.ppo.ptx_coef=0")
            self.ptx_ds, _ = language_model_datasets(cfg, total_steps(cfg))

    def _load_critic(self) -> TrainedModel:
        """A resumed run's critic from beside the actor's checkpoints, a new one from
        ``critic`` (or the reward model, or without one the actor's checkpoint with a new value
        head) with a fresh optimizer."""
        cfg, settings = self.cfg, self.settings
        critic = build_trained_model(cfg, self.dims, "value", self.critic_loss, lr=settings.critic_lr)
        resuming = bool(cfg.checkpoint.load) and not cfg.checkpoint.finetune
        if resuming:
            source = resolve_checkpoint_dir(cfg.checkpoint.load).parent / CRITIC_DIR
            if not source.is_dir():
                raise ConfigError(f"resuming ppo from {cfg.checkpoint.load} needs the critic saved with it in "
                                  f"{source}; to start a new run from these weights set checkpoint.finetune=true")
            key = "checkpoint.load"
        else:
            sources = [(k, v) for k, v in (("rlhf.ppo.critic", settings.critic),
                                           ("rlhf.ppo.reward_model", settings.reward_model),
                                           ("checkpoint.load", cfg.checkpoint.load)) if v]
            if not sources:
                raise ConfigError("ppo without rlhf.ppo.reward_model starts the critic from rlhf.ppo.critic or "
                                  "checkpoint.load; set one of them")
            key, source = sources[0]
        critic.load(source, weights_only=not resuming, source_key=key)
        return critic

    def saved_beside(self) -> dict[str, TrainedModel]:
        return {CRITIC_DIR: self.critic}

    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    # ------------------------------------------------------------------ rollout

    def rollout(self, indices: list[int], seed: int) -> dict:
        """Sample answers to the prompts ``indices`` and score them: every tensor of the update, on
        the device (log-probs, values and what follows from them are zeros on pipeline stages other
        than the last)."""
        settings, size = self.settings, self.cfg.train.micro_batch_size
        prompts = [self.records[i] for i in indices]
        started = time.perf_counter()
        answers = sample_answers(self.actor, prompts, self.sampling, self.tokenizer.eod_id, seed)
        generated = time.perf_counter()
        batch = answer_batch(prompts, answers, self.cfg.model.seq_length, self.tokenizer.pad_id, self.dims.device)
        with self.actor.evaluating(), self.critic.evaluating():  # dropout off while scoring
            logp = score(self.actor, batch, size, token_log_probs)
            reference_logp = score(self.reference, batch, size, token_log_probs)
            values = score(self.critic, batch, size, position_values)
        reward_score, per_function = score_answers(self.functions, self.records.records, indices, answers,
                                                   self.tokenizer)
        reward_score = reward_score.float().to(self.dims.device)
        if self.reward_model is not None:
            reward_score = reward_score + score(self.reward_model, batch, size, score_at_last)
        scored = time.perf_counter()
        mask = batch.mask
        kl = per_token_kl(logp, reference_logp, mask)
        rewards = -self.kl_coef * kl
        rows = torch.arange(len(prompts), device=self.dims.device)
        rewards[rows, batch.last - 1] += reward_score.clamp(-settings.reward_clip, settings.reward_clip)
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.gae_lambda)
        dp_group = self.dims.dp_group if self.dims.dp > 1 else None
        return {"tokens": batch.tokens, "labels": batch.labels, "mask": mask, "logp": logp, "values": values * mask,
                "advantages": whiten(advantages, mask, dp_group), "returns": returns, "score": reward_score,
                "rewards": reward_score, "per_function": per_function, "kl": kl.sum(dim=1),
                "entropy": -(logp * mask).sum(dim=1), "length": mask.sum(dim=1),
                "seconds": {"generation": generated - started, "scoring": scored - generated}}

    def _sampling_seed(self, step: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + step * 1009 + self.dims.dp_rank) % (2**63)

    def _figures(self, batch: dict) -> dict[str, float]:
        """The rollout's figures, with the critic's explained variance of the returns."""
        mask, returns, values = batch["mask"], batch["returns"], batch["values"]
        sums = torch.stack([mask.sum(), (returns * mask).sum(), (returns**2 * mask).sum(),
                            ((returns - values) * mask).sum(), ((returns - values) ** 2 * mask).sum()]).double()
        tokens, r_sum, r_sq, e_sum, e_sq = sum_over_replicas(sums, self.dims).tolist()
        tokens = max(tokens, 1.0)
        variance = r_sq / tokens - (r_sum / tokens) ** 2
        residual = e_sq / tokens - (e_sum / tokens) ** 2
        explained = 1.0 - residual / variance if variance > 0 else 0.0
        return {**rollout_figures(self.dims, batch, self.functions), "explained_variance": explained}

    # ------------------------------------------------------------------ the update

    def train_step(self, epochs: Epochs, first_sample: int, step: int) -> StepResult:
        batch = self.rollout(self.prompt_indices(epochs, first_sample), self._sampling_seed(step))
        started = time.perf_counter()
        ptx = self._ptx_micro_batches(first_sample) if self.ptx_ds is not None else []
        count = self.mini_batches
        for _ in range(self.settings.epochs):
            for k in range(count):  # every K-th answer from k: see mini_batch_count
                part = {key: batch[key][k::count] for key in ("tokens", "labels", "mask", "logp", "advantages",
                                                               "values", "returns")}
                self._update_sums = torch.zeros(len(_UPDATE_FIGURES), dtype=torch.float64, device=self.dims.device)
                actor_micro = self._rollout_micro_batches(part, ("labels", "mask", "logp", "advantages"), kind="ppo")
                loss, grad_norm, skipped = self.actor.train_on(actor_micro + ptx)
                critic_loss, _, critic_skipped = self.critic.train_on(
                    self._rollout_micro_batches(part, ("mask", "values", "returns")))
        if not (self.critic.scaler.dynamic and critic_skipped.item()):  # as the trainer does for the actor
            self.critic.scheduler.step()
        figures = {**self._figures(batch), **self._update_figures(), "critic_loss": critic_loss,
                   "kl_coef": self.kl_coef, **{f"time_{k}": v for k, v in batch["seconds"].items()},
                   "time_training": time.perf_counter() - started}
        if self.kl_controller is not None:
            self.kl_coef = self.kl_controller.update(figures["kl"], self.cfg.train.global_batch_size)
        return StepResult(loss, grad_norm, skipped, figures)

    def _update_figures(self) -> dict[str, float]:
        """The last optimizer step's clip fraction, approx-KL to the rollout policy and the
        fraction of value positions whose clipped loss was taken."""
        clipped, tokens, approx_kl, value_clipped, value_tokens = sum_over_replicas(self._update_sums,
                                                                                    self.dims).tolist()
        return {"clip_fraction": clipped / max(tokens, 1.0), "approx_kl": approx_kl / max(tokens, 1.0),
                "value_clip_fraction": value_clipped / max(value_tokens, 1.0)}

    def _rollout_micro_batches(self, batch: dict, keys: tuple[str, ...], kind: str | None = None) -> list:
        """The rollout's rows as micro-batches of ``keys``; an actor's (``kind``) also counts them."""
        size, rows = self.cfg.train.micro_batch_size, batch["tokens"].shape[0]
        micro = [(batch["tokens"][i : i + size], {k: batch[k][i : i + size] for k in keys})
                 for i in range(0, rows, size)]
        if kind is not None:
            for _, target in micro:
                target.update(kind=kind, count=len(micro))
        return micro

    def _ptx_micro_batches(self, first_sample: int) -> list:
        cfg = self.cfg
        batch = local_batch(self.ptx_ds, first_sample, cfg.train.global_batch_size, self.dims)
        ptx = split_micro_batches(batch, cfg.train.micro_batch_size, self.dims.device)
        return [(tokens, {"kind": "ptx", "labels": labels, "count": len(ptx)}) for tokens, labels in ptx]

    def loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        """The actor's loss: PPO's clipped objective on rollout micro-batches, the weighted
        pretraining loss on PPO-ptx ones (each kind averaged over its own micro-batches)."""
        if target["kind"] == "ptx":
            return self.settings.ptx_coef * language_model_loss(chunk, inputs, target["labels"], target["count"])
        logp = -chunk(inputs, labels=target["labels"]).float()
        mask, clip = target["mask"], self.settings.clip_ratio
        _, clipped = clipped_surrogate(logp, target["logp"], target["advantages"], clip, clip)
        self._record(0, torch.stack([(clipped * mask).sum(), mask.sum(),
                                     (0.5 * ((logp - target["logp"]) * mask) ** 2).sum()]))
        return ppo_policy_loss(logp, target["logp"], target["advantages"], mask, clip) / target["count"]

    def critic_loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        values = chunk(inputs).float()
        old, returns, mask, clip = target["values"], target["returns"], target["mask"], self.settings.value_clip
        clipped = old + (values - old).clamp(-clip, clip)
        took_clipped = ((clipped - returns) ** 2 > (values - returns) ** 2).float()
        self._record(3, torch.stack([(took_clipped * mask).sum(), mask.sum()]))
        return clipped_value_loss(values, old, returns, mask, clip) / num_micro_batches

    def _record(self, first: int, figures: torch.Tensor) -> None:
        """Add an update's per-micro-batch figures to ``_UPDATE_FIGURES`` from index ``first``
        (while training only: ``loss`` also runs outside an update, in tests)."""
        if self._update_sums is not None:
            self._update_sums[first : first + len(figures)] += figures.detach().double()

    # ------------------------------------------------------------------ validation

    def evaluate(self, epochs: Epochs) -> dict[str, float]:
        """Rollouts on ``train.eval_steps`` batches of held-out prompts (same seed each time):
        the mean reward (the run's validation value), its std and per-function means, KL to the
        reference, entropy and answer length."""
        figures: dict[str, float] = {}
        gb, eval_steps = self.cfg.train.global_batch_size, self.cfg.train.eval_steps
        for i in range(eval_steps):
            batch = self.rollout(self.prompt_indices(epochs, i * gb), seed=self.cfg.train.seed + 7919 * i)
            means = rollout_figures(self.dims, batch, self.functions)
            figures = {k: figures.get(k, 0.0) + v / eval_steps for k, v in means.items()}
        return figures
