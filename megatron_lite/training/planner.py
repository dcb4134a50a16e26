"""Memory planner: what each (tp, pp) rank holds while training a config, before anything starts.

``python -m megatron_lite plan --config FILE [overrides] [--world-size N] [--gpu-memory 80GB] [--json]``

Parameters come from the model itself, built on the meta device for each (tp rank, pp rank), so
the counts follow every structural field and every sharding rule exactly. Bytes follow from them.
N is the rank's parameter count, P its number of parameter tensors, w the 16-bit or 32-bit weight
size (2 for bf16/fp16, 4 for fp32). Under ZeRO-1 each chunk's parameters are split into gradient
buckets of ``parallel.bucket_size_mb`` exactly as training splits them, each bucket padded to a
multiple of G = dp x cp; Np is their padded sum and S = Np / G this rank's slices:

    weights     = N * w                        (ZeRO-1: Np * w, the parameters are views into the buckets)
    gradients   = N * 4                        fp32 main-grad buffers, also for 16-bit weights (ZeRO-1: Np * 4)
    optimizer   = N * 8 + P * 4                fp32: Adam's two moments + a step counter per tensor
                = N * (4 + 8) + P * 4          bf16/fp16: fp32 main params + the two moments
                = S * (4 + 8 + 4)              ZeRO-1: fp32 master slices, the moments, the reduced-grad
                                               slices (at G = 1 the gradient buffer is the slice: S * 12)
    activations = per micro-batch x in flight (below) + one layer's full set under recompute=full
    communication = 2 * b * s_r * h * a        pp > 1: the activation and gradient receive buffers
                  + 2 * b*s*cp*nkv*hd*a        cp > 1: one layer's all-gathered K and V (and in backward
                                               the dK, dV it reduce-scatters), over the whole sequence
                  + S * w                      ZeRO-1 with 16-bit weights and G > 1: the updated slices cast
                                               for the all-gather, in flight until the next forward
                                               (fp32 gathers the master slice itself; gradients are reduced
                                               in place in their buckets)
    total       = the sum

Activations per micro-batch (b micro-batch, s the positions of the sequence a rank holds, its
length / cp, s_r = s / tp under sequence parallelism else s, h hidden, nh / nkv local query /
kv heads, hd head dim, f = ffn / tp, V vocabulary / tp, a = 2 bytes under bf16/fp16 else 4) are
the tensors autograd keeps for backward, per layer:

    none       norm inputs 2 * b*s_r*h*a (+ their fp32 statistics), the linear inputs gathered over
               the sequence 2 * b*s*h*a, the qkv output b*s*(nh + 2 nkv)*hd*a, the rotated q and k
               b*s*(nh + nkv)*hd*a (RoPE), the attention output b*s*nh*hd*a and its fp32 log-sum-exp,
               the MLP's first output b*s*f*a (2f for SwiGLU) and activation output b*s*f*a (with
               torch's SwiGLU also silu(gate), b*s*f*a); where the attention keeps its probabilities
               (dropout on the CPU) the score-sized softmax, dropout mask and dropped probabilities
               b*nh*s*s*3a and the math path's scaled copies of q, k and v 3*b*s*nh*hd*a instead of
               q, k, v and the log-sum-exp; with dropout the residual masks (in the activation type
               on the CPU, one byte each on a GPU); torch's RMSNorm keeps its fp32 input (twice,
               cast apart, for 16-bit weights), rstd and normalised output (b*s_r*h*(4 + a),
               b*s_r*h*(8 + a) at 16 bits) instead of the input and statistics; under cp > 1 each
               layer also keeps its K and V all-gathered over the whole sequence, 2 * b*s*cp*nkv*hd*a,
               and the score-sized tensors cover each held chunk's queries against the keys before
               them, b*nh*L^2*(2cp + 1) with L = s / 2, in place of s*s
    selective  none without the MLP activation's output b*s*f*a (rebuilt from its input), and where
               the attention keeps its probabilities (torch's math path: dropout, planned for
               ``train.device=cpu``) with q, k, v in place of the core's own tensors (rerun, which
               gathers K and V again under cp); elsewhere the attention keeps q, k, v and its
               log-sum-exp and is not rerun
    full       the layer input b*s_r*h*a; the first ``train.recompute_layers`` layers of each chunk
               only, when set

plus the first chunk's token ids (and RoPE tables) and the last chunk's final norm, head input
and the loss's fp32 exponentials b*s*V*4 (the torch loss; the fused loss keeps the logits b*s*V*a
instead). In flight: the
pipeline schedule is replayed op by op (``parallel.pipeline.build_schedule``) and the peak sum of
the held micro-batch chunks taken; that is all micro-batches for afab, pp - pp_rank for 1F1B, and
for the interleaved schedule on stage 0 Megatron's L * act * (1 + (pp - 1) / (pp * vpp)).
Gradient accumulation at pp = 1 holds one micro-batch.

A layout the training run would refuse is refused here with the training run's message: the
grid and model checks of ``model.layout_check``, the batch split of ``step.validate_batch_layout``
and the refusals of ``train.compile`` (``setup.check_compile``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

from megatron_lite.config import RECOMPUTE_MODES, Config, ConfigError
from megatron_lite.model.gpt import flops_per_token, local_kv_heads
from megatron_lite.model.layout_check import kv_replicas_for, validate_layout
from megatron_lite.model.recompute import attention_keeps_probabilities
from megatron_lite.parallel.dims import ParallelDims, padded_vocab_size, rank_of
from megatron_lite.parallel.layout import layout_of
from megatron_lite.parallel.pipeline import build_schedule, chunk_layers
from megatron_lite.training.setup import check_compile
from megatron_lite.training.step import validate_batch_layout

GIB = 2**30
_UNITS = {"b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": GIB, "gib": GIB, "tb": 2**40,
          "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '141 GB', '512MB' -> bytes; GB and GiB both mean 2**30 (as nvidia-smi counts)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"--gpu-memory {text!r} is not a memory size; write a number and a unit, such as 80GB, 141GiB or 512MB"
        )
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if size <= 0:
        raise ConfigError(f"--gpu-memory {text!r} must be positive")
    return int(size)


def check_plannable(cfg: Config, world_size: int) -> ParallelDims:
    """The grid as rank 0 sees it, after the checks a training run makes at start-up."""
    if world_size < 1:
        raise ConfigError(f"--world-size must be positive, got {world_size}")
    if cfg.model.vocab_size <= 0:
        raise ConfigError(
            "the planner needs model.vocab_size (this config takes it from the tokenizer); pass "
            "model.vocab_size=N, for example 50257 for GPT-2 or 128256 for Llama 3"
        )
    validate_layout(cfg.parallel, cfg.model, world_size)
    dims = ParallelDims.for_world(cfg.parallel, world_size, kv_replicas=kv_replicas_for(cfg.model, cfg.parallel.tp))
    validate_batch_layout(cfg, dims)
    check_compile(cfg)
    return dims


# ----------------------------------------------------------------------------- parameters and state


@dataclass(frozen=True)
class RankParameters:
    """One rank's parameters: ``elements`` in ``tensors`` tensors, and the elements of each gradient
    bucket ZeRO-1 would build over them (``parallel.bucket_size_mb``, one reducer per chunk, the
    parameters summed over tp or the embedding group first in buckets of their own)."""

    elements: int
    tensors: int
    buckets: tuple[int, ...]


def _bucket_elements(shards: list[torch.Tensor], late: list[bool], bucket_size_mb: float) -> list[int]:
    """What ``GradReducer`` splits one chunk's parameters into (the same split function)."""
    from megatron_lite.parallel.data_parallel import _split_buckets

    limit = int(bucket_size_mb * 2**20)
    early = _split_buckets([t for t, is_late in zip(shards, late) if not is_late], limit)
    later = _split_buckets([t for t, is_late in zip(shards, late) if is_late], limit)
    return [sum(t.numel() for t in bucket) for bucket in early + later]


