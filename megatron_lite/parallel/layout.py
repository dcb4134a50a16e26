"""A parameter's sharding layout: one frozen ``ParamLayout`` attached once to each parameter.

Every question the gradient path, the grad norm, the optimizer and the checkpoint code ask
about a parameter is answered from this object, never from loose attributes:

- how the full (tp = 1) tensor is split over tensor-parallel ranks (``partition_dim``,
  ``partition_chunks``, ``partition_groups``, ``replicated_rows``);
- whether each tp rank's gradient covers only its own tokens (``sequence_parallel``: norms and
  the value head on a sequence shard), so the gradients are summed over tp;
- whether the parameter is one of the two copies of a tied word embedding (first and last
  pipeline stage), whose gradients are summed and which is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

_ATTRIBUTE = "param_layout"


@dataclass(frozen=True)
class ParamLayout:
    partition_dim: int | None = None  # None: every tp rank holds the whole tensor
    partition_chunks: int = 1  # equal blocks along partition_dim, each split over tp on its own
    partition_groups: int = 1  # row groups (grouped-query attention's kv groups)
    replicated_rows: int = 0  # rows at the end of each group that stay whole (copies when tp > groups)
    sequence_parallel: bool = False  # gradient partial per tp rank: summed over tp
    tied_embedding: bool = False  # one of two copies of the word embedding (pp > 1)

    def __post_init__(self) -> None:
        grouped = self.partition_groups > 1 or self.replicated_rows > 0
        if grouped and (self.partition_dim != 0 or self.partition_chunks != 1):
            # The replicated rows must be a contiguous tail of the flat gradient (ZeRO slices it flat).
            raise ValueError("grouped rows (partition_groups / replicated_rows) need partition_dim=0 and one chunk")

    @property
    def is_sharded(self) -> bool:
        return self.partition_dim is not None

    def shard_fields(self) -> dict:
        """The four split fields, as keyword arguments of ``shard_tensor`` / ``merge_shards`` / ``full_shape``."""
        return {
            "partition_dim": self.partition_dim,
            "partition_chunks": self.partition_chunks,
            "partition_groups": self.partition_groups,
            "replicated_rows": self.replicated_rows,
        }


REPLICATED = ParamLayout()


def attach_layout(param: nn.Parameter, layout: ParamLayout) -> nn.Parameter:
    setattr(param, _ATTRIBUTE, layout)
    return param


def layout_of(param) -> ParamLayout:
    """The parameter's layout; a parameter no parallel layer claimed is replicated."""
    return getattr(param, _ATTRIBUTE, REPLICATED)


def mark_tied_embedding(param: nn.Parameter) -> nn.Parameter:
    return attach_layout(param, replace(layout_of(param), tied_embedding=True))
