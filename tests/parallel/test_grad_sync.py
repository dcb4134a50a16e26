"""The flat all-reduce helper and the post-backward gradient sequence, on gloo ranks and without."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel.collectives import all_reduce_flat, sum_over_replicas
from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.grad_sync import GradSync, sum_replicated_rows, sum_sequence_parallel
from megatron_lite.parallel.layout import ParamLayout, attach_layout
from tests.distributed import run_distributed


def test_flat_all_reduce_without_a_group_is_the_identity():
    tensors, stats = [torch.ones(2, 3), torch.arange(4.0)], CommStats()
    all_reduce_flat(tensors, None, stats)
    assert torch.equal(tensors[0], torch.ones(2, 3)) and torch.equal(tensors[1], torch.arange(4.0))
    assert stats.calls == {}


def _param(values, layout: ParamLayout) -> nn.Parameter:
    param = attach_layout(nn.Parameter(torch.zeros_like(values)), layout)
    param.grad = values.clone()
    return param


class _Chunk(nn.Module):
    """Three parameters: tp-sharded, sequence-parallel (gradient partial per rank), tied embedding copy."""

    def __init__(self, rank: int):
        super().__init__()
        self.sharded = _param(torch.full((2, 2), float(rank + 1)), ParamLayout(partition_dim=0))
        self.norm = _param(torch.full((3,), float(rank + 1)), ParamLayout(sequence_parallel=True))
        self.embedding = _param(torch.full((2,), 10.0 * (rank + 1)), ParamLayout(tied_embedding=True))


def _grad_sync_body(rank: int, world_size: int) -> str:
    group = dist.new_group([0, 1])
    # Several tensors, one a strided view: every one gets the sum over the group, one call recorded.
    matrix = torch.full((3, 4), float(rank + 1))
    tensors, stats = [matrix[:, 1], torch.full((5,), 10.0 * (rank + 1))], CommStats()
    all_reduce_flat(tensors, group, stats, "embedding")
    assert torch.equal(matrix[:, 1], torch.full((3,), 3.0)) and torch.equal(matrix[:, 0], torch.full((3,), rank + 1.0))
    assert torch.equal(tensors[1], torch.full((5,), 30.0))
    assert stats.calls == {"embedding.all_reduce": 1} and stats.payload_bytes["embedding"] == 8 * 4

    # Only the replicated rows of a grouped parameter are summed over its replica group.
    qkv = _param(torch.full((3, 2), float(rank + 1)), ParamLayout(partition_dim=0, replicated_rows=2))
    sum_replicated_rows([qkv], 2, group)
    assert torch.equal(qkv.grad, torch.tensor([[rank + 1.0] * 2, [3.0] * 2, [3.0] * 2]))
    sequence = _param(torch.full((2,), float(rank + 1)), ParamLayout(sequence_parallel=True))
    sum_sequence_parallel([sequence, qkv], group)
    assert torch.equal(sequence.grad, torch.full((2,), 3.0))

    # The whole sequence over one chunk: sequence-parallel and tied copies summed, sharded ones left alone.
    chunk = _Chunk(rank)
    dims = SimpleNamespace(dp_group=None, dp_cp_group=None, tp=2, tp_group=group, sequence_parallel=True,
                           embedding_group=group, kv_replica_group=None)
    sync = GradSync([chunk], dims, optimizer=None)
    assert sync.pipeline_hook() is not None and sync.norm_dp_group is None
    sync.finish()
    assert torch.equal(chunk.sharded.grad, torch.full((2, 2), float(rank + 1)))
    assert torch.equal(chunk.norm.grad, torch.full((3,), 3.0))
    assert torch.equal(chunk.embedding.grad, torch.full((2,), 30.0))
    assert len(sync.grads_for_optimizer()) == 3

    # A loss held by the last stage reaches every rank (two stages, no dp).
    stages = SimpleNamespace(is_last_stage=rank == 1, pp_group=group, dp_group=None)
    assert sum_over_replicas(torch.tensor([2.5, 1.0]), stages).tolist() == [2.5, 1.0]
    return "ok"


def test_grad_sync_on_two_ranks():
    assert run_distributed(_grad_sync_body, 2) == ["ok", "ok"]


def test_replicas_over_different_rank_counts_are_refused():
    params = [_param(torch.ones(6, 2), ParamLayout(partition_dim=0, replicated_rows=2)),
              _param(torch.ones(6, 2), ParamLayout(partition_dim=0, partition_groups=2, replicated_rows=1))]
    with pytest.raises(ValueError, match=r"replicated over different numbers of ranks \[2, 4\]"):
        sum_replicated_rows(params, 4, None)
