"""The GPT model: GPT-2 and Llama flavours on tensor-parallel layers.

GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings.
Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head by default.

At tp = pp = dp = 1 every parallel layer is a plain Linear / Embedding and every
collective is the identity. A pipeline stage is one ``GPT`` holding ``layer_range``
(global layer indices, so parameter names match across layouts), the embeddings if
``pre_process`` and the final norm and head if ``post_process``.

Shapes: B batch, T sequence, H hidden, nh / nkv query / kv heads on this rank,
hd head dim, V padded vocabulary. Under sequence parallelism the residual stream
between blocks is the rank's sequence shard (B, T/tp, H).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.model import ops
from megatron_lite.model.layout_check import check_layout
from megatron_lite.parallel.dims import ParallelDims, padded_vocab_size
from megatron_lite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    fill_from_full_,
    full_shape,
    layout_of,
    set_partition,
)
from megatron_lite.parallel.mappings import (
    gather_replicated_from_sequence_region,
    scatter_to_sequence_region,
)
from megatron_lite.parallel.random import RNGStatesTracker, model_parallel_seed

WORD_EMBEDDING = "embedding.word.weight"
RESIDUAL_PROJECTIONS = ("attention.proj.weight", "mlp.proj.weight")


class KVCache:
    """Keys and values of every processed position, per global layer: (B, S_max, nkv, hd)."""

    def __init__(self, layers, batch: int, max_length: int, kv_heads: int, head_dim: int, device, dtype):
        shape = (batch, max_length, kv_heads, head_dim)
        self.keys = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.values = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.length = 0  # positions already stored

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        self.keys[layer][:, self.length : end] = k
        self.values[layer][:, self.length : end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama) through the backend switch."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool, device):
        super().__init__()
        self.kind = "layer" if cfg.flavor == "gpt2" else "rms"
        self.eps, self.backend = cfg.norm_eps, cfg.norm_backend
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size, device=device))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size, device=device)) if self.kind == "layer" else None
        for p in self.parameters():
            set_partition(p, None)
            # On a sequence shard each rank's gradient covers only its tokens: summed over tp later.
            p.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return ops.layer_norm(x, self.weight, self.bias, self.eps, self.backend)
        return ops.rms_norm(x, self.weight, self.eps, self.backend)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, T, 1, hd) for rotary embedding, computed once per forward for every layer."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    angles = position_ids.float().unsqueeze(-1) * theta**-exponents  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(2)  # (B, T, 1, hd)
    return angles.cos(), angles.sin()


def local_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """kv heads a tp rank holds: a share of them, or one copy when tp exceeds their number."""
    return max(1, cfg.num_kv_heads // tp)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, layer_index: int):
        super().__init__()
        self.cfg, self.layer_index = cfg, layer_index
        self.head_dim = cfg.head_dim
        self.kv_heads = local_kv_heads(cfg, dims.tp)  # on this rank
        self.q_per_kv = cfg.num_heads // dims.tp // self.kv_heads  # on this rank
        bias, group, sp = cfg.flavor == "gpt2", dims.tp_group, dims.sequence_parallel
        # Full layout grouped per kv head, [q heads of group g, k_g, v_g] for each g, so a
        # contiguous split over tp hands each rank whole groups. With tp > num_kv_heads the
        # tp / num_kv_heads ranks of group g split its q heads and each keeps a copy of k_g, v_g.
        qkv_size = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_size, bias, group, sp, device=dims.device,
            partition_groups=cfg.num_kv_heads, replicated_rows=2 * cfg.head_dim,
        )
        self.proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias, group, sp, device=dims.device)

    def forward(self, x, rope, rng, kv_cache=None, attention_mask=None):
        qkv = self.qkv(x)  # (B, T, nkv * (q_per_kv + 2) * hd), full T even under sequence parallelism
        B, T, _ = qkv.shape
        qkv = qkv.view(B, T, self.kv_heads, self.q_per_kv + 2, self.head_dim)
        q = qkv[:, :, :, : self.q_per_kv].reshape(B, T, self.kv_heads * self.q_per_kv, self.head_dim)  # (B, T, nh, hd)
        k, v = qkv[:, :, :, self.q_per_kv], qkv[:, :, :, self.q_per_kv + 1]  # (B, T, nkv, hd)
        if rope is not None:
            backend = self.cfg.elementwise_backend
            q, k = ops.apply_rope(q, rope, backend), ops.apply_rope(k, rope, backend)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, S, nkv, hd)
        dropout_p = self.cfg.dropout if self.training else 0.0
        with rng.sharded(dropout_p > 0):
            y = ops.attention(q, k, v, True, self.cfg.attention_backend, dropout_p, attention_mask)  # (B, T, nh, hd)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims):
        super().__init__()
        self.flavor, self.backend = cfg.flavor, cfg.elementwise_backend
        group, sp, H, F_ = dims.tp_group, dims.sequence_parallel, cfg.hidden_size, cfg.ffn_hidden_size
        if cfg.flavor == "gpt2":
            self.fc = ColumnParallelLinear(H, F_, True, group, sp, device=dims.device)
        else:
            # [gate; up] fused; partition_chunks=2 keeps each rank's gate and up rows paired.
            self.fc = ColumnParallelLinear(H, 2 * F_, False, group, sp, partition_chunks=2, device=dims.device)
        self.proj = RowParallelLinear(F_, H, cfg.flavor == "gpt2", group, sp, device=dims.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, F/tp) or (B, T, 2F/tp)
        if self.flavor == "gpt2":
            h = F.gelu(h, approximate="tanh")
        else:
            gate, up = h.chunk(2, dim=-1)
            h = ops.swiglu(gate, up, self.backend)
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, layer_index: int):
        super().__init__()
        sp = dims.sequence_parallel
        self.attention_norm = Norm(cfg, sp, dims.device)
        self.attention = Attention(cfg, dims, layer_index)
        self.mlp_norm = Norm(cfg, sp, dims.device)
        self.mlp = MLP(cfg, dims)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, rng, kv_cache=None, attention_mask=None):
        # x: (B, T, H), or (B, T/tp, H) under sequence parallelism; rope: (cos, sin) for llama, else None
        active = self.training and self.dropout.p > 0
        h = self.attention(self.attention_norm(x), rope, rng, kv_cache, attention_mask)
        with rng.residual(active):
            x = x + self.dropout(h)
        h = self.mlp(self.mlp_norm(x))
        with rng.residual(active):
            return x + self.dropout(h)


class _DropoutStreams:
    """Which random stream a dropout draws from. Sharded activations (attention heads; the
    residual stream under sequence parallelism) fork the per-tp-rank stream; replicated ones
    keep the default generator, which every tp rank advances identically."""

    def __init__(self, tracker, sequence_parallel: bool):
        self.tracker, self.sequence_parallel = tracker, sequence_parallel

    def sharded(self, active: bool):
        return self.tracker.fork() if active else contextlib.nullcontext()

    def residual(self, active: bool):
        return self.sharded(active and self.sequence_parallel)


class Embedding(nn.Module):
    def __init__(self, cfg: ModelConfig, dims: ParallelDims, padded_vocab: int):
        super().__init__()
        self.word = VocabParallelEmbedding(padded_vocab, cfg.hidden_size, dims.tp_group, dims.device)
        self.position = None
        if cfg.flavor == "gpt2":
            self.position = nn.Embedding(cfg.seq_length, cfg.hidden_size, device=dims.device)
            set_partition(self.position.weight, None)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dims = dims

    def forward(self, ids: torch.Tensor, position_ids: torch.Tensor, rng) -> torch.Tensor:
        x = self.word(ids)  # (B, T, H)
        if self.position is not None:
            x = x + self.position(position_ids)
        if self.dims.sequence_parallel:
            x = scatter_to_sequence_region(x, self.dims.tp_group)  # (B, T/tp, H)
        with rng.residual(self.training and self.dropout.p > 0):
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
    ):
        """``rng_tracker``: share one across the chunks of a rank (virtual pipeline); None seeds a new one,
        which also reseeds the default generator (seed + 100 x pp_rank, shared over tp).
        ``head``: "lm" (next-token logits over the vocabulary) or "value" (one scalar per position:
        the reward model's and the PPO critic's head, in place of the vocabulary head)."""
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head={head!r} is not one of {', '.join(HEADS)}")
        self.head = head
        if cfg.vocab_size <= 0:
            raise ConfigError("model.vocab_size must be > 0 to build the model; set it from the tokenizer first")
        ops.check_backends(cfg)
        self.config, self.dims = cfg, dims or ParallelDims.single()
        check_layout(cfg, self.dims)
        dims = self.dims
        self.layer_range = range(cfg.num_layers) if layer_range is None else layer_range
        if self.layer_range and (self.layer_range.start < 0 or self.layer_range.stop > cfg.num_layers):
            raise ValueError(f"layer_range {self.layer_range} is outside the model's {cfg.num_layers} layers")
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, dims.tp)
        self.rng_tracker = rng_tracker or model_parallel_seed(seed, dims.tp_rank, dims.pp_rank, dims.device)
        self._streams = _DropoutStreams(self.rng_tracker, dims.sequence_parallel)

        self.embedding = Embedding(cfg, dims, self.padded_vocab_size) if pre_process else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, dims, i) for i in self.layer_range})
        self.final_norm = Norm(cfg, dims.sequence_parallel, dims.device) if post_process else None
        self.output = self.value_head = None
        if post_process and head == "value":
            self.value_head = ValueHead(cfg.hidden_size, dims.sequence_parallel, dims.device)
        elif post_process and not (cfg.tie_embeddings and pre_process):
            self.output = ColumnParallelLinear(
                cfg.hidden_size, self.padded_vocab_size, False, dims.tp_group, dims.sequence_parallel, device=dims.device
            )
        if self._shares_embedding():
            # Two copies of one matrix on the first and last stage; the pipeline sums their gradients.
            for p in self.tied_embedding_params():
                p.shared_embedding = True
        self.init_weights(seed)

    # ---- initialisation: the same full model whatever the layout ----

    def init_weights(self, seed: int) -> None:
        """Draw every full parameter from a generator seeded by (seed, global name), keep this rank's shard."""
        if self.dims.device.type == "meta":  # shapes only (planning a checkpoint layout): nothing to draw
            return
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}"
                fill_from_full_(param, self._full_init(name, param, module, seed), self.dims.tp_group)

    def _full_init(self, name: str, param: nn.Parameter, module: nn.Module, seed: int) -> torch.Tensor:
        cfg = self.config
        shape = full_shape(param.shape, self.dims.tp, **layout_of(param))
        if isinstance(module, Norm):
            return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        if self.output is not None and param is self.output.weight and cfg.tie_embeddings:
            name = WORD_EMBEDDING  # the last stage's copy starts identical to the first stage's
        generator = torch.Generator().manual_seed(_param_seed(seed, name))
        std = cfg.init_std
        if name.endswith(RESIDUAL_PROJECTIONS):
            std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        if name == WORD_EMBEDDING or module is self.output:
            # Real rows random, padding rows zero: identical whatever the padded size.
            full = torch.zeros(shape)
            full[: cfg.vocab_size] = torch.randn(cfg.vocab_size, shape[1], generator=generator) * std
            return full
        return torch.randn(shape, generator=generator) * std

    def _shares_embedding(self) -> bool:
        """First and last stage each hold a copy of the tied word embedding (pp > 1, lm head)."""
        return self.config.tie_embeddings and self.pre_process != self.post_process and self.head == "lm"

    def tied_embedding_params(self) -> list[nn.Parameter]:
        """The word-embedding copy this chunk holds when first and last stage each hold one (pp > 1)."""
        if not self._shares_embedding():
            return []
        return [self.embedding.word.weight] if self.pre_process else [self.output.weight]

    # ---- forward ----

    def forward(self, inputs, labels=None, position_ids=None, *, kv_cache=None, attention_mask=None):
        """Token ids (B, T) on the first stage, hidden states after; see the module docstring for outputs."""
        full_length = inputs.shape[1]
        if not self.pre_process and self.dims.sequence_parallel:
            full_length *= self.dims.tp
        elif self.dims.sequence_parallel and full_length % self.dims.tp != 0:
            raise ValueError(
                f"sequence parallelism splits the sequence over tp={self.dims.tp}, but the batch has "
                f"{full_length} positions; pass sequences whose length is a multiple of tp"
            )
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + full_length, device=inputs.device).expand(inputs.shape[0], -1)
        if kv_cache is not None and attention_mask is None:
            # New queries sit after the cached keys: causal alignment is bottom-right, (1, 1, T, S).
            keys = torch.arange(start + full_length, device=inputs.device)
            attention_mask = (keys <= start + torch.arange(full_length, device=inputs.device).unsqueeze(1))[None, None]
        x = self.embedding(inputs, position_ids, self._streams) if self.pre_process else inputs
        rope = None
        if self.config.flavor == "llama":
            rope = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        for block in self.layers.values():
            x = block(x, rope, self._streams, kv_cache, attention_mask)
        if kv_cache is not None:  # one cache per chunk: this chunk's layers have stored these positions
            kv_cache.length += full_length
        if not self.post_process:
            return x
        if self.value_head is not None:
            values = self.value_head(self.final_norm(x))  # (B, T) fp32, or (B, T/tp) under sequence parallelism
            if self.dims.sequence_parallel:
                values = gather_replicated_from_sequence_region(values, self.dims.tp_group)
            return values  # labels are not used
        logits = self.logits(self.final_norm(x))  # (B, T, V/tp)
        if labels is None:
            return logits
        return ops.cross_entropy(logits, labels, self.config.vocab_size, self.dims.tp_group, self.config.loss_backend)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.output is not None:
            return self.output(x)
        return column_parallel_linear(x, self.embedding.word.weight, None, self.dims.tp_group, self.dims.sequence_parallel)


