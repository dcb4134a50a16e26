"""``Checkpointer``: everything of a trained model that a checkpoint holds, saved and restored in one call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lite.training.checkpoint.background import BackgroundWriter
from megatron_lite.training.checkpoint.live import LoadPolicy, capture_checkpoint, load_checkpoint, save_checkpoint


@dataclass(frozen=True)
class DataPosition:
    """Where a resumed run continues: the step and the samples of the data stream it has consumed."""

    step: int
    consumed_samples: int


class Checkpointer:
    """Owns the stateful parts of one model: its chunks (and their tensor-parallel RNG streams),
    optimizer, learning-rate scheduler and loss scaler. The caller keeps the data position and the
    run's config and passes them to ``save``; ``load`` hands the position back.

    ``optimizer``, ``scheduler`` and ``scaler`` may be None for a model that is only loaded;
    ``policy`` says how strictly loads check what they read.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], dims, optimizer=None, scheduler=None, scaler=None,
                 policy: LoadPolicy = LoadPolicy()):
        self.model_chunks = model_chunks
        self.dims = dims
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.policy = policy

    @property
    def rng_trackers(self) -> list:
        return [chunk.rng_tracker for chunk in self.model_chunks]

    @property
    def padded_vocab_size(self) -> int:
        return self.model_chunks[0].padded_vocab_size

    def save(self, save_dir: str | Path, step: int, consumed_samples: int, config: dict,
             tokenizer_dir: str | Path | None = None, writer: BackgroundWriter | None = None) -> Path:
        """Write the checkpoint of ``step`` (collective: every rank calls it); returns its directory.
        With a ``writer`` the state is copied to host memory now and written in the background:
        the directory appears once ``writer.wait()`` returns."""
        if writer is None:
            return save_checkpoint(
                save_dir, step, self.model_chunks, self.dims, config, optimizer=self.optimizer,
                train_state=self._train_state(step, consumed_samples), tokenizer_dir=tokenizer_dir,
                rng_trackers=self.rng_trackers, padded_vocab_size=self.padded_vocab_size,
            )
        snapshot = capture_checkpoint(
            save_dir, step, self.model_chunks, self.dims, config, optimizer=self.optimizer,
            train_state=self._train_state(step, consumed_samples), tokenizer_dir=tokenizer_dir,
            rng_trackers=self.rng_trackers, padded_vocab_size=self.padded_vocab_size, copy=True,
        )
        writer.submit(snapshot)
        return snapshot.final

    def load(self, load_dir: str | Path, weights_only: bool = False, source_key: str = "checkpoint.load",
             value_head_from_lm: bool = True) -> DataPosition | None:
        """Restore what ``load_dir`` holds; with ``weights_only`` (fine-tuning) only the weights.
        ``source_key`` names the config key that gave ``load_dir``; ``value_head_from_lm``: a
        language model may start this model's value head (not for a frozen reward model).
        Returns where training continues, or None when the checkpoint has no training state."""
        loaded = load_checkpoint(
            load_dir, self.model_chunks, self.dims, self.optimizer, weights_only=weights_only,
            rng_trackers=self.rng_trackers, padded_vocab_size=self.padded_vocab_size, policy=self.policy,
            source_key=source_key, value_head_from_lm=value_head_from_lm,
        )
        train_state = loaded["train_state"]
        if not train_state:
            return None
        if self.scheduler is not None:
            self.scheduler.load_state_dict(train_state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(train_state["scaler"])
        return DataPosition(step=train_state["step"], consumed_samples=train_state["consumed_samples"])

    def _train_state(self, step: int, consumed_samples: int) -> dict:
        state = {"step": step, "consumed_samples": consumed_samples}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state
