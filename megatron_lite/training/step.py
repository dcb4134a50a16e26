"""One parallel training step over a rank's model chunks, and the forward-only validation pass.

Every rank runs the same collectives in the same order:

1. forward and backward of each micro-batch: a plain loop at pp=1, the pipeline schedule
   (afab, 1F1B or interleaved 1F1B) at pp>1; the loss lives on the last stage;
2. the gradient path, ``parallel.grad_sync``: gradients averaged over dp (``GradReducer``
   buckets launched during each chunk's final micro-batch backward, or under ZeRO-1 a
   reduce-scatter onto each rank's slice), sequence-parallel parameters summed over tp, the
   two copies of a tied embedding summed, the copies of a kv head summed over the ranks that
   share it; why each is right and counted once is written there and in ``parallel.layout``;
3. the fp16 loss scale removed, the global gradient norm taken (each element counted once
   across tp, pp and, under ZeRO-1, dp) and clipped;
4. the optimizer step, skipped when the norm or the loss is not finite (the trainer then stops
   the run unless fp16 loss scaling explains it: ``training.divergence``).

The loss returned is the mean over the global batch, identical on every rank. The loss, the norm
and the skip decision stay on the device: a step waits for the device only where fp16's loss
scaler needs the overflow on the host, or where the optimizer cannot skip on the device (apex
FusedAdam, ``optim.fused=none``); the trainer reads the figures back on logging steps.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, NamedTuple, Sequence

import torch

from megatron_lite.config import Config, ConfigError, OptimConfig, ParallelConfig
from megatron_lite.parallel.collectives import all_reduce, sum_over_replicas
from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.data_parallel import Zero1AdamW
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.grad_norm import clip_grad_norm
from megatron_lite.parallel.grad_sync import GradSync, summed_before_data_parallel
from megatron_lite.parallel.pipeline import forward_backward as run_pipeline
from megatron_lite.training import optim
from megatron_lite.training.checkpoint.format import named_parameters

# (tokens (micro_batch_size, T), target): the first stage reads the tokens, the last stage's loss
# the target (the labels when pretraining; what an RLHF stage's loss needs otherwise).
MicroBatch = tuple[torch.Tensor, Any]
# loss_fn(chunk, inputs, target, num_micro_batches): the last stage's scalar loss for one
# micro-batch, already divided by the number of micro-batches (run under the model's forward context).
LossFn = Callable[[torch.nn.Module, torch.Tensor, Any, int], torch.Tensor]


class PackedTarget(NamedTuple):
    """The target of a micro-batch of packed documents: every stage's attention reads the
    documents and positions, the last stage's loss the labels."""

    labels: torch.Tensor  # (B, T)
    document_ids: torch.Tensor  # (B, T) int32, from 0 in each row
    position_ids: torch.Tensor  # (B, T), from 0 in each document


def chunk_inputs(target) -> dict:
    """What every model chunk takes from a micro-batch's target besides the tokens or hidden states."""
    if isinstance(target, PackedTarget):
        return {"document_ids": target.document_ids, "position_ids": target.position_ids}
    if isinstance(target, dict) and "document_ids" in target:  # packed fine-tuning records (rlhf.pack)
        return {"document_ids": target["document_ids"], "position_ids": target["position_ids"]}
    return {}


def language_model_loss(chunk, inputs: torch.Tensor, target: torch.Tensor | PackedTarget,
                        num_micro_batches: int) -> torch.Tensor:
    """Mean next-token cross entropy over every position of the micro-batch; ``target`` is the
    labels, or a ``PackedTarget`` holding them."""
    labels = target.labels if isinstance(target, PackedTarget) else target
    return chunk(inputs, labels=labels, **chunk_inputs(target)).float().mean() / num_micro_batches


def build_parallel_optimizer(chunks: Sequence[torch.nn.Module], optim_cfg: OptimConfig, parallel_cfg: ParallelConfig,
                             dims: ParallelDims) -> tuple[object, str]:
    """AdamW over this rank's parameters: sharded over dp with ``parallel.zero1`` (gradient buckets
    of ``parallel.bucket_size_mb``, one reducer per chunk), else torch's (or apex's), over fp32 main
    copies when the weights are 16-bit. Returns the optimizer and a short description for the
    start-up line."""
    named_params = named_parameters(chunks)
    if not parallel_cfg.zero1:
        if any(p.dtype != torch.float32 for _, p in named_params):
            optimizer = optim.MainParamsAdamW(named_params, optim_cfg, dims.device)
            return optimizer, optimizer.kind
        return optim.build_optimizer(named_params, optim_cfg, dims.device)
    zero = Zero1AdamW(
        optim.param_groups(named_params, optim_cfg.weight_decay), dims.dp_cp_group, lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps, param_names={p: n for n, p in named_params},
        bucket_size_mb=parallel_cfg.bucket_size_mb, param_chunks=[list(chunk.parameters()) for chunk in chunks],
        late_params=summed_before_data_parallel([p for _, p in named_params], dims),
    )
    return zero, (f"ZeRO-1 AdamW over dp={dims.dp}" + (f" x cp={dims.cp}" if dims.cp > 1 else "")
                  + f" (overlapped, {sum(len(r.buckets) for r in zero.reducers)} buckets)")


