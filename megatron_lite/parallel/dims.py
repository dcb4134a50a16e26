"""The tensor x data x pipeline grid of ranks and its process groups.

Rank order follows Megatron: tp varies fastest, then dp, then pp,
``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``, so the chattiest group (tp)
sits on neighbouring ranks, which launchers place inside one node.
Everything that needs a group receives this object; nothing reads a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up so every tensor-parallel shard has the same, aligned width."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def coords_of(rank: int, tp: int, dp: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank."""
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def group_ranks(tp: int, dp: int, pp: int, kv_replicas: int = 1) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks; every rank must create them in this order.
    ``kv_replica`` groups are runs of ``kv_replicas`` consecutive ranks inside each tp group: the
    ranks holding copies of one kv head."""
    tp_groups = [[rank_of(t, d, p, tp, dp) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank_of(t, d, p, tp, dp) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank_of(t, d, p, tp, dp) for p in range(pp)] for d in range(dp) for t in range(tp)]
    embedding_groups = [sorted({g[0], g[-1]}) for g in pp_groups]
    kv_groups = [g[start : start + kv_replicas] for g in tp_groups for start in range(0, tp, kv_replicas)]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "embedding": embedding_groups, "kv_replica": kv_groups}


def kv_replicas_for(model: ModelConfig, tp: int) -> int:
    """Tensor-parallel ranks that share one kv head: tp / num_kv_heads when tp exceeds the kv heads."""
    return tp // model.num_kv_heads if tp > model.num_kv_heads else 1


def split_layers(num_layers: int, num_chunks: int, stage_layers: list[int] | None) -> list[range]:
    """Global layer indices of each virtual stage, in virtual-stage order."""
    if stage_layers is None:
        if num_layers % num_chunks != 0:
            raise ConfigError(
                f"model.num_layers={num_layers} does not split evenly over {num_chunks} pipeline chunks "
                f"(parallel.pp x parallel.virtual_pp); change num_layers or set parallel.stage_layers "
                f"to a list of {num_chunks} layer counts"
            )
        counts = [num_layers // num_chunks] * num_chunks
    else:
        counts = list(stage_layers)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def validate_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> int:
    """Check the grid against the world and the model; return dp. Errors say what to change."""
    tp, pp = parallel.tp, parallel.pp
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {tp} x {pp} = {tp * pp}; "
            f"launch a multiple of {tp * pp} processes or change tp/pp"
        )
    if model.num_heads % tp != 0:
        raise ConfigError(
            f"model.num_heads={model.num_heads} is not divisible by parallel.tp={tp}; "
            f"choose a tp that divides the head count"
        )
    _validate_kv_heads(model.num_kv_heads, tp)
    if model.ffn_hidden_size % tp != 0:
        raise ConfigError(
            f"model.ffn_hidden_size={model.ffn_hidden_size} is not divisible by parallel.tp={tp}; "
            f"choose an ffn size that is a multiple of tp"
        )
    if parallel.sequence_parallel and tp > 1 and model.seq_length % tp != 0:
        raise ConfigError(
            f"parallel.sequence_parallel splits the sequence over parallel.tp={tp}, but model.seq_length="
            f"{model.seq_length} is not a multiple of it; change seq_length or turn sequence_parallel off"
        )
    if parallel.virtual_pp > 1 and pp == 1:
        raise ConfigError("parallel.virtual_pp > 1 needs parallel.pp > 1; set virtual_pp=1 or raise pp")
    _validate_stage_layers(parallel, model)
    if model.vocab_size > 0:
        padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
        if padded % tp != 0 or padded < model.vocab_size:
            raise ConfigError(
                f"vocabulary {model.vocab_size} padded to {padded} does not split over parallel.tp={tp}; "
                f"set model.make_vocab_size_divisible_by to a positive integer"
            )
    return world_size // (tp * pp)


def _validate_kv_heads(kv_heads: int, tp: int) -> None:
    """Each rank holds whole kv heads (tp divides them) or one copy of a kv head shared by
    tp / num_kv_heads ranks (tp a multiple of them); anything between would cut a head."""
    if tp <= kv_heads and kv_heads % tp != 0:
        raise ConfigError(
            f"model.num_kv_heads={kv_heads} is not divisible by parallel.tp={tp}; each tensor-parallel rank "
            f"needs whole kv heads: choose a tp that divides num_kv_heads or a multiple of it "
            f"(then each kv head is copied to tp / num_kv_heads ranks)"
        )
    if tp > kv_heads and tp % kv_heads != 0:
        raise ConfigError(
            f"parallel.tp={tp} is larger than model.num_kv_heads={kv_heads} but not a multiple of it; each kv head "
            f"is copied to tp / num_kv_heads ranks, so choose a tp that is a multiple of num_kv_heads "
            f"(or a divisor of it), or change num_kv_heads"
        )


def _validate_stage_layers(parallel: ParallelConfig, model: ModelConfig) -> None:
    num_chunks = parallel.pp * parallel.virtual_pp
    if parallel.stage_layers is None:
        split_layers(model.num_layers, num_chunks, None)
        return
    counts = parallel.stage_layers
    if len(counts) != num_chunks:
        raise ConfigError(
            f"parallel.stage_layers has {len(counts)} entries but there are {num_chunks} pipeline chunks "
            f"(parallel.pp x parallel.virtual_pp); give one layer count per chunk"
        )
    if any(c < 0 for c in counts):
        raise ConfigError(f"parallel.stage_layers={counts} has a negative layer count; every entry must be >= 0")
    if sum(counts) != model.num_layers:
        raise ConfigError(
            f"parallel.stage_layers={counts} sums to {sum(counts)} but model.num_layers={model.num_layers}; "
            f"the counts must add up to the number of layers (no layer is dropped or repeated)"
        )


@dataclass
class ParallelDims:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    virtual_pp: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    stage_layers: list[int] | None = None
    num_layers: int | None = None
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    embedding_group: dist.ProcessGroup | None = None
    kv_replicas: int = 1  # tp ranks holding copies of one kv head (tp > num_kv_heads)
    kv_replica_group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return coords_of(self.rank, self.tp, self.dp)[0]

    @property
    def dp_rank(self) -> int:
        return coords_of(self.rank, self.tp, self.dp)[1]

    @property
    def pp_rank(self) -> int:
        return coords_of(self.rank, self.tp, self.dp)[2]

    @property
    def tp_ranks(self) -> list[int]:
        return [rank_of(t, self.dp_rank, self.pp_rank, self.tp, self.dp) for t in range(self.tp)]

    @property
    def dp_ranks(self) -> list[int]:
        return [rank_of(self.tp_rank, d, self.pp_rank, self.tp, self.dp) for d in range(self.dp)]

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of my pipeline group, in stage order."""
        return [rank_of(self.tp_rank, self.dp_rank, p, self.tp, self.dp) for p in range(self.pp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_layer_ranges(self, num_layers: int | None = None) -> list[range]:
        """Global layer indices of every virtual stage; virtual stage c * pp + s is chunk c of stage s."""
        num_layers = self._num_layers(num_layers)
        return split_layers(num_layers, self.pp * self.virtual_pp, self.stage_layers)

    def layers_for(self, pp_rank: int, chunk: int = 0, num_layers: int | None = None) -> range:
        """The layers model chunk ``chunk`` of pipeline stage ``pp_rank`` holds (interleaved order)."""
        if not (0 <= pp_rank < self.pp and 0 <= chunk < self.virtual_pp):
            raise ValueError(f"no chunk {chunk} on stage {pp_rank} with pp={self.pp}, virtual_pp={self.virtual_pp}")
        return self.stage_layer_ranges(num_layers)[chunk * self.pp + pp_rank]

    def my_layer_ranges(self, num_layers: int | None = None) -> list[range]:
        """The layers of each of this rank's model chunks, chunk 0 first."""
        return [self.layers_for(self.pp_rank, c, num_layers) for c in range(self.virtual_pp)]

    def _num_layers(self, num_layers: int | None) -> int:
        if num_layers is None:
            num_layers = self.num_layers
        if num_layers is None:
            raise ValueError("pass num_layers: these dims were built without a model config")
        return num_layers

    @classmethod
    def single(cls, model: ModelConfig | None = None) -> ParallelDims:
        """One process, no torch.distributed: every size is 1 and every group is None."""
        return cls(num_layers=model.num_layers if model is not None else None)

    @classmethod
    def initialize(cls, parallel: ParallelConfig, model: ModelConfig) -> ParallelDims:
        """Join (or start, from torchrun's env) the process group, validate the grid, build the groups."""
        _init_distributed_from_env(parallel)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        dp = validate_layout(parallel, model, world_size)
        dims = cls(
            tp=parallel.tp,
            pp=parallel.pp,
            dp=dp,
            virtual_pp=parallel.virtual_pp,
            rank=rank,
            sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
            stage_layers=list(parallel.stage_layers) if parallel.stage_layers is not None else None,
            num_layers=model.num_layers,
            kv_replicas=kv_replicas_for(model, parallel.tp),
            device=_pick_device(parallel),
        )
        if world_size > 1:
            dims._build_groups(timedelta(seconds=parallel.timeout_s))
        return dims

    def _build_groups(self, timeout: timedelta) -> None:
        sizes = {"tp": self.tp, "dp": self.dp, "pp": self.pp, "embedding": min(self.pp, 2),
                 "kv_replica": self.kv_replicas}
        for kind, groups in group_ranks(self.tp, self.dp, self.pp, self.kv_replicas).items():
            if sizes[kind] == 1:
                continue
            for ranks in groups:
                # new_group is collective: every rank creates every group, in the same order.
                group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    setattr(self, f"{kind}_group", group)


def _resolve_backend(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _pick_device(parallel: ParallelConfig) -> torch.device:
    if _resolve_backend(parallel) == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _init_distributed_from_env(parallel: ParallelConfig) -> None:
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = _resolve_backend(parallel)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo on CPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=parallel.timeout_s))
