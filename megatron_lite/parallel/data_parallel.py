"""Data parallelism: bucketed gradient all-reduce overlapped with backward, and ZeRO-1.

``GradReducer`` keeps every gradient as a view into a few flat bucket buffers. A hook fires
when a parameter's gradient is final for the step; when all of a bucket's parameters are
final the bucket's all-reduce starts asynchronously, so communication of the last layers
overlaps the backward pass of the first ones. Buckets are launched in index order on every
rank, because collectives must be issued in the same order by all members of a group.

``Zero1AdamW`` shards AdamW's state over the data-parallel group: the parameters are laid
end to end in one flat fp32 vector, rank r owns the r-th contiguous slice, gradients are
reduce-scattered onto the slices, each rank updates its slice, and the updated slices are
all-gathered back into the parameters.
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


def _reduce_scatter(output: torch.Tensor, full: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, full, group=group)


def _all_gather(full: torch.Tensor, shard: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(full, shard, group=group)


class _Bucket:
    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        numel = sum(p.numel() for p in params)
        self.buffer = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
        self.views: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for p in params:
            self.views[p] = self.buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.ready: set[int] = set()
        self.work: dist.Work | None = None
        self.launched = False

    def attach_grads(self) -> None:
        """Point every ``param.grad`` at its view so backward accumulates into the buffer."""
        for p, view in self.views.items():
            if p.grad is None:  # unused since grads were last set to None: its gradient is zero
                view.zero_()
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
            p.grad = view

    def reset(self) -> None:
        self.ready.clear()
        self.work = None
        self.launched = False


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
        current_bytes += _nbytes(p)
    if current:
        buckets.append(current)
    return buckets


class GradReducer:
    """Average gradients over ``dp_group`` in buckets launched during backward.

    Gradient accumulation: wrap the non-final micro-batches in ``no_sync()`` (or let the
    pipeline executor call ``set_grad_sync``) so they communicate nothing; call
    ``finish_grad_sync()`` after the final backward, before clipping and the optimizer step
    (``parallel.grad_sync`` does both, and the other sums after it). ``zero_grad()`` clears the
    buffers (use it instead of the optimizer's, which would detach the gradients from their
    buckets until the next backward).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        dp_group: dist.ProcessGroup | None,
        bucket_size_mb: float = 25.0,
        *,
        comm_stats: CommStats | None = None,
    ):
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be positive, got {bucket_size_mb}")
        self.params = [p for p in params if p.requires_grad]
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("GradReducer got the same parameter twice; pass each parameter once")
        self.dp_group, self.dp_size = dp_group, group_size(dp_group)
        self.comm_stats = comm_stats
        self.sync_enabled = True
        self.buckets = [_Bucket(ps) for ps in _split_buckets(self.params, int(bucket_size_mb * 2**20))]
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
        if not self.sync_enabled or self.dp_size == 1:
            return
        index, position = self._bucket_of[param]
        bucket = self.buckets[index]
        if bucket.launched:
            raise RuntimeError(
                "a gradient was accumulated again after its bucket's all-reduce started: more than one "
                "backward ran with grad sync on; wrap all but the final micro-batch in no_sync() and call "
                "finish_grad_sync() before the next step"
            )
        view = bucket.views[param]
        if param.grad.data_ptr() != view.data_ptr():  # grads were set to None since the last step
            view.copy_(param.grad)
            param.grad = view
        bucket.ready.add(position)
        self._launch_ready_buckets()

    def _launch_ready_buckets(self, force: bool = False) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if not force and len(bucket.ready) < len(bucket.params):
                return
            self._launch(bucket)
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.attach_grads()  # parameters that took no part in this backward contribute zeros
        bucket.buffer.div_(self.dp_size)
        bucket.work = dist.all_reduce(bucket.buffer, group=self.dp_group, async_op=True)
        bucket.launched = True
        record(self.comm_stats, "dp", "all_reduce", _nbytes(bucket.buffer), self.dp_size)

    def finish_grad_sync(self) -> None:
        """Launch what backward left unlaunched and wait for every bucket."""
        if not self.sync_enabled:
            raise RuntimeError(
                "finish_grad_sync() was called inside no_sync() / with grad sync disabled; call it after "
                "the final micro-batch's backward, outside no_sync()"
            )
        if self.dp_size > 1:
            self._launch_ready_buckets(force=True)
            for bucket in self.buckets:
                bucket.work.wait()
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
class _Slot:
    param: torch.Tensor
    name: str
    group: int
    start: int  # offset in the flat vector
    numel: int


