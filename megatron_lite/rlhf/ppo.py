"""PPO and PPO-ptx: the policy answers prompts, a reward model scores the answers, and the policy
is updated with the clipped surrogate objective against a learned critic.

Four models of one architecture, each laid out on the same tp x pp x dp grid:

    actor       the policy being trained (``checkpoint.load``, usually the SFT model)
    critic      a value head, trained alongside (``rlhf.critic``, by default the reward model)
    reference   the frozen policy of the KL penalty (``rlhf.reference``)
    reward      the frozen reward model (``rlhf.reward_model``)

One step on a global batch of prompts (each dp rank its share; the tp ranks of a replica sample
the same tokens):

1. rollout: the actor samples an answer to each prompt (KV cache, ``rlhf.temperature``, top-k,
   top-p, at most ``rlhf.max_new_tokens``, stopping at end-of-text; at pp > 1 each token's
   hidden states go stage to stage and the last stage's choice is broadcast back);
2. scoring, forward only (through the pipeline at pp > 1, where the figures below live on the
   last stage): the actor's and the reference's log-probability of every answer token, the
   critic's value before each, the reward model's score at the answer's last token;
3. per-token reward: -``kl_coef`` * (log pi - log pi_ref), plus the clipped score on the last
   answer token; advantages by GAE (``gamma``, ``gae_lambda``), whitened over the global batch;
4. ``ppo_epochs`` optimizer steps of each model: the actor on the clipped ratio objective
   (plus, with ``ptx_coef`` > 0, that weight times the pretraining loss on a batch of
   ``data.mixture``: PPO-ptx), the critic on the clipped value loss.

The actor is saved like any run (``checkpoint.save``); the critic beside it in
``checkpoint.save/critic``, and a resumed run loads both with their optimizers.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lite.config import Config, ConfigError
from megatron_lite.model.generation import generate
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.rlhf.data import IGNORE_INDEX, PromptDataset
from megatron_lite.rlhf.losses import values_at
from megatron_lite.rlhf.stage import Epochs, StageTrainer
from megatron_lite.training.checkpoint import Checkpointer, named_parameters, resolve_checkpoint_dir
from megatron_lite.training.optim import LossScaler
from megatron_lite.training.schedule import LRScheduler
from megatron_lite.training.step import ParallelStep, build_optimizer, language_model_loss
from megatron_lite.training.setup import build_model_chunks, local_batch, split_micro_batches
from megatron_lite.training.trainer import Trainer

CRITIC_DIR = "critic"


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


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> torch.Tensor:
    """PPO's clipped surrogate, averaged over the answer tokens."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (surrogate * mask).sum() / mask.sum().clamp(min=1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within ``clip`` of the rollout's values."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def _token_log_probs(chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
    return -chunk(inputs, labels=target["labels"]).float()  # (b, T), 0 off the answers