def _summed_before_data_parallel(param: torch.Tensor, tp: int) -> bool:
    """``parallel.grad_sync.summed_before_data_parallel`` for one parameter, without process groups: a
    marked tied-embedding copy is summed over the embedding group (which exists wherever it is marked)."""
    layout = layout_of(param)
    return (tp > 1 and layout.summed_over_tp) or layout.tied_embedding or layout.tp_replicas(tp) > 1


def stage_parameters(cfg: Config, dims: ParallelDims, pp_rank: int) -> list[RankParameters]:
    """The parameters each tp rank of stage ``pp_rank`` holds, tp rank order.

    The stage's chunks are built on the meta device without process groups, so every layer holds
    its full (tp = 1) tensor with its layout attached; each rank's shard is cut from it by the same
    ``ParamLayout.shard_tensor`` that training and checkpoints use."""
    from megatron_lite.training.setup import build_model_chunks

    # Shapes do not depend on the kernels; torch backends build anywhere.
    model = dataclasses.replace(cfg.model, attention_backend="torch", norm_backend="torch", loss_backend="torch",
                                elementwise_backend="torch")
    train = dataclasses.replace(cfg.train, compile=False)
    rank = rank_of(0, 0, pp_rank, dims.tp, dims.dp, 0, dims.cp)
    stage_dims = dataclasses.replace(dims, rank=rank, device=torch.device("meta"))
    chunks = build_model_chunks(dataclasses.replace(cfg, model=model, train=train), stage_dims)
    ranks = []
    for tp_rank in range(dims.tp):
        elements, tensors, buckets = 0, 0, []
        for chunk in chunks:
            params = list(chunk.parameters())
            shards = [layout_of(p).shard_tensor(p, tp_rank, dims.tp) for p in params]
            late = [_summed_before_data_parallel(p, dims.tp) for p in params]
            elements += sum(t.numel() for t in shards)
            tensors += len(params)
            buckets += _bucket_elements(shards, late, cfg.parallel.bucket_size_mb)
        ranks.append(RankParameters(elements, tensors, tuple(buckets)))
    return ranks


