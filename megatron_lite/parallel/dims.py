"""The tensor x context x data x pipeline grid of ranks and its process groups.

Rank order follows Megatron: tp varies fastest, then cp, then dp, then pp,
``rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))``, so the chattiest groups
(tp, then cp with its K/V all-gathers in every layer) sit on neighbouring ranks, which
launchers place inside one node. Every parameter's gradient is reduced over the joint dp x cp
group (``dp_cp``): the cp ranks of a replica see different tokens of the same samples.
Everything that needs a group receives this object; nothing reads a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError, ParallelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up so every tensor-parallel shard has the same, aligned width."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int, cp_rank: int = 0, cp: int = 1) -> int:
    return tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))


def coords_of(rank: int, tp: int, dp: int, cp: int = 1) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of a global rank; ``cp_rank_of`` gives the fourth coordinate."""
    return rank % tp, (rank // (tp * cp)) % dp, rank // (tp * cp * dp)


def cp_rank_of(rank: int, tp: int, cp: int) -> int:
    return (rank // tp) % cp


def group_ranks(tp: int, dp: int, pp: int, kv_replicas: int = 1, cp: int = 1) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks; every rank must create them in this order.
    ``kv_replica`` groups are runs of ``kv_replicas`` consecutive ranks inside each tp group: the
    ranks holding copies of one kv head. ``dp_cp`` joins the dp and cp groups of a tp rank and stage."""
    def rank(t, d, p, c):
        return rank_of(t, d, p, tp, dp, c, cp)

    tp_groups = [[rank(t, d, p, c) for t in range(tp)] for p in range(pp) for d in range(dp) for c in range(cp)]
    cp_groups = [[rank(t, d, p, c) for c in range(cp)] for p in range(pp) for d in range(dp) for t in range(tp)]
    dp_groups = [[rank(t, d, p, c) for d in range(dp)] for p in range(pp) for c in range(cp) for t in range(tp)]
    dp_cp_groups = [sorted(rank(t, d, p, c) for d in range(dp) for c in range(cp))
                    for p in range(pp) for t in range(tp)]
    pp_groups = [[rank(t, d, p, c) for p in range(pp)] for d in range(dp) for c in range(cp) for t in range(tp)]
    embedding_groups = [sorted({g[0], g[-1]}) for g in pp_groups]
    kv_groups = [g[start : start + kv_replicas] for g in tp_groups for start in range(0, tp, kv_replicas)]
    return {"tp": tp_groups, "cp": cp_groups, "dp": dp_groups, "dp_cp": dp_cp_groups, "pp": pp_groups,
            "embedding": embedding_groups, "kv_replica": kv_groups}


def validate_grid(parallel: ParallelConfig, world_size: int, kv_replicas: int = 1) -> int:
    """Check the grid against the world size; return dp. Errors say what to change."""
    degrees = {"tp": parallel.tp, "cp": parallel.cp, "pp": parallel.pp}
    if parallel.cp == 1:
        del degrees["cp"]  # the message names only the degrees in use
    model_parallel = parallel.tp * parallel.cp * parallel.pp
    if world_size % model_parallel != 0:
        names = " x ".join(f"parallel.{name}" for name in degrees)
        values = " x ".join(str(value) for value in degrees.values())
        raise ConfigError(
            f"world size {world_size} is not divisible by {names} = {values} = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes or change {'/'.join(degrees)}"
        )
    tp, pp = parallel.tp, parallel.pp
    if parallel.virtual_pp > 1 and pp == 1:
        raise ConfigError("parallel.virtual_pp > 1 needs parallel.pp > 1; set virtual_pp=1 or raise pp")
    if kv_replicas < 1 or tp % kv_replicas != 0:
        raise ValueError(f"kv_replicas={kv_replicas} must be a positive divisor of parallel.tp={tp}")
    _validate_stage_layers(parallel)
    return world_size // model_parallel


def _validate_stage_layers(parallel: ParallelConfig) -> None:
    """One non-negative layer count per pipeline chunk; whether they add up to the model's layers
    is for the model to check."""
    if parallel.stage_layers is None:
        return
    num_chunks = parallel.pp * parallel.virtual_pp
    counts = parallel.stage_layers
    if len(counts) != num_chunks:
        raise ConfigError(
            f"parallel.stage_layers has {len(counts)} entries but there are {num_chunks} pipeline chunks "
            f"(parallel.pp x parallel.virtual_pp); give one layer count per chunk"
        )
    if any(c < 0 for c in counts):
        raise ConfigError(f"parallel.stage_layers={counts} has a negative layer count; every entry must be >= 0")


@dataclass
class ParallelDims:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    virtual_pp: int = 1
    rank: int = 0
    sequence_parallel: bool = False
    stage_layers: list[int] | None = None
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None  # where every gradient is reduced: dp x cp
    embedding_group: dist.ProcessGroup | None = None
    kv_replicas: int = 1  # tp ranks holding copies of one kv head (tp > num_kv_heads)
    kv_replica_group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def tp_rank(self) -> int:
        return coords_of(self.rank, self.tp, self.dp, self.cp)[0]

    @property
    def cp_rank(self) -> int:
        return cp_rank_of(self.rank, self.tp, self.cp)

    @property
    def dp_rank(self) -> int:
        return coords_of(self.rank, self.tp, self.dp, self.cp)[1]

    @property
    def pp_rank(self) -> int:
        return coords_of(self.rank, self.tp, self.dp, self.cp)[2]

    def _rank(self, tp_rank: int, cp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return rank_of(tp_rank, dp_rank, pp_rank, self.tp, self.dp, cp_rank, self.cp)

    @property
    def tp_ranks(self) -> list[int]:
        return [self._rank(t, self.cp_rank, self.dp_rank, self.pp_rank) for t in range(self.tp)]

    @property
    def cp_ranks(self) -> list[int]:
        return [self._rank(self.tp_rank, c, self.dp_rank, self.pp_rank) for c in range(self.cp)]

    @property
    def dp_ranks(self) -> list[int]:
        return [self._rank(self.tp_rank, self.cp_rank, d, self.pp_rank) for d in range(self.dp)]

    @property
    def dp_cp_ranks(self) -> list[int]:
        """The ranks over which every gradient is reduced, in rank order."""
        return sorted(self._rank(self.tp_rank, c, d, self.pp_rank) for d in range(self.dp) for c in range(self.cp))

    @property
    def pp_ranks(self) -> list[int]:
        """Global ranks of my pipeline group, in stage order."""
        return [self._rank(self.tp_rank, self.cp_rank, self.dp_rank, p) for p in range(self.pp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @classmethod
    def single(cls) -> ParallelDims:
        """One process, no torch.distributed: every size is 1 and every group is None."""
        return cls()

    @classmethod
    def initialize(cls, parallel: ParallelConfig, kv_replicas: int = 1) -> ParallelDims:
        """Join (or start, from torchrun's env) the process group, validate the grid, build the groups.
        ``kv_replicas``: the size of the ``kv_replica`` groups, runs of consecutive tp ranks that
        hold copies of one kv head (how many is for the model to say)."""
        _init_distributed_from_env(parallel)
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        dims = cls.for_world(parallel, world_size, rank, kv_replicas)
        if world_size > 1:
            dims._build_groups(timedelta(seconds=parallel.timeout_s))
        return dims

    @classmethod
    def for_world(cls, parallel: ParallelConfig, world_size: int, rank: int = 0, kv_replicas: int = 1) -> ParallelDims:
        """The validated grid of ``world_size`` ranks as seen by ``rank``, without process groups."""
        dp = validate_grid(parallel, world_size, kv_replicas)
        return cls(
            tp=parallel.tp,
            pp=parallel.pp,
            dp=dp,
            cp=parallel.cp,
            virtual_pp=parallel.virtual_pp,
            rank=rank,
            sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
            stage_layers=list(parallel.stage_layers) if parallel.stage_layers is not None else None,
            kv_replicas=kv_replicas,
            device=_pick_device(parallel),
        )

    def _build_groups(self, timeout: timedelta) -> None:
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp, "pp": self.pp, "embedding": min(self.pp, 2),
                 "kv_replica": self.kv_replicas,
                 # with one of dp, cp at 1 the joint group is the other one: no second copy of it
                 "dp_cp": self.dp * self.cp if self.dp > 1 and self.cp > 1 else 1}
        for kind, groups in group_ranks(self.tp, self.dp, self.pp, self.kv_replicas, self.cp).items():
            if sizes[kind] == 1:
                continue
            for ranks in groups:
                # new_group is collective: every rank creates every group, in the same order.
                group = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    setattr(self, f"{kind}_group", group)
        if sizes["dp_cp"] == 1:
            self.dp_cp_group = self.dp_group if self.cp == 1 else self.cp_group


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
