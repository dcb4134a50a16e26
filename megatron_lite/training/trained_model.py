"""A trained model: everything one model of a run carries from step to step, built by one function.

Pretraining and every fine-tuning stage hold one; PPO holds four (the actor and the critic
trained, the reference and the reward model frozen). A ``TrainedModel`` is this rank's model
chunks with the parallel step that runs them and, unless frozen, the optimizer, learning-rate
schedule and loss scaler that update them. Its checkpoints are written and read here only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from megatron_lite.config import Config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import BackgroundWriter, Checkpointer, DataPosition, LoadPolicy, named_parameters
from megatron_lite.training.divergence import require_finite_weights
from megatron_lite.training.optim import LossScaler
from megatron_lite.training.schedule import LRScheduler
from megatron_lite.training.setup import autocast_context, build_model_chunks, total_steps
from megatron_lite.training.step import (
    LossFn,
    MicroBatch,
    ParallelStep,
    build_parallel_optimizer,
    language_model_loss,
)


@dataclass
class TrainedModel:
    """This rank's chunks of one model and what trains them; ``optimizer`` is None when frozen
    (forward only: no optimizer, schedule or loss scaler)."""

    chunks: list[torch.nn.Module]
    dims: ParallelDims
    parallel_step: ParallelStep
    autocast: Callable[[], ContextManager]  # the context every forward runs under (``setup.autocast_context``)
    optimizer: object | None = None
    optimizer_kind: str = "frozen"  # which AdamW, for the start-up line
    scheduler: LRScheduler | None = None
    scaler: LossScaler | None = None
    grad_clip: float = 0.0
    load_policy: LoadPolicy = LoadPolicy()
    named_params: list[tuple[str, torch.nn.Parameter]] = field(init=False)
    checkpointer: Checkpointer = field(init=False)

    def __post_init__(self) -> None:
        self.named_params = named_parameters(self.chunks)
        self.checkpointer = Checkpointer(self.chunks, self.dims, self.optimizer, self.scheduler, self.scaler,
                                         self.load_policy)

    @property
    def frozen(self) -> bool:
        return self.optimizer is None

    @contextlib.contextmanager
    def evaluating(self):
        """Dropout off for the duration; a frozen model stays in eval mode afterwards."""
        for chunk in self.chunks:
            chunk.eval()
        try:
            yield
        finally:
            if not self.frozen:
                for chunk in self.chunks:
                    chunk.train()

    # ------------------------------------------------------------------ running it

    def train_on(self, micro_batches: Sequence[MicroBatch]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step on a global batch: (mean loss, grad norm before clipping, skipped),
        scalar tensors left on the device (read them back only when needed: each read waits for
        the device). The learning-rate schedule is left to the caller, which steps it once per run step."""
        loss = self.parallel_step.forward_backward(micro_batches, self.autocast(), self.scaler.scale)
        grad_norm, skipped = self.parallel_step.optimizer_step(self.scaler, self.grad_clip, torch.isfinite(loss))
        return loss, grad_norm, skipped

    def forward_outputs(self, micro_batches: Sequence[MicroBatch], fn: LossFn | None = None) -> list[torch.Tensor]:
        """Forward only: what ``fn`` (default: the training loss) returns per micro-batch, on the
        last pipeline stage ([] on the others)."""
        return self.parallel_step.forward_outputs(micro_batches, self.autocast(), fn)

    # ------------------------------------------------------------------ checkpoints

    def save(self, save_dir: str | Path, step: int, consumed_samples: int, config: dict,
             tokenizer_dir: str | None, writer: BackgroundWriter | None = None) -> Path:
        """Write this model's checkpoint for ``step`` (collective); returns its directory. Weights
        holding NaN or inf on any rank are refused (``TrainingDivergedError``), so ``latest`` stays.
        With a ``writer`` the files are written in the background (``Checkpointer.save``)."""
        self.parallel_step.wait_for_params()
        require_finite_weights(self.named_params, self.dims.device, step, save_dir)
        with self.parallel_step.full_precision_weights():  # 16-bit runs save their fp32 masters
            return self.checkpointer.save(save_dir, step, consumed_samples, config, tokenizer_dir, writer)

    def load(self, load_dir: str | Path, weights_only: bool, source_key: str = "checkpoint.load",
             value_head_from_lm: bool = True) -> DataPosition | None:
        """Read a checkpoint into this model (collective). Unless ``weights_only``, the optimizer,
        schedule, loss scale and RNG streams resume too. ``source_key``: the config key naming
        ``load_dir``, for messages; ``value_head_from_lm``: a language model may start a value head.
        Returns the saved run position, or None when there is none to resume (always None for a
        frozen model)."""
        # Loaded into the fp32 masters (any precision the checkpoint was saved at); the weights follow.
        with self.parallel_step.full_precision_weights():
            position = self.checkpointer.load(load_dir, weights_only=weights_only, source_key=source_key,
                                              value_head_from_lm=value_head_from_lm)
        return None if self.frozen else position


def build_trained_model(cfg: Config, dims: ParallelDims, head: str = "lm", loss_fn: LossFn = language_model_loss,
                        lr: float | None = None, frozen: bool = False) -> TrainedModel:
    """A model of the config's shape on ``dims`` with a fresh initialization. ``head``: "lm" or
    "value"; ``loss_fn``: its training loss on the last stage; ``lr``: a peak learning rate other
    than ``optim.lr`` (the minimum is lowered to it when above); ``frozen``: forward only, in eval
    mode, without gradients. The schedule spans the run's steps (``train.max_steps``, or fewer
    under ``train.max_tokens``)."""
    chunks = build_model_chunks(cfg, dims, head)
    schedule = cfg.parallel.pipeline_schedule
    autocast = functools.partial(autocast_context, cfg.train.precision, dims.device)
    if frozen:
        for chunk in chunks:
            chunk.eval().requires_grad_(False)
        return TrainedModel(chunks, dims, ParallelStep(chunks, None, dims, schedule), autocast,
                            load_policy=LoadPolicy.of(cfg.checkpoint))
    optim_cfg = cfg.optim
    if lr is not None:
        optim_cfg = dataclasses.replace(optim_cfg, lr=lr, min_lr=min(optim_cfg.min_lr, lr))
    optimizer, kind = build_parallel_optimizer(chunks, optim_cfg, cfg.parallel, dims)
    parallel_step = ParallelStep(chunks, optimizer, dims, schedule, cfg.parallel.bucket_size_mb, loss_fn)
    scaler = LossScaler(cfg.train.initial_loss_scale, cfg.train.loss_scale_window,
                        dynamic=cfg.train.precision == "fp16", min_scale=cfg.train.min_loss_scale)
    return TrainedModel(chunks, dims, parallel_step, autocast, optimizer, kind,
                        LRScheduler(optimizer, optim_cfg, total_steps(cfg)), scaler, optim_cfg.grad_clip,
                        LoadPolicy.of(cfg.checkpoint))


def load_frozen_model(cfg: Config, dims: ParallelDims, load_dir: str | Path, head: str,
                      source_key: str) -> TrainedModel:
    """A model that only scores (a reference policy, a reward model): the weights of ``load_dir``
    (named by the config key ``source_key``), forward only. Its checkpoint must have its head: a
    frozen value head left at its random initialization would score noise."""
    model = build_trained_model(cfg, dims, head, frozen=True)
    model.load(load_dir, weights_only=True, source_key=source_key, value_head_from_lm=False)
    return model