def weight_bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def zero1_group_size(dims: ParallelDims) -> int:
    """ZeRO-1 shards over the joint dp x cp group."""
    return dims.dp * dims.cp


def state_bytes(parameters: RankParameters, precision: str, zero1: bool, shards: int) -> dict[str, int]:
    """Weights, gradients, optimizer state and ZeRO-1's communication buffers of one rank (formulas in
    the module docstring); ``shards``: the ZeRO-1 group's size."""
    w = weight_bytes_per_element(precision)
    if not zero1:
        main_params = 0 if precision == "fp32" else 4
        return {"weights": parameters.elements * w, "gradients": parameters.elements * 4,
                "optimizer": parameters.elements * (main_params + 8) + parameters.tensors * 4, "communication": 0}
    padded = sum(math.ceil(b / shards) * shards for b in parameters.buckets)
    owned = padded // shards  # this rank's slice of every bucket
    reduced = owned * 4 if shards > 1 else 0  # at one shard the gradient buffer is the slice
    gather = owned * w if shards > 1 and w != 4 else 0  # fp32 all-gathers the master slice itself
    return {"weights": padded * w, "gradients": padded * 4, "optimizer": owned * (4 + 8) + reduced,
            "communication": gather}


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Shape:
    """What a micro-batch's activations depend on, on one rank."""

    batch: int
    seq: int
    tp: int
    sequence_parallel: bool
    act: int  # bytes per activation element
    cp: int = 1  # context parallel ranks the sequence is split over

    @property
    def local_seq(self) -> int:
        """Positions of the sequence this rank holds: its two chunks under context parallelism."""
        return self.seq // self.cp

    @property
    def tokens(self) -> int:
        return self.batch * self.local_seq

    @property
    def residual_tokens(self) -> int:
        """Tokens of the residual stream this rank holds: a sequence shard under sequence parallelism."""
        return self.tokens // self.tp if self.sequence_parallel else self.tokens


def _norm_bytes(cfg: Config, shape: Shape) -> int:
    """What one norm keeps for backward: torch's RMSNorm its fp32 input (two casts of a 16-bit input,
    the fp32 input itself), its fp32 rstd and normalised output, else the input and fp32 statistics
    (mean and rstd for LayerNorm, rstd for RMSNorm)."""
    model, local = cfg.model, shape.residual_tokens
    if model.norm == "rmsnorm" and model.norm_backend == "torch":
        fp32_inputs = 1 if shape.act == 4 else 2
        return local * model.hidden_size * (4 * fp32_inputs + shape.act) + local * 4
    stats = 2 if model.norm == "layernorm" else 1
    return local * model.hidden_size * shape.act + local * 4 * stats


def planned_device(cfg: Config) -> str:
    """The device the plan is for: the CPU when the config trains there, else a GPU."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def _keeps_probabilities(cfg: Config) -> bool:
    return attention_keeps_probabilities(cfg.model.attention_backend, cfg.model.dropout, planned_device(cfg))


def _dropout_mask_bytes(cfg: Config, shape: Shape) -> int:
    """Bytes per element of a dropout's saved mask: a bool on a GPU (torch's fused dropout), the
    activation's own type on the CPU (dropout multiplies by a noise tensor there)."""
    return 1 if planned_device(cfg) == "cuda" else shape.act