HEADS = ("lm", "value")


class ValueHead(nn.Module):
    """One scalar per position from the final hidden state: a (1, H) weight and a bias, replicated
    over tp. Under sequence parallelism each rank scores its sequence shard, so (as for the norms)
    its gradient covers only its tokens and is summed over tp later."""

    def __init__(self, hidden_size: int, sequence_parallel: bool, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, device=device))
        self.bias = nn.Parameter(torch.zeros(1, device=device))
        for p in self.parameters():
            set_partition(p, None)
            p.sequence_parallel = sequence_parallel

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias).squeeze(-1).float()


def _param_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def num_parameters(cfg: ModelConfig, padded_vocab: int) -> int:
    """Parameters of the full (tp = 1) model, each tied matrix counted once."""
    H, F_, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    gpt2 = cfg.flavor == "gpt2"
    qkv = H * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + (cfg.num_heads + 2 * cfg.num_kv_heads) * hd * gpt2
    proj = cfg.num_heads * hd * H + H * gpt2
    mlp = (H * F_ + F_ + F_ * H + H) if gpt2 else (3 * H * F_)
    norms = 2 * (2 * H if gpt2 else H)
    per_layer = qkv + proj + mlp + norms
    embedding = padded_vocab * H + (cfg.seq_length * H if gpt2 else 0)
    head = 0 if cfg.tie_embeddings else padded_vocab * H
    final_norm = 2 * H if gpt2 else H
    return embedding + cfg.num_layers * per_layer + final_norm + head


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style: 6 x matmul params + attention scores.

    Matmul params exclude the position table and the embedding lookup, but count the output
    head (a V x H matmul whether tied or not). Attention adds 12 * L * H * T (QK^T and AV,
    forward and backward, without discounting the causal half).
    """
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    n = num_parameters(cfg, padded) - padded * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    if cfg.flavor == "gpt2":
        n -= cfg.seq_length * cfg.hidden_size
    n += padded * cfg.hidden_size  # the output head matmul
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_length
