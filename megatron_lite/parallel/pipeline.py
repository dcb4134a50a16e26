"""Pipeline parallelism: schedules as pure functions, and an executor that runs one.

A schedule is this stage's ordered list of ``(op, micro_batch, chunk)`` with op ``"F"``
(forward) or ``"B"`` (backward); ``chunk`` is the index of one of this rank's model chunks.
Chunk ``c`` on stage ``s`` is virtual stage ``c * pp + s``, so activations flow
stage 0 -> 1 -> ... -> pp-1 -> stage 0 (next chunk) -> ... and gradients flow back.

The executor follows ``p2p_plan``: between computations it posts one batch holding what
the previous computations produced and what the next ones need (Megatron-LM's fused
send-and-receive). A send may block until its receive is posted (NCCL runs a link's
transfers in order on one stream), so neighbours must post matching batches;
``tests/parallel/test_pipeline.py`` simulates all stages under that rule and checks that
every schedule finishes and every transfer meets the one its peer expects. Activations and
gradients also carry different tags (gloo honours them) because with pp = 2 and virtual
stages both kinds go between the same two ranks.

Once a stage's output activation has reached the next stage, only its autograd node is needed
here (the backward starts from the gradient the next stage sends back), so its storage is
released as soon as the send completes, as Megatron-LM does: a stage then holds one copy of
each in-flight activation (its input) instead of two.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable

from megatron_lite.config import ConfigError
from megatron_lite.parallel.comm_stats import CommStats, record
from megatron_lite.parallel.dims import ParallelDims

Op = tuple[str, int, int]  # ("F" | "B", micro_batch, chunk)
ForwardStep = Callable[[int, "torch.Tensor | None", Any], torch.Tensor]
GradSyncHook = Callable[[int, bool], None]  # (chunk, is its last micro-batch): see parallel.grad_sync

SCHEDULES = ("afab", "1f1b")
_ACTIVATION_TAG = 0
_GRADIENT_TAG = 1


# ----------------------------------------------------------------------------- which layers each chunk holds


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


def stage_layer_ranges(num_layers: int, dims: ParallelDims) -> list[range]:
    """Global layer indices of every virtual stage; virtual stage c * pp + s is chunk c of stage s."""
    return split_layers(num_layers, dims.pp * dims.virtual_pp, dims.stage_layers)


def chunk_layers(num_layers: int, dims: ParallelDims, pp_rank: int, chunk: int = 0) -> range:
    """The layers model chunk ``chunk`` of pipeline stage ``pp_rank`` holds (interleaved order)."""
    if not (0 <= pp_rank < dims.pp and 0 <= chunk < dims.virtual_pp):
        raise ValueError(f"no chunk {chunk} on stage {pp_rank} with pp={dims.pp}, virtual_pp={dims.virtual_pp}")
    return stage_layer_ranges(num_layers, dims)[chunk * dims.pp + pp_rank]


def my_layer_ranges(num_layers: int, dims: ParallelDims) -> list[range]:
    """The layers of each of this rank's model chunks, chunk 0 first."""
    return [chunk_layers(num_layers, dims, dims.pp_rank, c) for c in range(dims.virtual_pp)]


def _check_sizes(num_micro_batches: int, pp: int, stage: int, virtual_pp: int = 1) -> None:
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if pp < 1 or virtual_pp < 1:
        raise ValueError(f"pp and virtual_pp must be >= 1, got pp={pp}, virtual_pp={virtual_pp}")
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} is outside the pipeline of {pp} stages (0..{pp - 1})")


def schedule_afab(num_micro_batches: int, pp: int, stage: int) -> list[Op]:
    """All forwards, then all backwards: the reference schedule (one model chunk per stage)."""
    _check_sizes(num_micro_batches, pp, stage)
    return [("F", mb, 0) for mb in range(num_micro_batches)] + [("B", mb, 0) for mb in range(num_micro_batches)]


def schedule_1f1b(num_micro_batches: int, pp: int, stage: int) -> list[Op]:
    """Warm-up forwards, then alternate one forward and one backward, then cool-down backwards.

    A stage starts backward as soon as the first gradient can arrive, so it holds at most
    ``pp - stage`` micro-batches' activations instead of all of them.
    """
    _check_sizes(num_micro_batches, pp, stage)
    warmup = min(pp - stage - 1, num_micro_batches)
    ops: list[Op] = [("F", mb, 0) for mb in range(warmup)]
    for i in range(num_micro_batches - warmup):
        ops += [("F", warmup + i, 0), ("B", i, 0)]
    ops += [("B", mb, 0) for mb in range(num_micro_batches - warmup, num_micro_batches)]
    return ops