def _attention_input_bytes(cfg: Config, shape: Shape) -> int:
    """q, k and v as the attention core receives them: the qkv output (v is a view of it) and
    RoPE's rotated q and k."""
    model, tokens, a = cfg.model, shape.tokens, shape.act
    q_width = model.num_heads // shape.tp * model.head_dim
    kv_width = local_kv_heads(model, shape.tp) * model.head_dim
    inputs = tokens * (q_width + 2 * kv_width) * a
    if model.position_embedding == "rope":
        inputs += tokens * (q_width + kv_width) * a
    return inputs


def _attention_core_bytes(cfg: Config, shape: Shape) -> int:
    """What the attention core keeps besides its output. A fused attention: its inputs (counted by
    ``_attention_input_bytes``) and the fp32 log-sum-exp. Where it keeps its probabilities (torch's
    math path: dropout off a GPU) it keeps its own scaled, head-widened copies of q, k and v instead
    of the inputs (so their storages are freed), the score-sized softmax, dropout mask (in the
    activation type) and dropped probabilities."""
    heads = cfg.model.num_heads // shape.tp
    if _keeps_probabilities(cfg):
        copies = 3 * shape.tokens * heads * cfg.model.head_dim * shape.act
        core = shape.batch * heads * _score_pairs(shape) * 3 * shape.act + copies - _attention_input_bytes(cfg, shape)
    else:
        core = shape.tokens * heads * 4
    if shape.cp > 1:
        core += _gathered_kv_bytes(cfg, shape)
    return core


def _mlp_activation_bytes(cfg: Config, shape: Shape) -> int:
    """The MLP activation's output (gelu(h), or silu(gate) * up), the input of the output projection."""
    return shape.tokens * (cfg.model.ffn_hidden_size // shape.tp) * shape.act


def selective_savings(cfg: Config, shape: Shape) -> int:
    """What ``selective`` drops per layer: the MLP activation's output, and where the attention keeps
    its probabilities the core's own tensors (the rerun keeps its inputs; elsewhere the core is not
    rerun)."""
    core = _attention_core_bytes(cfg, shape) if _keeps_probabilities(cfg) else 0
    return _mlp_activation_bytes(cfg, shape) + core


def _score_pairs(shape: Shape) -> int:
    """(query, key) pairs of one head's score matrix: under cp each held chunk c of L queries
    scores the (c + 1) L keys up to it, and the chunks i and 2 cp - 1 - i add up to 2 cp + 1."""
    if shape.cp == 1:
        return shape.seq * shape.seq
    chunk = shape.seq // (2 * shape.cp)
    return chunk * chunk * (2 * shape.cp + 1)


def _gathered_kv_bytes(cfg: Config, shape: Shape) -> int:
    """One layer's K and V all-gathered over the cp group: the whole sequence, this rank's kv heads."""
    kv_width = local_kv_heads(cfg.model, shape.tp) * cfg.model.head_dim
    return 2 * shape.batch * shape.seq * kv_width * shape.act


def layer_activation_bytes(cfg: Config, shape: Shape, mode: str) -> int:
    """Bytes one transformer layer keeps for backward per micro-batch under recompute ``mode``."""
    model, a, tokens = cfg.model, shape.act, shape.tokens
    hidden = model.hidden_size
    if mode == "full":
        return shape.residual_tokens * hidden * a
    q_width = model.num_heads // shape.tp * model.head_dim
    ffn = model.ffn_hidden_size // shape.tp
    total = 2 * _norm_bytes(cfg, shape) + 2 * tokens * hidden * a  # norms; qkv and fc inputs
    total += _attention_input_bytes(cfg, shape) + _attention_core_bytes(cfg, shape)
    total += tokens * q_width * a  # attention output, the projection's input
    if model.activation == "swiglu":
        # [gate; up] and the product; torch's SwiGLU keeps silu(gate) too, the fused kernel recomputes it
        kept = 2 if model.elementwise_backend == "torch" else 1
        total += tokens * 2 * ffn * a + kept * tokens * ffn * a
    else:
        total += 2 * tokens * ffn * a  # fc output, gelu output
    if model.dropout > 0:
        total += 2 * shape.residual_tokens * hidden * _dropout_mask_bytes(cfg, shape)  # the residual dropouts
    if mode == "selective":
        total -= selective_savings(cfg, shape)
    return total


def _first_chunk_bytes(cfg: Config, shape: Shape) -> int:
    """Token ids for the embedding's backward (and position ids for a learned table), RoPE's cos and
    sin tables (fp32), the embedding dropout's mask."""
    extra = shape.tokens * 8
    if cfg.model.position_embedding == "learned":
        extra += shape.local_seq * 8
    else:
        extra += 2 * shape.tokens * cfg.model.head_dim * 4
    if cfg.model.dropout > 0:
        extra += shape.residual_tokens * cfg.model.hidden_size * _dropout_mask_bytes(cfg, shape)
    return extra


def _last_chunk_bytes(cfg: Config, shape: Shape) -> int:
    """Final norm, the head's gathered input, and what the loss keeps: the torch loss its fp32
    exponentials (not the logits), row sums, local labels and masks; the fused loss the logits,
    labels and log-sum-exp."""
    vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, shape.tp) // shape.tp
    head = _norm_bytes(cfg, shape) + shape.tokens * cfg.model.hidden_size * shape.act
    if cfg.model.loss_backend == "torch":
        return head + shape.tokens * vocab * 4 + shape.tokens * (4 + 8 + 2)
    return head + shape.tokens * vocab * shape.act + shape.tokens * (8 + 4)


