"""The GPT model on tensor-parallel layers; the structure comes from config fields.

``bias`` (linear biases), ``norm`` (layernorm | rmsnorm), ``activation`` (gelu | swiglu),
``position_embedding`` (learned | rope), ``tie_embeddings``, ``qkv_bias`` (Qwen2), ``qk_norm``
(Qwen3), ``head_dim`` and ``rope_scaling``: the gpt2, llama, mistral, qwen2 and qwen3 flavors are
presets of them (see ``config.FLAVOR_PRESETS``). Grouped-query attention: ``num_kv_heads``.

At tp = pp = dp = 1 every parallel layer is a plain Linear / Embedding, every collective is the
identity and every dropout is plain dropout. A pipeline stage is one ``GPT`` holding ``layer_range``
(global layer indices, so parameter names match across layouts), the embeddings if ``pre_process``
and the final norm and head if ``post_process``.

Shapes: B batch, T sequence, H hidden, nh / nkv query / kv heads on this rank, hd head dim,
V padded vocabulary. Under sequence parallelism the residual stream between blocks is the rank's
sequence shard (B, T/tp, H).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ConfigError, ModelConfig, RopeScaling
from megatron_lite.model import ops
from megatron_lite.model.heads import HEADS, ValueHead
from megatron_lite.model.init import init_parameters
from megatron_lite.model.layout_check import check_layout
from megatron_lite.model.recompute import RecomputePolicy, rebuilt_in_backward, recomputed
from megatron_lite.model.rope import inverse_frequencies
from megatron_lite.parallel.context_parallel import ContextParallel, local_positions
from megatron_lite.parallel.dims import ParallelDims, padded_vocab_size
from megatron_lite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
)
from megatron_lite.parallel.layout import ParamLayout, attach_layout, mark_tied_embedding
from megatron_lite.parallel.mappings import (
    gather_replicated_from_sequence_region,
    scatter_to_sequence_region,
)
from megatron_lite.parallel.random import ParallelDropout, RNGStatesTracker, model_parallel_rng_tracker

if TYPE_CHECKING:
    from megatron_lite.model.generation import KVCache


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight) through the backend switch."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool, device, group=None):
        super().__init__()
        self.kind, self.eps, self.backend = cfg.norm, cfg.norm_eps, cfg.norm_backend
        self.tp_group = group  # tp ranks run the same norms: one launch setting for the kernels
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=device))
        self.bias = None
        if self.kind == "layernorm":
            self.bias = nn.Parameter(torch.zeros(cfg.hidden_size, device=device))
        for p in self.parameters():
            # On a sequence shard each rank's gradient covers only its tokens: summed over tp.
            attach_layout(p, ParamLayout(sequence_parallel=sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return ops.layer_norm(x, self.weight, self.bias, self.eps, self.backend, tuning_group=self.tp_group)
        return ops.rms_norm(x, self.weight, self.eps, self.backend, tuning_group=self.tp_group)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, 1, hd) for rotary embedding, computed once per forward for every layer.
    ``scaling`` changes the inverse frequencies and (yarn) scales both tables by its attention factor."""
    inv_freq, attention_factor = inverse_frequencies(head_dim, theta, scaling, position_ids.device)  # (hd/2,)
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # (B, T, 1, hd)
    if attention_factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * attention_factor, angles.sin() * attention_factor


