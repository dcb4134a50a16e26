"""The training loop: setup (grid, data, model chunks), ``Trainer.train`` and the task it runs.

The trainer holds one ``TrainedModel`` (``training.trained_model``) and a task that says what a
step trains on: ``LanguageModelTask`` for pretraining, a fine-tuning stage or RL algorithm from
``rlhf`` otherwise. The model is a list of chunks (one per virtual pipeline stage this rank
holds; one chunk at pp=1). ``training.step.ParallelStep`` runs one global batch's micro-batches
(a plain loop at pp=1, the pipeline schedule at pp>1), reduces the gradients over tp, dp and the
tied embedding copies, and owns unscaling, the global grad norm, clipping and overflow skipping.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import BackgroundWriter, DataPosition
from megatron_lite.training.divergence import DivergenceGuard
from megatron_lite.training.metrics import Metrics
from megatron_lite.training.run_directory import check_run_directories
from megatron_lite.training.setup import (
    load_run_tokenizer,
    local_batch,
    resolve,
    seed_everything,
    setup_dims,
    split_micro_batches,
    total_steps,
)
from megatron_lite.training.step import language_model_loss, validate_batch_layout
from megatron_lite.training.trained_model import TrainedModel, build_trained_model

# ----------------------------------------------------------------------------- what a run trains on


class StepResult(NamedTuple):
    """One run step's figures. The tensors stay on the device until the trainer reads them back
    (on logging and save steps), so a step does not wait for the device to report them."""

    loss: torch.Tensor  # the global-batch mean loss, a scalar
    grad_norm: torch.Tensor  # before clipping, a scalar
    skipped: torch.Tensor  # a bool scalar: the optimizer step was skipped (a non-finite loss or norm)
    extra: dict  # the task's own per-step figures (PPO: reward, KL, critic loss, ...): floats or scalars


class Task(Protocol):
    """What a run trains on and how it is measured; the ``Trainer`` owns the loop, the trained
    model and its checkpoints. Pretraining is ``LanguageModelTask``; the fine-tuning stages and
    RL algorithms are tasks in ``rlhf``. A task class is called as ``task(cfg, dims, tokenizer)``."""

    head: str  # the model's head: "lm", or "value" for a reward model

    def loss(self, chunk, inputs: torch.Tensor, target, num_micro_batches: int) -> torch.Tensor:
        """The last stage's loss of one micro-batch (see ``training.step.LossFn``)."""

    def datasets(self) -> tuple:
        """(train, valid): what ``train_step`` and ``evaluate`` read (valid may be None)."""

    def start(self, model: TrainedModel) -> None:
        """Receive the model to train, built and loaded (a stage may build its other models here)."""

    def train_step(self, dataset, first_sample: int, step: int) -> StepResult:
        """One run step on the global batch starting at run sample ``first_sample``."""

    def evaluate(self, dataset) -> dict[str, float]:
        """Validation figures by name: "loss" first when the task has one (it is then the run's
        validation value; alone, it is logged with its perplexity), else the first figure is."""

    def tokens_per_step(self) -> int:
        """Tokens of one global batch, for throughput."""

    def saved_beside(self) -> dict[str, TrainedModel]:
        """Other trained models saved with the run's checkpoints, each in a subdirectory by name."""