def layer_modes(cfg: Config, num_layers: int, mode: str) -> list[str]:
    """The recompute mode of each layer of a chunk: ``train.recompute_layers`` limits full to the first N."""
    if mode != "full" or cfg.train.recompute_layers is None:
        return [mode] * num_layers
    limit = min(cfg.train.recompute_layers, num_layers)
    return ["full"] * limit + ["none"] * (num_layers - limit)


def chunk_activation_bytes(cfg: Config, dims: ParallelDims, shape: Shape, pp_rank: int, chunk: int,
                           mode: str) -> int:
    """Bytes one micro-batch leaves for backward in chunk ``chunk`` of stage ``pp_rank``."""
    layers = len(chunk_layers(cfg.model.num_layers, dims, pp_rank, chunk))
    total = sum(layer_activation_bytes(cfg, shape, m) for m in layer_modes(cfg, layers, mode))
    if pp_rank == 0 and chunk == 0:
        total += _first_chunk_bytes(cfg, shape)
    if pp_rank == dims.pp - 1 and chunk == dims.virtual_pp - 1:
        total += _last_chunk_bytes(cfg, shape)
    return total


def in_flight_peak(cfg: Config, dims: ParallelDims, pp_rank: int, num_micro_batches: int,
                   per_chunk: list[int]) -> tuple[int, int]:
    """(peak bytes, most micro-batch chunks held at once) replaying this stage's pipeline schedule."""
    if dims.pp == 1:
        return sum(per_chunk), 1
    held: set[tuple[int, int]] = set()
    peak = most = 0
    for op, micro_batch, chunk in build_schedule(cfg.parallel.pipeline_schedule, num_micro_batches, dims.pp,
                                                 pp_rank, dims.virtual_pp):
        if op == "F":
            held.add((micro_batch, chunk))
        else:
            held.discard((micro_batch, chunk))
        most = max(most, len(held))
        peak = max(peak, sum(per_chunk[c] for _, c in held))
    return peak, most


def activation_shape(cfg: Config, dims: ParallelDims, sequence_parallel: bool | None = None) -> Shape:
    sp = dims.sequence_parallel if sequence_parallel is None else sequence_parallel and dims.tp > 1
    return Shape(cfg.train.micro_batch_size, cfg.model.seq_length, dims.tp, sp,
                 weight_bytes_per_element(cfg.train.precision), dims.cp)


# ----------------------------------------------------------------------------- the plan


@dataclass
class RankMemory:
    rank: int
    tp_rank: int
    pp_rank: int
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations_per_micro_batch: int  # all of this rank's chunks, one micro-batch each
    in_flight: int  # micro-batch chunks held at the peak
    activations: int  # peak, with the recompute working set
    communication: int
    by_mode: dict[str, int] = field(default_factory=dict)  # "<mode>, sp on|off" -> bytes per micro-batch

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.communication

    def to_json(self) -> dict:
        return {
            "rank": self.rank, "tp_rank": self.tp_rank, "pp_rank": self.pp_rank, "parameters": self.parameters,
            "bytes": {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                      "activations": self.activations, "communication": self.communication, "total": self.total},
            "activations_per_micro_batch": self.activations_per_micro_batch,
            "in_flight_micro_batches": self.in_flight,
            "activations_per_micro_batch_by_mode": self.by_mode,
        }


