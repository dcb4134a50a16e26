"""Direct preference optimization: the policy learns from preference pairs against a frozen
reference, with no reward model and no sampling.

The reference is the policy as loaded (usually the SFT checkpoint). Before the first step one
forward-only pass over every record computes the reference's log-probabilities of both answers
(each data-parallel replica a share, summed over dp and handed from the last pipeline stage to
every rank), so training holds one model, not two. The table is saved next to the run's
checkpoints, and a resumed run reads it back instead of recomputing it from weights that have
moved. The loss and its variants are in ``rlhf.losses.dpo_loss``; ``rlhf.dpo.nll_weight`` adds the
chosen answers' next-token loss (as in RPO), which keeps DPO from lowering the likelihood of the
answers it prefers along with the ones it rejects. With ``rlhf.pack`` a micro-batch's chosen and
rejected answers are packed as documents (``rlhf.packing``) and each answer's log-probability is
summed from the packed rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_lite.config import ConfigError
from megatron_lite.parallel.collectives import sum_over_replicas
from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.losses import dpo_loss
from megatron_lite.rlhf.packing import trained_length
from megatron_lite.rlhf.stage import Epochs, RecordStage, per_sequence, token_losses
from megatron_lite.training.checkpoint import durable, resolve_checkpoint_dir
from megatron_lite.training.trained_model import TrainedModel

REFERENCE_FILE = "dpo_reference.pt"


class DPOTask(RecordStage):
    name = "dpo"
    dataset_kind = "preference"
    evaluation_names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")
    sequences_per_record = 2
    reference: torch.Tensor | None = None  # (records, 2): log pi_ref of the chosen and the rejected answer

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
        """log pi(answer | prompt) of every record's two answers under the current weights, (records, 2),
        the same on every rank."""
        count, gb, dims = len(self.records), self.cfg.train.global_batch_size, self.dims
        every = Epochs(np.arange(count), self.cfg.train.seed, shuffle=False)
        table = torch.zeros(count, 2, dtype=torch.float64, device=dims.device)
        seen = torch.zeros(count, dtype=torch.float64, device=dims.device)
        with self.model.evaluating():
            for first in tqdm(range(0, count, gb), desc="reference log-probs", leave=False,
                              disable=dims.rank != 0 or count < 20 * gb):
                outputs = self.model.forward_outputs(self.micro_batches(every, first), self._answer_log_probs)
                if outputs:  # the last pipeline stage: (2b,) per micro-batch, chosen then rejected
                    rows = torch.tensor(self.records.local_indices(every, first), device=dims.device)
                    pairs = torch.cat([o.view(2, -1).t() for o in outputs])  # (records of this rank, 2)
                    table.index_add_(0, rows, pairs.double())
                    seen.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        both = torch.cat([table, seen.unsqueeze(1)], dim=1)
        both = sum_over_replicas(both, dims)  # a record past the end of the data may repeat: averaged
        return (both[:, :2] / both[:, 2:].clamp(min=1)).float()

    def _answer_log_probs(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        return -per_sequence(token_losses(chunk, inputs, target), target)

    def _read_reference(self, load: str) -> torch.Tensor:
        ckpt_dir = resolve_checkpoint_dir(load)
        for path in (ckpt_dir / REFERENCE_FILE, ckpt_dir.parent / REFERENCE_FILE):
            if path.is_file():
                table = torch.load(path, map_location=self.dims.device, weights_only=True)
                if table.shape != (len(self.records), 2):
                    raise ConfigError(
                        f"{path} holds reference log-probs for {table.shape[0]} records, but {self.records.path} "
                        f"has {len(self.records)}; resume with the data the run started with"
                    )
                return table
        raise ConfigError(
            f"resuming DPO from {ckpt_dir} needs the reference log-probs saved with the run ({REFERENCE_FILE}), "
            f"which is in neither {ckpt_dir} nor its parent; to start DPO from these weights as the reference, "
            f"set checkpoint.finetune=true"
        )

    # ------------------------------------------------------------------ batches and loss

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, dict]:
        """Chosen answers first, then rejected: tokens and labels (2b, T), reference log-probs (2b,)."""
        tokens, labels = self.records.pairs(indices, "tokens"), self.records.pairs(indices, "labels")
        return tokens, {"labels": labels, "reference": self._reference_of(indices)}

    def _reference_of(self, indices: list[int]) -> torch.Tensor:
        """The records' reference log-probs, chosen answers first, then rejected (2b,)."""
        if self.reference is None:  # computing the reference itself
            return torch.zeros(2 * len(indices), device=self.dims.device)
        rows = self.reference[torch.tensor(indices, device=self.reference.device)]
        return torch.cat([rows[:, 0], rows[:, 1]]).to(self.dims.device)

    def packed_sequences(self, indices: list[int]) -> list:
        """Every chosen answer, then every rejected one: the order of ``collate``'s rows."""
        records = [self.records[i] for i in indices]
        return [(r[f"{side}_tokens"], r[f"{side}_labels"], trained_length(r[f"{side}_labels"]))
                for side in ("chosen", "rejected") for r in records]

    def collate_packed(self, indices: list[int], rows) -> tuple[torch.Tensor, dict]:
        tokens, target = super().collate_packed(indices, rows)
        return tokens, {**target, "reference": self._reference_of(indices)}

    def pair_losses(self, chunk, inputs, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss (DPO's, plus ``rlhf.dpo.nll_weight`` x the chosen answer's mean
        next-token loss) and the implicit rewards of both answers."""
        token_loss = token_losses(chunk, inputs, target)  # (rows, T), 0 off the answers
        policy_chosen, policy_rejected = (-per_sequence(token_loss, target)).chunk(2)
        reference_chosen, reference_rejected = target["reference"].chunk(2)
        settings = self.cfg.rlhf.dpo
        loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                          settings.beta, settings.loss, settings.label_smoothing)
        if settings.nll_weight > 0:
            chosen_tokens = per_sequence((target["labels"] != IGNORE_INDEX).float(), target).chunk(2)[0].clamp(min=1)
            loss = loss - settings.nll_weight * policy_chosen / chosen_tokens
        return loss, chosen, rejected

    def loss(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        loss, _, _ = self.pair_losses(chunk, inputs, target)
        return loss.mean() / num_micro_batches

    def evaluation_terms(self, chunk, inputs, target, num_micro_batches) -> torch.Tensor:
        loss, chosen, rejected = self.pair_losses(chunk, inputs, target)
        margin = chosen - rejected
        return torch.stack([loss, (margin > 0).float(), margin, chosen, rejected], dim=1)
