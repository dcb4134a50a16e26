"""Everything done to gradients after backward, in one place: why each gradient is right and counted once.

After the last micro-batch's backward every rank holds, per parameter, the gradient of the loss
of its own micro-batches through its own piece of the model. Four sums make that the gradient
of the global-batch loss, identical wherever the model keeps copies; ``GradSync.finish`` runs
them in this order on every rank (collectives must be issued in one order by all members):

1. **data parallel**: each dp rank saw a different part of the global batch, so the gradients
   are averaged over dp (the per-micro-batch losses are already divided by the number of
   micro-batches, so the average is the global-batch mean). Under context parallelism each cp
   rank's loss is the mean over its own tokens of the same samples (attention's K/V gradients
   already crossed ranks in the backward's reduce-scatter): the global loss is the mean of the
   cp ranks' losses, so the average runs over the joint dp x cp group (``dims.dp_cp_group``).
   Gradients live in ``GradReducer`` buckets (fp32 main-grad buffers, also for 16-bit weights)
   whose reductions start during the final backward: an all-reduce for plain AdamW, a
   reduce-scatter onto each rank's optimizer slices under ZeRO-1. The sums below act on whole
   gradients, and after a reduce-scatter only slices exist, so under ZeRO-1 the parameters they
   touch (``summed_before_data_parallel``) sit in buckets of their own that are reduce-scattered
   last, after the sums; every other bucket is on the wire while backward still runs;
2. **sequence parallel** (``layout.sequence_parallel``): norms, the row-parallel biases and the
   value head run on each tp rank's sequence shard, so each rank's gradient covers only its
   tokens: summed over tp. Per-head q/k norm weights (``layout.partial_over_tp``) are whole on
   every tp rank but each rank applies them to its own heads only: summed over tp in the same call;
3. **tied embedding** (``layout.tied_embedding``): at pp > 1 the first and last stage each hold
   a copy of the word embedding and each copy saw one of its two uses: summed over the
   embedding group, so both copies take the same step and stay equal;
4. **kv-head replicas** (``layout.tp_replicas(tp) > 1``): with tp > num_kv_heads the tp ranks of
   one kv group each hold a copy of its k and v rows, and each copy saw only its rank's query
   heads: those rows are summed over the replica group, so the copies stay identical.

Every sum goes through one flat all-reduce (``collectives.all_reduce_flat``) and acts on the
gradient the optimizer reads: ``param.main_grad`` (the bucket view; for fp32 weights the same
tensor as ``param.grad``), or ``param.grad`` for a parameter no reducer holds. Counting each
element once in the global grad norm is the other half of the answer: ``grad_norm`` asks each
parameter's ``ParamLayout`` whether this rank counts it (``parallel/layout.py``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from megatron_lite.parallel.collectives import all_reduce_flat, group_size
from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.data_parallel import GradReducer, GradShard, Zero1AdamW, pipeline_grad_sync
from megatron_lite.parallel.layout import layout_of
from megatron_lite.parallel.pipeline import GradSyncHook


def summed_before_data_parallel(params, dims) -> list:
    """The parameters whose gradients take a sum over tp or the embedding group (steps 2-4) before
    the dp reduction; ZeRO-1 reduce-scatters their buckets last."""
    return [
        p for p in params
        if (dims.tp > 1 and layout_of(p).summed_over_tp)
        or (dims.embedding_group is not None and layout_of(p).tied_embedding)
        or layout_of(p).tp_replicas(dims.tp) > 1
    ]


class GradSync:
    """The post-backward gradient sequence of one rank's model chunks (see the module docstring).

    ``dims`` is the rank's ``ParallelDims`` (its groups and sizes). With a ``Zero1AdamW``
    optimizer the dp step is its reduce-scatter, through the optimizer's own reducers (one per
    chunk, built over ``param_chunks``); otherwise one ``GradReducer`` per chunk all-reduces.
    """

    def __init__(self, chunks: Sequence[nn.Module], dims, optimizer, bucket_size_mb: float = 25.0,
                 comm_stats: CommStats | None = None):
        self.dims, self.comm_stats = dims, comm_stats
        self.params = [p for chunk in chunks for p in chunk.parameters()]
        self.zero1_optimizer = optimizer if isinstance(optimizer, Zero1AdamW) else None
        if self.zero1_optimizer is not None:
            self.reducers = self.zero1_optimizer.reducers
        else:
            self.reducers = [GradReducer(chunk.parameters(), dims.dp_cp_group, bucket_size_mb, comm_stats=comm_stats)
                             for chunk in chunks]

    # ---- during backward ----

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally (every micro-batch but the last)."""
        with contextlib.ExitStack() as stack:
            for reducer in self.reducers:
                stack.enter_context(reducer.no_sync())
            yield

    def pipeline_hook(self) -> GradSyncHook | None:
        """The pipeline executor's ``grad_sync``: each chunk's buckets communicate only during its
        final micro-batch's backward (None when nothing overlaps with backward)."""
        return pipeline_grad_sync(self.reducers) if self.reducers else None

    # ---- after the final backward ----

    def finish(self) -> None:
        """Run the whole sequence; afterwards ``grads_for_optimizer`` are the global-batch gradients."""
        dims, stats = self.dims, self.comm_stats
        if self.zero1_optimizer is None:
            for reducer in self.reducers:
                reducer.set_grad_sync(True)
                reducer.finish_grad_sync()
        sum_sequence_parallel(self.params, dims.tp_group, stats)
        sum_tied_embedding_copies(self.params, dims.embedding_group, stats)
        sum_replicated_rows(self.params, dims.tp, dims.kv_replica_group, stats)
        if self.zero1_optimizer is not None:
            self.zero1_optimizer.reduce_gradients()

    def grads_for_optimizer(self) -> list:
        """What the norm, clipping and unscaling act on: the parameters (fp32 weights), the
        ``GradShard`` of each 16-bit weight's fp32 main grad, or under ZeRO-1 this rank's
        ``GradShard`` slices of the dp-reduced gradient."""
        if self.zero1_optimizer is not None:
            return self.zero1_optimizer.grad_shards()
        grads = (_optimizer_grad(p) for p in self.params)
        return [g for g in grads if g is not None]

    @property
    def norm_dp_group(self):
        """The group over which the grad norm also sums: dp under ZeRO-1 (each rank holds a different
        slice), else None (every dp rank holds the same gradient)."""
        return self.dims.dp_cp_group if self.zero1_optimizer is not None else None

    def zero_grad(self) -> None:
        """Clear the gradient buffers; fp32 gradients stay views into them."""
        if self.zero1_optimizer is not None:
            self.zero1_optimizer.zero_grad()
        else:
            for reducer in self.reducers:
                reducer.zero_grad()