@dataclass
class Plan:
    config: Config
    world_size: int
    dp: int
    num_micro_batches: int
    ranks: list[RankMemory]

    @property
    def peak(self) -> int:
        return max(r.total for r in self.ranks)


def _rank_activations(cfg: Config, dims: ParallelDims, pp_rank: int, num_micro_batches: int,
                      shape: Shape, mode: str) -> tuple[int, int, int]:
    """(per micro-batch, peak with the recompute working set, chunks in flight) on stage ``pp_rank``."""
    per_chunk = [chunk_activation_bytes(cfg, dims, shape, pp_rank, c, mode) for c in range(dims.virtual_pp)]
    peak, most = in_flight_peak(cfg, dims, pp_rank, num_micro_batches, per_chunk)
    if mode == "full":  # backward rebuilds one layer's whole set at a time
        peak += layer_activation_bytes(cfg, shape, "none")
    return sum(per_chunk), peak, most


def _pipeline_buffer_bytes(cfg: Config, dims: ParallelDims, shape: Shape) -> int:
    """The pipeline's receive buffers, and under cp one layer's all-gathered K and V."""
    total = 0
    if dims.pp > 1:
        total += 2 * shape.residual_tokens * cfg.model.hidden_size * shape.act
    if dims.cp > 1:
        total += _gathered_kv_bytes(cfg, shape)
    return total


def plan_memory(cfg: Config, world_size: int, parameter_cache: dict | None = None) -> Plan:
    """Every (tp, pp) rank's memory for ``cfg`` on ``world_size`` ranks (ranks of one tp x pp
    position hold the same on every dp replica). ``parameter_cache``: stage parameter counts kept
    across calls that vary only the layout (the layout search)."""
    dims = check_plannable(cfg, world_size)
    num_micro_batches = validate_batch_layout(cfg, dims)
    shape = activation_shape(cfg, dims)
    ranks = []
    for pp_rank in range(dims.pp):
        key = (dims.tp, dims.pp, dims.virtual_pp, pp_rank)
        if parameter_cache is None or key not in parameter_cache:
            counts = stage_parameters(cfg, dims, pp_rank)
            if parameter_cache is None:
                parameter_cache = {}
            parameter_cache[key] = counts
        for tp_rank, parameters in enumerate(parameter_cache[key]):
            state = state_bytes(parameters, cfg.train.precision, cfg.parallel.zero1, zero1_group_size(dims))
            per_mb, peak, most = _rank_activations(cfg, dims, pp_rank, num_micro_batches, shape, cfg.train.recompute)
            by_mode = {}
            for sp in ((False, True) if dims.tp > 1 else (False,)):
                mode_shape = activation_shape(cfg, dims, sp)
                for mode in RECOMPUTE_MODES:
                    by_mode[f"{mode}, sp {'on' if sp else 'off'}"] = sum(
                        chunk_activation_bytes(cfg, dims, mode_shape, pp_rank, c, mode) for c in range(dims.virtual_pp))
            communication = _pipeline_buffer_bytes(cfg, dims, shape) + state["communication"]
            ranks.append(RankMemory(rank_of(tp_rank, 0, pp_rank, dims.tp, dims.dp, 0, dims.cp), tp_rank, pp_rank,
                                    parameters.elements, state["weights"], state["gradients"], state["optimizer"],
                                    per_mb, most, peak, communication, by_mode))
    return Plan(cfg, world_size, dims.dp, num_micro_batches, ranks)


# ----------------------------------------------------------------------------- layouts that fit


