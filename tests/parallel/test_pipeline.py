"""Pipeline schedules (pure order checks and a simulated run of all stages) and the executor on gloo."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import ConfigError, ParallelConfig
from megatron_lite.parallel import pipeline
from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.grad_sync import sum_tied_embedding_copies
from megatron_lite.parallel.layout import mark_tied_embedding
from megatron_lite.parallel.pipeline import (
    Transfer,
    build_schedule,
    forward_backward,
    in_flight_bound,
    interleaved_warmup,
    p2p_plan,
    schedule_1f1b,
    schedule_afab,
    schedule_interleaved,
)
from tests.distributed import run_distributed


def _max_in_flight(ops) -> int:
    live, peak = set(), 0
    for op, mb, chunk in ops:
        if op == "F":
            live.add((mb, chunk))
        else:
            live.remove((mb, chunk))
        peak = max(peak, len(live))
    return peak


def _check_each_once_and_ordered(ops, num_microbatches: int, virtual_pp: int) -> None:
    expected = {(mb, c) for mb in range(num_microbatches) for c in range(virtual_pp)}
    forwards = [(mb, c) for op, mb, c in ops if op == "F"]
    backwards = [(mb, c) for op, mb, c in ops if op == "B"]
    assert sorted(forwards) == sorted(expected) and len(forwards) == len(expected)
    assert sorted(backwards) == sorted(expected) and len(backwards) == len(expected)
    position = {(op, mb, c): i for i, (op, mb, c) in enumerate(ops)}
    for mb, c in expected:
        assert position[("F", mb, c)] < position[("B", mb, c)]
        if c + 1 < virtual_pp:  # a micro-batch reaches a rank's later chunk after its earlier one
            assert position[("F", mb, c)] < position[("F", mb, c + 1)]
            assert position[("B", mb, c + 1)] < position[("B", mb, c)]


@pytest.mark.parametrize("pp", [1, 2, 3, 4])
@pytest.mark.parametrize("num_microbatches", [1, 2, 3, 5, 8])
def test_1f1b_order(pp, num_microbatches):
    for stage in range(pp):
        ops = schedule_1f1b(num_microbatches, pp, stage)
        _check_each_once_and_ordered(ops, num_microbatches, 1)
        warmup = min(pp - stage - 1, num_microbatches)
        assert [op for op, _, _ in ops[:warmup]] == ["F"] * warmup
        steady = ops[warmup : warmup + 2 * (num_microbatches - warmup)]
        assert [op for op, _, _ in steady] == ["F", "B"] * (num_microbatches - warmup)
        assert [op for op, _, _ in ops[len(ops) - warmup :]] == ["B"] * warmup
        assert [mb for op, mb, _ in ops if op == "B"] == list(range(num_microbatches))
        bound = in_flight_bound("1f1b", num_microbatches, pp, stage)
        assert _max_in_flight(ops) == min(num_microbatches, pp - stage) == bound


def test_afab_order_holds_every_microbatch():
    ops = schedule_afab(4, 2, 1)
    _check_each_once_and_ordered(ops, 4, 1)
    assert [op for op, _, _ in ops] == ["F"] * 4 + ["B"] * 4
    assert _max_in_flight(ops) == 4 == in_flight_bound("afab", 4, 2, 1)


@pytest.mark.parametrize(
    "pp,virtual_pp,num_microbatches", [(2, 2, 2), (2, 2, 4), (2, 3, 6), (4, 2, 4), (4, 2, 8), (3, 3, 9)]
)
def test_interleaved_order(pp, virtual_pp, num_microbatches):
    for stage in range(pp):
        ops = schedule_interleaved(num_microbatches, pp, stage, virtual_pp)
        _check_each_once_and_ordered(ops, num_microbatches, virtual_pp)
        warmup = interleaved_warmup(num_microbatches, pp, stage, virtual_pp)
        assert warmup == min(num_microbatches * virtual_pp, 2 * (pp - stage - 1) + (virtual_pp - 1) * pp)
        assert all(op == "F" for op, _, _ in ops[:warmup])
        assert _max_in_flight(ops) <= in_flight_bound("1f1b", num_microbatches, pp, stage, virtual_pp)
    # Micro-batches go round in groups of pp: the first forwards are group 0 through chunk 0, then chunk 1.
    first = schedule_interleaved(num_microbatches, pp, 0, virtual_pp)[: 2 * pp]
    assert first == [("F", mb, 0) for mb in range(pp)] + [("F", mb, 1) for mb in range(pp)]
    # The last stage starts backward early, holding fewer activations than all of them.
    last_stage = schedule_interleaved(num_microbatches, pp, pp - 1, virtual_pp)
    assert _max_in_flight(last_stage) == min(num_microbatches * virtual_pp, (virtual_pp - 1) * pp + 1)


def _link_and_identity(transfer, pp: int, stage: int) -> tuple[tuple[int, int], tuple]:
    """((src, dst) ranks, what the tensor is) of a transfer posted on ``stage``."""
    virtual = transfer.chunk * pp + stage
    peer = (stage + 1) % pp if transfer.peer == "next" else (stage - 1) % pp
    if transfer.kind == "act":
        producer = virtual if transfer.peer == "next" else virtual - 1
    else:
        producer = virtual if transfer.peer == "prev" else virtual + 1
    sending = (transfer.kind == "act") == (transfer.peer == "next")
    link = (stage, peer) if sending else (peer, stage)
    return link, (transfer.kind, transfer.micro_batch, producer)


def _simulate(schedule: str, num_microbatches: int, pp: int, virtual_pp: int, forward_only: bool = False) -> None:
    """Run every stage's p2p plan under NCCL's rule: a transfer completes only when both ends
    have posted it in their current batch, and a rank posts its next batch only when the
    current one completed. Transfers on a link are matched in posting order, whatever their
    tag, and each must be the tensor its receiver expects."""
    plans = []
    for stage in range(pp):
        ops = build_schedule(schedule, num_microbatches, pp, stage, virtual_pp)
        if forward_only:
            ops = [op for op in ops if op[0] == "F"]
        plans.append(p2p_plan(ops, num_microbatches, pp, stage, virtual_pp))
    posted: dict[tuple, list] = {}  # (link, "send" | "recv") -> identities in posting order
    slots = []  # per stage, per step: [(link, direction, index on the link)]
    for stage, plan in enumerate(plans):
        slots.append([])
        for step in plan:
            mine = []
            for direction, transfers in (("send", step.sends), ("recv", step.recvs)):
                for transfer in transfers:
                    link, identity = _link_and_identity(transfer, pp, stage)
                    queue = posted.setdefault((link, direction), [])
                    mine.append((link, direction, len(queue)))
                    queue.append(identity)
            slots[stage].append(mine)
    for (link, direction), identities in posted.items():
        if direction == "send":
            assert identities == posted.get((link, "recv")), f"link {link} would deliver tensors out of order"
    cursor, done = [0] * pp, set()
    while any(cursor[s] < len(plans[s]) for s in range(pp)):
        current = {(link, d, k) for s in range(pp) if cursor[s] < len(plans[s]) for link, d, k in slots[s][cursor[s]]}
        matched = {(link, k) for link, d, k in current if d == "send" and (link, "recv", k) in current}
        done |= matched
        advanced = False
        for s in range(pp):
            if cursor[s] < len(plans[s]) and all((link, k) in done for link, _, k in slots[s][cursor[s]]):
                cursor[s] += 1
                advanced = True
        assert matched or advanced, f"deadlock: {schedule} m={num_microbatches} pp={pp} v={virtual_pp} at {cursor}"


@pytest.mark.parametrize("forward_only", [False, True])
def test_all_stages_run_without_deadlock(forward_only):
    for pp in (1, 2, 3, 4, 8):
        for num_microbatches in (1, 2, 3, 4, 6, 8, 12, 16):
            _simulate("afab", num_microbatches, pp, 1, forward_only)
            _simulate("1f1b", num_microbatches, pp, 1, forward_only)
            for virtual_pp in (2, 3):
                if pp > 1 and num_microbatches % pp == 0:
                    _simulate("1f1b", num_microbatches, pp, virtual_pp, forward_only)


def test_simulation_catches_a_plan_that_deadlocks(monkeypatch):
    # Batching each interleaved op's transfers alone (no steady-state pairing) hangs under NCCL's rule.
    monkeypatch.setattr(pipeline, "_compute_groups", lambda ops, *sizes: [[op] for op in ops])
    with pytest.raises(AssertionError, match=r"deadlock: 1f1b m=4 pp=2 v=2"):
        _simulate("1f1b", 4, 2, 2)


def test_plan_batches_every_transfer_once():
    ops = schedule_interleaved(4, 2, 0, 2)
    plan = p2p_plan(ops, 4, 2, 0, 2)
    assert [op for step in plan for op in step.ops] == ops
    sends = [t for step in plan for t in step.sends]
    recvs = [t for step in plan for t in step.recvs]
    # Stage 0 receives every activation but chunk 0's and every gradient; sends everything but chunk 0's grads.
    every = [(mb, c) for mb in range(4) for c in range(2)]
    assert sorted(recvs) == sorted(
        [Transfer("act", mb, 1, "prev") for mb in range(4)] + [Transfer("grad", mb, c, "next") for mb, c in every]
    )
    assert sorted(sends) == sorted(
        [Transfer("act", mb, c, "next") for mb, c in every] + [Transfer("grad", mb, 1, "prev") for mb in range(4)]
    )
    # In the steady state a forward and a backward share one batch with up to four transfers.
    assert max(len(step.sends) + len(step.recvs) for step in plan) == 4


def test_schedule_errors_say_what_to_change():
    with pytest.raises(ValueError, match=r"number of micro-batches \(6\) to be a multiple of pp=4"):
        schedule_interleaved(6, 4, 0, 2)
    with pytest.raises(ValueError, match=r"schedule 'gpipe' is not one of afab, 1f1b"):
        build_schedule("gpipe", 4, 2, 0)
    with pytest.raises(ValueError, match=r"stage 2 is outside the pipeline of 2 stages"):
        schedule_1f1b(4, 2, 2)
    with pytest.raises(ValueError, match=r"num_micro_batches must be >= 1"):
        schedule_1f1b(0, 2, 0)
    with pytest.raises(ValueError, match=r"afab schedule runs one model chunk per stage, got virtual_pp=2"):
        build_schedule("afab", 4, 2, 0, virtual_pp=2)
    with pytest.raises(ConfigError, match=r"afab runs one model chunk per stage, but parallel.virtual_pp=2"):
        ParallelConfig(pp=2, virtual_pp=2, pipeline_schedule="afab")


def test_executor_errors_on_one_process():
    layer = nn.Linear(4, 4)
    batches = [torch.ones(2, 4)]
    with pytest.raises(ValueError, match=r"must return the scalar loss"):
        forward_backward([layer], batches, lambda c, x, mb: layer(mb), tensor_shape=(2, 4))
    with pytest.raises(ValueError, match=r"2 model chunks \(virtual_pp\) need pp > 1"):
        forward_backward([layer, layer], batches, lambda c, x, mb: layer(mb).sum(), tensor_shape=(2, 4))
    with pytest.raises(RuntimeError, match=r"pp_size=2 needs torch.distributed to be initialized"):
        forward_backward([layer], batches, lambda c, x, mb: layer(mb).sum(), pp_size=2, tensor_shape=(2, 4))


def test_single_stage_accumulates_like_a_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    batches = [torch.randn(3, 4) for _ in range(3)]
    losses = forward_backward([model], batches, lambda c, x, mb: model(mb).pow(2).mean() / 3, tensor_shape=(3, 4))
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected_losses = []
    for mb in batches:
        loss = model(mb).pow(2).mean() / 3
        loss.backward()
        expected_losses.append(loss.detach())
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), rtol=0, atol=0)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


# ---- gloo: a stack of Linear+GELU split over stages matches the unsplit stack ----

HIDDEN, ROWS, LAYERS = 8, 2, 8


def _full_stack() -> nn.ModuleList:
    torch.manual_seed(1234)
    return nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU()) for _ in range(LAYERS))


def _microbatches(num: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    return [(torch.randn(ROWS, HIDDEN, generator=gen), torch.randn(ROWS, HIDDEN, generator=gen)) for _ in range(num)]


def _reference(batches):
    """Losses and per-layer gradients of the unsplit stack, micro-batch by micro-batch."""
    layers = _full_stack()
    losses = []
    for x, y in batches:
        for layer in layers:
            x = layer(x)
        loss = nn.functional.mse_loss(x, y) / len(batches)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), [[p.grad.clone() for p in layer.parameters()] for layer in layers]


def _run_split(group, pp_rank, pp_size, virtual_pp, schedule, batches, forward_only=False, stats=None, sent=None):
    """This rank's chunks of the stack (virtual stage c * pp + s), run through the executor."""
    layers = _full_stack()
    per_chunk = LAYERS // (pp_size * virtual_pp)
    virtual_stages = [c * pp_size + pp_rank for c in range(virtual_pp)]
    owned = [list(range(v * per_chunk, (v + 1) * per_chunk)) for v in virtual_stages]
    chunks = [nn.Sequential(*[layers[i] for i in idx]) for idx in owned]
    last = pp_size * virtual_pp - 1

    def forward_step(chunk, x, batch):
        virtual = chunk * pp_size + pp_rank
        out = chunks[chunk](batch[0] if virtual == 0 else x)
        if virtual != last and sent is not None:
            sent.append(out)
        return nn.functional.mse_loss(out, batch[1]) / len(batches) if virtual == last else out

    losses = forward_backward(
        chunks, batches, forward_step, schedule, pp_group=group, pp_rank=pp_rank, pp_size=pp_size,
        tensor_shape=(ROWS, HIDDEN), forward_only=forward_only, comm_stats=stats,
    )
    return losses, layers, [i for idx in owned for i in idx]


