"""What the fine-tuning stages share: a JSONL file -> token records -> epochs of batches, and the
task shape of the stages that train one model on a loss over those records (sft, rm, dpo).

Batches are records drawn from a seeded permutation of the training records, reshuffled every
epoch; every tp and pp rank of a data-parallel replica reads the same records, as in
pretraining. A stage is a task object run by ``training.trainer.Trainer`` (see its ``Task``):
``RecordStage`` below holds the parts sft, rm and dpo have in common, and each of them says
how a micro-batch is collated (``collate``), what its loss is (``loss``, on the last pipeline
stage) and which figures validation reports (``evaluation_terms``, ``summarize``); with
``rlhf.pack`` a micro-batch's sequences (``packed_sequences``) share rows as documents
(``rlhf.packing``), and the loss reads per-sequence figures with ``per_sequence``. PPO reads
prompts through ``StageRecords`` too but trains several models, so it is a task of its own.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.collectives import sum_over_replicas
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.rlhf.arithmetic import build_arithmetic_data
from megatron_lite.rlhf.data import RankedDataset, SFTDataset, chat_format, split_indices
from megatron_lite.rlhf.demo_data import build_demo_rlhf_data
from megatron_lite.rlhf.packing import PackedRows, pack_micro_batches, packed_target, sequence_sums
from megatron_lite.training.step import chunk_inputs
from megatron_lite.training.trained_model import TrainedModel
from megatron_lite.training.trainer import StepResult


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


def stage_data_path(cfg: Config, dims: ParallelDims, stage: str, demo_file: str) -> Path:
    """``rlhf.data``, or with ``rlhf.demo`` the demo instruction set's ``demo_file`` (built once):
    "sft" or "preference" from the docstrings, "arithmetic" for the verifiable questions."""
    settings = cfg.rlhf
    if settings.data:
        path = Path(settings.data)
        if not path.is_file():
            raise ConfigError(f"rlhf.data={settings.data} does not exist; point it at a JSONL file")
        return path
    if not settings.demo:
        raise ConfigError(f"rlhf.data is empty; set it to a JSONL file for the {stage} stage "
                          f"(or rlhf.demo=true for the standard-library instruction data)")
    def build() -> Path:
        if demo_file == "arithmetic":
            return build_arithmetic_data(settings.demo_dir, count=settings.demo_examples)
        return Path(build_demo_rlhf_data(settings.demo_dir, max_examples=settings.demo_examples)[demo_file])

    if dims.rank == 0:  # one rank builds; the others then find it finished
        build()
    if dist.is_initialized():
        dist.barrier()
    return build()


class StageRecords:
    """A stage's records, split into training and validation epochs (``rlhf.valid_fraction``),
    handed out as each data-parallel rank's share of a global batch."""

    def __init__(self, cfg: Config, dims: ParallelDims, stage: str, demo_file: str, open_records: Callable):
        """``open_records(path)``: the dataset of the file's records (``rlhf.data``)."""
        self.cfg, self.dims = cfg, dims
        self.path = stage_data_path(cfg, dims, stage, demo_file)
        self.records = open_records(self.path)
        train, valid = split_indices(len(self.records), cfg.rlhf.valid_fraction, cfg.train.seed)
        if cfg.train.eval_interval > 0 and len(valid) == 0:
            raise ConfigError(
                f"validation is on (train.eval_interval={cfg.train.eval_interval}) but rlhf.valid_fraction="
                f"{cfg.rlhf.valid_fraction} holds out no record of {self.path}; raise it or set train.eval_interval=0"
            )
        self.train = Epochs(train, cfg.train.seed)
        self.valid = Epochs(valid, cfg.train.seed, shuffle=False) if len(valid) else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.records[index]

    def local_indices(self, epochs: Epochs, first_sample: int) -> list[int]:
        """The record indices of this dp rank's contiguous share of the global batch starting at
        run sample ``first_sample``."""
        per_rank = self.cfg.train.global_batch_size // self.dims.dp
        start = first_sample + self.dims.dp_rank * per_rank
        return [epochs[j] for j in range(start, start + per_rank)]

    def stack(self, indices: list[int], key: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.records[i][key] for i in indices])).to(self.dims.device)


def report_truncation(records, path: Path, seq_length: int, dims: ParallelDims) -> None:
    """Rank 0 says how many records the sequence length truncated or dropped."""
    if dims.rank == 0 and (records.num_truncated or records.num_dropped):
        print(f"{path}: {len(records)} records kept, {records.num_truncated} truncated and "
              f"{records.num_dropped} dropped at model.seq_length={seq_length}", flush=True)


def is_packed(target) -> bool:
    """Whether a micro-batch's target is of packed records (``rlhf.packing.packed_target``)."""
    return isinstance(target, dict) and "sequence" in target


def per_sequence(values: torch.Tensor, target) -> torch.Tensor:
    """Per-token ``values`` (rows, T) summed per sequence: per row unpacked, per packed sequence
    (in the order they were packed) under ``rlhf.pack``."""
    return sequence_sums(values, target) if is_packed(target) else values.sum(dim=-1)


def token_losses(chunk, inputs: torch.Tensor, target: dict) -> torch.Tensor:
    """The last stage's fp32 per-token losses of ``target["labels"]`` (0 off the trained positions),
    with the documents and positions of a packed micro-batch."""
    return chunk(inputs, labels=target["labels"], **chunk_inputs(target)).float()


