"""ParamLayout: what it refuses, the questions it answers, its manifest form; no launches."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from megatron_lite.parallel.data_parallel import GradShard
from megatron_lite.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_lite.parallel.layout import REPLICATED, ParamLayout, attach_layout, layout_of, mark_tied_embedding

QKV = ParamLayout(partition_dim=0, partition_groups=2, replicated_rows=4)  # two kv groups, k and v 2 rows each


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(partition_dim=1, partition_groups=2), "grouped rows .* need partition_dim=0 and one chunk"),
        (dict(partition_dim=0, partition_chunks=2, replicated_rows=1), "need partition_dim=0 and one chunk"),
        (dict(partition_dim=0, partition_chunks=0), r"partition_chunks \(0\) and partition_groups \(1\) must be >= 1"),
        (dict(replicated_rows=-1, partition_dim=0), r"replicated_rows \(-1\) >= 0"),
        (dict(partition_dim=0, sequence_parallel=True), "a parameter split along partition_dim=0 holds different"),
    ],
)
def test_invalid_layouts_say_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        ParamLayout(**fields)


def test_layout_is_frozen_and_picklable():
    with pytest.raises(AttributeError):
        QKV.partition_dim = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(QKV)) == QKV


def test_attach_and_read_back():
    plain = nn.Parameter(torch.zeros(2))
    assert layout_of(plain) is REPLICATED  # unclaimed: whole on every rank
    sharded = attach_layout(nn.Parameter(torch.zeros(2, 2)), ParamLayout(partition_dim=1))
    assert layout_of(sharded) == ParamLayout(partition_dim=1)
    assert mark_tied_embedding(sharded) is sharded
    assert layout_of(sharded) == ParamLayout(partition_dim=1, tied_embedding=True)
    assert sharded.layout == torch.strided  # the tensor's own ``layout`` is untouched


def test_parallel_layers_attach_their_layouts():
    column = ColumnParallelLinear(4, 6, bias=True, group=None, partition_chunks=2)
    assert layout_of(column.weight) == layout_of(column.bias) == ParamLayout(partition_dim=0, partition_chunks=2)
    row = RowParallelLinear(4, 6, bias=True, group=None, sequence_parallel=True)
    assert layout_of(row.weight) == ParamLayout(partition_dim=1)
    assert layout_of(row.bias) == ParamLayout(sequence_parallel=True)  # added after the reduce-scatter
    assert layout_of(VocabParallelEmbedding(8, 4, group=None).weight) == ParamLayout(partition_dim=0)


def test_tp_replicas_and_the_ranks_holding_copies():
    assert [QKV.tp_replicas(tp) for tp in (1, 2, 4, 8)] == [1, 1, 2, 4]
    assert ParamLayout(partition_dim=0).tp_replicas(8) == 1  # nothing replicated
    assert list(QKV.replica_ranks(5, 8)) == [4, 5, 6, 7]
    assert list(QKV.replica_ranks(1, 2)) == [1]
    assert [r for r in range(8) if QKV.counts_replicated_rows(r, 8)] == [0, 4]
    with pytest.raises(ValueError, match="tensor-parallel size 3 is larger than the 2 row groups but not a multiple"):
        QKV.tp_replicas(3)


def test_who_counts_a_gradient_in_the_norm():
    sharded, whole = ParamLayout(partition_dim=0), ParamLayout(sequence_parallel=True)
    tied = ParamLayout(partition_dim=0, tied_embedding=True)
    grid = [(tp_rank, pp_rank) for pp_rank in (0, 1) for tp_rank in (0, 1)]
    assert [sharded.counts_in_grad_norm(*c) for c in grid] == [True, True, True, True]
    assert [whole.counts_in_grad_norm(*c) for c in grid] == [True, False, True, False]
    assert [tied.counts_in_grad_norm(*c) for c in grid] == [True, True, False, False]


def test_a_grad_shard_reads_like_its_parameter():
    assert layout_of(GradShard(torch.zeros(3), QKV)) is QKV
    assert layout_of(GradShard(torch.zeros(3))) is REPLICATED


def test_replicated_part_is_the_tail_rows_as_a_view():
    grad = torch.arange(12.0).view(6, 2)
    part = QKV.replicated_part(grad)
    assert torch.equal(part, grad[2:]) and part.data_ptr() == grad[2:].data_ptr()


def test_manifest_fields_keep_the_on_disk_keys():
    assert ParamLayout(partition_dim=0, partition_chunks=2).manifest_fields() == {
        "partition_dim": 0, "partition_chunks": 2}
    assert ParamLayout(sequence_parallel=True).manifest_fields() == {"partition_dim": None, "partition_chunks": 1}
    assert QKV.manifest_fields() == {"partition_dim": 0, "partition_chunks": 1, "partition_groups": 2,
                                     "replicated_rows": 4}
    assert ParamLayout.from_manifest({**QKV.manifest_fields(), "shape": [12, 3], "dtype": "float32"}) == QKV
    # An entry written before grouped rows existed reads with their defaults.
    assert ParamLayout.from_manifest({"partition_dim": 1, "partition_chunks": 1, "shape": [2, 2]}) == ParamLayout(
        partition_dim=1)


def test_full_shape_inverts_the_shard_shape():
    full = torch.randn(2 * (4 + 4), 3)  # per group: 4 query rows, then 4 replicated k/v rows
    for tp in (1, 2, 4):
        shard = QKV.shard_tensor(full, 0, tp)
        assert QKV.full_shape(shard.shape, tp) == [16, 3]
    assert QKV.replicated_shard_rows(16, 4) == 2 + 4