def _values(chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
    return chunk(inputs).float()


def _score_at_last(chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
    return values_at(chunk(inputs).float(), target["last"])


class PPOTrainer(StageTrainer):
    dataset_kind = demo_file = "sft"  # prompts: of any record kind, the answers are not read
    stage_name = "ppo"

    def __init__(self, cfg: Config, dims: ParallelDims | None = None):
        rl = cfg.rlhf
        if cfg.parallel.sequence_parallel or cfg.parallel.virtual_pp > 1:
            raise ConfigError(
                "ppo samples rollouts one token at a time, which sequence parallelism cannot split and an "
                "interleaved pipeline cannot stage: set parallel.sequence_parallel=false and parallel.virtual_pp=1"
            )
        needed = {"reference": "the SFT model the KL penalty measures against",
                  "reward_model": "a reward model from python -m megatron_lite rm"}
        for key, what in needed.items():
            if not getattr(rl, key):
                raise ConfigError(f"ppo needs rlhf.{key}: a checkpoint directory ({what})")
        self.ptx_ds = None
        super().__init__(cfg, dims)
        self.reference_step = self._frozen(rl.reference, "lm")
        self.reward_step = self._frozen(rl.reward_model, "value")
        self._build_critic()
        if rl.ptx_coef > 0:
            if not self.cfg.data.mixture:  # the resolved config: demo data fills the mixture
                raise ConfigError("rlhf.ptx_coef > 0 (PPO-ptx) mixes in pretraining batches: set data.mixture "
                                  "(or data.demo=true), or rlhf.ptx_coef=0")
            self.ptx_ds, _ = Trainer._build_datasets(self)

    # ------------------------------------------------------------------ models

    def _frozen(self, path: str, head: str) -> ParallelStep:
        """A model that only scores: loaded, in eval mode, without gradients; run forward-only
        through its own (optimizer-less) parallel step."""
        chunks = build_model_chunks(self.cfg, self.dims, head)
        Checkpointer(chunks, self.dims).load(path, weights_only=True)
        for chunk in chunks:
            chunk.eval().requires_grad_(False)
        return ParallelStep(chunks, None, self.dims, self.cfg.parallel.pipeline_schedule)

    def _build_critic(self) -> None:
        cfg, rl = self.cfg, self.cfg.rlhf
        self.critic_cfg = copy.copy(cfg)
        if rl.critic_lr is not None:
            min_lr = min(cfg.optim.min_lr, rl.critic_lr)
            self.critic_cfg.optim = dataclasses.replace(cfg.optim, lr=rl.critic_lr, min_lr=min_lr)
        self.critic_chunks = build_model_chunks(cfg, self.dims, "value")
        named = named_parameters(self.critic_chunks)
        self.critic_optimizer, _ = build_optimizer(named, self.critic_cfg, self.dims)
        self.critic_step = ParallelStep(self.critic_chunks, self.critic_optimizer, self.dims,
                                        cfg.parallel.pipeline_schedule, cfg.parallel.bucket_size_mb,
                                        loss_fn=self._critic_loss)
        self.critic_scheduler = LRScheduler(self.critic_optimizer, self.critic_cfg.optim, self.total_steps)
        self.critic_scaler = LossScaler(cfg.train.initial_loss_scale, cfg.train.loss_scale_window,
                                        dynamic=cfg.train.precision == "fp16")
        self.critic_checkpointer = Checkpointer(self.critic_chunks, self.dims, self.critic_optimizer,
                                                self.critic_scheduler, self.critic_scaler)
        ck = cfg.checkpoint
        resuming = ck.load and not ck.finetune
        if resuming:  # the critic saved beside the actor's checkpoints
            source = resolve_checkpoint_dir(ck.load).parent / CRITIC_DIR
        else:
            source = rl.critic or rl.reward_model
        if resuming and not Path(source).is_dir():
            raise ConfigError(f"resuming ppo from {ck.load} needs the critic saved with it in {source}; "
                              f"to start a new run from these weights set checkpoint.finetune=true")
        self.critic_checkpointer.load(source, weights_only=not resuming)  # the actor's load restored the position
        self.critic_step.weights_loaded()

    # ------------------------------------------------------------------ data

    def _load_records(self, path: Path) -> PromptDataset:
        room = self.cfg.model.seq_length - self.cfg.rlhf.max_new_tokens
        records = PromptDataset(path, self.tokenizer, room)
        if self.is_logging_rank and records.num_dropped:
            print(f"{path}: {len(records)} prompts kept, {records.num_dropped} longer than {room} tokens dropped "
                  f"(model.seq_length - rlhf.max_new_tokens)", flush=True)
        return records

    def _prompts(self, epochs: Epochs, first_sample: int) -> list[list[int]]:
        return [self.records[i] for i in self.local_records(epochs, first_sample)]

    # ------------------------------------------------------------------ rollout and scoring

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], seed: int) -> dict[str, torch.Tensor]:
        """Sample answers and score them: every tensor of the update, on the device (the scores and
        what follows from them are zeros on pipeline stages other than the last)."""
        rl, device, size = self.cfg.rlhf, self.dims.device, self.cfg.train.micro_batch_size
        actor = self.model_chunks[0]
        answers = generate(actor, prompts, rl.max_new_tokens, rl.temperature, rl.top_k, rl.top_p,
                           eod_id=self.tokenizer.eod_id, seed=seed)
        T = self.cfg.model.seq_length
        tokens = torch.full((len(prompts), T), self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(prompts), T), IGNORE_INDEX, dtype=torch.long)
        last = torch.zeros(len(prompts), dtype=torch.long)
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            sequence = prompt + answer
            tokens[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(answer)  # position t predicts t + 1
            last[row] = len(sequence) - 1
        tokens, labels, last = tokens.to(device), labels.to(device), last.to(device)
        micro = [(tokens[i : i + size], {"labels": labels[i : i + size], "last": last[i : i + size]})
                 for i in range(0, len(prompts), size)]
        scoring = self.model_chunks + self.critic_chunks  # dropout off while scoring; the frozen models stay in eval
        for chunk in scoring:
            chunk.eval()
        logp, ref_logp, values, score = (
            self._scores(step, micro, fn, len(prompts))
            for step, fn in ((self.parallel_step, _token_log_probs), (self.reference_step, _token_log_probs),
                             (self.critic_step, _values), (self.reward_step, _score_at_last)))
        for chunk in scoring:
            chunk.train()
        mask = (labels != IGNORE_INDEX).float()
        kl = (logp - ref_logp) * mask
        rewards = -rl.kl_coef * kl
        rewards[torch.arange(len(prompts), device=device), last - 1] += score.clamp(-rl.reward_clip, rl.reward_clip)
        advantages, returns = gae(rewards, values, mask, rl.gamma, rl.gae_lambda)
        return {"tokens": tokens, "labels": labels, "mask": mask, "logp": logp, "values": values * mask,
                "advantages": self._whiten(advantages, mask), "returns": returns, "score": score, "kl": kl.sum(dim=1),
                "length": mask.sum(dim=1)}

    def _scores(self, step: ParallelStep, micro: list, fn, batch: int) -> torch.Tensor:
        outputs = step.forward_outputs(micro, self._autocast(), fn)
        if outputs:  # the last pipeline stage
            return torch.cat([o.float() for o in outputs])
        shape = (batch,) if fn is _score_at_last else (batch, self.cfg.model.seq_length)
        return torch.zeros(shape, device=self.dims.device)

    def _whiten(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zero mean and unit variance over every answer token of the global batch."""
        stats = torch.stack([(advantages * mask).sum(), (advantages**2 * mask).sum(), mask.sum()]).double()
        if self.dims.dp > 1:
            dist.all_reduce(stats, group=self.dims.dp_group)
        mean = stats[0] / stats[2].clamp(min=1)
        var = (stats[1] / stats[2].clamp(min=1) - mean**2).clamp(min=0)
        return ((advantages - mean) * torch.rsqrt(var + 1e-8) * mask).float()

    def _global_means(self, **per_sample: torch.Tensor) -> dict[str, float]:
        """Means over the global batch of per-sample (B,) tensors held by the last pipeline stage."""
        columns = torch.stack([t.double() for t in per_sample.values()], dim=1)  # (B, k)
        sums = self._sum_over_replicas(torch.cat([columns.sum(dim=0), columns.new_tensor([columns.shape[0]])]))
        return {name: (sums[i] / sums[-1]).item() for i, name in enumerate(per_sample)}

    # ------------------------------------------------------------------ the update

    def _sampling_seed(self, step: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + step * 1009 + self.dims.dp_rank) % (2**63)

    def train_step(self) -> tuple[float, float, bool, dict]:
        cfg, rl = self.cfg, self.cfg.rlhf
        batch = self.rollout(self._prompts(self.train_ds, self.consumed_samples), self._sampling_seed(self.step))
        size = cfg.train.micro_batch_size
        keys = ("labels", "mask", "logp", "advantages")
        rollout_micro = [(batch["tokens"][i : i + size], {"kind": "ppo", **{k: batch[k][i : i + size] for k in keys}})
                         for i in range(0, batch["tokens"].shape[0], size)]
        for micro in rollout_micro:
            micro[1]["count"] = len(rollout_micro)
        actor_micro = list(rollout_micro)
        if self.ptx_ds is not None:
            ptx = split_micro_batches(local_batch(self.ptx_ds, self.consumed_samples, cfg.train.global_batch_size,
                                                  self.dims), size, self.dims.device)
            actor_micro += [(tokens, {"kind": "ptx", "labels": labels, "count": len(ptx)}) for tokens, labels in ptx]
        keys = ("mask", "values", "returns")
        critic_micro = [(batch["tokens"][i : i + size], {k: batch[k][i : i + size] for k in keys})
                        for i in range(0, batch["tokens"].shape[0], size)]
        for _ in range(rl.ppo_epochs):
            loss = self.parallel_step.forward_backward(actor_micro, self._autocast(), self.scaler.scale)
            grad_norm, skipped = self.parallel_step.optimizer_step(self.scaler, cfg.optim.grad_clip)
            critic_loss = self.critic_step.forward_backward(critic_micro, self._autocast(), self.critic_scaler.scale)
            _, critic_skipped = self.critic_step.optimizer_step(self.critic_scaler, cfg.optim.grad_clip)
        if not critic_skipped:
            self.critic_scheduler.step()
        extra = self._global_means(reward=batch["score"], kl=batch["kl"], response_length=batch["length"])
        return loss, grad_norm, skipped, {**extra, "critic_loss": critic_loss}

    def loss_fn(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        """The actor's loss: PPO's clipped objective on rollout micro-batches, the weighted
        pretraining loss on PPO-ptx ones (each kind averaged over its own micro-batches)."""
        if target["kind"] == "ptx":
            return self.cfg.rlhf.ptx_coef * language_model_loss(chunk, inputs, target["labels"], target["count"])
        logp = -chunk(inputs, labels=target["labels"]).float()
        loss = ppo_policy_loss(logp, target["logp"], target["advantages"], target["mask"], self.cfg.rlhf.clip_ratio)
        return loss / target["count"]

    def _critic_loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        values = chunk(inputs).float()
        loss = clipped_value_loss(values, target["values"], target["returns"], target["mask"], self.cfg.rlhf.value_clip)
        return loss / num_micro_batches

    # ------------------------------------------------------------------ validation and saving

    def evaluate(self) -> float:
        """Rollouts on ``train.eval_steps`` batches of held-out prompts (same seed each time):
        the mean reward-model score, KL to the reference and answer length. Returns the reward."""
        figures = {"reward": 0.0, "kl": 0.0, "response_length": 0.0}
        gb = self.cfg.train.global_batch_size
        for i in range(self.cfg.train.eval_steps):
            batch = self.rollout(self._prompts(self.valid_ds, i * gb), seed=self.cfg.train.seed + 7919 * i)
            means = self._global_means(reward=batch["score"], kl=batch["kl"], response_length=batch["length"])
            figures = {k: v + means[k] / self.cfg.train.eval_steps for k, v in figures.items()}
        self.metrics.validation_figures(self.step, {f"val_{k}": v for k, v in figures.items()})
        self.metrics.restart_window()
        return figures["reward"]

    def save(self) -> Path | None:
        path = super().save()
        if path is not None:
            self.critic_checkpointer.save(Path(self.cfg.checkpoint.save) / CRITIC_DIR, self.step, self.consumed_samples,
                                          self.cfg.to_dict(), self.cfg.data.tokenizer or None)
        return path