class RecordStage(abc.ABC):
    """A stage that trains one model on a loss over records: sft, rm and dpo. A stage class sets
    ``name``, ``head``, ``dataset_kind`` ("sft", or "preference" for ranked answers and pairs; also
    the demo file it reads), ``evaluation_names`` and ``sequences_per_record`` (K when a record is
    K ranked answers), and implements ``collate``, ``loss`` and ``evaluation_terms``, and for
    ``rlhf.pack`` ``packed_sequences``."""

    name: str  # the command line's name of the stage
    head = "lm"
    dataset_kind: str
    evaluation_names: tuple[str, ...] = ()  # the columns of evaluation_terms
    sequences_per_record = 1

    def __init__(self, cfg: Config, dims: ParallelDims, tokenizer):
        if cfg.rlhf.pack and cfg.model.attention_backend not in ("torch", "triton"):
            raise ConfigError(f"rlhf.pack=true masks attention per record, which model.attention_backend="
                              f"{cfg.model.attention_backend} cannot; use torch or triton, or set rlhf.pack=false")
        self.cfg, self.dims, self.tokenizer = cfg, dims, tokenizer
        self.records: StageRecords | None = None
        self.model: TrainedModel | None = None

    def datasets(self) -> tuple:
        dataset = SFTDataset if self.dataset_kind == "sft" else RankedDataset
        seq_length = self.cfg.model.seq_length
        chat = chat_format(self.cfg.rlhf.chat_template, self.tokenizer, self.cfg.data.tokenizer)

        def open_records(path: Path):
            records = dataset(path, self.tokenizer, seq_length, chat)
            report_truncation(records, path, seq_length, self.dims)
            return records

        self.records = StageRecords(self.cfg, self.dims, self.name, self.dataset_kind, open_records)
        return self.records.train, self.records.valid

    def start(self, model: TrainedModel) -> None:
        self.model = model

    def micro_batches(self, epochs: Epochs, first_sample: int) -> list:
        """This dp rank's share of the global batch starting at run sample ``first_sample``,
        collated into micro-batches on the device."""
        indices = self.records.local_indices(epochs, first_sample)
        size = self.cfg.train.micro_batch_size
        groups = [indices[i : i + size] for i in range(0, len(indices), size)]
        if self.cfg.rlhf.pack:
            return self.packed_micro_batches(groups)
        return [self.collate(group) for group in groups]

    def packed_micro_batches(self, groups: list[list[int]]) -> list:
        """Each group of records packed into rows (``rlhf.packing``), collated on the device."""
        packed = pack_micro_batches([self.packed_sequences(group) for group in groups],
                                    self.cfg.model.seq_length, self.tokenizer.pad_id)
        return [self.collate_packed(group, rows) for group, rows in zip(groups, packed)]

    @abc.abstractmethod
    def collate(self, indices: list[int]) -> tuple[torch.Tensor, object]:
        """One micro-batch of records: (tokens, what ``loss`` reads), on the device."""

    @abc.abstractmethod
    def packed_sequences(self, indices: list[int]) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """The sequences of these records to pack, (tokens, labels, length) each, in the order
        the loss reads their per-sequence figures; length 0 for one that is no sequence (a ranked
        record's padding answer), which keeps its place in that order but takes no room."""

    def collate_packed(self, indices: list[int], rows: PackedRows) -> tuple[torch.Tensor, dict]:
        """A micro-batch of these records packed into ``rows``: (tokens, what ``loss`` reads), on
        the device."""
        return torch.from_numpy(rows.tokens).to(self.dims.device), packed_target(rows, self.dims.device)

    @abc.abstractmethod
    def loss(self, chunk, inputs: torch.Tensor, target, num_micro_batches: int) -> torch.Tensor:
        """The last stage's loss of one micro-batch (see ``training.step.LossFn``)."""

    def train_step(self, epochs: Epochs, first_sample: int, step: int) -> StepResult:
        return StepResult(*self.model.train_on(self.micro_batches(epochs, first_sample)), {})

    def tokens_per_step(self) -> int:
        return self.sequences_per_record * self.cfg.train.global_batch_size * self.cfg.model.seq_length

    def saved_beside(self) -> dict[str, TrainedModel]:
        return {}

    # ------------------------------------------------------------------ validation

    @abc.abstractmethod
    def evaluation_terms(self, chunk, inputs: torch.Tensor, target, num_micro_batches: int) -> torch.Tensor:
        """(samples, len(evaluation_names)) per-sample terms; validation sums them over its batches."""

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        """Validation's figures from the summed terms: by default each term's mean per sample.
        Must hold "loss"."""
        return {name: value / max(samples, 1.0) for name, value in sums.items()}

    def evaluate(self, epochs: Epochs) -> dict[str, float]:
        """Over ``train.eval_steps`` validation batches: the loss and the stage's own figures
        (accuracy, margins)."""
        gb = self.cfg.train.global_batch_size
        sums = torch.zeros(len(self.evaluation_names) + 1, dtype=torch.float64, device=self.dims.device)
        with self.model.evaluating():
            for i in range(self.cfg.train.eval_steps):
                for terms in self.model.forward_outputs(self.micro_batches(epochs, i * gb), self.evaluation_terms):
                    sums[0] += terms.shape[0]
                    sums[1:] += terms.double().sum(dim=0)
        sums = sum_over_replicas(sums, self.dims).tolist()
        figures = self.summarize(dict(zip(self.evaluation_names, sums[1:])), sums[0])
        return {"loss": figures.pop("loss"), **figures}