class LanguageModelTask:
    """Pretraining: the next-token loss on packed samples of ``data.mixture``. Under
    ``data.document_mask`` each document of a sample attends only within itself."""

    head = "lm"

    def __init__(self, cfg: Config, dims: ParallelDims, tokenizer=None, *, eod_id: int | None = None):
        """``eod_id``: the end-of-document token that splits packed samples under
        ``data.document_mask``; the tokenizer's when not given."""
        self.cfg, self.dims = cfg, dims
        self.model: TrainedModel | None = None
        self.eod_id = None
        if cfg.data.document_mask:
            self.eod_id = _end_of_document_id(cfg, tokenizer, eod_id)

    def loss(self, chunk, inputs: torch.Tensor, target, num_micro_batches: int) -> torch.Tensor:
        return language_model_loss(chunk, inputs, target, num_micro_batches)

    def datasets(self) -> tuple:
        return language_model_datasets(self.cfg, total_steps(self.cfg), self.eod_id)

    def start(self, model: TrainedModel) -> None:
        self.model = model

    def micro_batches(self, dataset, first_sample: int) -> list:
        """This rank's micro-batches of the global batch starting at ``first_sample``."""
        batch = local_batch(dataset, first_sample, self.cfg.train.global_batch_size, self.dims)
        return split_micro_batches(batch, self.cfg.train.micro_batch_size, self.dims.device, self.eod_id,
                                   cp_rank=self.dims.cp_rank, cp=self.dims.cp)

    def train_step(self, dataset, first_sample: int, step: int) -> StepResult:
        return StepResult(*self.model.train_on(self.micro_batches(dataset, first_sample)), {})

    def evaluate(self, dataset) -> dict[str, float]:
        """The mean loss over ``train.eval_steps`` global batches (the same batches every time)."""
        gb, eval_steps = self.cfg.train.global_batch_size, self.cfg.train.eval_steps
        losses = []
        steps = tqdm(range(eval_steps), desc="validation", leave=False,
                     disable=self.dims.rank != 0 or eval_steps < 20)
        with self.model.evaluating(), torch.no_grad():
            for i in steps:
                losses.append(self.model.parallel_step.evaluate(self.micro_batches(dataset, i * gb),
                                                                self.model.autocast()))
        return {"loss": sum(losses) / len(losses)}

    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def saved_beside(self) -> dict[str, TrainedModel]:
        return {}


def _end_of_document_id(cfg: Config, tokenizer, eod_id: int | None) -> int:
    """The EOD id document masking splits samples at; the attention backend must take document ids."""
    from megatron_lite.model.ops import check_document_backend

    check_document_backend(cfg.model.attention_backend)
    if eod_id is None and tokenizer is None:
        raise ConfigError("data.document_mask=true needs the end-of-document token id: train with data.tokenizer "
                          "set, or pass eod_id to LanguageModelTask")
    return eod_id if eod_id is not None else tokenizer.eod_id


def language_model_datasets(cfg: Config, steps: int, eod_id: int | None = None) -> tuple:
    """(train, valid) packed samples of ``data.mixture`` for ``steps`` global batches and validation;
    ``eod_id`` under document masking (sources without it are refused)."""
    from megatron_lite.data import build_datasets

    gb = cfg.train.global_batch_size
    eval_samples = gb * cfg.train.eval_steps if cfg.train.eval_interval > 0 else 0
    train_ds, valid_ds, _ = build_datasets(cfg.data, cfg.model.seq_length, cfg.train.seed,
                                           num_samples=(steps * gb, eval_samples, 0), vocab_size=cfg.model.vocab_size,
                                           eod_id=eod_id)
    return train_ds, valid_ds


# ----------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per step of this run
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    interrupted: bool = False


@dataclass
class PendingStep:
    """A finished step whose figures have not been read back from the device yet."""

    step: int  # 1-based, as logged
    outcome: StepResult
    lr: float  # the learning rate it trained with
    loss_scale: float | None  # fp16's scale when it ran
    tokens: int


