"""Direct preference optimization: the policy learns from preference pairs against a frozen
reference, with no reward model and no sampling.

The reference is the policy as loaded (usually the SFT checkpoint). Before the first step one
forward-only pass over every record computes the reference's log-probabilities of both answers
(each data-parallel replica a share, summed over dp and handed from the last pipeline stage to
every rank), so training holds one model, not two. The table is saved next to the run's
checkpoints, and a resumed run reads it back instead of recomputing it from weights that have
moved. The loss and its variants are in ``rlhf.losses.dpo_loss``; ``rlhf.dpo_nll_weight`` adds the
chosen answers' next-token loss (as in RPO), which keeps DPO from lowering the likelihood of the
answers it prefers along with the ones it rejects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.rlhf.data import IGNORE_INDEX
from megatron_lite.rlhf.losses import dpo_loss, sequence_log_probs
from megatron_lite.rlhf.stage import Epochs, StageTrainer
from megatron_lite.training.checkpoint import durable, resolve_checkpoint_dir

REFERENCE_FILE = "dpo_reference.pt"


class DPOTrainer(StageTrainer):
    dataset_kind = demo_file = "preference"
    stage_name = "dpo"
    evaluation_names = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward")
    reference: torch.Tensor | None = None  # (records, 2): log pi_ref of the chosen and the rejected answer

    def __init__(self, cfg: Config, dims: ParallelDims | None = None):
        super().__init__(cfg, dims)
        ck = cfg.checkpoint
        if ck.load and not ck.finetune:
            self.reference = self._read_reference(ck.load)
        else:
            self.reference = self.reference_log_probs()
            if ck.save and self.is_logging_rank:
                Path(ck.save).mkdir(parents=True, exist_ok=True)
                durable.save_torch(self.reference.cpu(), Path(ck.save) / REFERENCE_FILE)

    # ------------------------------------------------------------------ the reference

    def reference_log_probs(self) -> torch.Tensor:
        """log pi(answer | prompt) of every record's two answers under the current weights, (records, 2),
        the same on every rank."""
        count, gb, dims = len(self.records), self.cfg.train.global_batch_size, self.dims
        every = Epochs(np.arange(count), self.cfg.train.seed, shuffle=False)
        table = torch.zeros(count, 2, dtype=torch.float64, device=dims.device)
        seen = torch.zeros(count, dtype=torch.float64, device=dims.device)
        for chunk in self.model_chunks:
            chunk.eval()
        for first in tqdm(range(0, count, gb), desc="reference log-probs", leave=False,
                          disable=not self.is_logging_rank or count < 20 * gb):
            outputs = self.parallel_step.forward_outputs(self.micro_batches(every, first), self._autocast(),
                                                         self._answer_log_probs)
            if outputs:  # the last pipeline stage: (2b,) per micro-batch, chosen then rejected
                rows = torch.tensor(self.local_records(every, first), device=dims.device)
                pairs = torch.cat([o.view(2, -1).t() for o in outputs])  # (records of this rank, 2)
                table.index_add_(0, rows, pairs.double())
                seen.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
        for chunk in self.model_chunks:
            chunk.train()
        both = torch.cat([table, seen.unsqueeze(1)], dim=1)
        both = self._sum_over_replicas(both)  # a record past the end of the data may repeat: averaged
        return (both[:, :2] / both[:, 2:].clamp(min=1)).float()

    def _answer_log_probs(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        return sequence_log_probs(chunk(inputs, labels=target["labels"]).float())

    def _read_reference(self, load: str) -> torch.Tensor:
        ckpt_dir = resolve_checkpoint_dir(load)
        for path in (ckpt_dir / REFERENCE_FILE, ckpt_dir.parent / REFERENCE_FILE):
            if path.is_file():
                table = torch.load(path, map_location=self.dims.device, weights_only=True)
                if table.shape != (len(self.records), 2):
                    raise ConfigError(
                        f"{path} holds reference log-probs for {table.shape[0]} records, but {self._data_path()} "
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
        tokens, labels = self._pairs(indices, "tokens"), self._pairs(indices, "labels")
        if self.reference is None:  # computing the reference itself
            reference = torch.zeros(2 * len(indices), device=self.dims.device)
        else:
            rows = self.reference[torch.tensor(indices, device=self.reference.device)]
            reference = torch.cat([rows[:, 0], rows[:, 1]]).to(self.dims.device)
        return tokens, {"labels": labels, "reference": reference}

    def _pair_losses(self, chunk, inputs, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per pair: the loss (DPO's, plus ``rlhf.dpo_nll_weight`` x the chosen answer's mean
        next-token loss) and the implicit rewards of both answers."""
        token_loss = chunk(inputs, labels=target["labels"]).float()  # (2b, T), 0 off the answers
        policy_chosen, policy_rejected = sequence_log_probs(token_loss).chunk(2)
        reference_chosen, reference_rejected = target["reference"].chunk(2)
        rl = self.cfg.rlhf
        loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                                          rl.beta, rl.dpo_loss, rl.label_smoothing)
        if rl.dpo_nll_weight > 0:
            chosen_tokens = (target["labels"] != IGNORE_INDEX).sum(dim=1).chunk(2)[0].clamp(min=1)
            loss = loss - rl.dpo_nll_weight * policy_chosen / chosen_tokens
        return loss, chosen, rejected

    def loss_fn(self, chunk, inputs, target, num_micro_batches: int) -> torch.Tensor:
        loss, _, _ = self._pair_losses(chunk, inputs, target)
        return loss.mean() / num_micro_batches

    def evaluation_terms(self, chunk, inputs, target, num_micro_batches) -> torch.Tensor:
        loss, chosen, rejected = self._pair_losses(chunk, inputs, target)
        margin = chosen - rejected
        return torch.stack([loss, (margin > 0).float(), margin, chosen, rejected], dim=1)

    def tokens_per_step(self) -> int:
        return 2 * super().tokens_per_step()