def interleaved_warmup(num_micro_batches: int, pp: int, stage: int, virtual_pp: int) -> int:
    """Forwards before the first backward: enough for the first gradient to come round the ring."""
    return min(num_micro_batches * virtual_pp, (pp - stage - 1) * 2 + (virtual_pp - 1) * pp)


def _interleaved_op(k: int, pp: int, virtual_pp: int, backward: bool) -> tuple[int, int]:
    """(micro_batch, chunk) of this stage's k-th forward or backward.

    Micro-batches go in groups of pp: a group passes through chunk 0, then chunk 1, ...;
    backwards take the chunks in reverse.
    """
    group, within = divmod(k, pp * virtual_pp)
    chunk = within // pp
    if backward:
        chunk = virtual_pp - 1 - chunk
    return group * pp + within % pp, chunk


def schedule_interleaved(num_micro_batches: int, pp: int, stage: int, virtual_pp: int) -> list[Op]:
    """1F1B over virtual stages: each rank runs ``virtual_pp`` chunks, cutting the bubble by that factor."""
    _check_sizes(num_micro_batches, pp, stage, virtual_pp)
    if num_micro_batches % pp != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({num_micro_batches}) to be a "
            f"multiple of pp={pp}; change global_batch_size / micro_batch_size / dp, or set virtual_pp=1"
        )
    total = num_micro_batches * virtual_pp
    warmup = interleaved_warmup(num_micro_batches, pp, stage, virtual_pp)
    forward = [("F", *_interleaved_op(k, pp, virtual_pp, backward=False)) for k in range(total)]
    backward = [("B", *_interleaved_op(k, pp, virtual_pp, backward=True)) for k in range(total)]
    ops: list[Op] = forward[:warmup]
    for i in range(total - warmup):
        ops += [forward[warmup + i], backward[i]]
    return ops + backward[total - warmup :]