class Trainer:
    """A run built from a ``Config``: the grid, one trained model and the task it trains on
    (pretraining unless told otherwise); ``train()`` runs it."""

    def __init__(self, cfg: Config, dims: ParallelDims | None = None, datasets: tuple | None = None,
                 task: Callable[..., Task] = LanguageModelTask):
        """``datasets``: (train, valid) to use instead of the task's (benchmarks feed synthetic
        tokens this way; ``model.vocab_size`` must then be set)."""
        self.dims = dims if dims is not None else setup_dims(cfg)
        # functools.partial(LanguageModelTask, eod_id=...) is pretraining too
        if self.dims.cp > 1 and getattr(task, "func", task) is not LanguageModelTask:
            raise ConfigError(
                f"parallel.cp={self.dims.cp}: context parallelism runs pretraining only (the fine-tuning and RL "
                f"stages score, mask and generate whole sequences); set parallel.cp=1"
            )
        self.is_logging_rank = self.dims.rank == 0
        self.cfg = cfg = resolve(cfg, self.is_logging_rank, read_data=datasets is None)
        check_run_directories(cfg)
        self.tokenizer = None
        if datasets is None:
            self.tokenizer = load_run_tokenizer(cfg)
        elif cfg.model.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be set when training on given (synthetic) datasets")
        self.micro_batches_per_step = validate_batch_layout(cfg, self.dims)
        self.total_steps = total_steps(cfg)
        self.task = task(cfg, self.dims, self.tokenizer)
        seed_everything(cfg.train.seed)
        self.model = build_trained_model(cfg, self.dims, self.task.head, self.task.loss)
        self.step = 0
        self.consumed_samples = 0
        self.train_ds, self.valid_ds = datasets if datasets is not None else self.task.datasets()
        if cfg.checkpoint.load:
            self._resume_from(self.model.load(cfg.checkpoint.load, weights_only=cfg.checkpoint.finetune))
        self.metrics = Metrics(cfg.log, self.is_logging_rank, self.dims.device, cfg.train.precision,
                               self._train_flops_per_token(), self.dims.world_size, self.total_steps)
        self.task.start(self.model)
        self.divergence = DivergenceGuard(cfg.train, cfg.optim, cfg.checkpoint.save, cfg.log.interval)
        self._stop_requested = threading.Event()
        self.pending: list[PendingStep] = []  # steps since the last read-back
        self.writer: BackgroundWriter | None = None  # checkpoint.async_save's, from the first save on

    def _resume_from(self, position: DataPosition | None) -> None:
        if position is not None:
            self.step, self.consumed_samples = position.step, position.consumed_samples

    def _train_flops_per_token(self) -> float:
        from megatron_lite.model.gpt import flops_per_token

        return float(flops_per_token(self.cfg.model, self.cfg.model.seq_length))

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run the steps left. A step's loss, grad norm and skip stay on the device; they are read
        back (one wait for the device) on logging steps, save steps and the last step, where the
        divergence guard and the metrics see every step since the previous read-back. fp16 reads
        back every step: its loss scaler needs the overflow on the host anyway."""
        result = TrainResult(steps=self.step)
        self._announce()
        try:
            with _sigterm_sets(self._stop_requested):
                while self.step < self.total_steps and not self._run_step(result):
                    pass
        finally:
            self.finish_checkpoints()
        result.steps = self.step
        self.model.parallel_step.wait_for_params()  # ZeRO-1 leaves the last step's weight all-gathers in flight
        self.metrics.close()
        return result

    def _run_step(self, result: TrainResult) -> bool:
        """One run step, with its evaluation and checkpoint when due; True when the run stops (SIGTERM)."""
        cfg, step, scaler = self.cfg, self.step + 1, self.model.scaler
        reads_back = self._reads_back(step)
        outcome = self.task.train_step(self.train_ds, self.consumed_samples, self.step)
        self.pending.append(PendingStep(step, outcome, self.model.scheduler.lr,
                                        scaler.scale if scaler.dynamic else None, self.task.tokens_per_step()))
        stop = self._read_back(result) if reads_back else False
        # fp32/bf16 step the schedule unconditionally: a skipped step there is divergence, which
        # stops the run at the read-back. fp16's skip was read on the host by the loss scaler.
        if not (scaler.dynamic and outcome.skipped.item()):
            self.model.scheduler.step()
        self.step += 1
        self.consumed_samples += cfg.train.global_batch_size
        if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == self.total_steps):
            result.val_losses.append((self.step, self.evaluate()))
        if self._save_due(self.step) or stop:
            result.checkpoint_dir = self.save()
        if stop:
            saved = f"saved step {self.step} to {result.checkpoint_dir}" if result.checkpoint_dir else "nothing saved"
            self.metrics.print(f"SIGTERM received: {saved}; stopping")
            result.interrupted = True
        return stop

    def _reads_back(self, step: int) -> bool:
        return (self.model.scaler.dynamic or step % self.cfg.log.interval == 0 or step == self.total_steps
                or self._save_due(step))

    def _read_back(self, result: TrainResult) -> bool:
        """Read the pending steps' figures from the device in one transfer; check and log each step
        in order. Returns whether the ranks agreed to stop (SIGTERM)."""
        pending, self.pending = self.pending, []
        tensors = [t for p in pending for t in (p.outcome.loss, p.outcome.grad_norm, p.outcome.skipped)]
        tensors += [v for p in pending for v in p.outcome.extra.values() if torch.is_tensor(v)]
        values = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()
        extras = iter(values[3 * len(pending) :])
        noticed_at = pending[-1].step
        for index, p in enumerate(pending):
            loss, grad_norm, skipped = values[3 * index : 3 * index + 3]
            extra = {k: next(extras) if torch.is_tensor(v) else v for k, v in p.outcome.extra.items()}
            self.divergence.check(p.step, loss, grad_norm, bool(skipped), self.model.scaler, noticed_at)
            extra = {**extra, **self._loss_spike(p.step, loss)}
            result.losses.append(loss)
            self.metrics.step(p.step, loss, p.lr, grad_norm, p.tokens, loss_scale=p.loss_scale, skipped=bool(skipped),
                              **extra)
        return self._stop_agreed()

    def _stop_agreed(self) -> bool:
        """Every rank stops at the same step when any rank received SIGTERM: one all-reduce of a flag,
        on read-back steps only, after the figures were read, so it waits for nothing but the ranks."""
        flag = torch.tensor(float(self._stop_requested.is_set()), device=self.dims.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ pieces the loop calls

    def _announce(self) -> None:
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
        if d.cp > 1:
            layout += f" cp={d.cp} ({m.seq_length // d.cp} of {m.seq_length} tokens per rank)"
        self.metrics.print(
            f"training {m.flavor} ({count / 1e6:.2f}M parameters) on {d.device} | "
            f"{layout} | global batch {self.cfg.train.global_batch_size} = "
            f"{self.cfg.train.micro_batch_size} x {self.micro_batches_per_step} accumulation x {d.dp} dp | "
            f"{self.cfg.train.precision} | {self.model.optimizer_kind} | steps {self.step}->{self.total_steps}"
        )
        from megatron_lite.kernels import backends

        self.metrics.print("kernel backends:\n" + backends.describe(m))

    def evaluate(self) -> float:
        """The task's validation figures, logged; returns the run's validation value."""
        figures = self.task.evaluate(self.valid_ds)
        if "loss" in figures:
            value = figures.pop("loss")
            self.metrics.evaluation(self.step, value, extra={f"val_{k}": v for k, v in figures.items()} or None)
        else:
            value = next(iter(figures.values()))
            self.metrics.validation_figures(self.step, {f"val_{k}": v for k, v in figures.items()})
        self.metrics.restart_window()
        return value

    def _loss_spike(self, step: int, loss: float) -> dict:
        """``{"loss_spike": loss / recent mean}`` when the loss jumped (``train.loss_spike_factor``), with a warning."""
        ratio = self.divergence.loss_spike(loss)
        if ratio is None:
            return {}
        self.metrics.print(f"warning: loss spike at step {step}: loss {loss:.4g} is {ratio:.1f}x the mean of the "
                           f"recent losses (train.loss_spike_factor={self.cfg.train.loss_spike_factor:g})")
        return {"loss_spike": ratio}

    def _save_due(self, step: int) -> bool:
        checkpoint_cfg = self.cfg.checkpoint
        if not checkpoint_cfg.save:
            return False
        return step == self.total_steps or (checkpoint_cfg.interval > 0 and step % checkpoint_cfg.interval == 0)

    def save(self) -> Path | None:
        """The trained model's checkpoint, and beside it those of the task's other trained models."""
        save_dir = self.cfg.checkpoint.save
        if not save_dir:
            self.metrics.print("checkpoint.save is empty: nothing saved")
            return None
        config, tokenizer_dir = self.cfg.to_dict(), self.cfg.data.tokenizer or None
        writer = self._checkpoint_writer()
        path = self.model.save(save_dir, self.step, self.consumed_samples, config, tokenizer_dir, writer)
        for name, model in self.task.saved_beside().items():
            model.save(Path(save_dir) / name, self.step, self.consumed_samples, config, tokenizer_dir, writer)
        self.metrics.print(f"saving checkpoint {path} in the background" if writer else f"saved checkpoint {path}")
        self.metrics.restart_window()
        return path

    def _checkpoint_writer(self) -> BackgroundWriter | None:
        """``checkpoint.async_save``'s writer, once the previous save is written (a failure of it raises here)."""
        if not self.cfg.checkpoint.async_save:
            return None
        if self.writer is None:
            self.writer = BackgroundWriter()
        self.writer.wait()
        return self.writer

    def finish_checkpoints(self) -> None:
        """Wait until the checkpoints being written in the background are published; raises a
        failure of theirs (``CheckpointWriteError``, naming the checkpoint). ``train`` calls it last."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()


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
