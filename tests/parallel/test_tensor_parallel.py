"""Tensor-parallel pieces against their unsharded references, on gloo ranks.

Each launch runs many checks: starting ranks costs more than the checks themselves.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_lite import kernels
from megatron_lite.config import ModelConfig, ParallelConfig
from megatron_lite.model.generation import generate
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel import mappings
from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    fill_from_full_,
)
from megatron_lite.parallel.layout import ParamLayout, layout_of
from megatron_lite.parallel.pipeline import my_layer_ranges
from megatron_lite.parallel.random import REPLICATED_STREAM, RNGStatesTracker, model_parallel_rng_tracker
from tests.distributed import run_distributed

close = dict(rtol=1e-5, atol=1e-6)


def gather_shards(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def check_mappings(rank: int, group) -> None:
    torch.manual_seed(0)  # every rank draws the same full tensors
    full = torch.randn(2, 4, 6)
    per_rank_weight = [torch.randn(2, 4, 6) for _ in range(2)]
    mine = per_rank_weight[rank]

    x = full.clone().requires_grad_()
    (mappings.copy_to_region(x, group) * mine).sum().backward()
    torch.testing.assert_close(x.grad, per_rank_weight[0] + per_rank_weight[1])

    x = (full * (rank + 1)).requires_grad_()
    y = mappings.reduce_from_region(x, group)
    torch.testing.assert_close(y, full * 3)
    (y * mine).sum().backward()
    torch.testing.assert_close(x.grad, mine)

    for dim, scatter, gather in [
        (-1, mappings.scatter_to_region, mappings.gather_from_region),
        (1, mappings.scatter_to_sequence_region, mappings.gather_replicated_from_sequence_region),
    ]:
        x = full.clone().requires_grad_()
        y = scatter(x, group)
        torch.testing.assert_close(y, full.chunk(2, dim)[rank])
        (y * per_rank_weight[0].chunk(2, dim)[rank]).sum().backward()
        torch.testing.assert_close(x.grad, per_rank_weight[0])  # both ranks' upstream, gathered
        if gather is not None:
            x = full.chunk(2, dim)[rank].clone().requires_grad_()
            y = gather(x, group)
            torch.testing.assert_close(y, full)
            (y * per_rank_weight[0]).sum().backward()
            torch.testing.assert_close(x.grad, per_rank_weight[0].chunk(2, dim)[rank])

    # Sequence pair: gathering before a sharded matmul sums the partial gradients back per shard.
    x = full.chunk(2, 1)[rank].clone().requires_grad_()
    y = mappings.gather_from_sequence_region(x, group)
    torch.testing.assert_close(y, full)
    (y * mine).sum().backward()
    torch.testing.assert_close(x.grad, (per_rank_weight[0] + per_rank_weight[1]).chunk(2, 1)[rank])

    x = (full * (rank + 1)).requires_grad_()
    y = mappings.reduce_scatter_to_sequence_region(x, group)
    torch.testing.assert_close(y, (full * 3).chunk(2, 1)[rank])
    (y * per_rank_weight[0].chunk(2, 1)[rank]).sum().backward()
    torch.testing.assert_close(x.grad, per_rank_weight[0])


def check_layers(rank: int, group, sequence_parallel: bool) -> None:
    torch.manual_seed(1)
    reference_up, reference_down = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)
    reference_embedding = torch.nn.Embedding(10, 8)
    ids = torch.randint(0, 10, (2, 4))
    column = ColumnParallelLinear(8, 12, bias=True, group=group, sequence_parallel=sequence_parallel)
    row = RowParallelLinear(12, 8, bias=True, group=group, sequence_parallel=sequence_parallel)
    embedding = VocabParallelEmbedding(10, 8, group=group)
    for layer, reference in [(column, reference_up), (row, reference_down), (embedding, reference_embedding)]:
        for name, param in layer.named_parameters():
            fill_from_full_(param, getattr(reference, name).detach(), group)

    x = reference_embedding(ids)  # (B, T, H)
    expected = reference_down(F.gelu(reference_up(x)))
    expected.square().sum().backward()

    h = embedding(ids)
    torch.testing.assert_close(h, x, **close)
    if sequence_parallel:
        h = mappings.scatter_to_sequence_region(h, group)  # (B, T/2, H)
    out = row(F.gelu(column(h)))
    target = expected.chunk(2, 1)[rank] if sequence_parallel else expected
    torch.testing.assert_close(out, target, **close)
    out.square().sum().backward()

    assert layout_of(row.bias).sequence_parallel is sequence_parallel
    if sequence_parallel:
        dist.all_reduce(row.bias.grad, group=group)
    for layer, reference in [(column, reference_up), (row, reference_down), (embedding, reference_embedding)]:
        for name, param in layer.named_parameters():
            merged = layout_of(param).merge_shards(gather_shards(param.grad, group))
            torch.testing.assert_close(merged, getattr(reference, name).grad, **close)


def check_cross_entropy(rank: int, group) -> None:
    torch.manual_seed(2)
    vocab, padded = 13, 16
    logits = torch.randn(3, 5, padded) * 3
    labels = torch.randint(0, vocab, (3, 5))
    labels[0, 1] = -100
    full = logits.clone().requires_grad_()
    expected = F.cross_entropy(full[..., :vocab].reshape(-1, vocab), labels.reshape(-1), reduction="none").view(3, 5)
    upstream = torch.rand(3, 5)
    (expected * upstream).sum().backward()

    # The torch loss and the fused Triton one (the interpreter here), each on this rank's shard.
    for loss_fn in (vocab_parallel_cross_entropy, kernels.vocab_parallel_cross_entropy):
        shard = logits.chunk(2, -1)[rank].clone().requires_grad_()
        loss = loss_fn(shard, labels, vocab, group)
        assert loss.shape == (3, 5) and loss.dtype == torch.float32
        torch.testing.assert_close(loss, expected, **close)
        (loss * upstream).sum().backward()
        torch.testing.assert_close(shard.grad, full.grad.chunk(2, -1)[rank], **close)
        if rank == 1:
            assert torch.all(shard.grad[..., vocab - 8 :] == 0), "padding columns get no gradient"


def check_rng(rank: int, group) -> None:
    tracker = model_parallel_rng_tracker(5, rank, 0)
    with tracker.fork(REPLICATED_STREAM):
        replicated = torch.rand(8)
    with tracker.fork():
        sharded = torch.rand(8)
    others_replicated, others_sharded = gather_shards(replicated, group), gather_shards(sharded, group)
    assert torch.equal(others_replicated[0], others_replicated[1])
    assert not torch.equal(others_sharded[0], others_sharded[1])
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(4)
    restored = RNGStatesTracker()
    restored.set_states(saved)
    with restored.fork():
        torch.testing.assert_close(torch.rand(4), first)


def tiny_config(flavor: str) -> ModelConfig:
    return ModelConfig(
        flavor=flavor, num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2 if flavor == "llama" else None,
        ffn_hidden_size=48 if flavor == "llama" else None, seq_length=8, vocab_size=37,
        make_vocab_size_divisible_by=8,
    )


def merged_tensors(model: GPT, dims: ParallelDims, grads: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        t = param.grad.clone() if grads else param.detach()
        if grads and layout_of(param).sequence_parallel:
            dist.all_reduce(t, group=dims.tp_group)  # what the gradient path does for these
        out[name] = layout_of(param).merge_shards(gather_shards(t, dims.tp_group))
    return out


def check_gpt(flavor: str, sequence_parallel: bool, triton_ops: bool = False) -> None:
    cfg = tiny_config(flavor)
    dims = ParallelDims.initialize(ParallelConfig(tp=2, sequence_parallel=sequence_parallel))
    assert dims.tp == 2 and dims.dp == 1 and dims.sequence_parallel is sequence_parallel
    reference = GPT(cfg, seed=9)
    backend = "triton" if triton_ops else "torch"
    sharded = GPT(dataclasses.replace(cfg, loss_backend=backend, elementwise_backend=backend), dims, seed=9)
    assert sharded.padded_vocab_size == 48 and reference.padded_vocab_size == 40
    torch.manual_seed(3)
    ids = torch.randint(0, 37, (2, 8))
    labels = torch.randint(0, 37, (2, 8))

    expected = reference(ids, labels=labels)
    loss = sharded(ids, labels=labels)
    torch.testing.assert_close(loss, expected, **close)
    weights = torch.rand(2, 8)
    (expected * weights).sum().backward()
    (loss * weights).sum().backward()

    params, grads = merged_tensors(sharded, dims, False), merged_tensors(sharded, dims, True)
    reference_params = dict(reference.named_parameters())
    assert params.keys() == reference_params.keys()
    for name, param in reference_params.items():
        rows = 37 if name in ("embedding.word.weight", "output.weight") else None  # padding differs: 40 vs 48
        torch.testing.assert_close(params[name][:rows], param.detach()[:rows], rtol=0, atol=0)
        torch.testing.assert_close(grads[name][:rows], param.grad[:rows], **close)
    if not sequence_parallel:
        out = generate(sharded, [[1, 2, 3], [4]], 3, temperature=0)
        assert out == generate(reference, [[1, 2, 3], [4]], 3, temperature=0)


def tp2_checks(rank: int, world_size: int) -> str:
    group = dist.new_group([0, 1])
    check_mappings(rank, group)
    for sequence_parallel in (False, True):
        check_layers(rank, group, sequence_parallel)
    check_cross_entropy(rank, group)
    check_rng(rank, group)
    with pytest.raises(ValueError, match="in_features=7 is not divisible by the tensor-parallel size 2"):
        RowParallelLinear(7, 4, bias=True, group=group)
    with pytest.raises(ValueError, match="num_embeddings=9 is not divisible by the tensor-parallel size 2"):
        VocabParallelEmbedding(9, 4, group=group)
    for flavor in ("gpt2", "llama"):
        for sequence_parallel in (False, True):
            # Llama's sharded model takes the fused Triton loss, SwiGLU and RoPE (interpreted here)
            # against a torch reference.
            check_gpt(flavor, sequence_parallel, triton_ops=flavor == "llama")
    return "ok"


def test_tensor_parallel_matches_single_process():
    assert run_distributed(tp2_checks, 2) == ["ok", "ok"]


def pipeline_step(model: GPT, dims: ParallelDims, ids, labels, weights, hidden_shape):
    """One forward/backward over two stages by hand: hidden states forward, their gradient back."""
    peer = dims.pp_ranks[1 - dims.pp_rank]
    if dims.is_first_stage:
        hidden = model(ids)
        dist.send(hidden.detach().contiguous(), peer)
        grad = torch.empty_like(hidden)
        dist.recv(grad, peer)
        hidden.backward(grad)
        return None
    hidden = torch.empty(hidden_shape)
    dist.recv(hidden, peer)
    hidden.requires_grad_()
    loss = model(hidden, labels=labels)
    (loss * weights).sum().backward()
    dist.send(hidden.grad.contiguous(), peer)
    return loss


def grid_checks(rank: int, world_size: int) -> dict:
    """tp=2 x pp=2 with sequence parallelism and tied embeddings against the single-process model."""
    cfg = tiny_config("gpt2")
    dims = ParallelDims.initialize(ParallelConfig(tp=2, pp=2, sequence_parallel=True))
    layers = my_layer_ranges(cfg.num_layers, dims)[0]
    model = GPT(cfg, dims, layers, pre_process=dims.is_first_stage, post_process=dims.is_last_stage, seed=9)
    reference = GPT(cfg, seed=9)
    torch.manual_seed(3)
    ids, labels, weights = torch.randint(0, 37, (2, 8)), torch.randint(0, 37, (2, 8)), torch.rand(2, 8)
    expected = reference(ids, labels=labels)
    (expected * weights).sum().backward()
    loss = pipeline_step(model, dims, ids, labels, weights, (2, 4, 32))  # (B, T/tp, H): a sequence shard
    if loss is not None:
        torch.testing.assert_close(loss, expected, **close)

    for param in model.tied_embedding_params():
        assert layout_of(param).tied_embedding
        dist.all_reduce(param.grad, group=dims.embedding_group)
    grads = merged_tensors(model, dims, True)
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    reference_grads["output.weight"] = reference_grads["embedding.word.weight"]
    for name, grad in grads.items():
        rows = 37 if name in ("embedding.word.weight", "output.weight") else None
        torch.testing.assert_close(grad[:rows], reference_grads[name][:rows], **close)

    sizes = {
        name: dist.get_world_size(getattr(dims, f"{name}_group")) if getattr(dims, f"{name}_group") else 1
        for name in ("tp", "pp", "dp", "embedding")
    }
    members = gather_shards(torch.tensor([rank]), dims.tp_group)
    return {"sizes": sizes, "tp_members": [int(m) for m in members], "pp_ranks": dims.pp_ranks,
            "layers": list(layers), "names": sorted(grads)}


def test_tensor_and_pipeline_parallel_on_four_ranks():
    results = run_distributed(grid_checks, 4)
    assert all(r["sizes"] == {"tp": 2, "pp": 2, "dp": 1, "embedding": 2} for r in results)
    assert [r["tp_members"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["pp_ranks"] for r in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["layers"] for r in results] == [[0], [0], [1], [1]]
    assert "layers.1.mlp.fc.weight" in results[2]["names"] and "output.weight" in results[2]["names"]
    assert "embedding.position.weight" in results[0]["names"] and "final_norm.weight" not in results[0]["names"]


@pytest.mark.parametrize("partition_dim, chunks", [(None, 1), (0, 1), (1, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shard_and_merge_are_inverses(partition_dim, chunks, tp):
    full = torch.arange(8 * 16).reshape(8, 16)
    layout = ParamLayout(partition_dim=partition_dim, partition_chunks=chunks)
    shards = [layout.shard_tensor(full, r, tp) for r in range(tp)]
    if partition_dim is not None:
        assert all(s.shape[partition_dim] == full.shape[partition_dim] // tp for s in shards)
    assert torch.equal(layout.merge_shards(shards), full)


def test_shards_of_a_fused_weight_keep_blocks_paired():
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    fused = ParamLayout(partition_dim=0, partition_chunks=2)
    shard = fused.shard_tensor(torch.cat([gate, up]), 1, 2)
    assert torch.equal(shard, torch.cat([gate[2:], up[2:]]))
    with pytest.raises(ValueError, match="does not split into 2 block"):
        fused.shard_tensor(torch.zeros(6, 3), 0, 2)


def test_single_process_errors():
    with pytest.raises(ValueError, match="out_features=12 does not split into 5 block.*multiple of 5"):
        ColumnParallelLinear(4, 12, bias=True, group=None, partition_chunks=5)
    tracker = RNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="random stream 'a' already exists"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="random stream 'b' was never added"):
        with tracker.fork("b"):
            pass
