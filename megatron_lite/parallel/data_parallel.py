"""Data parallelism: gradient buckets reduced while backward runs, and ZeRO-1.

``GradReducer`` keeps every gradient in a few flat fp32 main-grad buffers (``param.main_grad``
is each parameter's view; fp32 weights accumulate into it directly, 16-bit weights through a
hook that adds each micro-batch's gradient). A hook fires when a parameter's gradient is final
for the step; when all of a bucket's parameters are final the bucket's reduction starts
asynchronously, so communication of the last layers overlaps the backward pass of the first
ones. Buckets are launched in index order on every rank, because collectives must be issued in
the same order by all members of a group.

``Zero1AdamW`` shards AdamW's state over the data-parallel group by bucket: each bucket is
reduce-scattered as backward completes it, rank r owns the r-th slice of every bucket (its fp32
master weights and moments), updates its slices bucket by bucket, and all-gathers each bucket's
updated weights straight into the parameters; the next forward waits for a bucket only when a
module that holds one of its parameters runs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from megatron_lite.parallel.collectives import group_rank, group_size
from megatron_lite.parallel.comm_stats import CommStats, record
from megatron_lite.parallel.layout import REPLICATED, ParamLayout, layout_of


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _reduce_scatter(output: torch.Tensor, full: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, full, group=group, async_op=async_op)


def _all_gather(full: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(full, shard, group=group, async_op=async_op)


def main_grad_dtype(param: torch.Tensor) -> torch.dtype:
    """Gradients of 16-bit weights accumulate in fp32 (Megatron's main grads); others in their own dtype."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


class _Bucket:
    """A few parameters' main gradients, end to end in one buffer. ``param.main_grad`` is each one's
    view. A bucket that is reduce-scattered is zero-padded to a multiple of the dp size, and
    ``grad_shard`` receives this rank's reduced part of it."""

    def __init__(self, params: list[torch.Tensor], shard_over: int | None):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        padded = self.numel if shard_over is None else math.ceil(self.numel / shard_over) * shard_over
        self.buffer = torch.zeros(padded, dtype=main_grad_dtype(params[0]), device=params[0].device)
        self.views: dict[torch.Tensor, torch.Tensor] = {}
        self.offsets: dict[torch.Tensor, int] = {}
        offset = 0
        for p in params:
            self.views[p] = self.buffer[offset : offset + p.numel()].view_as(p)
            self.offsets[p] = offset
            p.main_grad = self.views[p]
            offset += p.numel()
        self.grad_shard: torch.Tensor | None = None
        if shard_over is not None:  # at dp = 1 the whole buffer is this rank's shard
            self.grad_shard = self.buffer if shard_over == 1 else torch.zeros_like(self.buffer[: padded // shard_over])
        self.ready: set[int] = set()
        self.work: dist.Work | None = None
        self.launched = False

    def owns(self, param: torch.Tensor) -> bool:
        """False once a newer reducer was built over the same parameter (it takes the gradients)."""
        return getattr(param, "main_grad", None) is self.views[param]

    def attach_grads(self) -> None:
        """Point every fp32 ``param.grad`` at its view so backward accumulates into the buffer.
        16-bit weights keep ``grad`` None: their hook adds each gradient into the fp32 view."""
        for p, view in self.views.items():
            if not self.owns(p) or p.dtype != view.dtype:
                continue
            if p.grad is None:  # unused since grads were last set to None: its gradient is zero
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view

    def reset(self) -> None:
        self.ready.clear()
        self.work = None
        self.launched = False


def accumulate_main_grad(param: torch.Tensor, view: torch.Tensor) -> None:
    """Move the gradient backward just produced into the parameter's main-grad view."""
    grad = param.grad
    if grad is None or grad.data_ptr() == view.data_ptr():  # fp32: backward accumulated in place
        return
    if param.dtype != view.dtype:  # 16-bit weights: added into fp32, the 16-bit gradient freed
        view.add_(grad)
        param.grad = None
    else:  # fp32 grads were set to None since the last step: this tensor holds the whole sum so far
        view.copy_(grad)
        param.grad = view


def _main_grad_bytes(param: torch.Tensor) -> int:
    return param.numel() * main_grad_dtype(param).itemsize


def _split_buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Reverse parameter order (roughly the order backward finishes them), one dtype per bucket."""
    buckets: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    current_bytes = 0
    for p in reversed(params):
        if current and (current_bytes >= bucket_bytes or p.dtype != current[0].dtype):
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += _main_grad_bytes(p)
    if current:
        buckets.append(current)
    return buckets


class GradReducer:
    """Gradients over ``dp_group`` in buckets launched during backward: averaged by all-reduce, or
    under ZeRO-1 (``shard=True``) reduce-scattered so each rank receives its slice of each bucket.

    Every parameter's gradient lives in a fp32 main-grad buffer laid out by bucket
    (``param.main_grad``): fp32 weights accumulate into it directly (``param.grad`` is the same
    view), 16-bit weights through a hook that adds each micro-batch's gradient into it, so the
    reduction reads the buffers in place and no gradient is re-cast.

    Gradient accumulation: wrap the non-final micro-batches in ``no_sync()`` (or let the
    pipeline executor call ``set_grad_sync``) so they communicate nothing; call
    ``finish_grad_sync()`` after the final backward, before clipping and the optimizer step
    (``parallel.grad_sync`` does both, and the other sums after it). ``zero_grad()`` clears the
    buffers (use it instead of the optimizer's, which would detach the gradients from their
    buckets until the next backward).

    ``late_params`` join buckets of their own, launched only by ``finish_grad_sync()``: their
    gradients need other sums first (``parallel.grad_sync``). ``bucket_order`` sorts the
    parameters inside each bucket (ZeRO-1 keeps each weight-decay group contiguous in a slice).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        dp_group: dist.ProcessGroup | None,
        bucket_size_mb: float = 25.0,
        *,
        comm_stats: CommStats | None = None,
        shard: bool = False,
        late_params: Iterable[torch.Tensor] = (),
        bucket_order: Callable[[torch.Tensor], int] | None = None,
    ):
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be positive, got {bucket_size_mb}")
        self.params = [p for p in params if p.requires_grad]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("GradReducer got the same parameter twice; pass each parameter once")
        self.dp_group, self.dp_size = dp_group, group_size(dp_group)
        self.comm_stats, self.shard = comm_stats, shard
        self.sync_enabled = True
        late = {id(p) for p in late_params}
        early_lists = _split_buckets([p for p in self.params if id(p) not in late], int(bucket_size_mb * 2**20))
        late_lists = _split_buckets([p for p in self.params if id(p) in late], int(bucket_size_mb * 2**20))
        if bucket_order is not None:
            early_lists = [sorted(ps, key=bucket_order) for ps in early_lists]
            late_lists = [sorted(ps, key=bucket_order) for ps in late_lists]
        shard_over = self.dp_size if shard else None
        self.buckets = [_Bucket(ps, shard_over) for ps in early_lists + late_lists]
        self.num_early_buckets = len(early_lists)
        self._bucket_of = {p: (i, j) for i, b in enumerate(self.buckets) for j, p in enumerate(b.params)}
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.attach_grads()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self.params]

    @property
    def num_buckets_launched(self) -> int:
        return self._next_launch

    def set_grad_sync(self, enabled: bool) -> None:
        self.sync_enabled = enabled

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally and communicate nothing."""
        previous, self.sync_enabled = self.sync_enabled, False
        try:
            yield
        finally:
            self.sync_enabled = previous

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        index, position = self._bucket_of[param]
        bucket = self.buckets[index]
        if not bucket.owns(param):
            return
        if bucket.launched and self.sync_enabled:
            raise RuntimeError(
                "a gradient was accumulated again after its bucket's reduction started: more than one "
                "backward ran with grad sync on; wrap all but the final micro-batch in no_sync() and call "
                "finish_grad_sync() before the next step"
            )
        accumulate_main_grad(param, bucket.views[param])
        if not self.sync_enabled or self.dp_size == 1:
            return
        bucket.ready.add(position)
        self._launch_ready_buckets()

    def _launch_ready_buckets(self, force: bool = False) -> None:
        last = len(self.buckets) if force else self.num_early_buckets
        while self._next_launch < last:
            bucket = self.buckets[self._next_launch]
            if not force and len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.attach_grads()  # parameters that took no part in this backward contribute zeros
        if self.shard:
            bucket.work = _reduce_scatter(bucket.grad_shard, bucket.buffer, self.dp_group, async_op=True)
            record(self.comm_stats, "dp", "reduce_scatter", _nbytes(bucket.buffer), self.dp_size)
        else:
            bucket.buffer.div_(self.dp_size)
            bucket.work = dist.all_reduce(bucket.buffer, group=self.dp_group, async_op=True)
            record(self.comm_stats, "dp", "all_reduce", _nbytes(bucket.buffer), self.dp_size)
        bucket.launched = True

    def finish_grad_sync(self) -> None:
        """Launch what backward left unlaunched (the late buckets too) and wait for every bucket."""
        if not self.sync_enabled:
            raise RuntimeError(
                "finish_grad_sync() was called inside no_sync() / with grad sync disabled; call it after "
                "the final micro-batch's backward, outside no_sync()"
            )
        if self.dp_size > 1:
            self._launch_ready_buckets(force=True)
            for bucket in self.buckets:
                bucket.work.wait()
                if self.shard:  # summed over dp by the reduce-scatter: the mean, as ZeRO-1 always took it
                    bucket.grad_shard.div_(self.dp_size)
                bucket.reset()
            self._next_launch = 0
        for bucket in self.buckets:
            bucket.attach_grads()

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.attach_grads()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def pipeline_grad_sync(reducers: Sequence[GradReducer]) -> Callable[[int, bool], None]:
    """The ``grad_sync`` callback for ``pipeline.forward_backward``: one reducer per model chunk,
    each communicating only during its chunk's final micro-batch."""

    def set_sync(chunk: int, is_last_microbatch: bool) -> None:
        reducers[chunk].set_grad_sync(is_last_microbatch)

    return set_sync


@dataclass
class GradShard:
    """The part of one parameter's gradient a ZeRO rank owns, with the parameter's layout (the
    attribute ``layout_of`` reads), so ``clip_grad_norm`` counts it like a parameter."""

    grad: torch.Tensor
    param_layout: ParamLayout = REPLICATED
    param: torch.Tensor | None = None  # the parameter, for layouts that count only some of its rows
    offset: int = 0  # where ``grad`` starts in the flattened parameter


@dataclass
class _ShardedBucket:
    """One gradient bucket as ZeRO-1 holds it: the bucket's parameters end to end in ``weights``
    (the model's dtype, padded like the gradient buffer; every parameter is a view into it), and
    this rank's slice ``[start, start + size)`` of both with its fp32 master weights and AdamW state."""

    bucket: _Bucket
    weights: torch.Tensor  # (padded,) in the parameters' dtype
    start: int
    master: torch.Tensor  # (size,) fp32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    group_ranges: list[tuple[int, int, int]]  # (param group, lo, hi) in the local slice
    gather: dist.Work | None = None
    gather_input: torch.Tensor | None = None  # kept alive until the all-gather is waited for

    @property
    def size(self) -> int:
        return self.master.numel()

    def local_piece(self, param: torch.Tensor) -> tuple[int, int] | None:
        """Where ``param`` meets this rank's slice, as offsets into the slice."""
        offset = self.bucket.offsets[param]
        lo, hi = max(offset, self.start), min(offset + param.numel(), self.start + self.size)
        return (lo - self.start, hi - self.start) if lo < hi else None


class Zero1AdamW:
    """AdamW (decoupled weight decay, fp32 state and master weights) sharded over ``dp_group``,
    overlapped with backward and with the next forward.

    The gradients live in ``GradReducer`` buckets (one reducer per entry of ``param_chunks``,
    default one over all parameters in the order of ``param_names``, else of the groups); each
    bucket is reduce-scattered as soon as backward completes it, so rank r receives the r-th
    slice of every bucket and owns AdamW's state for those slices. ``step()`` updates the slices
    bucket by bucket and all-gathers each bucket's updated weights straight into the parameters,
    which are views into one buffer per bucket. After ``install_param_gather_hooks(modules)`` the
    all-gathers are left in flight and each module's forward waits only for its own buckets;
    ``wait_for_params()`` waits for all of them (before reading the weights otherwise).

    Weights may be 16-bit (Megatron mixed precision): the fp32 master slice is this optimizer's,
    gradients accumulate in fp32 buffers, and the 16-bit weights are all-gathered from the
    updated masters. ``full_precision_weights()`` shows the fp32 masters in the parameters for a
    checkpoint's save or load.

    ``param_groups`` follow torch: a list of dicts with "params" and optional "lr", "betas",
    "eps", "weight_decay"; inside each bucket the parameters are sorted by group so a rank's
    slice meets each group in one range. ``late_params``: parameters whose gradients need other
    sums before the dp reduction (``parallel.grad_sync``); their buckets are reduce-scattered in
    ``reduce_gradients()``, after those sums. The step is ``reduce_gradients()`` (gradients
    averaged over dp onto each rank's slices; ``grad_shards()`` then feeds ``clip_grad_norm``)
    and ``step()``. Checkpoints use ``state_dict_by_param_name()``, the full per-parameter state,
    so a run can resume with a different dp. After loading weights into the model outside
    ``full_precision_weights()`` call ``reload_params()``.
    """

    def __init__(
        self,
        param_groups: Sequence[dict] | Iterable[torch.Tensor],
        dp_group: dist.ProcessGroup | None,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        param_names: Mapping[torch.Tensor, str] | None = None,
        comm_stats: CommStats | None = None,
        bucket_size_mb: float = 25.0,
        param_chunks: Sequence[Sequence[torch.Tensor]] | None = None,
        late_params: Iterable[torch.Tensor] = (),
    ):
        groups = list(param_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.dp_group, self.dp_size = dp_group, group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.step_count = 0
        self.overlap_param_gather = False
        group_of = self._group_of_each_param()
        names = param_names or {}
        self.names = {p: names.get(p, f"param{i}") for i, p in enumerate(group_of)}
        chunks = [[p for p in chunk if p in group_of] for chunk in param_chunks or [list(names) or list(group_of)]]
        self._check_covered(group_of, chunks)
        self.reducers = [
            GradReducer(chunk, dp_group, bucket_size_mb, comm_stats=comm_stats, shard=True, late_params=late_params,
                        bucket_order=group_of.get)
            for chunk in chunks
        ]
        self._comm_stats = comm_stats
        self._sharded = [self._shard(bucket, group_of) for reducer in self.reducers for bucket in reducer.buckets]
        self._grad_shards = [shard for sb in self._sharded for shard in self._local_grad_shards(sb)]
        self._grads_reduced = False

    @property
    def shard_size(self) -> int:
        """Elements of the model whose optimizer state this rank owns (padding included)."""
        return sum(sb.size for sb in self._sharded)

    @property
    def comm_stats(self) -> CommStats | None:
        return self._comm_stats

    @comm_stats.setter
    def comm_stats(self, stats: CommStats | None) -> None:
        self._comm_stats = stats
        for reducer in self.reducers:
            reducer.comm_stats = stats

    def _group_of_each_param(self) -> dict[torch.Tensor, int]:
        group_of: dict[torch.Tensor, int] = {}
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in group_of:
                    raise ValueError("a parameter appears twice in Zero1AdamW's param_groups; list it once")
                group_of[p] = g
        if not group_of:
            raise ValueError("Zero1AdamW got no parameters")
        return group_of

    def _check_covered(self, group_of: Mapping[torch.Tensor, int], chunks: list[list[torch.Tensor]]) -> None:
        bucketed = {p for chunk in chunks for p in chunk if p.requires_grad}
        missing = [self.names[p] for p in group_of if p not in bucketed]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) of Zero1AdamW's param_groups are in no entry of param_chunks "
                f"(or do not require gradients), e.g. {missing[:3]}; pass every chunk's parameters"
            )

    def _shard(self, bucket: _Bucket, group_of: Mapping[torch.Tensor, int]) -> _ShardedBucket:
        """Move the bucket's parameters into one buffer and take this rank's slice as fp32 masters."""
        size = bucket.buffer.numel() // self.dp_size
        first = bucket.params[0]
        weights = torch.zeros(bucket.buffer.numel(), dtype=first.dtype, device=first.device)
        for p in bucket.params:
            piece = weights[bucket.offsets[p] : bucket.offsets[p] + p.numel()]
            piece.copy_(p.detach().reshape(-1))
            p.data = piece.view_as(p)
        start = self.dp_rank * size
        master = weights[start : start + size].to(torch.float32, copy=True)
        sharded = _ShardedBucket(bucket, weights, start, master, torch.zeros_like(master), torch.zeros_like(master), [])
        for p in bucket.params:  # sorted by group inside the bucket: one range per group
            piece = sharded.local_piece(p)
            if piece is None:
                continue
            ranges = sharded.group_ranges
            if ranges and ranges[-1][0] == group_of[p] and ranges[-1][2] == piece[0]:
                ranges[-1] = (group_of[p], ranges[-1][1], piece[1])
            else:
                ranges.append((group_of[p], *piece))
        return sharded

    @staticmethod
    def _local_grad_shards(sb: _ShardedBucket) -> list[GradShard]:
        """The reduced gradient of each parameter's piece in this rank's slice of the bucket."""
        shards = []
        for p in sb.bucket.params:
            piece = sb.local_piece(p)
            if piece is not None:
                lo, hi = piece
                shards.append(GradShard(sb.bucket.grad_shard[lo:hi], layout_of(p), p, sb.start + lo - sb.bucket.offsets[p]))
        return shards

    # ------------------------------------------------------------------ gradients

    def reduce_gradients(self) -> None:
        """Launch the buckets backward left unlaunched and wait for every reduce-scatter; each rank
        then holds the dp-averaged gradient of its slices."""
        for reducer in self.reducers:
            reducer.set_grad_sync(True)
            reducer.finish_grad_sync()
        self._grads_reduced = True

    def grad_shards(self) -> list[GradShard]:
        """Views of this rank's reduced gradient, one per parameter it (partly) owns."""
        if not self._grads_reduced:
            raise RuntimeError("call reduce_gradients() before grad_shards()")
        return self._grad_shards

    def zero_grad(self) -> None:
        for reducer in self.reducers:
            reducer.zero_grad()
        self._grads_reduced = False

    # ------------------------------------------------------------------ the update

    @torch.no_grad()
    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """One AdamW step. ``found_inf`` (a device scalar, 1 = skip) keeps the master slice and the
        moments as they were without reading the flag on the host; ``step_count`` still advances,
        which only a run that stops at the skip (fp32, bf16 divergence) may allow."""
        if not self._grads_reduced:
            self.reduce_gradients()
        self.wait_for_params()
        self.step_count += 1
        for sb in self._sharded:
            grad = sb.bucket.grad_shard
            kept = [t.clone() for t in (sb.master, sb.exp_avg, sb.exp_avg_sq)] if found_inf is not None else []
            for g, lo, hi in sb.group_ranges:
                self._adamw(self.param_groups[g], sb.master[lo:hi], grad[lo:hi], sb.exp_avg[lo:hi],
                            sb.exp_avg_sq[lo:hi])
            for before, updated in zip(kept, (sb.master, sb.exp_avg, sb.exp_avg_sq)):
                updated.copy_(torch.where(found_inf.bool(), before, updated))
            self._start_gather(sb)
        if not self.overlap_param_gather:
            self.wait_for_params()
        self._grads_reduced = False

    def _adamw(self, group: dict, param, grad, exp_avg, exp_avg_sq) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        param.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**self.step_count
        bias_correction2_sqrt = math.sqrt(1 - beta2**self.step_count)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    def _start_gather(self, sb: _ShardedBucket) -> None:
        """The updated slice, in the weights' dtype, all-gathered into the bucket's weights."""
        if self.dp_size == 1:
            sb.weights.copy_(sb.master)
            return
        sb.gather_input = sb.master.to(sb.weights.dtype)  # fp32 weights: the master itself, no copy
        sb.gather = _all_gather(sb.weights, sb.gather_input, self.dp_group, async_op=True)
        record(self.comm_stats, "dp", "all_gather", _nbytes(sb.weights), self.dp_size)

    def _wait_for(self, indices: Iterable[int]) -> None:
        for index in indices:
            sb = self._sharded[index]
            if sb.gather is not None:
                sb.gather.wait()
                sb.gather, sb.gather_input = None, None

    def wait_for_params(self) -> None:
        """Every bucket's all-gather done: the parameters hold the last step's weights."""
        self._wait_for(range(len(self._sharded)))

    @property
    def gathers_in_flight(self) -> int:
        """Buckets whose updated weights no forward (or ``wait_for_params``) has waited for yet."""
        return sum(sb.gather is not None for sb in self._sharded)

    def install_param_gather_hooks(self, modules: Iterable[torch.nn.Module]) -> None:
        """Leave each step's all-gathers in flight; a module's forward first waits for the buckets
        holding its own parameters, so the next step's first layers start while later buckets
        are still arriving."""
        bucket_index = {p: i for i, sb in enumerate(self._sharded) for p in sb.bucket.params}
        for root in modules:
            for module in root.modules():
                needed = sorted({bucket_index[p] for p in module.parameters(recurse=False) if p in bucket_index})
                if needed:
                    module.register_forward_pre_hook(lambda _module, _args, needed=tuple(needed): self._wait_for(needed))
        self.overlap_param_gather = True

    # ------------------------------------------------------------------ checkpoints

    def _gather_full(self, sb: _ShardedBucket, shard: torch.Tensor) -> torch.Tensor:
        """A bucket-sized tensor assembled from every rank's ``shard`` of it (a collective)."""
        if self.dp_size == 1:
            return shard
        full = torch.empty(sb.weights.numel(), dtype=shard.dtype, device=shard.device)
        _all_gather(full, shard, self.dp_group)
        record(self.comm_stats, "dp", "all_gather", _nbytes(full), self.dp_size)
        return full

    def _params(self) -> Iterator[tuple[_ShardedBucket, torch.Tensor, slice]]:
        for sb in self._sharded:
            for p in sb.bucket.params:
                yield sb, p, slice(sb.bucket.offsets[p], sb.bucket.offsets[p] + p.numel())

    def state_dict_by_param_name(self) -> dict:
        """Full per-parameter state (gathered over dp; a collective) in the layout
        ``training.optim.optimizer_state_by_name`` uses for torch's AdamW, so checkpoints move
        between ZeRO and plain AdamW and between data-parallel sizes."""
        full = {id(sb): (self._gather_full(sb, sb.exp_avg), self._gather_full(sb, sb.exp_avg_sq)) for sb in self._sharded}
        per_param = {}
        for sb, p, piece in self._params():
            exp_avg, exp_avg_sq = full[id(sb)]
            per_param[self.names[p]] = {
                "step": torch.tensor(float(self.step_count)),
                "exp_avg": exp_avg[piece].view(p.shape).clone(),
                "exp_avg_sq": exp_avg_sq[piece].view(p.shape).clone(),
            }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"per_param": per_param, "groups": groups}

    def load_state_dict_by_param_name(self, saved: dict) -> None:
        """Load a full per-parameter state (any dp it was saved with); keeps this rank's slice."""
        names = [self.names[p] for _, p, _ in self._params()]
        missing = [n for n in names if n not in saved.get("per_param", {})]
        if missing:
            raise KeyError(
                f"optimizer state has no entry for {len(missing)} parameter(s), e.g. {missing[:3]}; the "
                f"checkpoint was saved from a different model or with different parameter names"
            )
        if len(saved.get("groups", [])) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(saved.get('groups', []))} param groups, this optimizer has "
                f"{len(self.param_groups)}; build the optimizer with the same weight-decay grouping"
            )
        for group, saved_group in zip(self.param_groups, saved["groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        self._check_shapes(saved["per_param"])
        for key in ("exp_avg", "exp_avg_sq"):
            for sb in self._sharded:
                full = self._bucket_vector(sb, [saved["per_param"][self.names[p]][key] for p in sb.bucket.params])
                getattr(sb, key).copy_(full[sb.start : sb.start + sb.size])
        self.step_count = int(float(saved["per_param"][names[0]]["step"]))
        self.reload_params()

    @staticmethod
    def _bucket_vector(sb: _ShardedBucket, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """The bucket's parameters' ``tensors`` end to end in fp32, padded like the bucket."""
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat, (0, sb.weights.numel() - flat.numel()))

    @torch.no_grad()
    def reload_params(self) -> None:
        """Take the fp32 master slices from the parameters again (after loading model weights)."""
        self.wait_for_params()
        for sb in self._sharded:
            sb.master.copy_(self._bucket_vector(sb, sb.bucket.params)[sb.start : sb.start + sb.size])

    @contextlib.contextmanager
    def full_precision_weights(self) -> Iterator[None]:
        """Inside, every parameter holds its fp32 master weight (16-bit weights: gathered over dp, a
        collective), so a checkpoint saves and loads the masters; on leaving, the masters are taken
        from the parameters (whatever a load put there) and 16-bit weights are cast from them."""
        self.wait_for_params()
        held: dict[torch.Tensor, torch.Tensor] = {}
        if any(sb.weights.dtype != torch.float32 for sb in self._sharded):
            masters = {id(sb): self._gather_full(sb, sb.master) for sb in self._sharded}
            for sb, p, piece in self._params():
                held[p] = p.data
                p.data = masters[id(sb)][piece].view_as(p)
        try:
            yield
        finally:
            self.reload_params()
            with torch.no_grad():
                for p, weights in held.items():
                    weights.copy_(p.data)
                    p.data = weights

    def _check_shapes(self, per_param: Mapping[str, dict]) -> None:
        for _, p, _ in self._params():
            st = per_param[self.names[p]]
            if tuple(st["exp_avg"].shape) != tuple(p.shape):
                raise ValueError(
                    f"optimizer state for {self.names[p]} has shape {tuple(st['exp_avg'].shape)} but the parameter "
                    f"is {tuple(p.shape)}; reshard the checkpoint for this tensor-parallel layout"
                )
