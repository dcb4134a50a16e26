import pytest

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig
from megatron_lite.model.layout_check import check_layout, kv_replicas_for, validate_layout
from megatron_lite.parallel.dims import ParallelDims, coords_of, group_ranks, padded_vocab_size, rank_of, validate_grid
from megatron_lite.parallel.pipeline import chunk_layers, my_layer_ranges, split_layers, stage_layer_ranges


def model(**kw) -> ModelConfig:
    values = dict(flavor="llama", num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=4, vocab_size=1000)
    values.update(kw)
    return ModelConfig(**values)


def test_rank_order_is_tp_then_dp_then_pp():
    # tp=2, dp=2, pp=2 on 8 ranks
    assert rank_of(1, 0, 0, 2, 2) == 1 and rank_of(0, 1, 0, 2, 2) == 2 and rank_of(0, 0, 1, 2, 2) == 4
    assert all(rank_of(*coords_of(r, 2, 2), 2, 2) == r for r in range(8))
    groups = group_ranks(tp=2, dp=2, pp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["embedding"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_ranks(tp=1, dp=1, pp=4)["embedding"] == [[0, 3]]


def test_dims_properties():
    dims = ParallelDims(tp=2, pp=2, dp=2, rank=5)
    assert (dims.tp_rank, dims.dp_rank, dims.pp_rank) == (1, 0, 1)
    assert dims.world_size == 8 and dims.pp_ranks == [1, 5] and dims.tp_ranks == [4, 5] and dims.dp_ranks == [5, 7]
    assert dims.is_last_stage and not dims.is_first_stage
    assert stage_layer_ranges(8, dims) == [range(0, 4), range(4, 8)]
    single = ParallelDims.single()
    assert single.world_size == 1 and single.tp_group is None and single.is_first_stage and single.is_last_stage


def test_virtual_stages_are_interleaved():
    dims = ParallelDims(tp=1, pp=2, dp=1, virtual_pp=2, rank=1)
    assert stage_layer_ranges(8, dims) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert chunk_layers(8, dims, 0, 1) == range(4, 6)  # chunk 1 of stage 0 is virtual stage 2
    assert my_layer_ranges(8, dims) == [range(2, 4), range(6, 8)]
    uneven = ParallelDims(pp=2, stage_layers=[3, 5])
    assert stage_layer_ranges(8, uneven) == [range(0, 3), range(3, 8)]
    with pytest.raises(ValueError, match="no chunk 2 on stage 0"):
        chunk_layers(8, dims, 0, 2)


def test_initialize_without_distributed_is_single_process():
    dims = ParallelDims.initialize(ParallelConfig())
    assert (dims.tp, dims.pp, dims.dp, dims.rank) == (1, 1, 1, 0)
    assert dims.dp_group is None and dims.embedding_group is None
    assert my_layer_ranges(8, dims) == [range(0, 8)]


def test_vocab_padding():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 4) == 50688
    assert padded_vocab_size(512, 128, 4) == 512


@pytest.mark.parametrize(
    "parallel, model_kw, world, message",
    [
        (dict(tp=2, pp=2), {}, 6, r"world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2 = 4"),
        (dict(tp=3), dict(num_heads=6, hidden_size=60, num_kv_heads=6), 4, "world size 4 is not divisible"),
        (dict(tp=16), dict(num_heads=8, hidden_size=64), 16, "model.num_heads=8 is not divisible by parallel.tp=16"),
        (dict(tp=4), dict(num_heads=12, hidden_size=96, num_kv_heads=6), 4,
         "model.num_kv_heads=6 is not divisible by parallel.tp=4; .*divides num_kv_heads or a multiple of it"),
        (dict(tp=6), dict(num_heads=12, hidden_size=96, num_kv_heads=4), 6,
         "parallel.tp=6 is larger than model.num_kv_heads=4 but not a multiple of it"),
        (dict(tp=2), dict(ffn_hidden_size=101), 2, "model.ffn_hidden_size=101 is not divisible by parallel.tp=2"),
        (dict(pp=3), {}, 3, r"model.num_layers=8 does not split evenly over 3 pipeline chunks.*stage_layers"),
        (dict(pp=2, virtual_pp=3), {}, 2, "does not split evenly over 6 pipeline chunks"),
        (dict(virtual_pp=2), {}, 1, "virtual_pp > 1 needs parallel.pp > 1"),
        (dict(tp=2, sequence_parallel=True), dict(seq_length=15), 2, "model.seq_length=15 is not a multiple of it"),
        (dict(pp=2, stage_layers=[4, 2, 2]), {}, 2, "stage_layers has 3 entries but there are 2 pipeline chunks"),
        (dict(pp=2, stage_layers=[4, 3]), {}, 2, r"sums to 7 but model.num_layers=8.*no layer is dropped"),
        (dict(pp=2, stage_layers=[9, -1]), {}, 2, "negative layer count"),
    ],
)
def test_bad_layouts_say_what_to_change(parallel, model_kw, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(ParallelConfig(**parallel), model(**model_kw), world)


def test_good_layouts_give_dp():
    assert validate_layout(ParallelConfig(tp=2, pp=2), model(), 16) == 4
    assert validate_layout(ParallelConfig(pp=3, stage_layers=[2, 3, 3]), model(), 3) == 1


def test_split_layers_never_drops_layers():
    for counts in ([1, 2, 5], [0, 4, 4]):
        ranges = split_layers(8, 3, counts)
        assert [i for r in ranges for i in r] == list(range(8))


def test_nccl_without_gpus_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo"):
        ParallelDims.initialize(ParallelConfig(backend="nccl"))


def test_grid_checks_need_no_model():
    assert validate_grid(ParallelConfig(tp=2, pp=2), 16) == 4
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        validate_grid(ParallelConfig(tp=2, pp=2), 6)
    with pytest.raises(ConfigError, match="stage_layers has 3 entries but there are 2 pipeline chunks"):
        validate_grid(ParallelConfig(pp=2, stage_layers=[4, 2, 2]), 2)
    with pytest.raises(ValueError, match="kv_replicas=3 must be a positive divisor of parallel.tp=4"):
        ParallelDims.for_world(ParallelConfig(tp=4), 4, kv_replicas=3)


def test_model_checks_run_on_dims():
    dims = ParallelDims.for_world(ParallelConfig(tp=2, pp=2), 4)
    check_layout(model(), dims)
    with pytest.raises(ConfigError, match="model.ffn_hidden_size=101 is not divisible by parallel.tp=2"):
        check_layout(model(ffn_hidden_size=101), dims)
    with pytest.raises(ConfigError, match="model.num_layers=6 does not split evenly over 4 pipeline chunks"):
        check_layout(model(num_layers=6), ParallelDims.for_world(ParallelConfig(pp=2, virtual_pp=2), 2))


def test_kv_replica_groups_must_match_the_model():
    one_kv_head = model(num_kv_heads=1)
    assert kv_replicas_for(one_kv_head, 4) == 4 and kv_replicas_for(model(), 2) == 1
    check_layout(one_kv_head, ParallelDims.for_world(ParallelConfig(tp=4), 4, kv_replicas=4))
    with pytest.raises(ValueError, match="kv-replica groups have 1 ranks but .* needs 4"):
        check_layout(one_kv_head, ParallelDims.for_world(ParallelConfig(tp=4), 4))