def build_schedule(schedule: str, num_micro_batches: int, pp: int, stage: int, virtual_pp: int = 1) -> list[Op]:
    """The op list for ``schedule`` ("afab" or "1f1b"; 1F1B is interleaved when virtual_pp > 1)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "afab":
        if virtual_pp > 1:
            raise ValueError(
                f"the afab schedule runs one model chunk per stage, got virtual_pp={virtual_pp}; "
                f"use the 1f1b schedule (interleaved) for virtual stages"
            )
        return schedule_afab(num_micro_batches, pp, stage)
    if virtual_pp > 1:
        return schedule_interleaved(num_micro_batches, pp, stage, virtual_pp)
    return schedule_1f1b(num_micro_batches, pp, stage)


def in_flight_bound(schedule: str, num_micro_batches: int, pp: int, stage: int, virtual_pp: int = 1) -> int:
    """Most (micro_batch, chunk) activations a stage holds at once under ``schedule``."""
    if schedule == "afab":
        return num_micro_batches
    if virtual_pp > 1:
        return min(num_micro_batches * virtual_pp, interleaved_warmup(num_micro_batches, pp, stage, virtual_pp) + 1)
    return min(num_micro_batches, pp - stage)


class Transfer(NamedTuple):
    """One tensor crossing a stage boundary, seen from this rank."""

    kind: str  # "act" (forward activation) | "grad" (its gradient)
    micro_batch: int
    chunk: int  # this rank's chunk that produced it (send) or will consume it (receive)
    peer: str  # "next" | "prev": the neighbouring stage on the other end


class Step(NamedTuple):
    """Post ``sends`` and ``recvs`` as one batch, wait for the receives, then run ``ops``."""

    sends: tuple[Transfer, ...]
    recvs: tuple[Transfer, ...]
    ops: tuple[Op, ...]


def _transfers(op: Op, pp: int, stage: int, virtual_pp: int) -> tuple[Transfer | None, Transfer | None]:
    """(what ``op`` must receive first, what it sends afterwards) on this stage."""
    kind, mb, chunk = op
    virtual, last = chunk * pp + stage, pp * virtual_pp - 1
    if kind == "F":
        recv = Transfer("act", mb, chunk, "prev") if virtual > 0 else None
        send = Transfer("act", mb, chunk, "next") if virtual < last else None
    else:
        recv = Transfer("grad", mb, chunk, "next") if virtual < last else None
        send = Transfer("grad", mb, chunk, "prev") if virtual > 0 else None
    return recv, send


def _compute_groups(ops: Sequence[Op], num_micro_batches: int, pp: int, stage: int, virtual_pp: int) -> list[list[Op]]:
    """Ops run between two communication batches: one op, or under interleaving a steady-state
    (forward, backward) pair, whose transfers are batched together as in Megatron-LM."""
    if virtual_pp == 1 or not any(op == "B" for op, _, _ in ops):
        return [[op] for op in ops]
    warmup = interleaved_warmup(num_micro_batches, pp, stage, virtual_pp)
    steady_end = warmup + 2 * (num_micro_batches * virtual_pp - warmup)
    groups = [[op] for op in ops[:warmup]]
    groups += [list(ops[i : i + 2]) for i in range(warmup, steady_end, 2)]
    return groups + [[op] for op in ops[steady_end:]]


def _canonical(transfers: list[Transfer]) -> tuple[Transfer, ...]:
    # Both ends of a link post activations before gradients, so unordered (NCCL) matching agrees.
    return tuple(sorted(transfers, key=lambda t: (t.kind != "act", t.peer)))


def p2p_plan(ops: Sequence[Op], num_micro_batches: int, pp: int, stage: int, virtual_pp: int = 1) -> list[Step]:
    """This stage's communication batches and computations for ``ops``.

    Each batch carries what the previous computations produced and what the next ones need,
    so with sends that block until received (NCCL on one stream per link) neighbours meet
    instead of waiting on each other; the tests check this by simulating all stages.
    """
    steps, pending = [], []
    for group in _compute_groups(ops, num_micro_batches, pp, stage, virtual_pp):
        recvs = [t for t in (_transfers(op, pp, stage, virtual_pp)[0] for op in group) if t is not None]
        steps.append(Step(_canonical(pending), _canonical(recvs), tuple(group)))
        pending = [t for t in (_transfers(op, pp, stage, virtual_pp)[1] for op in group) if t is not None]
    if pending:
        steps.append(Step(_canonical(pending), (), ()))
    return steps


class _P2P:
    """Batched sends and receives between neighbouring stages of one pipeline group."""

    def __init__(self, group, pp_rank: int, pp_size: int, shape, dtype, device, stats: CommStats | None):
        self.group = group
        self.peers = {
            "prev": _global_rank(group, (pp_rank - 1) % pp_size),
            "next": _global_rank(group, (pp_rank + 1) % pp_size),
        }
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.stats = stats
        # (works, the buffers they send, the stage outputs to release once they are sent)
        self.in_flight: list[tuple[list, list[torch.Tensor], list[torch.Tensor]]] = []

    def exchange(self, sends: Sequence[tuple[Transfer, torch.Tensor]], recvs: Sequence[Transfer],
                 release: Sequence[torch.Tensor] = ()) -> dict:
        """Post one batch and return the received tensors keyed by transfer; sends finish in
        the background, their buffers kept alive until they do; then the storage of each
        tensor in ``release`` (outputs whose activations this batch sends) is freed."""
        if not sends and not recvs:
            return {}
        ops, sent, buffers = [], [], {}
        for transfer, tensor in sends:
            tensor = tensor.detach().to(self.dtype).contiguous()
            ops.append(self._op(dist.isend, tensor, transfer))
            sent.append(tensor)
            record(self.stats, "pp", "send", tensor.numel() * tensor.element_size(), 2)
        for transfer in recvs:
            buffers[transfer] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(self._op(dist.irecv, buffers[transfer], transfer))
        works = dist.batch_isend_irecv(ops)
        if len(works) == len(ops):  # one work per transfer (gloo): only the receives hold us up
            send_works, recv_works = works[: len(sent)], works[len(sent) :]
        else:  # one work for the whole batch (NCCL): waiting orders the streams, not the host
            send_works, recv_works = works, works
        for work in recv_works:
            work.wait()
        self.in_flight.append((send_works, sent, list(release)))
        self._retire(wait=False)
        return buffers

    def _retire(self, wait: bool) -> None:
        """Drop finished sends and release the outputs they carried; with ``wait``, finish all."""
        pending = []
        for works, buffers, outputs in self.in_flight:
            if wait:
                for work in works:
                    work.wait()
            elif not all(work.is_completed() for work in works):
                pending.append((works, buffers, outputs))
                continue
            for output in outputs:
                release_storage(output)
        self.in_flight = pending

    def _op(self, fn, tensor: torch.Tensor, transfer: Transfer) -> dist.P2POp:
        tag = _ACTIVATION_TAG if transfer.kind == "act" else _GRADIENT_TAG
        return dist.P2POp(fn, tensor, self.peers[transfer.peer], self.group, tag)

    def wait_all(self) -> None:
        self._retire(wait=True)


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def send_to_next_stage(activation: torch.Tensor, pp_group, pp_rank: int, comm_stats: CommStats | None = None) -> None:
    """Blocking send of one forward activation to stage ``pp_rank + 1``, outside a schedule
    (generation, whose activations change shape every step)."""
    tensor = activation.contiguous()
    dist.send(tensor, dst=_global_rank(pp_group, pp_rank + 1), group=pp_group, tag=_ACTIVATION_TAG)
    record(comm_stats, "pp", "send", tensor.numel() * tensor.element_size(), 2)


def recv_from_previous_stage(shape: Sequence[int], dtype: torch.dtype, device, pp_group, pp_rank: int) -> torch.Tensor:
    """The activation ``send_to_next_stage`` on stage ``pp_rank - 1`` sends."""
    activation = torch.empty(*shape, dtype=dtype, device=device)
    dist.recv(activation, src=_global_rank(pp_group, pp_rank - 1), group=pp_group, tag=_ACTIVATION_TAG)
    return activation


def release_storage(output: torch.Tensor) -> None:
    """Free an activation's storage but keep its autograd node (its shape goes to (1,))."""
    output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def _releasable(output: torch.Tensor) -> bool:
    # A view shares its base's storage, and a leaf has no node to keep: neither is released.
    return output.grad_fn is not None and output._base is None