def _optimizer_grad(param):
    """The parameter itself when ``param.grad`` is what the optimizer reads (fp32), the fp32 main
    grad of a 16-bit weight as a ``GradShard``, or None without a gradient."""
    main_grad = getattr(param, "main_grad", None)
    if main_grad is not None and main_grad.dtype != param.dtype:
        return GradShard(main_grad, layout_of(param), param)
    return param if param.grad is not None else None


def _grad_of(param) -> torch.Tensor | None:
    """The gradient the optimizer reads: the main-grad view when a reducer holds the parameter."""
    main_grad = getattr(param, "main_grad", None)
    return param.grad if main_grad is None else main_grad


def sum_sequence_parallel(params, tp_group, comm_stats: CommStats | None = None) -> None:
    """Sum over tp the gradients of parameters used on sequence shards (each rank saw only its tokens)
    and of per-head norm weights (each rank saw only its heads)."""
    grads = [_grad_of(p) for p in params if _grad_of(p) is not None and layout_of(p).summed_over_tp]
    all_reduce_flat(grads, tp_group, comm_stats, "tp")


def sum_tied_embedding_copies(params, embedding_group, comm_stats: CommStats | None = None) -> None:
    """Sum the gradients of the tied word embedding's two copies (first and last stage), so both take
    the same step. ``embedding_group`` is None when one rank holds the only copy (pp = 1)."""
    if embedding_group is None:
        return
    copies = [p for p in params if layout_of(p).tied_embedding]
    for param in copies:
        if _grad_of(param) is None:  # this copy took no part in the loss: it contributes zeros
            param.grad = torch.zeros_like(param)
    all_reduce_flat([_grad_of(p) for p in copies], embedding_group, comm_stats, "embedding")


def sum_replicated_rows(params, tp: int, replica_group, comm_stats: CommStats | None = None) -> None:
    """Sum the gradients of the replicated rows over the tp ranks sharing them (``replica_group``,
    one set of consecutive tp ranks): each rank's copy only saw its own query heads' use of the rows."""
    params = [p for p in params if _grad_of(p) is not None and layout_of(p).tp_replicas(tp) > 1]
    if not params:
        return
    counts = {layout_of(p).tp_replicas(tp) for p in params}
    if len(counts) > 1:
        raise ValueError(f"parameters are replicated over different numbers of ranks {sorted(counts)}")
    replicas = counts.pop()
    if group_size(replica_group) != replicas:
        raise ValueError(
            f"parameters hold copies on {replicas} tensor-parallel ranks but the replica group has "
            f"{group_size(replica_group)}; build the dims with ParallelDims.initialize, which creates the "
            f"replica groups"
        )
    all_reduce_flat([layout_of(p).replicated_part(_grad_of(p)) for p in params], replica_group, comm_stats, "tp")