class HeadNorm(nn.Module):
    """RMSNorm over each head's hd features, one weight (hd,) shared by all heads (Qwen3's q/k norm).
    Every tp rank holds the whole weight but applies it to its own heads, so its gradient is partial."""

    def __init__(self, cfg: ModelConfig, dims: ParallelDims):
        super().__init__()
        self.eps, self.backend, self.tp_group = cfg.norm_eps, cfg.norm_backend, dims.tp_group
        self.weight = attach_layout(nn.Parameter(torch.ones(cfg.head_dim, device=dims.device)),
                                    ParamLayout(partial_over_tp=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, hd)
        return ops.rms_norm(x, self.weight, self.eps, self.backend, tuning_group=self.tp_group)


def local_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """kv heads a tp rank holds: a share of them, or one copy when tp exceeds their number."""
    return max(1, cfg.num_kv_heads // tp)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, layer_index: int, rng_tracker: RNGStatesTracker,
                 *, recompute_core: bool = False):
        """``recompute_core``: keep only q, k, v of the attention core and run it again in backward."""
        super().__init__()
        self.recompute_core = recompute_core
        self.layer_index, self.head_dim = layer_index, cfg.head_dim
        self.kv_heads = local_kv_heads(cfg, dims.tp)  # on this rank
        self.q_per_kv = cfg.num_heads // dims.tp // self.kv_heads  # on this rank
        self.attention_backend, self.rope_backend = cfg.attention_backend, cfg.elementwise_backend
        parallel = dict(group=dims.tp_group, sequence_parallel=dims.sequence_parallel, device=dims.device)
        # Full layout grouped per kv head, [q heads of group g, k_g, v_g] for each g, so a
        # contiguous split over tp hands each rank whole groups. With tp > num_kv_heads the
        # tp / num_kv_heads ranks of group g split its q heads and each keeps a copy of k_g, v_g.
        # The bias shares the weight's layout, so its k and v rows are copied the same way.
        qkv_size = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, bias=cfg.bias or cfg.qkv_bias, **parallel,
                                        partition_groups=cfg.num_kv_heads, replicated_rows=2 * cfg.head_dim)
        self.q_norm = HeadNorm(cfg, dims) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg, dims) if cfg.qk_norm else None
        self.proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.bias, **parallel)
        # Each tp rank holds different heads: their attention probabilities drop different elements.
        self.attention_dropout = ParallelDropout(cfg.dropout, rng_tracker, sharded=True)
        self.context_parallel = ContextParallel.of(dims)  # None at cp = 1

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, attention_mask=None, document_ids=None):
        qkv = self.qkv(x)  # (B, T, nkv * (q_per_kv + 2) * hd), full T even under sequence parallelism
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(B, T, self.kv_heads * self.q_per_kv, self.head_dim)  # (B, T, nh, hd)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]  # (B, T, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = ops.apply_rope(q, rope, self.rope_backend), ops.apply_rope(k, rope, self.rope_backend)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, S, nkv, hd), S = cached + T
        if self.recompute_core and torch.is_grad_enabled():
            y = recomputed(self._core, q, k, v, attention_mask, document_ids, rng_tracker=self.attention_dropout.tracker)
        else:
            y = self._core(q, k, v, attention_mask, document_ids)  # (B, T, nh, hd)
        return self.proj(y.reshape(B, T, -1))  # (B, T, H)

    def _core(self, q, k, v, attention_mask, document_ids=None):
        """softmax(q k^T) v with attention dropout: (B, T, nh, hd)."""
        dropout = self.attention_dropout
        with dropout.random_stream():
            return ops.attention(q, k, v, True, self.attention_backend, dropout.rate, attention_mask,
                                 context_parallel=self.context_parallel, document_ids=document_ids)  # (B, T, nh, hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, *, recompute_activation: bool = False):
        """``recompute_activation``: the output projection's backward rebuilds the activation's output
        from its input instead of keeping it."""
        super().__init__()
        self.recompute_activation = recompute_activation
        self.activation, self.backend = cfg.activation, cfg.elementwise_backend
        parallel = dict(bias=cfg.bias, group=dims.tp_group, sequence_parallel=dims.sequence_parallel,
                        device=dims.device)
        if cfg.activation == "swiglu":
            # [gate; up] fused; partition_chunks=2 keeps each rank's gate and up rows paired.
            self.fc = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, **parallel, partition_chunks=2)
        else:
            self.fc = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_hidden_size, **parallel)
        self.proj = RowParallelLinear(cfg.ffn_hidden_size, cfg.hidden_size, **parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, ffn/tp), or (B, T, 2 ffn/tp) for swiglu
        a = self._activation(h)  # (B, T, ffn/tp)
        if not (self.recompute_activation and torch.is_grad_enabled()):
            return self.proj(a)  # (B, T, H)
        # The activation's own backward keeps h: a is rebuilt from it rather than kept beside it.
        with rebuilt_in_backward(a, lambda: self._activation(h)):
            return self.proj(a)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)  # (B, T, ffn/tp) each
            return ops.swiglu(gate, up, self.backend)
        return F.gelu(h, approximate="tanh")


def residual_dropout(cfg: ModelConfig, dims: ParallelDims, rng_tracker: RNGStatesTracker) -> ParallelDropout:
    """Dropout on the residual stream: a sequence shard per tp rank under sequence parallelism, else whole."""
    return ParallelDropout(cfg.dropout, rng_tracker, sharded=dims.sequence_parallel)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, layer_index: int, rng_tracker: RNGStatesTracker,
                 *, recompute: RecomputePolicy = RecomputePolicy()):
        super().__init__()
        sp = dims.sequence_parallel
        self.attention_norm = Norm(cfg, sp, dims.device, group=dims.tp_group)
        self.attention = Attention(cfg, dims, layer_index, rng_tracker,
                                   recompute_core=recompute.recomputes_attention_core(cfg.attention_backend,
                                                                                      cfg.dropout, dims.device))
        self.mlp_norm = Norm(cfg, sp, dims.device, group=dims.tp_group)
        self.mlp = MLP(cfg, dims, recompute_activation=recompute.selective)
        self.dropout = residual_dropout(cfg, dims, rng_tracker)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, attention_mask=None, document_ids=None):
        # x: (B, T, H), or (B, T/tp, H) under sequence parallelism; rope: (cos, sin) or None
        x = x + self.dropout(self.attention(self.attention_norm(x), rope, kv_cache, attention_mask, document_ids))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, padded_vocab: int, rng_tracker: RNGStatesTracker):
        super().__init__()
        self.word = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, group=dims.tp_group, device=dims.device)
        self.position = None
        if cfg.position_embedding == "learned":
            # skip_init: init_parameters draws the values; nn.Embedding's own init would use the default generator.
            self.position = nn.utils.skip_init(nn.Embedding, cfg.seq_length, cfg.hidden_size, device=dims.device)
            attach_layout(self.position.weight, ParamLayout())
        self.dropout = residual_dropout(cfg, dims, rng_tracker)
        self.dims = dims

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word(ids)  # (B, T, H)
        if self.position is not None:
            x = x + self.position(position_ids)
        if self.dims.sequence_parallel:
            x = scatter_to_sequence_region(x, self.dims.tp_group)  # (B, T/tp, H)
        return self.dropout(x)


