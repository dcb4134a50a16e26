"""What the fine-tuning stages share: a JSONL file -> token datasets -> epochs of batches, fed to
the same ``Trainer`` and parallel step as pretraining.

A stage subclasses ``StageTrainer`` and says how a micro-batch is collated (``collate``), what its
loss is (``loss_fn``, on the last pipeline stage) and which metrics validation reports
(``evaluation_terms``). Batches are records drawn from a seeded permutation of the training
records, reshuffled every epoch; every tp and pp rank of a data-parallel replica reads the same
records, as in pretraining.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError
from megatron_lite.parallel.collectives import sum_over_replicas
from megatron_lite.rlhf.data import PreferenceDataset, SFTDataset, build_demo_rlhf_data, split_indices
from megatron_lite.training.trainer import Trainer


class Epochs:
    """Run sample j -> record index. Training: each epoch a new seeded permutation of ``records``;
    validation (``shuffle=False``): the records in order, repeated."""

    def __init__(self, records: np.ndarray, seed: int, shuffle: bool = True):
        self.records, self.seed, self.shuffle = np.asarray(records, dtype=np.int64), seed, shuffle
        self._epoch, self._order = -1, self.records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, j: int) -> int:
        epoch, k = divmod(int(j), len(self.records))
        if self.shuffle and epoch != self._epoch:
            self._epoch = epoch
            self._order = self.records[np.random.default_rng([self.seed, epoch]).permutation(len(self.records))]
        return int(self._order[k])


class StageTrainer(Trainer):
    """A ``Trainer`` over one of the RLHF datasets; subclasses set ``dataset_kind`` ("sft" or
    "preference") and implement ``collate``, ``loss_fn`` and ``evaluation_terms``."""

    dataset_kind = "sft"
    stage_name = "sft"
    demo_file = "sft"  # which file of the demo instruction set the stage reads

    # ------------------------------------------------------------------ data

    def _build_datasets(self) -> tuple:
        rl = self.cfg.rlhf
        path = self._data_path()
        self.records = self._load_records(path)
        train, valid = split_indices(len(self.records), rl.valid_fraction, self.cfg.train.seed)
        if self.cfg.train.eval_interval > 0 and len(valid) == 0:
            raise ConfigError(
                f"validation is on (train.eval_interval={self.cfg.train.eval_interval}) but rlhf.valid_fraction="
                f"{rl.valid_fraction} holds out no record of {path}; raise it or set train.eval_interval=0"
            )
        valid_epochs = Epochs(valid, self.cfg.train.seed, shuffle=False) if len(valid) else None
        return Epochs(train, self.cfg.train.seed), valid_epochs

    def _load_records(self, path: Path):
        seq = self.cfg.model.seq_length
        kind = SFTDataset if self.dataset_kind == "sft" else PreferenceDataset
        records = kind(path, self.tokenizer, seq)
        if self.is_logging_rank and (records.num_truncated or records.num_dropped):
            print(f"{path}: {len(records)} records kept, {records.num_truncated} truncated and "
                  f"{records.num_dropped} dropped at model.seq_length={seq}", flush=True)
        return records

    def _data_path(self) -> Path:
        rl = self.cfg.rlhf
        if rl.data:
            path = Path(rl.data)
            if not path.is_file():
                raise ConfigError(f"rlhf.data={rl.data} does not exist; point it at a JSONL file")
            return path
        if not rl.demo:
            raise ConfigError(f"rlhf.data is empty; set it to a JSONL file for the {self.stage_name} stage "
                              f"(or rlhf.demo=true for the standard-library instruction data)")
        if self.is_logging_rank:  # one rank builds; the others then find it finished
            build_demo_rlhf_data(rl.demo_dir, max_examples=rl.demo_examples)
        if dist.is_initialized():
            dist.barrier()
        return Path(build_demo_rlhf_data(rl.demo_dir, max_examples=rl.demo_examples)[self.demo_file])

    def micro_batches(self, epochs: Epochs, first_sample: int) -> list:
        """This dp rank's share of the global batch starting at run sample ``first_sample``,
        collated into micro-batches on the device."""
        indices = self.local_records(epochs, first_sample)
        size = self.cfg.train.micro_batch_size
        return [self.collate(indices[i : i + size]) for i in range(0, len(indices), size)]

    def local_records(self, epochs: Epochs, first_sample: int) -> list[int]:
        """The record indices of this dp rank's contiguous share of the global batch."""
        per_rank = self.cfg.train.global_batch_size // self.dims.dp
        start = first_sample + self.dims.dp_rank * per_rank
        return [epochs[j] for j in range(start, start + per_rank)]

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, object]:
        raise NotImplementedError

    def _stack(self, indices: list[int], key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.records[i][key] for i in indices])).to(self.dims.device)

    def _pairs(self, indices: list[int], key: str) -> torch.Tensor:
        """A preference field of both answers, chosen first then rejected: (2b, ...)."""
        return torch.cat([self._stack(indices, f"chosen_{key}"), self._stack(indices, f"rejected_{key}")])

    # ------------------------------------------------------------------ validation

    evaluation_names: tuple[str, ...] = ()  # the columns of evaluation_terms

    def evaluation_terms(self, chunk, inputs: torch.Tensor, target, num_micro_batches: int) -> torch.Tensor:
        """(samples, len(evaluation_names)) per-sample terms; validation sums them over its batches."""
        raise NotImplementedError

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        """Validation's figures from the summed terms: by default each term's mean per sample.
        Must hold "loss"."""
        return {name: value / max(samples, 1.0) for name, value in sums.items()}

    def evaluate(self) -> float:
        """Over ``train.eval_steps`` validation batches: the loss (returned and logged) and the
        stage's own figures (accuracy, margins; logged as ``val_<name>``)."""
        gb = self.cfg.train.global_batch_size
        for chunk in self.model_chunks:
            chunk.eval()
        sums = torch.zeros(len(self.evaluation_names) + 1, dtype=torch.float64, device=self.dims.device)
        for i in range(self.cfg.train.eval_steps):
            outputs = self.parallel_step.forward_outputs(self.micro_batches(self.valid_ds, i * gb), self._autocast(),
                                                         self.evaluation_terms)
            for terms in outputs:
                sums[0] += terms.shape[0]
                sums[1:] += terms.double().sum(dim=0)
        for chunk in self.model_chunks:
            chunk.train()
        sums = self._sum_over_replicas(sums).tolist()
        figures = self.summarize(dict(zip(self.evaluation_names, sums[1:])), sums[0])
        loss = figures.pop("loss")
        self.metrics.evaluation(self.step, loss, extra={f"val_{k}": v for k, v in figures.items()} or None)
        self.metrics.restart_window()
        return loss

    def _sum_over_replicas(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums held by the last stage of each data-parallel replica -> the total on every rank."""
        return sum_over_replicas(sums, self.dims)