@dataclass(frozen=True)
class CostModel:
    """A rough step time, enough to order layouts: compute at a fixed fraction of the peak, the
    pipeline bubble, and tensor- and data-parallel traffic over their links, nothing overlapped."""

    peak_tflops: float = 989.0  # dense bf16 of an H100/H200
    efficiency: float = 0.5  # fraction of the peak the matmuls reach
    tp_bandwidth_gbs: float = 450.0  # per direction, NVLink
    dp_bandwidth_gbs: float = 50.0  # per GPU, between nodes

    def describe(self) -> str:
        return (
            f"step time = FLOPs x recompute factor / (world x {self.peak_tflops:g} TFLOP/s x {self.efficiency:g})"
            f" x (1 + (pp - 1) / (micro-batches x virtual_pp)) + tp traffic / {self.tp_bandwidth_gbs:g} GB/s"
            f" + dp traffic / {self.dp_bandwidth_gbs:g} GB/s; recompute factor: full adds the recomputed layers'"
            f" forward (a third of their FLOPs), selective the attention scores' forward where the attention keeps its"
            f" probabilities (dropout on the CPU; elsewhere only the MLP activation, an elementwise op); tp traffic: 4 all-reduce"
            f" volumes of b*s*h per layer and micro-batch (6 under full recompute), 2(tp-1)/tp each; dp traffic:"
            f" 2(dp-1)/dp x the fp32 gradients"
        )

    def step_seconds(self, cfg: Config, dims: ParallelDims, num_micro_batches: int, parameters: int) -> float:
        model, shape = cfg.model, activation_shape(cfg, dims)
        tokens = cfg.train.global_batch_size * model.seq_length
        per_token = flops_per_token(model, model.seq_length)
        layer_flops = per_token - 6.0 * padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, 1) \
            * model.hidden_size
        recomputed = _recomputed_fraction(cfg, dims)
        rerun_core = 4.0 * model.num_layers * model.hidden_size * model.seq_length if _keeps_probabilities(cfg) else 0.0
        extra = {"none": 0.0, "selective": rerun_core, "full": layer_flops / 3 * recomputed}[cfg.train.recompute]
        compute = tokens * (per_token + extra) / (dims.world_size * self.peak_tflops * 1e12 * self.efficiency)
        compute *= 1 + (dims.pp - 1) / (num_micro_batches * dims.virtual_pp)
        collectives = 4 + (2 * recomputed if cfg.train.recompute == "full" else 0)
        layers_here = model.num_layers / dims.pp
        tp_bytes = layers_here * num_micro_batches * collectives * shape.tokens * model.hidden_size * shape.act
        tp_time = tp_bytes * 2 * (dims.tp - 1) / dims.tp / (self.tp_bandwidth_gbs * 1e9)
        dp_time = 2 * (dims.dp - 1) / dims.dp * parameters * 4 / (self.dp_bandwidth_gbs * 1e9)
        return compute + tp_time + dp_time


def _recomputed_fraction(cfg: Config, dims: ParallelDims) -> float:
    if cfg.train.recompute != "full":
        return 0.0
    per_chunk = cfg.model.num_layers / (dims.pp * dims.virtual_pp)
    if cfg.train.recompute_layers is None:
        return 1.0
    return min(cfg.train.recompute_layers, per_chunk) / per_chunk


