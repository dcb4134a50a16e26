"""A parameter's sharding layout: one frozen ``ParamLayout`` attached once to each parameter.

Every question the gradient path, the grad norm, the optimizer and the checkpoint code ask
about a parameter is answered from this object, never from loose attributes:

- how the full (tp = 1) tensor is split over tensor-parallel ranks (``partition_dim``,
  ``partition_chunks``, ``partition_groups``, ``replicated_rows``), and so how to cut a full
  tensor into this rank's shard and join the shards again (``shard_tensor``, ``merge_shards``,
  ``full_shape``). The full layout is canonical: checkpoints store it, any tp can load it;
- whether each tp rank's gradient covers only its own tokens (``sequence_parallel``: norms and
  the value head on a sequence shard) or its own heads (``partial_over_tp``: the per-head q/k norm
  weights every rank holds whole and applies to its heads), so the gradients are summed over tp;
- whether the parameter is one of the two copies of a tied word embedding (first and last
  pipeline stage), whose gradients are summed and which is counted once;
- which elements of the gradient this rank counts in the global grad norm, so that every
  element of the model's gradient is counted exactly once (``counts_in_grad_norm``,
  ``counts_replicated_rows``).

Splits. ``partition_dim`` None: every tp rank holds the whole tensor. Otherwise the tensor
along ``partition_dim`` is ``partition_chunks`` equal blocks, each split over tp on its own
(2 for a fused [gate; up] weight, so each rank's gate and up rows stay paired).

Grouped rows (a fused QKV weight of grouped-query attention): ``partition_groups`` G says the
full tensor along dim 0 is G equal groups, and ``replicated_rows`` R that the last R rows of
each group (that group's k and v) must stay whole. With tp <= G each rank holds G / tp whole
groups, an ordinary contiguous split. With tp = r x G the r consecutive ranks of group g split
its other rows r ways and each keeps a copy of its R rows (``tp_replicas(tp)`` is then r);
the gradient path sums the copies' gradients over those r ranks so they stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

# Not "layout": every tensor already has one (torch.strided).
_ATTRIBUTE = "param_layout"
# The split fields a checkpoint manifest records per parameter; the grouped-row pair only where
# used, so manifests of other parameters keep the form older readers expect.
_MANIFEST_FIELDS = ("partition_dim", "partition_chunks")
_GROUPED_MANIFEST_FIELDS = ("partition_groups", "replicated_rows")


@dataclass(frozen=True)
class ParamLayout:
    partition_dim: int | None = None  # None: every tp rank holds the whole tensor
    partition_chunks: int = 1  # equal blocks along partition_dim, each split over tp on its own
    partition_groups: int = 1  # row groups (grouped-query attention's kv groups)
    replicated_rows: int = 0  # rows at the end of each group that stay whole (copies when tp > groups)
    sequence_parallel: bool = False  # gradient partial per tp rank: summed over tp
    partial_over_tp: bool = False  # a whole tensor each tp rank applies to its own heads: summed over tp
    tied_embedding: bool = False  # one of two copies of the word embedding (pp > 1)

    def __post_init__(self) -> None:
        if self.partition_chunks < 1 or self.partition_groups < 1 or self.replicated_rows < 0:
            raise ValueError(
                f"partition_chunks ({self.partition_chunks}) and partition_groups ({self.partition_groups}) "
                f"must be >= 1 and replicated_rows ({self.replicated_rows}) >= 0"
            )
        if self.is_grouped and (self.partition_dim != 0 or self.partition_chunks != 1):
            # The replicated rows must be a contiguous tail of the flat gradient (ZeRO slices it flat).
            raise ValueError("grouped rows (partition_groups / replicated_rows) need partition_dim=0 and one chunk")
        if (self.sequence_parallel or self.partial_over_tp) and self.is_sharded:
            raise ValueError(
                f"sequence_parallel and partial_over_tp mark a parameter every tp rank holds whole (its gradients "
                f"are summed over tp); a parameter split along partition_dim={self.partition_dim} holds different pieces"
            )

    @property
    def summed_over_tp(self) -> bool:
        """Each tp rank's gradient is a part of the whole one (its tokens or its heads)."""
        return self.sequence_parallel or self.partial_over_tp

    @property
    def is_sharded(self) -> bool:
        return self.partition_dim is not None

    @property
    def is_grouped(self) -> bool:
        return self.partition_groups > 1 or self.replicated_rows > 0

    # ---- who holds what, and who counts it ----

    def tp_replicas(self, tp: int) -> int:
        """How many consecutive tp ranks hold a copy of each group's replicated rows (1: no copies)."""
        if self.replicated_rows == 0 or tp <= self.partition_groups:
            return 1
        if tp % self.partition_groups:
            raise ValueError(
                f"tensor-parallel size {tp} is larger than the {self.partition_groups} row groups but not a "
                f"multiple of them; each group's replicated rows need a whole number of ranks"
            )
        return tp // self.partition_groups

    def replica_ranks(self, tp_rank: int, tp: int) -> range:
        """The tp ranks holding the same replicated rows as ``tp_rank`` (itself alone without copies)."""
        replicas = self.tp_replicas(tp)
        first = tp_rank - tp_rank % replicas
        return range(first, first + replicas)

    def counts_in_grad_norm(self, tp_rank: int, pp_rank: int) -> bool:
        """Whether this rank counts its gradient in the global norm: a tp shard is counted by every
        tp rank (each holds a different piece), a whole tensor by tp rank 0 only (every tp rank holds
        the same gradient), a tied embedding by the first stage only (both copies hold the same
        gradient once summed)."""
        if self.tied_embedding and pp_rank != 0:
            return False
        return self.is_sharded or tp_rank == 0

    def counts_replicated_rows(self, tp_rank: int, tp: int) -> bool:
        """Whether this rank counts its copy of the replicated rows: the first rank of each replica set."""
        return self.replica_ranks(tp_rank, tp)[0] == tp_rank

    def replicated_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of a shard (or of its gradient) that other tp ranks hold copies of: a view."""
        return tensor.narrow(0, tensor.shape[0] - self.replicated_rows, self.replicated_rows)

    # ---- full tensor <-> shards ----

    def full_shape(self, local_shape, tp: int) -> list[int]:
        """The full (tp = 1) shape of a tp rank's shard."""
        shape = list(local_shape)
        if not self.is_sharded:
            return shape
        replicas = self.tp_replicas(tp)
        if replicas == 1:
            shape[self.partition_dim] *= tp
        else:  # one group per rank: a 1/replicas part of its split rows, then its replicated rows
            per_group = (shape[0] - self.replicated_rows) * replicas + self.replicated_rows
            shape[0] = self.partition_groups * per_group
        return shape

    def replicated_shard_rows(self, rows: int, tp: int) -> int:
        """Rows of a rank's shard of ``rows`` full rows when groups are replicated (tp > groups):
        its part of its group's split rows, then the group's replicated rows."""
        return self._grouped_sizes(rows, tp)[1] + self.replicated_rows

    def shard_tensor(self, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
        """This rank's shard of a full tensor: each of ``partition_chunks`` blocks split over tp, rejoined;
        with replicated groups, its part of its group's split rows followed by the group's replicated rows."""
        if not self.is_sharded or tp == 1:
            return full
        replicas = self.tp_replicas(tp)
        if replicas > 1:
            split, per_rank = self._grouped_sizes(full.shape[0], tp)
            group = full.chunk(self.partition_groups, dim=0)[tp_rank // replicas]
            part = group[(tp_rank % replicas) * per_rank : (tp_rank % replicas + 1) * per_rank]
            return torch.cat([part, group[split:]], dim=0)
        dim, chunks = self.partition_dim, self.partition_chunks
        blocks = full.chunk(chunks, dim=dim)
        if any(b.shape[dim] % tp for b in blocks) or full.shape[dim] % chunks:
            raise ValueError(
                f"dim {dim} of size {full.shape[dim]} does not split into {chunks} block(s) x {tp} "
                f"tensor-parallel ranks"
            )
        if self.partition_groups % tp and tp < self.partition_groups:
            raise ValueError(f"{self.partition_groups} row groups do not split over {tp} tensor-parallel ranks")
        return torch.cat([b.chunk(tp, dim=dim)[tp_rank] for b in blocks], dim=dim)

    def merge_shards(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard, tp rank order; the exact inverse of ``shard_tensor``.
        Replicated rows must be identical on every rank that holds them: a difference means the copies
        drifted apart (their gradients were not summed), and picking one would hide it."""
        if not self.is_sharded or len(shards) == 1:
            return shards[0]
        replicas = self.tp_replicas(len(shards))
        if replicas > 1:
            return torch.cat([self._merge_group(shards[g * replicas : (g + 1) * replicas], g)
                              for g in range(self.partition_groups)], dim=0)
        dim, chunks = self.partition_dim, self.partition_chunks
        per_rank = [s.chunk(chunks, dim=dim) for s in shards]
        blocks = [torch.cat([pieces[c] for pieces in per_rank], dim=dim) for c in range(chunks)]
        return torch.cat(blocks, dim=dim)

    def _merge_group(self, shards: list[torch.Tensor], group: int) -> torch.Tensor:
        split = shards[0].shape[0] - self.replicated_rows
        copies = [s[split:] for s in shards]
        if any(not torch.equal(c, copies[0]) for c in copies[1:]):
            raise ValueError(
                f"the replicated rows of group {group} differ between the tensor-parallel ranks that hold copies; "
                f"the shards were not saved from one consistent model"
            )
        return torch.cat([s[:split] for s in shards] + [copies[0]], dim=0)

    def _grouped_sizes(self, rows: int, tp: int) -> tuple[int, int]:
        """(rows of a group split over its ranks, rows per rank of that part) when groups are replicated."""
        groups, replicated, replicas = self.partition_groups, self.replicated_rows, self.tp_replicas(tp)
        if rows % groups or rows // groups < replicated or (rows // groups - replicated) % replicas:
            raise ValueError(
                f"dim 0 of size {rows} does not split into {groups} groups of {replicated} replicated rows "
                f"plus rows divisible by {replicas} tensor-parallel ranks"
            )
        split = rows // groups - replicated
        return split, split // replicas

    # ---- checkpoint manifests ----

    def manifest_fields(self) -> dict:
        """The split fields as a checkpoint manifest entry stores them (same JSON keys as ever)."""
        names = _MANIFEST_FIELDS + (_GROUPED_MANIFEST_FIELDS if self.is_grouped else ())
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_manifest(cls, entry: dict) -> ParamLayout:
        """The split of a checkpoint manifest entry; fields it lacks (written before grouped rows
        existed) take their defaults."""
        return cls(**{name: entry[name] for name in _MANIFEST_FIELDS + _GROUPED_MANIFEST_FIELDS if name in entry})


REPLICATED = ParamLayout()


def attach_layout(param: nn.Parameter, layout: ParamLayout) -> nn.Parameter:
    setattr(param, _ATTRIBUTE, layout)
    return param


def layout_of(param) -> ParamLayout:
    """The parameter's layout; a parameter no parallel layer claimed is replicated."""
    return getattr(param, _ATTRIBUTE, REPLICATED)


def mark_tied_embedding(param: nn.Parameter) -> nn.Parameter:
    return attach_layout(param, replace(layout_of(param), tied_embedding=True))