def _compare(rank_in_pipe, pp_size, losses, layers, owned, ref_losses, ref_grads):
    if rank_in_pipe == pp_size - 1:
        torch.testing.assert_close(torch.stack(losses), ref_losses, rtol=1e-6, atol=1e-9)
    else:
        assert losses == []
    for i in owned:
        for p, expected in zip(layers[i].parameters(), ref_grads[i]):
            torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-9)
    others = [i for i in range(LAYERS) if i not in owned]
    assert all(p.grad is None for i in others for p in layers[i].parameters())


def _pipeline_body(rank, world_size):
    batches = _microbatches(8)
    ref_losses, ref_grads = _reference(batches)
    checks = []
    # pp = 4 over the whole world.
    for schedule in ("afab", "1f1b"):
        stats = CommStats()
        losses, layers, owned = _run_split(None, rank, 4, 1, schedule, batches, stats=stats)
        _compare(rank, 4, losses, layers, owned, ref_losses, ref_grads)
        # Each micro-batch crosses each boundary once forward and once backward.
        sends = (rank < 3) + (rank > 0)
        assert stats.payload_bytes["pp"] == sends * 8 * ROWS * HIDDEN * 4
        checks.append(f"pp4-{schedule}")
    # Two pipelines of pp = 2: ranks {0, 1} and {2, 3}.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, pp_rank = groups[rank // 2], rank % 2
    for schedule, virtual_pp in (("afab", 1), ("1f1b", 1), ("1f1b", 2)):
        sent = []
        losses, layers, owned = _run_split(group, pp_rank, 2, virtual_pp, schedule, batches, sent=sent)
        _compare(pp_rank, 2, losses, layers, owned, ref_losses, ref_grads)
        # Every output that went to the next stage was released down to its autograd node.
        assert len(sent) == 8 * virtual_pp - (8 if pp_rank == 1 else 0)
        assert all(out.shape == (1,) and out.grad_fn is not None for out in sent)
        checks.append(f"pp2-v{virtual_pp}-{schedule}")
    # Forward only: same losses, no gradients, nothing sent backwards.
    stats = CommStats()
    losses, layers, _ = _run_split(group, pp_rank, 2, 2, "1f1b", batches, forward_only=True, stats=stats)
    if pp_rank == 1:
        torch.testing.assert_close(torch.stack(losses), ref_losses, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in layers.parameters())
    assert stats.payload_bytes["pp"] == (2 if pp_rank == 0 else 1) * 8 * ROWS * HIDDEN * 4
    checks.append("forward-only")
    # Tied embedding: the first and last stage's copies end with the sum of both gradients.
    emb = mark_tied_embedding(nn.Parameter(torch.zeros(3, 2)))
    emb.grad = torch.full((3, 2), float(rank + 1))
    sum_tied_embedding_copies([emb], group)
    torch.testing.assert_close(emb.grad, torch.full((3, 2), float(2 * (rank // 2) * 2 + 3)))
    checks.append("tied")
    # A stage that returns the wrong activation shape is told so before anything is sent.
    if rank == 0:
        with pytest.raises(ValueError, match=r"returned shape \(2, 5\) .* tensor_shape=\(2, 8\)"):
            forward_backward(
                [nn.Identity()], batches, lambda c, x, mb: torch.zeros(2, 5), pp_group=groups[0], pp_rank=0,
                pp_size=2, tensor_shape=(ROWS, HIDDEN),
            )
        checks.append("shape-error")
    return checks


def test_pipeline_matches_unsplit_stack_on_gloo():
    results = run_distributed(_pipeline_body, 4)
    assert results[0][-1] == "shape-error"
    assert all(len(r) >= 7 for r in results)