def _check_output(output: torch.Tensor, shape: tuple, is_last: bool, where: str, forward_only: bool) -> None:
    if is_last:
        if output.numel() != 1 and not forward_only:
            raise ValueError(
                f"forward_step on the last virtual stage must return the scalar loss (already divided by "
                f"the number of micro-batches), got a tensor of shape {tuple(output.shape)} at {where}"
            )
    elif tuple(output.shape) != shape:
        raise ValueError(
            f"forward_step returned shape {tuple(output.shape)} at {where}, but the pipeline was told "
            f"tensor_shape={shape}; pass the activation shape every stage sends"
        )


class _Executor:
    def __init__(self, chunks, micro_batches, forward_step, pp_rank, pp_size, grad_sync, loss_scale, shape):
        self.chunks, self.micro_batches, self.forward_step = chunks, micro_batches, forward_step
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.grad_sync, self.loss_scale, self.shape = grad_sync, loss_scale, tuple(shape)
        self.inputs: dict[tuple[int, int], torch.Tensor | None] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.received: dict[Transfer, torch.Tensor] = {}
        self.to_send: dict[Transfer, torch.Tensor] = {}
        self.losses: dict[int, torch.Tensor] = {}

    def is_first(self, chunk: int) -> bool:
        return self.pp_rank == 0 and chunk == 0

    def is_last(self, chunk: int) -> bool:
        return self.pp_rank == self.pp_size - 1 and chunk == len(self.chunks) - 1

    def forward(self, mb: int, chunk: int, keep_graph: bool) -> None:
        inp = None if self.is_first(chunk) else self.received.pop(Transfer("act", mb, chunk, "prev"))
        if inp is not None and keep_graph:
            inp.requires_grad_(True)
        with torch.set_grad_enabled(keep_graph):
            out = self.forward_step(chunk, inp, self.micro_batches[mb])
        _check_output(out, self.shape, self.is_last(chunk), f"stage {self.pp_rank}, chunk {chunk}", not keep_graph)
        if self.is_last(chunk):
            self.losses[mb] = out.detach() if not keep_graph else out.detach().reshape(())
        else:
            self.to_send[Transfer("act", mb, chunk, "next")] = out
        if keep_graph:
            self.inputs[(mb, chunk)], self.outputs[(mb, chunk)] = inp, out

    def backward(self, mb: int, chunk: int, last_of_chunk: bool) -> None:
        if self.grad_sync is not None:
            self.grad_sync(chunk, last_of_chunk)
        inp, out = self.inputs.pop((mb, chunk)), self.outputs.pop((mb, chunk))
        if self.is_last(chunk):
            torch.autograd.backward(out.reshape(()) * self.loss_scale)
        else:
            grad = self.received.pop(Transfer("grad", mb, chunk, "next")).to(out.dtype)
            # Straight to the engine: ``out`` may have been released to one element, and the
            # engine checks the gradient against the shape recorded in its node, not the data.
            Variable._execution_engine.run_backward(
                (out,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)
        if not self.is_first(chunk):
            grad_in = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            self.to_send[Transfer("grad", mb, chunk, "prev")] = grad_in

    def run(self, steps: Sequence[Step], p2p: _P2P, last_backward: set[tuple[int, int]], keep_graph: bool) -> None:
        for step in steps:
            sends = [(t, self.to_send.pop(t)) for t in step.sends]
            release = [tensor for t, tensor in sends if t.kind == "act" and _releasable(tensor)]
            self.received.update(p2p.exchange(sends, step.recvs, release))
            for op, mb, chunk in step.ops:
                if op == "F":
                    self.forward(mb, chunk, keep_graph)
                else:
                    self.backward(mb, chunk, (mb, chunk) in last_backward)


def _last_backward_per_chunk(ops: Sequence[Op]) -> set[tuple[int, int]]:
    last: dict[int, int] = {}
    for op, mb, chunk in ops:
        if op == "B":
            last[chunk] = mb
    return {(mb, chunk) for chunk, mb in last.items()}


def forward_backward(
    chunks: Sequence[nn.Module],
    micro_batches: Sequence[Any],
    forward_step: ForwardStep,
    schedule: str = "1f1b",
    *,
    pp_group: dist.ProcessGroup | None = None,
    pp_rank: int = 0,
    pp_size: int = 1,
    tensor_shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    forward_only: bool = False,
    grad_sync: GradSyncHook | None = None,
    loss_scale: float = 1.0,
    comm_stats: CommStats | None = None,
) -> list[torch.Tensor]:
    """Run every micro-batch through this rank's chunks (and back, unless ``forward_only``).

    ``forward_step(chunk, input_or_None, micro_batch)`` returns the chunk's output, or on the
    last virtual stage the loss already divided by the number of micro-batches (with
    ``forward_only``, any tensor: per-sample scores come back as they are). ``tensor_shape``
    and ``dtype`` describe what stages send each other. ``grad_sync(chunk, is_last)`` is called
    before every backward so a data-parallel reducer communicates only on each chunk's final
    micro-batch. The backward pass uses ``loss * loss_scale`` (fp16); returned losses are
    unscaled. ``pp_group=None`` with ``pp_size > 1`` takes the default group (the whole world)
    as the pipeline. Returns the per-micro-batch losses on the last stage, [] elsewhere.
    """
    num_chunks = len(chunks)
    if num_chunks < 1:
        raise ValueError("forward_backward needs at least one model chunk")
    if num_chunks > 1 and pp_size == 1:
        raise ValueError(f"{num_chunks} model chunks (virtual_pp) need pp > 1; set virtual_pp=1 or raise pp")
    if pp_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"pp_size={pp_size} needs torch.distributed to be initialized first")
    ops = build_schedule(schedule, len(micro_batches), pp_size, pp_rank, num_chunks)
    if forward_only:  # the schedule's forwards alone keep its send/receive order
        ops = [op for op in ops if op[0] == "F"]
    steps = p2p_plan(ops, len(micro_batches), pp_size, pp_rank, num_chunks)
    p2p = _P2P(pp_group, pp_rank, pp_size, tensor_shape, dtype, device, comm_stats)
    run = _Executor(chunks, micro_batches, forward_step, pp_rank, pp_size, grad_sync, loss_scale, tensor_shape)
    run.run(steps, p2p, _last_backward_per_chunk(ops), keep_graph=not forward_only)
    p2p.wait_all()
    return [run.losses[mb] for mb in sorted(run.losses)]

