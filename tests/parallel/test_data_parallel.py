"""Bucketed data-parallel gradients, ZeRO-1 and the global gradient norm, against single-process references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.data_parallel import GradReducer, GradShard, Zero1AdamW, pipeline_grad_sync
from megatron_lite.parallel.grad_norm import clip_grad_norm, global_grad_norm
from megatron_lite.parallel.layout import ParamLayout, attach_layout
from megatron_lite.parallel.pipeline import forward_backward
from tests.distributed import run_distributed

HIDDEN, GLOBAL_ROWS = 6, 16


def _model() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 1)
    )


def _batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_ROWS, HIDDEN, generator=gen), torch.randn(GLOBAL_ROWS, 1, generator=gen)


def _loss(model, x, y, num_microbatches: int) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y) / num_microbatches


def _full_batch_grads(step: int = 0) -> list[torch.Tensor]:
    model = _model()
    x, y = _batch(step)
    _loss(model, x, y, 1).backward()
    return [p.grad.clone() for p in model.parameters()]


def _local_microbatches(dp_rank: int, dp: int, num_microbatches: int, step: int = 0):
    x, y = _batch(step)
    rows = GLOBAL_ROWS // dp
    x, y = x[dp_rank * rows : (dp_rank + 1) * rows], y[dp_rank * rows : (dp_rank + 1) * rows]
    return list(zip(x.chunk(num_microbatches), y.chunk(num_microbatches)))


def _grad_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_reducer(group, dp_rank: int, dp: int) -> None:
    model, stats = _model(), CommStats()
    reducer = GradReducer(model.parameters(), group, bucket_size_mb=40 / 2**20, comm_stats=stats)
    assert len(reducer.buckets) >= 3
    launched_at_first_layer = []  # buckets on the wire as each first-layer gradient completes

    def record_launched(_):
        if reducer.sync_enabled:
            launched_at_first_layer.append(reducer.num_buckets_launched)

    model[0].weight.register_post_accumulate_grad_hook(record_launched)
    model[0].bias.register_post_accumulate_grad_hook(record_launched)
    for step in range(2):  # the second step starts from grads set to None, as optimizers do
        micro = _local_microbatches(dp_rank, dp, 2, step)
        with reducer.no_sync():
            _loss(model, *micro[0], 2).backward()
        assert stats.payload_bytes.get("dp", 0) == 0, "no communication before the final micro-batch"
        _loss(model, *micro[1], 2).backward()
        reducer.finish_grad_sync()
        assert stats.payload_bytes["dp"] == _grad_bytes(model)
        for p, expected in zip(model.parameters(), _full_batch_grads(step)):
            torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)
        for p in model.parameters():
            p.grad = None
        stats.reset()
    # Buckets of later layers were already on the wire when backward reached the first layer.
    assert len(launched_at_first_layer) == 4
    assert 0 < min(launched_at_first_layer) < len(reducer.buckets)


def _check_reducer_under_executor(group, dp_rank: int, dp: int) -> None:
    """The pipeline executor's grad_sync callback keeps earlier micro-batches silent."""
    model, stats = _model(), CommStats()
    reducer = GradReducer(model.parameters(), group, bucket_size_mb=1.0, comm_stats=stats)
    micro = _local_microbatches(dp_rank, dp, 4)
    forward_backward(
        [model], micro, lambda c, x, mb: _loss(model, mb[0], mb[1], len(micro)), "1f1b",
        tensor_shape=(GLOBAL_ROWS // dp // 4, HIDDEN), grad_sync=pipeline_grad_sync([reducer]),
    )
    reducer.finish_grad_sync()
    assert stats.calls == {"dp.all_reduce": 1}
    for p, expected in zip(model.parameters(), _full_batch_grads()):
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-7)


