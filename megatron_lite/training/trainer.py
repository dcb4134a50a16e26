"""The pretraining loop: ``Trainer`` builds a run from a ``Config`` with the helpers of
``training.setup`` (grid, resolved config, model chunks) and ``Trainer.train`` runs it.

The model is a list of chunks (one per virtual pipeline stage this rank holds; one chunk
at pp=1). ``training.step.ParallelStep`` runs one global batch's micro-batches (a plain loop
at pp=1, the pipeline schedule at pp>1), reduces the gradients over tp, dp and the tied
embedding copies, and owns unscaling, the global grad norm, clipping and overflow skipping.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import Checkpointer, named_parameters
from megatron_lite.training.metrics import Metrics
from megatron_lite.training.optim import LossScaler
from megatron_lite.training.schedule import LRScheduler
from megatron_lite.training.setup import (
    autocast_context,
    build_model_chunks,
    load_run_tokenizer,
    local_batch,
    resolve,
    seed_everything,
    setup_dims,
    split_micro_batches,
    total_steps,
)
from megatron_lite.training.step import ParallelStep, build_optimizer, language_model_loss, validate_batch_layout


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per step of this run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    interrupted: bool = False


class Trainer:
    """Everything a pretraining run needs, built from a ``Config``; ``train()`` runs it.

    The RLHF stages subclass it and change what a step trains on through four hooks: ``head``,
    ``_build_datasets``, ``micro_batches`` and ``loss_fn`` (and ``evaluate`` for their metrics).
    """

    head = "lm"  # the model's head: "lm", or "value" for a reward model

    def __init__(self, cfg: Config, dims: ParallelDims | None = None, datasets: tuple | None = None):
        """``datasets``: (train, valid) to use instead of the data section's (benchmarks feed
        synthetic tokens this way; ``model.vocab_size`` must then be set)."""
        self.dims = dims if dims is not None else setup_dims(cfg)
        self.is_logging_rank = self.dims.rank == 0
        self.cfg = cfg = resolve(cfg, self.is_logging_rank, read_data=datasets is None)
        if datasets is None:
            self.tokenizer = load_run_tokenizer(cfg)
        elif cfg.model.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set when training on given (synthetic) datasets")
        self.micro_batches_per_step = validate_batch_layout(cfg, self.dims)
        self.total_steps = total_steps(cfg)
        seed_everything(cfg.train.seed)
        self.model_chunks = build_model_chunks(cfg, self.dims, self.head)
        self.named_params = named_parameters(self.model_chunks)
        self.optimizer, self.optimizer_kind = build_optimizer(self.named_params, cfg, self.dims)
        self.parallel_step = ParallelStep(self.model_chunks, self.optimizer, self.dims,
                                          cfg.parallel.pipeline_schedule, cfg.parallel.bucket_size_mb, self.loss_fn)
        self.scheduler = LRScheduler(self.optimizer, cfg.optim, self.total_steps)
        self.scaler = LossScaler(cfg.train.initial_loss_scale, cfg.train.loss_scale_window,
                                 dynamic=cfg.train.precision == "fp16")
        self.step = 0
        self.consumed_samples = 0
        self.checkpointer = Checkpointer(self.model_chunks, self.dims, self.optimizer, self.scheduler, self.scaler)
        self.train_ds, self.valid_ds = datasets if datasets is not None else self._build_datasets()
        self._maybe_load_checkpoint()
        self.metrics = Metrics(cfg.log, self.is_logging_rank, self.dims.device, cfg.train.precision,
                               self._train_flops_per_token(), self.dims.world_size, self.total_steps)
        self._stop_requested = threading.Event()

    # ------------------------------------------------------------------ what a step trains on

    def loss_fn(self, chunk, inputs: torch.Tensor, target, num_micro_batches: int) -> torch.Tensor:
        """The last stage's loss of one micro-batch (see ``training.step.LossFn``)."""
        return language_model_loss(chunk, inputs, target, num_micro_batches)

    def micro_batches(self, dataset, first_sample: int) -> list:
        """This rank's micro-batches of the global batch starting at ``first_sample``."""
        batch = local_batch(dataset, first_sample, self.cfg.train.global_batch_size, self.dims)
        return split_micro_batches(batch, self.cfg.train.micro_batch_size, self.dims.device)

    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def _build_datasets(self) -> tuple:
        from megatron_lite.data import build_datasets

        gb = self.cfg.train.global_batch_size
        eval_samples = gb * self.cfg.train.eval_steps if self.cfg.train.eval_interval > 0 else 0
        train_ds, valid_ds, _ = build_datasets(
            self.cfg.data, self.cfg.model.seq_length, self.cfg.train.seed,
            num_samples=(self.total_steps * gb, eval_samples, 0),
        )
        return train_ds, valid_ds

    def _train_flops_per_token(self) -> float:
        from megatron_lite.model.gpt import flops_per_token

        return float(flops_per_token(self.cfg.model, self.cfg.model.seq_length))

    def _maybe_load_checkpoint(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        position = self.checkpointer.load(ck.load, weights_only=ck.finetune)
        self.parallel_step.weights_loaded()
        if position is not None:
            self.step, self.consumed_samples = position.step, position.consumed_samples

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        cfg, result = self.cfg, TrainResult(steps=self.step)
        self._announce()
        with _sigterm_sets(self._stop_requested):
            while self.step < self.total_steps:
                loss, grad_norm, skipped, extra = self.train_step()
                lr = self.scheduler.lr
                if not skipped:
                    self.scheduler.step()
                self.step += 1
                self.consumed_samples += cfg.train.global_batch_size
                result.losses.append(loss)
                self.metrics.step(self.step, loss, lr, grad_norm, self.tokens_per_step(),
                                  loss_scale=self.scaler.scale if self.scaler.dynamic else None, skipped=skipped,
                                  **extra)
                if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == self.total_steps):
                    result.val_losses.append((self.step, self.evaluate()))
                stop = self._stop_agreed()
                if self._save_due() or stop:
                    result.checkpoint_dir = self.save()
                if stop:
                    saved = f"saved step {self.step} to {result.checkpoint_dir}" if result.checkpoint_dir else "nothing saved"
                    self.metrics.print(f"SIGTERM received: {saved}; stopping")
                    result.interrupted = True
                    break
        result.steps = self.step
        self.metrics.close()
        return result

    # ------------------------------------------------------------------ pieces the loop calls

    def train_step(self) -> tuple[float, float, bool, dict]:
        """One global batch: (mean loss, grad norm before clipping, skipped, extra metrics)."""
        micro = self.micro_batches(self.train_ds, self.consumed_samples)
        loss = self.parallel_step.forward_backward(micro, self._autocast(), self.scaler.scale)
        grad_norm, skipped = self.parallel_step.optimizer_step(self.scaler, self.cfg.optim.grad_clip)
        return loss, grad_norm, skipped, {}

    def _autocast(self):
        return autocast_context(self.cfg.train.precision, self.dims.device)

    def _announce(self) -> None:
        from megatron_lite.kernels import backends
        from megatron_lite.model.gpt import num_parameters
        from megatron_lite.parallel.dims import padded_vocab_size

        m = self.cfg.model
        count = num_parameters(m, padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1))
        d, p = self.dims, self.cfg.parallel
        layout = f"tp={d.tp} pp={d.pp} dp={d.dp}"
        if d.pp > 1:
            layout += f" ({p.pipeline_schedule}" + (f", virtual {d.virtual_pp})" if d.virtual_pp > 1 else ")")
        if d.sequence_parallel:
            layout += " sequence-parallel"
        self.metrics.print(
            f"training {m.flavor} ({count / 1e6:.2f}M parameters) on {d.device} | "
            f"{layout} | global batch {self.cfg.train.global_batch_size} = "
            f"{self.cfg.train.micro_batch_size} x {self.micro_batches_per_step} accumulation x {d.dp} dp | "
            f"{self.cfg.train.precision} | {self.optimizer_kind} | steps {self.step}->{self.total_steps}"
        )
        self.metrics.print("kernel backends:\n" + backends.describe(m))

    def evaluate(self) -> float:
        """Mean validation loss over ``train.eval_steps`` global batches (same batches every time)."""
        gb = self.cfg.train.global_batch_size
        for chunk in self.model_chunks:
            chunk.eval()
        losses = []
        steps = tqdm(range(self.cfg.train.eval_steps), desc="validation", leave=False,
                     disable=not self.is_logging_rank or self.cfg.train.eval_steps < 20)
        with torch.no_grad():
            for i in steps:
                losses.append(self.parallel_step.evaluate(self.micro_batches(self.valid_ds, i * gb), self._autocast()))
        for chunk in self.model_chunks:
            chunk.train()
        val_loss = sum(losses) / len(losses)
        self.metrics.evaluation(self.step, val_loss)
        self.metrics.restart_window()
        return val_loss

    def _stop_agreed(self) -> bool:
        """Every rank stops at the same step when any rank received SIGTERM."""
        flag = torch.tensor(float(self._stop_requested.is_set()), device=self.dims.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _save_due(self) -> bool:
        ck = self.cfg.checkpoint
        if not ck.save:
            return False
        return self.step == self.total_steps or (ck.interval > 0 and self.step % ck.interval == 0)

    def save(self) -> Path | None:
        if not self.cfg.checkpoint.save:
            self.metrics.print("checkpoint.save is empty: nothing saved")
            return None
        path = self.checkpointer.save(self.cfg.checkpoint.save, self.step, self.consumed_samples, self.cfg.to_dict(),
                                      self.cfg.data.tokenizer or None)
        self.metrics.print(f"saved checkpoint {path}")
        self.metrics.restart_window()
        return path


@contextlib.contextmanager
def _sigterm_sets(event: threading.Event):
    """While training, SIGTERM (cluster preemption) only sets ``event``; the loop saves and exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

