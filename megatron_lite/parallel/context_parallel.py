"""Context parallelism: each sample's sequence split over the cp ranks, attention across them.

**The split (causal load balancing).** A sequence of T tokens is cut into 2 x cp chunks of
L = T / (2 cp); cp rank i holds chunks i and 2 cp - 1 - i, concatenated (T / cp tokens). Under a
causal mask a late chunk attends to many keys and an early one to few: pairing them gives every
rank the same attention work. Tokens, labels, position ids and document ids are split alike
(``split_sequence``); everything except attention is per token and runs on the local tokens.

**Attention: all-gather of K/V**, not a ring. Every layer
all-gathers the rank's K and V over the cp group (its backward is the dual: a reduce-scatter of
dK and dV), reorders them into sequence order and runs each local query chunk c against the
prefix of keys it may see, [0, (c + 1) L), with a bottom-right-aligned causal mask: query j of
the chunk sits at global position c L + j. Why not the ring exchange of K/V blocks with an
online-softmax merge: with grouped-query attention K and V are a small fraction of the
activations (2 nkv / nh of q's size), so holding them whole costs little memory; two collectives
per layer (K and V) replace the ring's cp - 1 send/receive steps, whose overlap with compute is
what makes a ring fast on GPUs and which gloo on CPU does not give; a mask on global positions
expresses any mask, so document masks need no bookkeeping of which block pairs are visible; and
the backward is the attention's own plus one reduce-scatter, where the ring sends partial dK / dV
around a second time. The ring wins when the K/V of a whole sequence do not fit on one device
(multi-million-token contexts), which is not the scale this project targets. The ring was not
built, so the two were not measured against each other; ``tools/bench_parallel.py
--context-parallel`` measures this one (docs/benchmarks.md): timed separately on a 2048-token
llama-style step, the forward K/V all-gathers took about 5% of the cp=2 step on gloo.

Backends. ``torch``: one ``scaled_dot_product_attention`` per query chunk with a boolean mask
(causal on global positions AND, given ``document_ids``, same document). ``triton``: the fused
kernel takes only square causal masks, so a chunk runs as two kernel calls, its diagonal block
(causal) and the keys before it (no mask), merged by their log-sum-exp; the backward calls the
kernel's backward on each block with the merged output and log-sum-exp, which gives exactly the
gradient of the joint softmax restricted to that block (the same identity the ring algorithm
rests on). With document masks the diagonal block is the kernel's document-masked causal case on
the chunk's ids, and the keys before it its ``query_start`` case: the ids of the whole prefix
place the queries after the keys, so a document crossing into the chunk is seen and tiles of other
documents are skipped; a query whose document starts inside the chunk sees no earlier key
(log-sum-exp -inf, weight 0 in the merge).

``ContextParallel`` is the small context the model hands to its attention call; with cp = 1 the
model holds None and attention is the plain local call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError
from megatron_lite.parallel.mappings import gather_from_sequence_region

SEQUENCE_DIM = 1


@dataclass(frozen=True)
class ContextParallel:
    """The cp group of a rank, its place in it and the group's size."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, dims) -> ContextParallel | None:
        """The context of ``dims`` (a ``ParallelDims``), None at cp = 1."""
        if dims.cp == 1:
            return None
        return cls(group=dims.cp_group, rank=dims.cp_rank, size=dims.cp)

    @property
    def chunks(self) -> tuple[int, int]:
        """The indices of this rank's two chunks, in the order they are held."""
        return self.rank, 2 * self.size - 1 - self.rank


def check_sequence_splits(length: int, cp: int, what: str = "the sequence") -> None:
    """``length`` must cut into 2 x cp equal chunks; the error says what to change."""
    if length % (2 * cp) != 0:
        raise ConfigError(
            f"parallel.cp={cp} splits {what} into 2 x cp = {2 * cp} chunks, but its length {length} is not a "
            f"multiple of {2 * cp}; set model.seq_length to a multiple of {2 * cp} or change parallel.cp"
        )


def split_sequence(x: torch.Tensor, cp_rank: int, cp: int, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """This cp rank's chunks i and 2 cp - 1 - i of ``x`` along ``dim`` (length T -> T / cp)."""
    if cp == 1:
        return x
    check_sequence_splits(x.shape[dim], cp)
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp - 1 - cp_rank]], dim=dim)


