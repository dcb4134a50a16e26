"""Learning-rate schedules: linear warmup, then cosine, linear, constant or WSD.

``step`` counts optimizer updates already taken, so the first update uses
``learning_rate(0, ...)``. Warmup ramps to the peak in ``warmup_steps`` updates
(the last warmup update runs at the full rate), then the decay runs until
``decay_steps`` and stays at ``min_lr`` afterwards (a run shorter than its warmup ends
while still warming up).
"""

from __future__ import annotations

import math

import torch

from megatron_lite.config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """The learning rate for update number ``step`` (0-based)."""
    decay_steps = optim.decay_steps if optim.decay_steps is not None else total_steps
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "wsd":
        return _wsd(step, optim, decay_steps)
    span = max(1, decay_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    if optim.schedule == "cosine":
        return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))
    return optim.lr - (optim.lr - optim.min_lr) * progress  # linear


def _wsd(step: int, optim: OptimConfig, decay_steps: int) -> float:
    """Warmup-stable-decay: hold the peak, then decay linearly over the final fraction."""
    decay_length = max(1, round(optim.wsd_decay_fraction * decay_steps))
    decay_start = max(optim.warmup_steps, decay_steps - decay_length)
    if step < decay_start:
        return optim.lr
    progress = min(1.0, (step - decay_start) / max(1, decay_steps - decay_start))
    return optim.lr - (optim.lr - optim.min_lr) * progress


class LRScheduler:
    """Sets the optimizer's learning rate before each update; its state is the update count."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
        self.optimizer = optimizer
        self.optim = optim
        self.total_steps = total_steps
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        return learning_rate(self.step_count, self.optim, self.total_steps)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