class Zero1AdamW:
    """AdamW (decoupled weight decay, fp32 state and master weights) sharded over ``dp_group``.

    ``param_groups`` follow torch: a list of dicts with "params" and optional "lr", "betas",
    "eps", "weight_decay"; each group's parameters are laid out contiguously so a rank's slice
    meets each group in one range. The step is ``reduce_gradients()`` (gradients averaged over
    dp onto each rank's slice; ``grad_shards()`` then feeds ``clip_grad_norm``) and ``step()``.
    Checkpoints use ``state_dict_by_param_name()``, the full per-parameter state, so a run can
    resume with a different dp. The fp32 master slice is copied from the parameters when the
    optimizer is built; after loading weights into the model call ``reload_params()``.
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
    ):
        groups = list(param_groups)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.dp_group, self.dp_size = dp_group, group_size(dp_group)
        self.dp_rank = group_rank(dp_group)
        self.comm_stats = comm_stats
        self.step_count = 0
        self._slots = self._lay_out(param_names or {})
        total = sum(s.numel for s in self._slots)
        self.shard_size = max(1, math.ceil(total / self.dp_size))
        self.shard_start = self.dp_rank * self.shard_size
        self.master = self._flat_params()[self.shard_start : self.shard_start + self.shard_size].clone()
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.grad = torch.zeros_like(self.master)
        self._grads_reduced = False

    def _lay_out(self, names: Mapping[torch.Tensor, str]) -> list[_Slot]:
        slots, offset, seen = [], 0, set()
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError("a parameter appears twice in Zero1AdamW's param_groups; list it once")
                seen.add(id(p))
                slots.append(_Slot(p, names.get(p, f"param{len(slots)}"), g, offset, p.numel()))
                offset += p.numel()
        if not slots:
            raise ValueError("Zero1AdamW got no parameters")
        return slots

    def _flat(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """The flat fp32 vector, zero-padded to dp x shard_size."""
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat, (0, self.shard_size * self.dp_size - flat.numel()))

    def _flat_params(self) -> torch.Tensor:
        return self._flat(s.param for s in self._slots)

    def _local_range(self, slot: _Slot) -> tuple[int, int] | None:
        """This rank's part of ``slot`` as offsets into the local shard."""
        lo = max(slot.start, self.shard_start)
        hi = min(slot.start + slot.numel, self.shard_start + self.shard_size)
        return (lo - self.shard_start, hi - self.shard_start) if lo < hi else None

    def reduce_gradients(self) -> None:
        """Average the gradients over dp; each rank keeps only its slice."""
        grads = [s.param.grad if s.param.grad is not None else torch.zeros_like(s.param) for s in self._slots]
        full = self._flat(grads)
        if self.dp_size == 1:
            self.grad.copy_(full)
        else:
            _reduce_scatter(self.grad, full, self.dp_group)
            self.grad.div_(self.dp_size)
            record(self.comm_stats, "dp", "reduce_scatter", _nbytes(full), self.dp_size)
        self._grads_reduced = True

    def grad_shards(self) -> list[GradShard]:
        """Views of this rank's reduced gradient, one per parameter it (partly) owns."""
        if not self._grads_reduced:
            raise RuntimeError("call reduce_gradients() before grad_shards()")
        shards = []
        for slot in self._slots:
            local = self._local_range(slot)
            if local is not None:
                shards.append(
                    GradShard(
                        self.grad[local[0] : local[1]],
                        layout_of(slot.param),
                        slot.param,
                        self.shard_start + local[0] - slot.start,
                    )
                )
        return shards

    def _group_range(self, g: int) -> tuple[int, int] | None:
        members = [s for s in self._slots if s.group == g]
        lo = max(members[0].start, self.shard_start) - self.shard_start
        hi = min(members[-1].start + members[-1].numel, self.shard_start + self.shard_size) - self.shard_start
        return (lo, hi) if lo < hi else None

    @torch.no_grad()
    def step(self, found_inf: torch.Tensor | None = None) -> None:
        """One AdamW step. ``found_inf`` (a device scalar, 1 = skip) keeps the master slice and the
        moments as they were without reading the flag on the host; ``step_count`` still advances,
        which only a run that stops at the skip (fp32, bf16 divergence) may allow."""
        if not self._grads_reduced:
            self.reduce_gradients()
        self.step_count += 1
        before = [t.clone() for t in (self.master, self.exp_avg, self.exp_avg_sq)] if found_inf is not None else []
        for g, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            local = self._group_range(g)
            if local is not None:
                sl = slice(*local)
                self._adamw(group, self.master[sl], self.grad[sl], self.exp_avg[sl], self.exp_avg_sq[sl])
        for kept, updated in zip(before, (self.master, self.exp_avg, self.exp_avg_sq)):
            updated.copy_(torch.where(found_inf.bool(), kept, updated))
        self._gather_params()
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

    def _gather_params(self) -> None:
        full = self._gather(self.master)
        for slot in self._slots:
            slot.param.copy_(full[slot.start : slot.start + slot.numel].view_as(slot.param))

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        if self.dp_size == 1:
            return shard
        full = torch.empty(self.shard_size * self.dp_size, dtype=shard.dtype, device=shard.device)
        _all_gather(full, shard, self.dp_group)
        record(self.comm_stats, "dp", "all_gather", _nbytes(full), self.dp_size)
        return full

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self._slots:
            if set_to_none:
                slot.param.grad = None
            elif slot.param.grad is not None:
                slot.param.grad.zero_()
        self._grads_reduced = False

    def state_dict_by_param_name(self) -> dict:
        """Full per-parameter state (gathered over dp; a collective) in the layout
        ``training.optim.optimizer_state_by_name`` uses for torch's AdamW, so checkpoints move
        between ZeRO and plain AdamW and between data-parallel sizes."""
        exp_avg, exp_avg_sq = self._gather(self.exp_avg), self._gather(self.exp_avg_sq)
        per_param = {}
        for slot in self._slots:
            piece = slice(slot.start, slot.start + slot.numel)
            per_param[slot.name] = {
                "step": torch.tensor(float(self.step_count)),
                "exp_avg": exp_avg[piece].view(slot.param.shape).clone(),
                "exp_avg_sq": exp_avg_sq[piece].view(slot.param.shape).clone(),
            }
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"per_param": per_param, "groups": groups}

    def load_state_dict_by_param_name(self, saved: dict) -> None:
        """Load a full per-parameter state (any dp it was saved with); keeps this rank's slice."""
        missing = [s.name for s in self._slots if s.name not in saved.get("per_param", {})]
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
        state = [saved["per_param"][s.name] for s in self._slots]
        self._check_shapes(state)
        shard = slice(self.shard_start, self.shard_start + self.shard_size)
        self.exp_avg.copy_(self._flat(st["exp_avg"] for st in state)[shard])
        self.exp_avg_sq.copy_(self._flat(st["exp_avg_sq"] for st in state)[shard])
        self.step_count = int(float(state[0]["step"]))
        self.reload_params()

    def reload_params(self) -> None:
        """Take the fp32 master slice from the parameters again (after loading model weights)."""
        shard = slice(self.shard_start, self.shard_start + self.shard_size)
        self.master.copy_(self._flat_params()[shard])

    def _check_shapes(self, state: list[dict]) -> None:
        for slot, st in zip(self._slots, state):
            if tuple(st["exp_avg"].shape) != tuple(slot.param.shape):
                raise ValueError(
                    f"optimizer state for {slot.name} has shape {tuple(st['exp_avg'].shape)} but the parameter "
                    f"is {tuple(slot.param.shape)}; reshard the checkpoint for this tensor-parallel layout"
                )
