"""Direct preference optimization: the policy learns from preference pairs, or rankings of K
answers, against a frozen reference, with no reward model and no sampling.

A ranked record (see ``rlhf.data.RankedDataset``) gives all its K(K-1)/2 pairs, as the reward
model takes them, not just the best answer against each other one: one batch element is one
prompt with its K answers, and its loss is the mean of DPO's loss over its ranked pairs (tied
answers make no pair), so a pair is the case K = 2.

The reference is the policy as loaded (usually the SFT checkpoint). Before the first step one
forward-only pass over every record computes the reference's log-probabilities of all its answers
(each data-parallel replica a share, summed over dp and handed from the last pipeline stage to
every rank), so training holds one model, not two. The table is saved next to the run's
checkpoints, and a resumed run reads it back instead of recomputing it from weights that have
moved. The loss and its variants are in ``rlhf.losses.dpo_loss``; ``rlhf.dpo.nll_weight`` adds the
best answer's next-token loss (as in RPO), which keeps DPO from lowering the likelihood of the
answers it prefers along with the ones it rejects. With ``rlhf.pack`` the K answers of every prompt
of a micro-batch are packed as documents (``rlhf.packing``), in the answer-major order of the
unpacked rows, and each answer's log-probability is summed from the packed rows; a record's
padding answers (fewer than K) take no room and sum to 0, as their label-less unpacked rows do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_lite.config import ConfigError
from megatron_lite.parallel.collectives import sum_over_replicas
from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.losses import dpo_loss, mean_over_pairs, sum_over_pairs
from megatron_lite.rlhf.packing import PackedRows, trained_length
from megatron_lite.rlhf.reward import answers_first, packed_answers, per_prompt
from megatron_lite.rlhf.stage import Epochs, RecordStage, per_sequence, token_losses
from megatron_lite.training.checkpoint import durable, resolve_checkpoint_dir
from megatron_lite.training.trained_model import TrainedModel

REFERENCE_FILE = "dpo_reference.pt"


class DPOTask(RecordStage):
    name = "dpo"
    dataset_kind = "preference"
    evaluation_names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "pairs")
    reference: torch.Tensor | None = None  # (records, K): log pi_ref of every answer, best first

    @property
    def sequences_per_record(self) -> int:
        return self.records.records.num_answers

    def start(self, model: TrainedModel) -> None:
        """The reference table: read back when resuming, else computed from the weights as loaded."""
        super().start(model)
        checkpoint_cfg = self.cfg.checkpoint
        if checkpoint_cfg.load and not checkpoint_cfg.finetune:
            self.reference = self._read_reference(checkpoint_cfg.load)
            return
        self.reference = self.reference_log_probs()
        if checkpoint_cfg.save and self.dims.rank == 0:
            Path(checkpoint_cfg.save).mkdir(parents=True, exist_ok=True)
            durable.save_torch(self.reference.cpu(), Path(checkpoint_cfg.save) / REFERENCE_FILE)

    # ------------------------------------------------------------------ the reference

    def reference_log_probs(self) -> torch.Tensor:
        """log pi(answer | prompt) of every record's K answers under the current weights, (records, K),
        the same on every rank (0 for a record's padding answers)."""
        count, gb, dims = len(self.records), self.cfg.train.global_batch_size, self.dims
        every = Epochs(np.arange(count), self.cfg.train.seed, shuffle=False)
        num_answers = self.sequences_per_record
        table = torch.zeros(count, num_answers, dtype=torch.float64, device=dims.device)
        seen = torch.zeros(count, dtype=torch.float64, device=dims.device)
        with self.model.evaluating():
            for first in tqdm(range(0, count, gb), desc="reference log-probs", leave=False,
                              disable=dims.rank != 0 or count < 20 * gb):
                outputs = self.model.forward_outputs(self.micro_batches(every, first), self._answer_log_probs)
                if outputs:  # the last pipeline stage: (K b,) per micro-batch, answer-major
                    rows = torch.tensor(self.records.local_indices(every, first), device=dims.device)
                    answers = torch.cat([per_prompt(o, num_answers) for o in outputs])  # (records of this rank, K)
                    table.index_add_(0, rows, answers.double())
                    seen.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        both = torch.cat([table, seen.unsqueeze(1)], dim=1)
        both = sum_over_replicas(both, dims)  # a record past the end of the data may repeat: averaged
        return (both[:, :-1] / both[:, -1:].clamp(min=1)).float()

    def _answer_log_probs(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        return -per_sequence(token_losses(chunk, inputs, target), target)

    def _read_reference(self, load: str) -> torch.Tensor:
        ckpt_dir = resolve_checkpoint_dir(load)
        for path in (ckpt_dir / REFERENCE_FILE, ckpt_dir.parent / REFERENCE_FILE):
            if path.is_file():
                table = torch.load(path, map_location=self.dims.device, weights_only=True)
                if table.shape != (len(self.records), self.sequences_per_record):
                    raise ConfigError(
                        f"{path} holds reference log-probs for {table.shape[0]} records of {table.shape[1]} answers, "
                        f"but {self.records.path} has {len(self.records)} of {self.sequences_per_record}; resume "
                        f"with the data the run started with"
                    )
                return table
        raise ConfigError(
            f"resuming DPO from {ckpt_dir} needs the reference log-probs saved with the run ({REFERENCE_FILE}), "
            f"which is in neither {ckpt_dir} nor its parent; to start DPO from these weights as the reference, "
            f"set checkpoint.finetune=true"
        )

    # ------------------------------------------------------------------ batches and loss

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, dict]:
        """tokens and labels (K b, T) answer-major (with pairs: chosen answers, then rejected), the
        reference log-probs (K b,) alike, and which answer is ranked above which (b, K, K)."""
        tokens, labels = self.records.stack(indices, "tokens"), self.records.stack(indices, "labels")
        target = {"labels": answers_first(labels), "reference": self._reference_of(indices),
                  "better": self.records.stack(indices, "better")}
        return answers_first(tokens), target

    def _reference_of(self, indices: list[int]) -> torch.Tensor:
        """The records' reference log-probs, answer-major (K b,)."""
        if self.reference is None:  # computing the reference itself
            return torch.zeros(self.sequences_per_record * len(indices), device=self.dims.device)
        rows = self.reference[torch.tensor(indices, device=self.reference.device)]  # (b, K)
        return answers_first(rows).to(self.dims.device)

    def packed_sequences(self, indices: list[int]) -> list:
        """Every answer up to its last trained token, answer-major as ``collate``'s rows."""
        return packed_answers([self.records[i] for i in indices], lambda item, k: trained_length(item["labels"][k]))

    def collate_packed(self, indices: list[int], rows: PackedRows) -> tuple[torch.Tensor, dict]:
        tokens, target = super().collate_packed(indices, rows)
        better = self.records.stack(indices, "better")
        return tokens, {**target, "reference": self._reference_of(indices), "better": better}

    def prompt_losses(self, chunk, inputs, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per prompt (b,): the mean of DPO's loss over its ranked pairs, plus ``rlhf.dpo.nll_weight``
        x its best answer's mean next-token loss; and per ordered pair of its answers (b, K, K) the
        implicit rewards of the first and the second answer."""
        num_answers = target["better"].shape[1]
        token_loss = token_losses(chunk, inputs, target)  # (rows, T), 0 off the answers
        policy = per_prompt(-per_sequence(token_loss, target), num_answers)  # (b, K)
        reference = per_prompt(target["reference"], num_answers)
        settings = self.cfg.rlhf.dpo
        pair_loss, first, second = dpo_loss(policy[:, :, None], policy[:, None, :], reference[:, :, None],
                                            reference[:, None, :], settings.beta, settings.loss,
                                            settings.label_smoothing)
        loss = mean_over_pairs(pair_loss, target["better"])
        if settings.nll_weight > 0:
            answer_tokens = per_sequence((target["labels"] != IGNORE_INDEX).float(), target)  # (K b,) answer-major
            best_tokens = answer_tokens[: loss.shape[0]].clamp(min=1)  # the first b are the best answers
            loss = loss - settings.nll_weight * policy[:, 0] / best_tokens
        return loss, first.expand_as(pair_loss), second.expand_as(pair_loss)

    def loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        loss, _, _ = self.prompt_losses(chunk, inputs, target)
        return loss.mean() / num_micro_batches

    def evaluation_terms(self, chunk, inputs, target, num_micro_batches) -> torch.Tensor:
        """Per prompt: its loss, and over its ranked pairs the number the policy ranks right, the
        summed margin, the summed implicit rewards of the better and the worse answer, the count."""
        loss, first, second = self.prompt_losses(chunk, inputs, target)
        better = target["better"]
        margin = first - second
        return torch.stack([loss, sum_over_pairs((margin > 0).float(), better), sum_over_pairs(margin, better),
                            sum_over_pairs(first, better), sum_over_pairs(second, better),
                            better.sum(dim=(1, 2)).float()], dim=1)

    def summarize(self, sums: dict[str, float], samples: float) -> dict[str, float]:
        """The loss per prompt; the rest per ranked pair."""
        pairs = max(sums.pop("pairs"), 1.0)
        loss = sums.pop("loss") / max(samples, 1.0)
        return {"loss": loss, **{name: value / pairs for name, value in sums.items()}}