def _check_reducer_rejects_two_synced_backwards(group, dp_rank: int, dp: int) -> None:
    model = _model()
    reducer = GradReducer(model.parameters(), group, bucket_size_mb=40 / 2**20)
    micro = _local_microbatches(dp_rank, dp, 2)
    _loss(model, *micro[0], 2).backward()
    with pytest.raises(RuntimeError, match=r"more than one backward ran with grad sync on; wrap all but the final"):
        _loss(model, *micro[1], 2).backward()
    reducer.finish_grad_sync()  # every rank stopped at the same bucket: the group drains cleanly


def _groups(model_params, weight_decay: float):
    decay = [p for p in model_params if p.ndim == 2]
    no_decay = [p for p in model_params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _reference_adamw(steps: int):
    model = _model()
    optimizer = torch.optim.AdamW(_groups(list(model.parameters()), 0.1), foreach=False, **HYPER)
    for step in range(steps):
        _loss(model, *_batch(step), 1).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _zero_steps(model, zero, dp_rank: int, dp: int, steps) -> None:
    for step in steps:
        for x, y in _local_microbatches(dp_rank, dp, 1, step):
            _loss(model, x, y, 1).backward()
        zero.step()
        zero.zero_grad()


def _check_zero1(group, dp_rank: int, dp: int, other_group, other_rank: int, other_dp: int) -> None:
    model = _model()
    names = {p: n for n, p in model.named_parameters()}
    zero = Zero1AdamW(_groups(list(model.parameters()), 0.1), group, param_names=names, **HYPER)
    assert zero.shard_size * dp >= sum(p.numel() for p in model.parameters())
    _zero_steps(model, zero, dp_rank, dp, range(3))
    ref_model, ref_opt = _reference_adamw(3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    saved = zero.state_dict_by_param_name()
    # The squares of gradients summed in a different order differ by a few ulps: rtol 1e-5 there.
    for name, q in ref_model.named_parameters():
        got, expected = saved["per_param"][name], ref_opt.state[q]
        torch.testing.assert_close(got["exp_avg"], expected["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got["exp_avg_sq"], expected["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        assert float(saved["per_param"][name]["step"]) == 3
    # Resume with another dp from the full state: the continuation still matches plain AdamW.
    resumed = Zero1AdamW(_groups(list(model.parameters()), 0.1), other_group, param_names=names, **HYPER)
    resumed.load_state_dict_by_param_name(saved)
    _zero_steps(model, resumed, other_rank, other_dp, range(3, 5))
    ref_model, _ = _reference_adamw(5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _check_zero1_grad_norm(group, dp_rank: int, dp: int) -> None:
    model = _model()
    zero = Zero1AdamW(model.parameters(), group, lr=1e-3)
    for x, y in _local_microbatches(dp_rank, dp, 1):
        _loss(model, x, y, 1).backward()
    zero.reduce_gradients()
    expected = torch.cat([g.reshape(-1) for g in _full_batch_grads()]).norm()
    norm = clip_grad_norm(zero.grad_shards(), 0.1, dp_group_if_zero1=group)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    assert global_grad_norm(zero.grad_shards(), dp_group=group).item() == pytest.approx(0.1, rel=1e-5)


def _adamw_the_old_way(master, grad, exp_avg, exp_avg_sq, step: int, weight_decay: float) -> None:
    """ZeRO-1's update before the buckets, one formula on a flat slice."""
    lr, (beta1, beta2), eps = HYPER["lr"], HYPER["betas"], HYPER["eps"]
    master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    master.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))


def _zero1_the_old_way(group, dp_rank: int, dp: int, steps: int) -> list[torch.Tensor]:
    """The reference: after backward every gradient copied into one flat fp32 vector (groups end to
    end), reduce-scattered, AdamW on this rank's slice, everything all-gathered into the parameters."""
    model = _model()
    ordered = [p for g in _groups(list(model.parameters()), 0.1) for p in g["params"]]
    decay = torch.cat([torch.full((p.numel(),), 0.1 if p.ndim == 2 else 0.0) for p in ordered])
    shard = math.ceil(decay.numel() / dp)
    pad = shard * dp - decay.numel()
    mine = slice(dp_rank * shard, (dp_rank + 1) * shard)
    master = nn.functional.pad(torch.cat([p.detach().reshape(-1) for p in ordered]), (0, pad))[mine].clone()
    exp_avg, exp_avg_sq, grad = torch.zeros_like(master), torch.zeros_like(master), torch.zeros_like(master)
    decay = nn.functional.pad(decay, (0, pad), value=-1.0)[mine]
    for step in range(steps):
        for x, y in _local_microbatches(dp_rank, dp, 2, step):
            _loss(model, x, y, 2).backward()
        flat = nn.functional.pad(torch.cat([p.grad.reshape(-1) for p in ordered]), (0, pad))
        dist.reduce_scatter_tensor(grad, flat, group=group)
        grad.div_(dp)
        for weight_decay in (0.1, 0.0):
            where = (decay == weight_decay).nonzero().flatten()
            if where.numel():  # each group meets a slice in one range
                piece = slice(int(where[0]), int(where[-1]) + 1)
                _adamw_the_old_way(master[piece], grad[piece], exp_avg[piece], exp_avg_sq[piece], step + 1, weight_decay)
        full = torch.empty(shard * dp)
        dist.all_gather_into_tensor(full, master, group=group)
        offset = 0
        with torch.no_grad():
            for p in ordered:
                p.copy_(full[offset : offset + p.numel()].view_as(p))
                p.grad = None
                offset += p.numel()
    return [p.detach().clone() for p in model.parameters()]


def _check_zero1_overlapped(group, dp_rank: int, dp: int) -> None:
    """Buckets are reduce-scattered while backward runs; the weights come back bucket by bucket, each
    module's forward waiting only for its own; the traffic is the old flat reduce-scatter and
    all-gather's (plus at most dp - 1 padding elements per bucket); the weights are the old way's, bit
    for bit over two ranks."""
    model, stats = _model(), CommStats()
    zero = Zero1AdamW(_groups(list(model.parameters()), 0.1), group, comm_stats=stats, bucket_size_mb=40 / 2**20,
                      param_names={p: n for n, p in model.named_parameters()}, **HYPER)
    reducer = zero.reducers[0]
    buckets = reducer.buckets
    assert len(buckets) >= 3
    launched_at_first_layer = []  # buckets on the wire as each first-layer gradient completes
    for param in model[0].parameters():
        param.register_post_accumulate_grad_hook(
            lambda _: launched_at_first_layer.append(reducer.num_buckets_launched) if reducer.sync_enabled else None)
    zero.install_param_gather_hooks([model])
    first_layer_buckets = len({i for i, b in enumerate(buckets) for p in b.params if p in set(model[0].parameters())})
    grad_bytes = sum(b.buffer.numel() * 4 for b in buckets)
    assert 0 <= grad_bytes - _grad_bytes(model) <= len(buckets) * (dp - 1) * 4
    for step in range(3):
        micro = _local_microbatches(dp_rank, dp, 2, step)
        with reducer.no_sync():
            _loss(model, *micro[0], 2).backward()
        assert stats.payload_bytes.get("dp", 0) == 0, "no communication before the final micro-batch"
        _loss(model, *micro[1], 2).backward()
        zero.step()
        zero.zero_grad()
        assert stats.calls == {"dp.reduce_scatter": len(buckets), "dp.all_gather": len(buckets)}
        assert stats.payload_bytes["dp"] == 2 * grad_bytes
        stats.reset()
        assert zero.gathers_in_flight == len(buckets)
        model[0](micro[0][0])  # the first layer waits for its own buckets only
        assert zero.gathers_in_flight == len(buckets) - first_layer_buckets
    assert 0 < min(launched_at_first_layer) < len(buckets)
    zero.wait_for_params()
    expected = _zero1_the_old_way(group, dp_rank, dp, 3)
    for p, q in zip(model.parameters(), expected):
        if dp == 2:  # a + b has one order: bit for bit
            assert torch.equal(p, q)
        else:  # gloo's ring adds 4 terms in an order set by the element's place in the buffer, which buckets move
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _check_grad_norm_tp_pp(rank: int) -> None:
    """tp = 2 (fastest) x pp = 2. Stage s has a Linear whose weight is split by rows over tp
    (partition_dim 0), a replicated bias, and a norm gain; both stages hold a copy of the tied
    embedding, which must be counted once whether the flag marks the last stage's copy or both."""
    tp_rank, pp_rank = rank % 2, rank // 2
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    gen = torch.Generator().manual_seed(5)
    full = {  # the unsharded model's gradients, the same on every rank
        "embedding": torch.randn(10, 4, generator=gen),
        **{f"stage{s}.weight": torch.randn(8, 4, generator=gen) for s in range(2)},
        **{f"stage{s}.bias": torch.randn(4, generator=gen) for s in range(2)},
        **{f"stage{s}.gain": torch.randn(4, generator=gen) for s in range(2)},
    }
    expected = torch.cat([g.reshape(-1) for g in full.values()]).norm().item()

    def param(grad, partition_dim=None, tied_embedding=False):
        p = attach_layout(nn.Parameter(torch.zeros_like(grad)),
                          ParamLayout(partition_dim=partition_dim, tied_embedding=tied_embedding))
        p.grad = grad.clone()
        return p

    def params_of_this_rank(flag_first_copy: bool):
        return [
            param(full[f"stage{pp_rank}.weight"].chunk(2, dim=0)[tp_rank], partition_dim=0),
            param(full[f"stage{pp_rank}.bias"]),
            param(full[f"stage{pp_rank}.gain"]),
            param(full["embedding"], tied_embedding=pp_rank == 1 or flag_first_copy),
        ]

    both_flagged = global_grad_norm(params_of_this_rank(flag_first_copy=True), tp_groups[pp_rank], pp_groups[tp_rank])
    assert both_flagged.item() == pytest.approx(expected, rel=1e-6)
    mine = params_of_this_rank(flag_first_copy=False)
    stats = CommStats()
    norm = clip_grad_norm(mine, 1.0, tp_groups[pp_rank], pp_groups[tp_rank], comm_stats=stats)
    assert norm == pytest.approx(expected, rel=1e-6)
    assert stats.calls == {"tp.all_reduce": 1, "pp.all_reduce": 1}
    unclipped = [full[f"stage{pp_rank}.weight"].chunk(2, dim=0)[tp_rank], full[f"stage{pp_rank}.bias"]]
    for p, before in zip(mine, unclipped):
        torch.testing.assert_close(p.grad, before / (expected + 1e-6), rtol=1e-6, atol=0)
    after = global_grad_norm(mine, tp_groups[pp_rank], pp_groups[tp_rank]).item()
    assert after == pytest.approx(1.0, rel=1e-5)


def _data_parallel_body(rank, world_size):
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half, half_rank = halves[rank // 2], rank % 2
    world = dist.group.WORLD
    _check_reducer(world, rank, 4)
    _check_reducer(half, half_rank, 2)
    _check_reducer_under_executor(world, rank, 4)
    _check_reducer_rejects_two_synced_backwards(world, rank, 4)
    _check_zero1(world, rank, 4, half, half_rank, 2)
    _check_zero1(half, half_rank, 2, world, rank, 4)
    _check_zero1_grad_norm(world, rank, 4)
    _check_zero1_overlapped(half, half_rank, 2)
    _check_zero1_overlapped(world, rank, 4)
    _check_grad_norm_tp_pp(rank)
    return "ok"


def test_data_parallel_on_gloo():
    assert run_distributed(_data_parallel_body, 4) == ["ok"] * 4


def test_zero1_on_one_process_matches_adamw():
    model = _model()
    zero = Zero1AdamW(_groups(list(model.parameters()), 0.1), None, **HYPER)
    _zero_steps(model, zero, 0, 1, range(3))
    ref_model, _ = _reference_adamw(3)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_zero1_resumes_from_torch_adamw_state():
    """A checkpoint written from torch's AdamW (state keyed by parameter name) loads into ZeRO-1."""
    ref_model, ref_opt = _reference_adamw(2)
    saved = {
        "per_param": {n: ref_opt.state[p] for n, p in ref_model.named_parameters()},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in ref_opt.param_groups],
    }
    model = _model()
    model.load_state_dict(ref_model.state_dict())
    names = {p: n for n, p in model.named_parameters()}
    zero = Zero1AdamW(_groups(list(model.parameters()), 0.1), None, param_names=names)
    zero.load_state_dict_by_param_name(saved)
    assert zero.param_groups[0]["lr"] == HYPER["lr"] and zero.step_count == 2
    _zero_steps(model, zero, 0, 1, range(2, 4))
    expected, _ = _reference_adamw(4)
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_norm_on_a_rank_without_gradients_is_zero():
    params = [nn.Parameter(torch.ones(3))]
    assert clip_grad_norm(params, 1.0) == 0.0


def test_reducer_without_dp_keeps_local_grads_and_zeroes():
    model = _model()
    reducer = GradReducer(model.parameters(), None)
    x, y = _batch()
    _loss(model, x, y, 1).backward()
    reducer.finish_grad_sync()
    for p, expected in zip(model.parameters(), _full_batch_grads()):
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)
    reducer.zero_grad()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.parameters())


def test_user_errors_are_explained():
    model = _model()
    with pytest.raises(ValueError, match=r"bucket_size_mb must be positive, got 0"):
        GradReducer(model.parameters(), None, bucket_size_mb=0)
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"same parameter twice"):
        GradReducer(params + params[:1], None)
    reducer = GradReducer(model.parameters(), None)
    with reducer.no_sync(), pytest.raises(RuntimeError, match=r"called inside no_sync"):
        reducer.finish_grad_sync()
    with pytest.raises(ValueError, match=r"max_norm must be >= 0"):
        clip_grad_norm(params, -1.0)
    zero = Zero1AdamW(params, None, param_names={p: n for n, p in model.named_parameters()})
    with pytest.raises(RuntimeError, match=r"call reduce_gradients\(\) before grad_shards"):
        zero.grad_shards()
    saved = zero.state_dict_by_param_name()
    del saved["per_param"]["0.weight"]
    with pytest.raises(KeyError, match=r"no entry for 1 parameter\(s\), e.g. \['0.weight'\]"):
        zero.load_state_dict_by_param_name(saved)
    saved = zero.state_dict_by_param_name()
    saved["per_param"]["0.bias"]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state for 0.bias has shape \(3,\) but the parameter is \(12,\)"):
        zero.load_state_dict_by_param_name(saved)
    with pytest.raises(ValueError, match=r"2 param groups, this optimizer has 1"):
        zero.load_state_dict_by_param_name({**saved, "groups": [{}, {}]})
    with pytest.raises(ValueError, match=r"appears twice"):
        Zero1AdamW(params + params[:1], None)
    with pytest.raises(ValueError, match=r"1 parameter\(s\) of Zero1AdamW's param_groups are in no entry of "
                                         r"param_chunks \(or do not require gradients\), e.g. \['param0'\]"):
        Zero1AdamW(params, None, param_chunks=[params[1:]])


def test_grad_shard_counts_like_a_parameter():
    shards = [GradShard(torch.tensor([3.0, 4.0])), GradShard(torch.tensor([12.0]), ParamLayout(partition_dim=0))]
    assert global_grad_norm(shards).item() == pytest.approx(13.0)
    assert clip_grad_norm(shards, 0.0) == pytest.approx(13.0)  # 0 measures without clipping
    torch.testing.assert_close(shards[0].grad, torch.tensor([3.0, 4.0]))
    assert clip_grad_norm(shards, 6.5) == pytest.approx(13.0)
    torch.testing.assert_close(shards[0].grad, torch.tensor([1.5, 2.0]), rtol=1e-6, atol=0)