@dataclass
class Candidate:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str
    sequence_parallel: bool
    peak_bytes: int
    step_seconds: float
    tokens_per_s: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(cfg: Config, world_size: int):
    """Every (tp, pp, micro-batch, recompute) variation of ``cfg`` on ``world_size`` ranks, sequence
    parallelism on wherever tp > 1 (it only removes memory); other settings, cp included, as configured."""
    cp = cfg.parallel.cp
    for tp in _divisors(world_size // cp) if world_size % cp == 0 else []:
        for pp in _divisors(world_size // (tp * cp)):
            dp = world_size // (tp * pp * cp)
            per_replica = cfg.train.global_batch_size // dp if cfg.train.global_batch_size % dp == 0 else 0
            for micro_batch in [m for m in _divisors(per_replica)] if per_replica else []:
                for recompute in RECOMPUTE_MODES:
                    parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp, sequence_parallel=tp > 1,
                                                   stage_layers=None)
                    train = dataclasses.replace(cfg.train, micro_batch_size=micro_batch, recompute=recompute)
                    yield dataclasses.replace(cfg, parallel=parallel, train=train)


def fitting_layouts(cfg: Config, world_size: int, gpu_bytes: int, cost: CostModel) -> list[Candidate]:
    """Layouts whose busiest rank fits ``gpu_bytes``, fastest first; layouts training would refuse are skipped."""
    fits, parameter_cache = [], {}
    for candidate in candidate_configs(cfg, world_size):
        try:
            plan = plan_memory(candidate, world_size, parameter_cache)
        except ConfigError:
            continue
        if plan.peak > gpu_bytes:
            continue
        dims = check_plannable(candidate, world_size)
        parameters = max(r.parameters for r in plan.ranks)
        seconds = cost.step_seconds(candidate, dims, plan.num_micro_batches, parameters)
        tokens = candidate.train.global_batch_size * candidate.model.seq_length
        fits.append(Candidate(dims.tp, dims.pp, dims.dp, candidate.train.micro_batch_size, candidate.train.recompute,
                              dims.sequence_parallel, plan.peak, seconds, tokens / seconds))
    return sorted(fits, key=lambda c: (c.step_seconds, c.peak_bytes))


# ----------------------------------------------------------------------------- output


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


FORMULAS = __doc__[__doc__.index("Parameters come"):__doc__.index("A layout the training")].strip()


def format_plan(plan: Plan) -> str:
    cfg = plan.config
    p, t = cfg.parallel, cfg.train
    lines = [
        f"layout: tp={p.tp} cp={p.cp} pp={p.pp} dp={plan.dp} virtual_pp={p.virtual_pp} schedule={p.pipeline_schedule} "
        f"sequence_parallel={p.sequence_parallel and p.tp > 1} zero1={p.zero1} precision={t.precision} "
        f"recompute={t.recompute}" + (f" (first {t.recompute_layers} layers)" if t.recompute_layers else ""),
        f"micro-batch {t.micro_batch_size} x {plan.num_micro_batches} per step on each of {plan.dp} dp ranks, "
        f"seq {cfg.model.seq_length}" + (f" ({cfg.model.seq_length // p.cp} per cp rank)" if p.cp > 1 else "")
        + f"; bucket {p.bucket_size_mb:g} MB",
        "",
        "rank tp pp  parameters  weights  grads  optimizer  act/mb  in-flight  activations  comm  total  (GiB)",
    ]
    for r in plan.ranks:
        lines.append(
            f"{r.rank:4d} {r.tp_rank:2d} {r.pp_rank:2d} {r.parameters:11,d} {_gib(r.weights):>8} {_gib(r.gradients):>6} "
            f"{_gib(r.optimizer):>10} {_gib(r.activations_per_micro_batch):>7} {r.in_flight:10d} "
            f"{_gib(r.activations):>12} {_gib(r.communication):>5} {_gib(r.total):>6}"
        )
    lines += ["", "activations per micro-batch (GiB) by recompute mode and sequence parallelism:"]
    for r in plan.ranks:
        modes = "  ".join(f"{key}: {_gib(value)}" for key, value in r.by_mode.items())
        lines.append(f"  rank {r.rank}: {modes}")
    lines += ["", "formulas:", FORMULAS]
    return "\n".join(lines)


def format_fits(fits: list[Candidate], gpu_bytes: int, world_size: int, cost: CostModel, top: int) -> str:
    lines = [f"layouts that fit {_gib(gpu_bytes)} GiB per GPU on {world_size} GPUs, fastest first "
             f"({len(fits)} fit; cost model: {cost.describe()}):"]
    if not fits:
        lines.append("  none: use more GPUs, a smaller micro-batch or model, or recompute")
    lines.append("   tp  pp  dp  micro-batch  recompute   sp   peak GiB  step s   tokens/s")
    for c in fits[:top]:
        lines.append(f"  {c.tp:3d} {c.pp:3d} {c.dp:3d} {c.micro_batch_size:12d}  {c.recompute:<10} "
                     f"{'on' if c.sequence_parallel else 'off':>3} {_gib(c.peak_bytes):>10} {c.step_seconds:7.3f} "
                     f"{c.tokens_per_s:10,.0f}")
    return "\n".join(lines)


def plan_json(plan: Plan, fits: list[Candidate] | None = None, cost: CostModel | None = None) -> dict:
    cfg = plan.config
    out = {
        "per_rank": [r.to_json() for r in plan.ranks],
        "layout": {"tp": cfg.parallel.tp, "cp": cfg.parallel.cp, "pp": cfg.parallel.pp, "dp": plan.dp,
                   "virtual_pp": cfg.parallel.virtual_pp,
                   "micro_batch_size": cfg.train.micro_batch_size, "num_micro_batches": plan.num_micro_batches,
                   "recompute": cfg.train.recompute, "sequence_parallel": cfg.parallel.sequence_parallel and
                   cfg.parallel.tp > 1, "zero1": cfg.parallel.zero1, "precision": cfg.train.precision},
        "world_size": plan.world_size,
        "peak_bytes": plan.peak,
        "formulas": FORMULAS,
    }
    if fits is not None:
        out["fits"] = [c.to_json() for c in fits]
        out["cost_model"] = cost.describe()
    return out
