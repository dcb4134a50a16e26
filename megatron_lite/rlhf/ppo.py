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
3. per-token reward: -``kl_coef`` * (log pi - log pi_ref), plus the clipped score on the last
   answer token; advantages by GAE (``gamma``, ``gae_lambda``), whitened over the global batch;
4. ``epochs`` optimizer steps of each model: the actor on the clipped ratio objective
   (plus, with ``ptx_coef`` > 0, that weight times the pretraining loss on a batch of
   ``data.mixture``: PPO-ptx), the critic on the clipped value loss.

The actor is saved like any run (``checkpoint.save``); the critic beside it in
``checkpoint.save/critic``, and a resumed run loads both with their optimizers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.rlhf.data import PromptDataset, chat_format
from megatron_lite.rlhf.losses import clipped_value_loss, gae, ppo_policy_loss, whiten
from megatron_lite.rlhf.rollout import (
    Sampling,
    answer_batch,
    global_means,
    per_token_kl,
    position_values,
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
        needed = {"reference": "the SFT model the KL penalty measures against",
                  "reward_model": "a reward model from python -m megatron_lite rm"}
        for key, what in needed.items():
            if not getattr(settings, key):
                raise ConfigError(f"ppo needs rlhf.ppo.{key}: a checkpoint directory ({what})")
        self.cfg, self.dims, self.tokenizer, self.settings = cfg, dims, tokenizer, settings
        self.sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
        self.records: StageRecords | None = None
        self.actor = self.reference = self.reward_model = self.critic = None
        self.ptx_ds = None

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

    def prompts(self, epochs: Epochs, first_sample: int) -> list[list[int]]:
        return [self.records[i] for i in self.records.local_indices(epochs, first_sample)]

    def start(self, actor: TrainedModel) -> None:
        """The actor is the run's model; the reference, the reward model and the critic join it."""
        cfg, settings = self.cfg, self.settings
        self.actor = actor
        self.reference = load_frozen_model(cfg, self.dims, settings.reference, "lm", "rlhf.ppo.reference")
        self.reward_model = load_frozen_model(cfg, self.dims, settings.reward_model, "value", "rlhf.ppo.reward_model")
        self.critic = self._load_critic()
        if settings.ptx_coef > 0:
            if not cfg.data.mixture:
                raise ConfigError("rlhf.ppo.ptx_coef > 0 (PPO-ptx) mixes in pretraining batches: set data.mixture "
                                  "(or data.demo=true), or rlhf.ppo.ptx_coef=0")
            self.ptx_ds, _ = language_model_datasets(cfg, total_steps(cfg))

    def _load_critic(self) -> TrainedModel:
        """A resumed run's critic from beside the actor's checkpoints, a new one from
        ``critic`` (or the reward model) with a fresh optimizer."""
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
            source = settings.critic or settings.reward_model
            key = "rlhf.ppo.critic" if settings.critic else "rlhf.ppo.reward_model"
        critic.load(source, weights_only=not resuming, source_key=key)
        return critic

    def saved_beside(self) -> dict[str, TrainedModel]:
        return {CRITIC_DIR: self.critic}

    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    # ------------------------------------------------------------------ rollout

    def rollout(self, prompts: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
        """Sample answers and score them: every tensor of the update, on the device (the scores and
        what follows from them are zeros on pipeline stages other than the last)."""
        settings, size = self.settings, self.cfg.train.micro_batch_size
        answers = sample_answers(self.actor, prompts, self.sampling, self.tokenizer.eod_id, seed)
        batch = answer_batch(prompts, answers, self.cfg.model.seq_length, self.tokenizer.pad_id, self.dims.device)
        with self.actor.evaluating(), self.critic.evaluating():  # dropout off while scoring
            logp = score(self.actor, batch, size, token_log_probs)
            reference_logp = score(self.reference, batch, size, token_log_probs)
            values = score(self.critic, batch, size, position_values)
            reward_score = score(self.reward_model, batch, size, score_at_last)
        mask = batch.mask
        kl = per_token_kl(logp, reference_logp, mask)
        rewards = -settings.kl_coef * kl
        rows = torch.arange(len(prompts), device=self.dims.device)
        rewards[rows, batch.last - 1] += reward_score.clamp(-settings.reward_clip, settings.reward_clip)
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.gae_lambda)
        dp_group = self.dims.dp_group if self.dims.dp > 1 else None
        return {"tokens": batch.tokens, "labels": batch.labels, "mask": mask, "logp": logp, "values": values * mask,
                "advantages": whiten(advantages, mask, dp_group), "returns": returns, "score": reward_score,
                "kl": kl.sum(dim=1), "length": mask.sum(dim=1)}

    def _sampling_seed(self, step: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + step * 1009 + self.dims.dp_rank) % (2**63)

    def _figures(self, batch: dict) -> dict[str, float]:
        return global_means(self.dims, reward=batch["score"], kl=batch["kl"], response_length=batch["length"])

    # ------------------------------------------------------------------ the update

    def train_step(self, epochs: Epochs, first_sample: int, step: int) -> StepResult:
        batch = self.rollout(self.prompts(epochs, first_sample), self._sampling_seed(step))
        actor_micro = self._rollout_micro_batches(batch, ("labels", "mask", "logp", "advantages"), kind="ppo")
        if self.ptx_ds is not None:
            actor_micro += self._ptx_micro_batches(first_sample)
        critic_micro = self._rollout_micro_batches(batch, ("mask", "values", "returns"))
        for _ in range(self.settings.epochs):
            loss, grad_norm, skipped = self.actor.train_on(actor_micro)
            critic_loss, _, critic_skipped = self.critic.train_on(critic_micro)
        if not (self.critic.scaler.dynamic and critic_skipped.item()):  # as the trainer does for the actor
            self.critic.scheduler.step()
        return StepResult(loss, grad_norm, skipped, {**self._figures(batch), "critic_loss": critic_loss})

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
        loss = ppo_policy_loss(logp, target["logp"], target["advantages"], target["mask"], self.settings.clip_ratio)
        return loss / target["count"]

    def critic_loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        values = chunk(inputs).float()
        loss = clipped_value_loss(values, target["values"], target["returns"], target["mask"], self.settings.value_clip)
        return loss / num_micro_batches

    # ------------------------------------------------------------------ validation

    def evaluate(self, epochs: Epochs) -> dict[str, float]:
        """Rollouts on ``train.eval_steps`` batches of held-out prompts (same seed each time):
        the mean reward-model score (the run's validation value), KL to the reference and answer
        length."""
        figures = {"reward": 0.0, "kl": 0.0, "response_length": 0.0}
        gb, eval_steps = self.cfg.train.global_batch_size, self.cfg.train.eval_steps
        for i in range(eval_steps):
            means = self._figures(self.rollout(self.prompts(epochs, i * gb), seed=self.cfg.train.seed + 7919 * i))
            figures = {k: v + means[k] / eval_steps for k, v in figures.items()}
        return figures
