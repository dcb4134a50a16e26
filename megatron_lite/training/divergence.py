"""Stopping a run that diverges before it saves what it diverged to, and reporting loss spikes.

fp32 and bf16 have no loss scale, so a non-finite loss or gradient norm there is divergence: the
step is not applied (``ParallelStep.optimizer_step``) and the run stops. Under fp16 a non-finite
norm is the loss scaler's ordinary overflow signal: the step is skipped and the scale halved, and
the run stops only when the skips do not end (``train.max_skipped_steps`` in a row) or the scale
falls below ``train.min_loss_scale``. A step's loss and grad norm are global (the same on every
rank), so every rank reaches the same verdict at the same step without another collective.

The trainer reads a step's figures back from the device only on logging and save steps
(``log.interval``; fp16 every step), so in fp32 and bf16 a divergence is noticed at the next
logging step, where the guard goes through every step since the previous one and names the first
bad one. The non-finite step itself was skipped on the device regardless; the steps between it
and the logging step trained on, and no checkpoint is written from them (a save step is a
read-back step, checked before the save).
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lite.config import OptimConfig, TrainConfig
from megatron_lite.errors import UserError
from megatron_lite.training.optim import LossScaler

SPIKE_WINDOW = 20  # the recent finite losses a step's loss is compared with


class TrainingDivergedError(UserError, RuntimeError):
    """The run diverged, or was about to save non-finite weights; the message names the step and what to try."""


class DivergenceGuard:
    """Watches each step's loss, grad norm and skip; raises ``TrainingDivergedError`` when the run must stop."""

    def __init__(self, train: TrainConfig, optim: OptimConfig, save_dir: str, log_interval: int = 1):
        self.train, self.optim, self.save_dir, self.log_interval = train, optim, save_dir, log_interval
        self.skipped_in_a_row = 0
        self.last_finite_loss: tuple[int, float] | None = None  # (step, loss)
        self.recent_losses: deque[float] = deque(maxlen=SPIKE_WINDOW)

    def check(self, step: int, loss: float, grad_norm: float, skipped: bool, scaler: LossScaler,
              noticed_at: int | None = None) -> None:
        """Raise when step ``step`` (1-based, as logged) ends the run; else remember its loss.
        ``noticed_at``: the step whose read-back brought these figures, when later than ``step``."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if not finite and self.train.precision != "fp16":
            raise self._diverged(step, f"loss {loss:.4g}, grad norm {grad_norm:.4g}: not finite in {self.train.precision} "
                                       f"(only fp16 loss scaling skips an overflowing step)", noticed_at)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.skipped_in_a_row >= self.train.max_skipped_steps:
            raise self._diverged(step, f"{self.skipped_in_a_row} fp16 steps in a row overflowed and were skipped "
                                       f"(train.max_skipped_steps={self.train.max_skipped_steps})")
        if scaler.exhausted:
            raise self._diverged(step, f"after {self.skipped_in_a_row} overflowing fp16 steps in a row the loss scale "
                                       f"fell to {scaler.scale:g}, below train.min_loss_scale={self.train.min_loss_scale:g}")
        if math.isfinite(loss):
            self.last_finite_loss = (step, loss)

    def loss_spike(self, loss: float) -> float | None:
        """``loss`` over the mean of the recent finite losses when that exceeds ``train.loss_spike_factor``
        (a spike), else None; the loss then joins the recent ones."""
        factor, recent = self.train.loss_spike_factor, self.recent_losses
        ratio = None
        if factor > 0 and recent and math.isfinite(loss):
            mean = sum(recent) / len(recent)
            if mean > 0 and loss > factor * mean:
                ratio = loss / mean
        if math.isfinite(loss):
            recent.append(loss)
        return ratio

    def _diverged(self, step: int, what: str, noticed_at: int | None = None) -> TrainingDivergedError:
        last = (f"last finite loss {self.last_finite_loss[1]:.4g} at step {self.last_finite_loss[0]}"
                if self.last_finite_loss else "no finite loss yet in this run")
        noticed = ""
        if noticed_at is not None and noticed_at > step:
            noticed = (f" (noticed at step {noticed_at}, the next logging step: log.interval={self.log_interval}; "
                       f"steps {step + 1}-{noticed_at} trained on)")
        return TrainingDivergedError(
            f"training diverged at step {step}{noticed}: {what}; {last}; this step did not update the weights and "
            f"{_kept_checkpoint(self.save_dir)}; {remedies(self.optim)}"
        )


def remedies(optim: OptimConfig) -> str:
    clip = f"a smaller optim.grad_clip (now {optim.grad_clip:g})" if optim.grad_clip > 0 else "optim.grad_clip=1.0 (now off)"
    return (f"try a lower optim.lr (now {optim.lr:g}), a longer optim.warmup_steps (now {optim.warmup_steps}) "
            f"or {clip}")


def _kept_checkpoint(save_dir: str | Path) -> str:
    if not save_dir:
        return "nothing was saved (checkpoint.save is empty)"
    return f"nothing was saved: the last checkpoint in {save_dir} (if any) stays latest"


def require_finite_weights(named_params: list[tuple[str, torch.nn.Parameter]], device: torch.device,
                           step: int, save_dir: str | Path) -> None:
    """Refuse (on every rank alike) to save weights holding NaN or inf on any rank: no path publishes
    a diverged model. One device sync per rank and one all-reduce over the world."""
    finite = [torch.isfinite(p.detach()).all() for _, p in named_params]
    all_finite = bool(torch.stack(finite).all()) if finite else True
    bad = torch.tensor(float(not all_finite), device=device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return
    where = "(on another rank)" if all_finite else next(name for (name, _), ok in zip(named_params, finite) if not ok)
    raise TrainingDivergedError(
        f"refusing to save the checkpoint of step {step} to {save_dir}: parameter "
        f"{where} holds NaN or inf values; {_kept_checkpoint(save_dir)}; resume from it with a lower optim.lr, "
        f"a longer optim.warmup_steps or optim.grad_clip"
    )