def local_positions(local_length: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """Global positions (local_length,) of the tokens a cp rank holds (``split_sequence`` of an arange)."""
    return split_sequence(torch.arange(local_length * cp, device=device), cp_rank, cp, dim=0)


def _to_sequence_order(gathered: torch.Tensor, cp: int) -> torch.Tensor:
    """(B, T, ...) gathered in rank order (each rank's two chunks) -> (B, T, ...) in sequence order."""
    held = gathered.chunk(2 * cp, dim=SEQUENCE_DIM)  # held[2 r], held[2 r + 1]: chunks r, 2 cp - 1 - r
    ordered = [held[2 * c] for c in range(cp)] + [held[2 * (2 * cp - 1 - c) + 1] for c in range(cp, 2 * cp)]
    return torch.cat(ordered, dim=SEQUENCE_DIM)


def gather_sequence(x: torch.Tensor, context: ContextParallel) -> torch.Tensor:
    """The whole sequence (B, T, ...) in order from every rank's (B, T / cp, ...); differentiable
    (backward: the gradient's reduce-scatter back onto each rank's chunks)."""
    return _to_sequence_order(gather_from_sequence_region(x, context.group), context.size)


@torch.no_grad()
def _gather_ids(ids: torch.Tensor, context: ContextParallel) -> torch.Tensor:
    """Per-token integer ids (B, T / cp) -> (B, T) in sequence order; no gradient."""
    parts = [torch.empty_like(ids) for _ in range(context.size)]
    dist.all_gather(parts, ids.contiguous(), group=context.group)
    return _to_sequence_order(torch.cat(parts, dim=SEQUENCE_DIM), context.size)


def chunk_mask(chunk: int, chunk_length: int, document_ids: torch.Tensor | None = None,
               device: torch.device | None = None) -> torch.Tensor:
    """Which of the keys [0, (chunk + 1) L) each query of ``chunk`` may attend to: (1, 1, L, S) bool,
    or (B, 1, L, S) with ``document_ids`` (B, T) in sequence order (causal AND same document)."""
    keys = (chunk + 1) * chunk_length
    query_positions = torch.arange(chunk * chunk_length, keys, device=device)
    mask = query_positions[:, None] >= torch.arange(keys, device=device)[None, :]  # (L, S) bottom-right causal
    if document_ids is None:
        return mask[None, None]
    query_docs = document_ids[:, chunk * chunk_length : keys]  # (B, L)
    same_document = query_docs[:, :, None] == document_ids[:, None, :keys]  # (B, L, S)
    return (mask[None] & same_document)[:, None]


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: ContextParallel,
                               backend: str = "torch", dropout_p: float = 0.0,
                               document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this rank's queries over the whole sequence.

    q (B, T/cp, nh, hd), k and v (B, T/cp, nkv, hd), each this rank's two chunks (see
    ``split_sequence``); ``document_ids`` (B, T/cp) split the same way, or None. Returns
    (B, T/cp, nh, hd).
    """
    _check_backend(backend, dropout_p)
    chunk_length = q.shape[SEQUENCE_DIM] // 2
    k_all, v_all = gather_sequence(k, context), gather_sequence(v, context)  # (B, T, nkv, hd)
    all_documents = _gather_ids(document_ids, context) if document_ids is not None else None
    outputs = []
    for held, chunk in enumerate(context.chunks):
        q_chunk = q[:, held * chunk_length : (held + 1) * chunk_length]  # (B, L, nh, hd)
        keys = (chunk + 1) * chunk_length
        k_prefix, v_prefix = k_all[:, :keys], v_all[:, :keys]  # (B, S, nkv, hd), S = (chunk + 1) L
        if backend == "torch":
            mask = chunk_mask(chunk, chunk_length, all_documents, q.device)  # (1 or B, 1, L, S)
            outputs.append(_torch_chunk(q_chunk, k_prefix, v_prefix, mask, dropout_p))
        else:
            prefix_documents = all_documents[:, :keys] if all_documents is not None else None  # (B, S)
            outputs.append(_triton_chunk(q_chunk, k_prefix, v_prefix, prefix_documents))
    return torch.cat(outputs, dim=SEQUENCE_DIM)


def _check_backend(backend: str, dropout_p: float) -> None:
    """Before any collective, so a bad setting fails on every rank alike."""
    if backend not in ("torch", "triton"):
        raise ConfigError(f"context parallelism runs attention on the torch or triton backend, not {backend!r}")
    if backend == "triton" and dropout_p != 0.0:
        raise ConfigError("model.attention_backend=triton has no attention dropout; set model.dropout=0")


def _torch_chunk(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    from megatron_lite.kernels.eager import attention

    return attention(q, k, v, causal=False, dropout_p=dropout_p, mask=mask)


def _triton_chunk(q, k, v, document_ids: torch.Tensor | None) -> torch.Tensor:
    from megatron_lite.kernels.attention import check_attention_inputs, document_runs

    check_attention_inputs(q, k, v, causal=False)
    documents = None
    if document_ids is not None:
        prefix = k.shape[SEQUENCE_DIM] - q.shape[SEQUENCE_DIM]
        documents = (document_runs(document_ids[:, prefix:]), document_runs(document_ids))
    return PrefixCausalAttention.apply(q, k, v, 1.0 / math.sqrt(q.shape[-1]), documents)


def _merge(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmax-attention results over disjoint key sets -> the result over their union.
    out (B, L, nh, hd), lse (B, nh, L) natural log."""
    lse = torch.logaddexp(lse_a, lse_b)  # (B, nh, L)
    weight_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)  # (B, L, nh, 1)
    weight_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * weight_a + out_b.float() * weight_b
    return out.to(out_a.dtype), lse