def validate_batch_layout(cfg: Config, dims: ParallelDims) -> int:
    """Gradient-accumulation steps per dp rank; the global batch must split over micro-batches
    x dp, and over a multiple of pp micro-batches when the schedule is interleaved."""
    per_step = cfg.train.micro_batch_size * dims.dp
    if cfg.train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {cfg.train.micro_batch_size} x {dims.dp} = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}"
        )
    count = cfg.train.global_batch_size // per_step
    if dims.virtual_pp > 1 and count % dims.pp != 0:
        raise ConfigError(
            f"the interleaved pipeline (parallel.virtual_pp={dims.virtual_pp}) needs the micro-batches per step "
            f"({cfg.train.global_batch_size} / ({cfg.train.micro_batch_size} x dp {dims.dp}) = {count}) to be a "
            f"multiple of parallel.pp={dims.pp}; raise train.global_batch_size to a multiple of {per_step * dims.pp} "
            f"or set parallel.virtual_pp=1"
        )
    return count


class ParallelStep:
    """Runs steps for one rank: owns its gradient path (``GradSync``) and knows the optimizer kind."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], optimizer, dims: ParallelDims,
                 schedule: str = "1f1b", bucket_size_mb: float = 25.0, loss_fn: LossFn = language_model_loss,
                 comm_stats: CommStats | None = None):
        """``comm_stats``: where every collective and send of a step records its bytes (benchmarks, tests)."""
        self.chunks, self.optimizer, self.dims, self.schedule = list(model_chunks), optimizer, dims, schedule
        self.loss_fn, self.comm_stats = loss_fn, comm_stats
        self.zero1 = isinstance(optimizer, Zero1AdamW)
        if self.zero1 and comm_stats is not None:  # ZeRO-1's reduce-scatter and all-gather run in the optimizer
            optimizer.comm_stats = comm_stats
        if self.zero1:  # each step's weight all-gathers overlap the next forward, bucket by bucket
            optimizer.install_param_gather_hooks(self.chunks)
        self.grad_sync = GradSync(self.chunks, dims, optimizer, bucket_size_mb, comm_stats)
        # Stages exchange activations in the weights' dtype: fp32, or the 16-bit type of a mixed-precision run.
        self.activation_dtype = next(self.chunks[0].parameters()).dtype

    # ------------------------------------------------------------------ forward and backward

    def forward_backward(self, micro_batches: Sequence[MicroBatch], autocast, loss_scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one global batch's local micro-batches, gradients reduced;
        returns the global-batch mean loss (an fp32 scalar on the device)."""
        if self.dims.pp > 1:
            losses = self._pipelined(micro_batches, autocast, loss_scale, forward_only=False)
        else:
            losses = self._accumulated(micro_batches, autocast, loss_scale)
        self.grad_sync.finish()
        return self._global_mean(losses)

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence[MicroBatch], autocast) -> float:
        """Forward only (through the pipeline at pp>1); the global-batch mean loss."""
        return self._global_mean(self.forward_outputs(micro_batches, autocast)).item()

    @torch.no_grad()
    def forward_outputs(self, micro_batches: Sequence[MicroBatch], autocast, loss_fn: LossFn | None = None) -> list[torch.Tensor]:
        """Forward only; what ``loss_fn`` (default: the training loss) returns for each
        micro-batch, on the last pipeline stage ([] on the others). Any shape is allowed, so
        an RLHF stage can read per-sample scores (log-probabilities, rewards) this way."""
        fn = loss_fn or self.loss_fn
        if self.dims.pp > 1:
            return self._pipelined(micro_batches, autocast, 1.0, forward_only=True, loss_fn=fn)
        return [self._loss(self.chunks[0], tokens, target, len(micro_batches), autocast, fn)
                for tokens, target in micro_batches]

    def _loss(self, chunk, tokens, target, num_micro_batches: int, autocast, loss_fn: LossFn | None = None) -> torch.Tensor:
        with autocast:
            return (loss_fn or self.loss_fn)(chunk, tokens, target, num_micro_batches)

    def _accumulated(self, micro_batches, autocast, loss_scale) -> list[torch.Tensor]:
        losses = []
        for index, (tokens, labels) in enumerate(micro_batches):
            final = index == len(micro_batches) - 1
            # Gradients stay local until the last micro-batch's backward.
            with contextlib.nullcontext() if final else self.grad_sync.no_sync():
                loss = self._loss(self.chunks[0], tokens, labels, len(micro_batches), autocast)
                (loss * loss_scale).backward()
            losses.append(loss.detach())
        return losses

    def _pipelined(self, micro_batches, autocast, loss_scale, forward_only: bool, loss_fn: LossFn | None = None) -> list[torch.Tensor]:
        dims, count = self.dims, len(micro_batches)

        def forward_step(chunk_index: int, hidden, micro_batch):
            tokens, target = micro_batch
            chunk = self.chunks[chunk_index]
            if chunk.post_process:
                inputs = tokens if chunk.pre_process else hidden
                return self._loss(chunk, inputs, target, count, autocast, loss_fn)
            with autocast:
                return chunk(tokens if chunk.pre_process else hidden, **chunk_inputs(target))

        batch, length = micro_batches[0][0].shape
        if dims.sequence_parallel:
            length //= dims.tp
        grad_sync = None if forward_only else self.grad_sync.pipeline_hook()
        return run_pipeline(
            self.chunks, micro_batches, forward_step, self.schedule, pp_group=dims.pp_group, pp_rank=dims.pp_rank,
            pp_size=dims.pp, tensor_shape=(batch, length, self.chunks[0].config.hidden_size), dtype=self.activation_dtype,
            device=dims.device, forward_only=forward_only, grad_sync=grad_sync, loss_scale=loss_scale,
            comm_stats=self.comm_stats,
        )

    def _global_mean(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """Sum of the last stage's micro-batch losses (already divided by their number), averaged over
        dp and cp: each cp rank's loss is the mean over its own tokens, T / cp of every sample, so the
        mean of the cp ranks' means is the sum of their token losses over all tokens. A scalar tensor,
        left on the device."""
        total = torch.zeros((), dtype=torch.float32, device=self.dims.device)
        if losses:
            total += torch.stack([loss.float() for loss in losses]).sum()
        total = all_reduce(sum_over_replicas(total, self.dims), self.dims.cp_group)
        return total / (self.dims.dp * self.dims.cp)

    # ------------------------------------------------------------------ the update

    def optimizer_step(self, scaler: optim.LossScaler, grad_clip: float,
                       loss_finite: torch.Tensor | bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip to the global norm, step; skip (and shrink the fp16 loss scale) when the
        norm or the global loss (``loss_finite``, a device bool or a Python one) is not finite.
        Returns (norm before clipping, skipped): scalar tensors on the device."""
        grads = self.grad_sync.grads_for_optimizer()
        optim.unscale_grads(grads, scaler.scale)
        norm = clip_grad_norm(grads, grad_clip, self.dims.tp_group, self.dims.pp_group, self.grad_sync.norm_dp_group,
                              self.comm_stats)
        skipped = ~(torch.isfinite(norm) & loss_finite)
        if scaler.dynamic:
            # fp16: the loss scale is host state, so the overflow is read back here, every step.
            found_inf = bool(skipped)
            if not found_inf:
                self.optimizer.step()
            scaler.update(found_inf=found_inf)
        else:
            step_unless(self.optimizer, skipped)
        self.zero_grad()
        return norm, skipped

    def zero_grad(self) -> None:
        self.grad_sync.zero_grad()

    def full_precision_weights(self) -> ContextManager:
        """A context in which the parameters hold the fp32 master weights, for a checkpoint's save or
        load; on leaving, the masters take what the parameters hold (a load) and 16-bit weights are
        cast from them. With fp32 weights and plain AdamW the parameters are the masters: nothing to do."""
        if hasattr(self.optimizer, "full_precision_weights"):
            return self.optimizer.full_precision_weights()
        return contextlib.nullcontext()

    def wait_for_params(self) -> None:
        """ZeRO-1 leaves each step's weight all-gathers in flight for the next forward; anything else
        that reads the weights waits for them first."""
        if self.zero1:
            self.optimizer.wait_for_params()


def step_unless(optimizer, skipped: torch.Tensor) -> None:
    """The optimizer step, left unapplied where ``skipped`` (a device bool) is set, without reading
    it back where the optimizer allows: torch's fused AdamW takes it as ``found_inf`` (its step
    counter does not advance either; also under the fp32 main params of 16-bit weights), ZeRO-1
    masks its update. Apex FusedAdam and the unfused torch AdamW (``optim.fused=none``) cannot, so
    the flag is read on the host there: one wait per step."""
    found_inf = skipped.float()
    if isinstance(optimizer, (Zero1AdamW, optim.MainParamsAdamW)):
        optimizer.step(found_inf=found_inf)
    else:
        optim.step_unless_found_inf(optimizer, found_inf)