class GPT(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dims: ParallelDims | None = None,
        layer_range: range | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        seed: int = 1234,
        rng_tracker: RNGStatesTracker | None = None,
        head: str = "lm",
        recompute: RecomputePolicy = RecomputePolicy(),
    ):
        """``rng_tracker``: the dropout streams, shared by the chunks of a rank (virtual pipeline); None
        builds a new one from ``seed``. Construction leaves torch's default generator untouched.
        ``head``: "lm" (next-token logits over the vocabulary) or "value" (one scalar per position:
        the reward model's and the PPO critic's head, in place of the vocabulary head).
        ``recompute``: which activations backward rebuilds instead of keeping (``model/recompute.py``)."""
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not one of {', '.join(HEADS)}")
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be > 0 to build the model; set it from the tokenizer first")
        ops.check_backends(cfg)
        self.config, self.dims, self.head = cfg, dims or ParallelDims.single(), head
        check_layout(cfg, self.dims)
        dims = self.dims
        self.layer_range = range(cfg.num_layers) if layer_range is None else layer_range
        if self.layer_range and (self.layer_range.start < 0 or self.layer_range.stop > cfg.num_layers):
            raise ValueError(f"layer_range {self.layer_range} is outside the model's {cfg.num_layers} layers")
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, dims.tp)
        self.rng_tracker = rng_tracker or model_parallel_rng_tracker(seed, dims.tp_rank, dims.pp_rank, dims.device,
                                                                     cp_rank=dims.cp_rank)
        recompute.check_chunks([len(self.layer_range)])
        self.recompute = recompute

        self.embedding = Embedding(cfg, dims, self.padded_vocab_size, self.rng_tracker) if pre_process else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, dims, i, self.rng_tracker, recompute=recompute)
                                     for i in self.layer_range})
        self.final_norm = Norm(cfg, dims.sequence_parallel, dims.device, group=dims.tp_group) if post_process else None
        self.output = self.value_head = None
        if post_process and head == "value":
            self.value_head = ValueHead(cfg.hidden_size, dims.sequence_parallel, dims.device)
        elif post_process and not (cfg.tie_embeddings and pre_process):
            self.output = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, bias=False,
                                               group=dims.tp_group, sequence_parallel=dims.sequence_parallel,
                                               device=dims.device)
        for p in self.tied_embedding_params():
            mark_tied_embedding(p)
        init_parameters(self, seed)

    def _shares_embedding(self) -> bool:
        """First and last stage each hold a copy of the tied word embedding (pp > 1, lm head)."""
        return self.config.tie_embeddings and self.pre_process != self.post_process and self.head == "lm"

    def tied_embedding_params(self) -> list[nn.Parameter]:
        """The word-embedding copy this chunk holds when first and last stage each hold one (pp > 1)."""
        if not self._shares_embedding():
            return []
        return [self.embedding.word.weight] if self.pre_process else [self.output.weight]

    def forward(self, inputs, labels=None, position_ids=None, *, kv_cache: KVCache | None = None, attention_mask=None,
                document_ids=None):
        """Token ids (B, T) on the first stage, hidden states after. Returns hidden states (B, T, H) before
        the last stage; there, per-token losses (B, T) given ``labels``, else logits (B, T, V/tp), or the
        value head's (B, T) values. ``document_ids`` (B, T): a packed sample's documents, each run of
        equal consecutive ids one document attending only within itself (pass ``position_ids``
        restarting at each one)."""
        full_length = self._full_length(inputs)
        if document_ids is not None:
            _check_document_ids(document_ids, inputs.shape[0], full_length, kv_cache, attention_mask)
        start = kv_cache.length if kv_cache is not None else 0
        if self.dims.cp > 1 and kv_cache is not None:
            raise ConfigError("generation (a KV cache) does not run under context parallelism; set parallel.cp=1")
        if position_ids is None and self.dims.cp > 1:  # this cp rank's two chunks of the sequence
            position_ids = local_positions(full_length, self.dims.cp_rank, self.dims.cp, inputs.device)
            position_ids = position_ids.expand(inputs.shape[0], -1)
        if position_ids is None:
            position_ids = torch.arange(start, start + full_length, device=inputs.device).expand(inputs.shape[0], -1)
        if kv_cache is not None and attention_mask is None:
            attention_mask = kv_cache.causal_mask(full_length, inputs.device)  # (1, 1, T, S)
        x = self.embedding(inputs, position_ids) if self.pre_process else inputs  # (B, T, H)
        rope = None
        if self.config.position_embedding == "rope":
            rope = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        for position, block in enumerate(self.layers.values()):
            x = self._run_block(position, block, x, rope, kv_cache, attention_mask, document_ids)
        if kv_cache is not None:  # one cache per chunk: this chunk's layers have stored these positions
            kv_cache.length += full_length
        if not self.post_process:
            return x
        if self.value_head is not None:
            return self._values(self.final_norm(x))  # labels are not used
        logits = self.logits(self.final_norm(x))  # (B, T, V/tp)
        if labels is None:
            return logits
        return ops.cross_entropy(logits, labels, self.config.vocab_size, self.dims.tp_group, self.config.loss_backend)

    def _run_block(self, position: int, block: Block, x: torch.Tensor, *args) -> torch.Tensor:
        """The chunk's ``position``-th block on x; under full recomputation only x (and the block's
        other arguments) is kept for backward. Decoding with a cache runs without autograd."""
        if self.recompute.recomputes_layer(position) and torch.is_grad_enabled():
            return recomputed(block, x, *args, rng_tracker=self.rng_tracker)
        return block(x, *args)

    def _full_length(self, inputs: torch.Tensor) -> int:
        """T of the whole sequence: a later stage under sequence parallelism receives its shard."""
        length = inputs.shape[1]
        if not self.pre_process and self.dims.sequence_parallel:
            return length * self.dims.tp
        if self.dims.sequence_parallel and length % self.dims.tp != 0:
            raise ValueError(
                f"sequence parallelism splits the sequence over tp={self.dims.tp}, but the batch has "
                f"{length} positions; pass sequences whose length is a multiple of tp"
            )
        return length

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        values = self.value_head(x)  # (B, T) fp32, or (B, T/tp) under sequence parallelism
        if self.dims.sequence_parallel:
            values = gather_replicated_from_sequence_region(values, self.dims.tp_group)  # (B, T)
        return values

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            return self.output(x)
        return column_parallel_linear(x, self.embedding.word.weight, None, self.dims.tp_group, self.dims.sequence_parallel)


