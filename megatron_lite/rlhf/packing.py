"""Packed fine-tuning batches (``rlhf.pack``): several records share one sequence of
``model.seq_length`` tokens, each a document of its own.

A micro-batch still holds ``train.micro_batch_size`` records (prompts with their K ranked answers
for rm and dpo, every answer a sequence); packing only
shrinks the rows they occupy, so a step trains on exactly the records it would unpacked, and
never needs more memory. The records of a micro-batch (the bounded window) are placed best-fit
decreasing: longest first, each into the row whose free room it fills most tightly, a new row
when none has room; ties keep the seeded record order, so the packing is deterministic. Every
micro-batch of one call gets the same number of rows (the most any of them needs), because the
pipeline exchanges activations of one shape.

Each packed sequence (a record's tokens with their labels) becomes one document: attention stays
within it (``document_ids``) and positions restart at 0 (``position_ids``), so its per-token
losses are those of the record alone in a row of its own. ``sequence`` (R, T) names the record
each token belongs to (``count`` for padding), from which the per-record sums of the losses
are taken (``sequence_sums``).

A sequence of length 0 (a ranked record's padding answer, which is in no pair) takes no room: it
has no token, so its sum is 0 as the sum of an unpacked row without labels is, and its last-token
value is 0 (``last`` -1); no loss reads either through a pair.

For a next-token loss (sft, dpo) a sequence occupies its tokens up to its last trained position
(``trained_length``): what follows carries no loss and, attention being causal, changes no loss
before it. A reward model's sequence keeps its closing token, whose value is its score
(``last_token_values``). Records longer than the sequence length are truncated by the datasets
exactly as unpacked (see ``rlhf.data``), so every record fits a row; such a record fills one.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from megatron_lite.errors import UserError
from megatron_lite.rlhf.data import IGNORE_INDEX


class PackingError(UserError, ValueError):
    """A sequence that cannot be packed; the message says which and what to change."""


class PackedRows(NamedTuple):
    """Sequences packed into rows, as numpy arrays (rows, seq_length)."""

    tokens: np.ndarray  # int64, pad id off the sequences
    labels: np.ndarray  # int64, IGNORE_INDEX off the trained positions
    document_ids: np.ndarray  # int32, from 0 in each row; padding is a document of its own
    position_ids: np.ndarray  # int64, from 0 in each document
    sequence: np.ndarray  # int64, the index of the sequence a token belongs to; count for padding
    last: np.ndarray  # (count,) int64: each sequence's last token as row * seq_length + column; -1 if empty


def trained_length(labels: np.ndarray) -> int:
    """The tokens of a padded sequence up to and including its last trained position."""
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if len(trained) == 0:
        raise PackingError("a sequence has no trained position; the datasets drop such records, so pass their items")
    return int(trained[-1]) + 1


def best_fit_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` placed into rows of ``capacity`` tokens,
    each row's indices in placement order; sequences of length 0 are in no row."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length == 0:
            continue
        if not 0 < length <= capacity:
            raise PackingError(
                f"sequence {index} holds {length} tokens, which does not fit a row of model.seq_length={capacity}; "
                f"the datasets truncate records to model.seq_length, so pack their items unchanged"
            )
        fitting = [row for row, room in enumerate(free) if room >= length]
        if fitting:
            row = min(fitting, key=lambda r: (free[r], r))
        else:
            row = len(rows)
            rows.append([])
            free.append(capacity)
        rows[row].append(index)
        free[row] -= length
    return rows


def pack_rows(sequences: Sequence[tuple[np.ndarray, np.ndarray, int]], rows: list[list[int]], num_rows: int,
              seq_length: int, pad_id: int) -> PackedRows:
    """Lay out ``sequences`` ((tokens, labels, length), the first ``length`` entries used) in the
    placement ``rows``, padded to ``num_rows`` rows."""
    if num_rows < len(rows):
        raise ValueError(f"{len(rows)} rows of sequences do not fit num_rows={num_rows}")
    count = len(sequences)
    tokens = np.full((num_rows, seq_length), pad_id, dtype=np.int64)
    labels = np.full((num_rows, seq_length), IGNORE_INDEX, dtype=np.int64)
    document_ids = np.zeros((num_rows, seq_length), dtype=np.int32)
    position_ids = np.tile(np.arange(seq_length, dtype=np.int64), (num_rows, 1))
    sequence = np.full((num_rows, seq_length), count, dtype=np.int64)
    last = np.full(count, -1, dtype=np.int64)
    for row, members in enumerate(rows):
        start = 0
        for document, index in enumerate(members):
            seq_tokens, seq_labels, length = sequences[index]
            end = start + length
            tokens[row, start:end] = seq_tokens[:length]
            labels[row, start:end] = seq_labels[:length]
            document_ids[row, start:end] = document
            position_ids[row, start:end] = np.arange(length)
            sequence[row, start:end] = index
            last[index] = row * seq_length + end - 1
            start = end
        document_ids[row, start:] = len(members)  # padding attends to no sequence
        position_ids[row, start:] = np.arange(seq_length - start)
    return PackedRows(tokens, labels, document_ids, position_ids, sequence, last)


def pack_micro_batches(groups: Sequence[Sequence[tuple[np.ndarray, np.ndarray, int]]], seq_length: int,
                       pad_id: int) -> list[PackedRows]:
    """Each group of sequences (one micro-batch) packed best-fit, all with the same number of rows."""
    placements = [best_fit_rows([length for _, _, length in group], seq_length) for group in groups]
    num_rows = max(len(rows) for rows in placements)
    return [pack_rows(group, rows, num_rows, seq_length, pad_id) for group, rows in zip(groups, placements)]


def packed_target(packed: PackedRows, device: torch.device) -> dict[str, torch.Tensor]:
    """What the model chunks (``document_ids``, ``position_ids``) and a stage's loss (``labels``,
    ``sequence``, ``last``) read of a packed micro-batch, on the device."""
    fields = ("labels", "document_ids", "position_ids", "sequence", "last")
    return {name: torch.from_numpy(getattr(packed, name)).to(device) for name in fields}


def sequence_sums(values: torch.Tensor, target: dict) -> torch.Tensor:
    """Per-sequence sums of per-token ``values`` (R, T) of a packed micro-batch: (count,)."""
    count = target["last"].shape[0]
    sums = torch.zeros(count + 1, dtype=values.dtype, device=values.device)
    sums.index_add_(0, target["sequence"].flatten(), values.flatten())
    return sums[:count]


def last_token_values(values: torch.Tensor, target: dict) -> torch.Tensor:
    """Per-position ``values`` (R, T) of a packed micro-batch -> (count,) the value at each
    sequence's last token (where a reward model reads its score); 0 for an empty sequence."""
    last = target["last"]
    read = values.flatten()[last.clamp(min=0)]
    return torch.where(last >= 0, read, torch.zeros_like(read))


def padding_fraction(rows: int, seq_length: int, lengths: Sequence[int]) -> float:
    """The share of ``rows`` x ``seq_length`` token slots holding no sequence token."""
    return 1.0 - sum(lengths) / max(rows * seq_length, 1)