class PrefixCausalAttention(torch.autograd.Function):
    """The Triton kernel on queries at the end of their keys: q (B, L, nh, hd) at positions
    [S - L, S) of k, v (B, S, nkv, hd), bottom-right causal. The diagonal block is the kernel's
    square causal case; the keys before it are all visible (no mask); the two are merged.
    ``documents``: None, or the ``document_runs`` (diagonal block's (B, 3, L), whole prefix's
    (B, 3, S)) restricting each query to the keys of its document."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale: float, documents: tuple[torch.Tensor, torch.Tensor] | None = None):
        from megatron_lite.kernels.attention import attention_forward

        q, k, v = (t.contiguous() for t in (q, k, v))
        diagonal_runs, prefix_runs = documents if documents is not None else (None, None)
        prefix = k.shape[SEQUENCE_DIM] - q.shape[SEQUENCE_DIM]
        out, lse = attention_forward(q, k[:, prefix:], v[:, prefix:], True, softmax_scale, diagonal_runs)
        if prefix > 0:
            out_before, lse_before = attention_forward(q, k[:, :prefix].contiguous(), v[:, :prefix].contiguous(),
                                                       False, softmax_scale, prefix_runs, prefix)
            out, lse = _merge(out, lse, out_before, lse_before)
        ctx.save_for_backward(q, k, v, out, lse, diagonal_runs, prefix_runs)
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from megatron_lite.kernels.attention import attention_backward

        q, k, v, out, lse, diagonal_runs, prefix_runs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        prefix = k.shape[SEQUENCE_DIM] - q.shape[SEQUENCE_DIM]
        # With the merged out and lse, each block's backward is its share of the joint softmax's.
        dq, dk_diag, dv_diag = attention_backward(grad_out, q, k[:, prefix:].contiguous(), v[:, prefix:].contiguous(),
                                                  out, lse, True, ctx.softmax_scale, diagonal_runs)
        if prefix == 0:
            return dq, dk_diag, dv_diag, None, None
        dq_before, dk_before, dv_before = attention_backward(grad_out, q, k[:, :prefix].contiguous(),
                                                             v[:, :prefix].contiguous(), out, lse, False,
                                                             ctx.softmax_scale, prefix_runs, prefix)
        dk = torch.cat([dk_before, dk_diag], dim=SEQUENCE_DIM)
        dv = torch.cat([dv_before, dv_diag], dim=SEQUENCE_DIM)
        return dq + dq_before, dk, dv, None, None