def _check_document_ids(document_ids: torch.Tensor, batch: int, length: int, kv_cache, attention_mask) -> None:
    if kv_cache is not None or attention_mask is not None:
        raise ValueError("document_ids mask a packed training sample; they do not combine with a kv_cache or an "
                         "attention_mask (generate one document at a time)")
    if tuple(document_ids.shape) != (batch, length):
        raise ValueError(f"document_ids must be (batch, seq) = {(batch, length)}, one id per token, "
                         f"got shape {tuple(document_ids.shape)}")


def num_parameters(cfg: ModelConfig, padded_vocab: int) -> int:
    """Parameters of the full (tp = 1) model, each tied matrix counted once."""
    hidden, ffn, qkv_width = cfg.hidden_size, cfg.ffn_hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    norm = 2 * hidden if cfg.norm == "layernorm" else hidden
    qkv = hidden * qkv_width + qkv_width * (cfg.bias or cfg.qkv_bias) + 2 * cfg.head_dim * cfg.qk_norm
    proj = cfg.num_heads * cfg.head_dim * hidden + hidden * cfg.bias
    fc_width = 2 * ffn if cfg.activation == "swiglu" else ffn
    mlp = hidden * fc_width + fc_width * cfg.bias + ffn * hidden + hidden * cfg.bias
    per_layer = qkv + proj + mlp + 2 * norm
    embedding = padded_vocab * hidden + (cfg.seq_length * hidden if cfg.position_embedding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else padded_vocab * hidden
    return embedding + cfg.num_layers * per_layer + norm + head


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style: 6 x matmul params + attention scores.

    Matmul params exclude the position table and the embedding lookup, but count the output
    head (a V x H matmul whether tied or not). Attention adds 12 * L * H * T (QK^T and AV,
    forward and backward, without discounting the causal half).
    """
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    n = num_parameters(cfg, padded) - padded * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    if cfg.position_embedding == "learned":
        n -= cfg.seq_length * cfg.hidden_size
    n += padded * cfg.hidden_size  # the output head matmul
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_length
