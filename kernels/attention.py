"""Fused attention in Triton, FlashAttention-2 style.

Forward: each program holds one tile of queries and streams K/V tiles past it, keeping a
running max and running sum (online softmax, fp32) so the (S, S) score matrix never exists.
It saves the log-sum-exp of every query row; the backward recomputes probabilities from it.

Backward, without atomics so gradients are bitwise reproducible:
  1. delta = rowsum(dO * O), one fp32 value per query row;
  2. dK/dV: each program owns one K/V tile and loops over the query tiles of every query
     head in its group (grouped-query attention sums over the group inside the program);
  3. dQ: each program owns one query tile and loops over the K/V tiles.

Scores are kept in base 2 (exp2 is one instruction; exp is exp2 plus a multiply): the
softmax scale is folded together with log2(e) into one multiplier.

Document masking (packed samples): with per-token document ids (B, S), each run of equal
consecutive ids is a document and a query attends only to keys of its own. The ids become
(number, first position, end) per position (``document_runs``); every program reads the first
position of its first row's document and the end of its last row's, and streams only the tiles
between them: a tile holding none of its documents is never visited, so the work follows the
documents' lengths, not the sequence's.

Queries after a key prefix (``query_start``, non-causal): context parallelism runs a query chunk
against the keys before it. The runs then describe one sequence in which the keys sit at
positions [0, S_k) and the queries at [query_start, query_start + S_q): query rows read their
documents at an offset, and each side's visible range is the other's document span shifted into
its own rows. A query whose document begins after the last key sees nothing: output 0, log-sum-exp
-inf, which weighs nothing when merged with the chunk's diagonal block.

Layout: q (B, S, H, D), k and v (B, S, KVH, D), any strides with a contiguous last dimension.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, dot_upcast, interpreting, new_output, seq_bucket, tuning_time_ms

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b, accumulated inside the matrix-multiply instruction (no second fp32 tile)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks exist only where the shape needs them."""
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < head_dim), other=0.0)
    else:
        if EVEN_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)


@triton.jit
def _store_rows(ptrs, value, rows, n_rows, offs_d, head_dim, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    if MASK_ROWS:
        if EVEN_D:
            tl.store(ptrs, value, mask=rows[:, None] < n_rows)
        else:
            tl.store(ptrs, value, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < head_dim))
    else:
        if EVEN_D:
            tl.store(ptrs, value)
        else:
            tl.store(ptrs, value, mask=offs_d[None, :] < head_dim)


@triton.jit
def _load_documents(doc_base, positions, seq, padding, MASK: tl.constexpr):
    """Document numbers of ``positions``; positions past the sequence read ``padding``."""
    if MASK:
        return tl.load(doc_base + positions, mask=positions < seq, other=padding)
    else:
        return tl.load(doc_base + positions)


@triton.jit
def _safe_max(m):
    """A row that has seen no visible key yet keeps max -inf; subtracting 0 instead keeps its
    probabilities exp2(-inf) = 0 rather than NaN (only document masks leave such rows)."""
    return tl.where(m == float("-inf"), 0.0, m)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _query_tile(num_heads, group_size, CAUSAL: tl.constexpr):
    """(query tile, batch x head program, batch, head, kv head) of a program over (tiles, B*H).
    Under a causal mask a tile's work grows with its index, so the last tiles are launched
    first and the cheap ones fill the tail of the grid."""
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    head = pid_bh % num_heads
    return start_m, pid_bh, (pid_bh // num_heads).to(tl.int64), head, head // group_size


@triton.jit
def _visible_range(doc_base, first, last, doc_len, offset, limit, BLOCK: tl.constexpr, DOCS: tl.constexpr):
    """[lo, hi) of the other side's rows a program visits: the positions the documents of run
    positions first..last occupy, shifted by -offset into the other side's rows and clipped to
    [0, limit), lo rounded down to a tile. Without documents, [0, limit)."""
    if DOCS:
        lo = tl.load(doc_base + doc_len + first) - offset  # the documents' first positions follow their numbers
        hi = tl.load(doc_base + 2 * doc_len + last) - offset  # and then their ends
        lo = tl.maximum(lo, 0)
        return (lo // BLOCK) * BLOCK, tl.minimum(hi, limit)
    else:
        return 0, limit


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_src, v_src, stride_ks, stride_vs,
    offs_m, offs_n, offs_d, lo, hi, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, DOCS: tl.constexpr,
):
    """k_src, v_src: tensor descriptors when TMA (the copy engine fills out-of-range rows with
    zeros), else base pointers. With DOCS, q_docs (BLOCK_M,) are the query rows' documents."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if TMA:
            k = k_src.load([start_n, 0])
        else:
            k = _load_rows(k_src + cols[:, None] * stride_ks + offs_d[None, :], cols, seq_k, offs_d, head_dim, MASKED, EVEN_D)
        qk = _dot(q, tl.trans(k), UPCAST, IEEE)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        if DOCS:
            k_docs = _load_documents(doc_base, cols, seq_k, -1, MASKED)
            qk = tl.where(q_docs[:, None] == k_docs[None, :], qk, float("-inf"))
        # The scale is positive, so max(qk) * scale is the scaled max, and scaling folds into the
        # subtraction as one fused multiply-add per score.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale_log2)
        if DOCS:
            m_sub = _safe_max(m_new)
        else:
            m_sub = m_new
        p = tl.math.exp2(qk * qk_scale_log2 - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_src.load([start_n, 0])
        else:
            v = _load_rows(v_src + cols[:, None] * stride_vs + offs_d[None, :], cols, seq_k, offs_d, head_dim, MASKED, EVEN_D)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, DOC,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_docb, doc_len, q_offset,
    num_heads, group_size, seq_q, seq_k, head_dim, qk_scale_log2, seq_key, programs_key, tma_ready,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, DOCS: tl.constexpr,
):
    # tma_ready (1 when K/V allow bulk copies) is read only by the autotuner: it is part of the
    # tuning key, so a cached TMA pick is never reused for tensors that cannot take it.
    start_m, pid_bh, batch, head, kv_head = _query_tile(num_heads, group_size, CAUSAL)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = _load_rows(q_ptrs, offs_m, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    if TMA:  # K/V tiles arrive by bulk copy into shared memory, without the warps issuing loads
        k_base = tl.make_tensor_descriptor(k_base, shape=[seq_k, head_dim], strides=[stride_ks, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, shape=[seq_k, head_dim], strides=[stride_vs, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    doc_base = DOC + batch * stride_docb
    q_docs = 0
    if DOCS:
        q_docs = _load_documents(doc_base, q_offset + offs_m, q_offset + seq_q, -2, not EVEN_M)
    # Keys outside the documents of this tile's rows are never visited.
    key_lo, key_hi = _visible_range(doc_base, q_offset + start_m * BLOCK_M,
                                    q_offset + tl.minimum(start_m * BLOCK_M + BLOCK_M, seq_q) - 1,
                                    doc_len, 0, seq_k, BLOCK_N, DOCS)
    if CAUSAL:
        # Tiles left of the diagonal need no mask; tiles right of it are skipped entirely.
        diag_lo = start_m * BLOCK_M
        diag_hi = tl.minimum(diag_lo + BLOCK_M, seq_k)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_n, offs_d, key_lo, diag_lo, seq_k, head_dim, qk_scale_log2,
                                   doc_base, q_docs, False, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, TMA, DOCS)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_n, offs_d, diag_lo, diag_hi, seq_k, head_dim, qk_scale_log2,
                                   doc_base, q_docs, True, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, TMA, DOCS)
    elif DOCS:  # the range ends inside a document, so its last tile may need the length mask
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_n, offs_d, key_lo, key_hi, seq_k, head_dim, qk_scale_log2,
                                   doc_base, q_docs, True, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, TMA, DOCS)
    else:
        full_hi = (seq_k // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, offs_n, offs_d, 0, full_hi, seq_k, head_dim, qk_scale_log2,
                                   doc_base, q_docs, False, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, TMA, DOCS)
        if not EVEN_N:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                       offs_m, offs_n, offs_d, full_hi, seq_k, seq_k, head_dim, qk_scale_log2,
                                       doc_base, q_docs, True, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, TMA, DOCS)

    # Padded query rows match no document, nor do rows whose document has no key here (queries
    # after a key prefix): keep their sums away from 0 / 0; the latter's log-sum-exp is -inf.
    if DOCS:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    o_ptrs = O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), offs_m, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log, (BLOCK_M,)
    lse_ptrs = LSE + pid_bh.to(tl.int64) * seq_q + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < seq_q)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    num_heads, seq_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = (pid_bh // num_heads).to(tl.int64)
    head = pid_bh % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    o = tl.load(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
    cols, offs_m, offs_d, lo, hi, seq_q, head_dim, qk_scale_log2, doc_base, k_docs, q_offset,
    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_M: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DOCS: tl.constexpr,
):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_base + rows[:, None] * stride_qs + offs_d[None, :], rows, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)
        do = _load_rows(do_base + rows[:, None] * stride_dos + offs_d[None, :], rows, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)
        # Padded query rows load q = dO = 0, so whatever p they get adds nothing to dK or dV.
        if EVEN_M:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        else:
            lse = tl.load(lse_base + rows, mask=rows < seq_q, other=0.0)
            delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        qk_t = _dot(k, tl.trans(q), UPCAST, IEEE) * qk_scale_log2  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t - lse[None, :] * 1.4426950408889634)
        if MASKED:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        if DOCS:
            q_docs = _load_documents(doc_base, q_offset + rows, q_offset + seq_q, -2, not EVEN_M)
            p_t = tl.where(k_docs[:, None] == q_docs[None, :], p_t, 0.0)
        dv = _dot_acc(p_t.to(do.dtype), do, dv, UPCAST, IEEE)
        dp_t = _dot(v, tl.trans(do), UPCAST, IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot_acc(ds_t.to(q.dtype), q, dk, UPCAST, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_docb, doc_len, q_offset,
    num_heads, num_kv_heads, group_size, seq_q, seq_k, head_dim, softmax_scale, qk_scale_log2, seq_key, programs_key,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DOCS: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    pid_bkv = tl.program_id(1)
    batch = (pid_bkv // num_kv_heads).to(tl.int64)
    kv_head = pid_bkv % num_kv_heads
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + batch * stride_kb + kv_head * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
                   cols, seq_k, offs_d, head_dim, not EVEN_N, EVEN_D)
    v = _load_rows(V + batch * stride_vb + kv_head * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
                   cols, seq_k, offs_d, head_dim, not EVEN_N, EVEN_D)
    doc_base = DOC + batch * stride_docb
    k_docs = 0
    if DOCS:
        k_docs = _load_documents(doc_base, cols, seq_k, -1, not EVEN_N)
    # Queries outside the documents of this tile's keys are never visited.
    query_lo, query_hi = _visible_range(doc_base, start_n, tl.minimum(start_n + BLOCK_N, seq_k) - 1, doc_len,
                                        q_offset, seq_q, BLOCK_M, DOCS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(group_size):
        head = kv_head * group_size + g
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DO + batch * stride_dob + head * stride_doh
        row_base = (batch * num_heads + head) * seq_q
        if CAUSAL:
            # Query tiles above this K/V tile see none of it; the ones crossing the diagonal are masked.
            diag_hi = tl.minimum(start_n + BLOCK_N, seq_q)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                                     stride_qs, stride_dos, cols, offs_m, offs_d, start_n, diag_hi, seq_q, head_dim,
                                     qk_scale_log2, doc_base, k_docs, q_offset, True, BLOCK_M, EVEN_M, EVEN_D, UPCAST,
                                     IEEE, DOCS)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                                     stride_qs, stride_dos, cols, offs_m, offs_d, start_n + BLOCK_N, query_hi, seq_q,
                                     head_dim, qk_scale_log2, doc_base, k_docs, q_offset, False, BLOCK_M, EVEN_M,
                                     EVEN_D,
                                     UPCAST, IEEE, DOCS)
        else:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
                                     stride_qs, stride_dos, cols, offs_m, offs_d, query_lo, query_hi, seq_q, head_dim,
                                     qk_scale_log2, doc_base, k_docs, q_offset, False, BLOCK_M, EVEN_M, EVEN_D, UPCAST,
                                     IEEE, DOCS)
    dk = dk * softmax_scale
    _store_rows(DK + batch * stride_dkb + kv_head * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :],
                dk.to(DK.dtype.element_ty), cols, seq_k, offs_d, head_dim, not EVEN_N, EVEN_D)
    _store_rows(DV + batch * stride_dvb + kv_head * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :],
                dv.to(DV.dtype.element_ty), cols, seq_k, offs_d, head_dim, not EVEN_N, EVEN_D)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs,
    rows, offs_n, offs_d, lo, hi, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DOCS: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # Padded key rows load k = v = 0, so their (finite) p adds nothing to dQ = dS K.
        k = _load_rows(k_base + cols[:, None] * stride_ks + offs_d[None, :], cols, seq_k, offs_d, head_dim, MASKED, EVEN_D)
        v = _load_rows(v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, seq_k, offs_d, head_dim, MASKED, EVEN_D)
        qk = _dot(q, tl.trans(k), UPCAST, IEEE) * qk_scale_log2  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse_log2[:, None])
        if MASKED:
            if CAUSAL:
                p = tl.where(rows[:, None] >= cols[None, :], p, 0.0)
        if DOCS:
            k_docs = _load_documents(doc_base, cols, seq_k, -1, MASKED)
            p = tl.where(q_docs[:, None] == k_docs[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, IEEE)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq, UPCAST, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_docb, doc_len, q_offset,
    num_heads, group_size, seq_q, seq_k, head_dim, softmax_scale, qk_scale_log2, seq_key, programs_key,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DOCS: tl.constexpr,
):
    start_m, pid_bh, batch, head, kv_head = _query_tile(num_heads, group_size, CAUSAL)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_rows(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                   rows, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)
    do = _load_rows(DO + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dos + offs_d[None, :],
                    rows, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)
    row_ptr = pid_bh.to(tl.int64) * seq_q + rows
    if EVEN_M:
        lse_log2 = tl.load(LSE + row_ptr) * 1.4426950408889634
        delta = tl.load(DELTA + row_ptr)
    else:
        lse_log2 = tl.load(LSE + row_ptr, mask=rows < seq_q, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_ptr, mask=rows < seq_q, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    doc_base = DOC + batch * stride_docb
    q_docs = 0
    if DOCS:
        q_docs = _load_documents(doc_base, q_offset + rows, q_offset + seq_q, -2, not EVEN_M)
    key_lo, key_hi = _visible_range(doc_base, q_offset + start_m * BLOCK_M,
                                    q_offset + tl.minimum(start_m * BLOCK_M + BLOCK_M, seq_q) - 1,
                                    doc_len, 0, seq_k, BLOCK_N, DOCS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        diag_lo = start_m * BLOCK_M
        diag_hi = tl.minimum(diag_lo + BLOCK_M, seq_k)
        dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
                           key_lo, diag_lo, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
                           False, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, DOCS)
        dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
                           diag_lo, diag_hi, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
                           True, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, DOCS)
    elif DOCS:
        dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
                           key_lo, key_hi, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
                           True, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, DOCS)
    else:
        full_hi = (seq_k // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n, offs_d,
                           0, full_hi, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
                           False, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, DOCS)
        if not EVEN_N:
            dq = _bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_ks, stride_vs, rows, offs_n,
                               offs_d, full_hi, seq_k, seq_k, head_dim, qk_scale_log2, doc_base, q_docs,
                               True, CAUSAL, BLOCK_N, EVEN_D, UPCAST, IEEE, DOCS)
    dq = dq * softmax_scale
    _store_rows(DQ + batch * stride_dqb + head * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), rows, seq_q, offs_d, head_dim, not EVEN_M, EVEN_D)


# ----------------------------------------------------------------------------- launching

_EVEN = {
    "EVEN_M": lambda args: args["seq_q"] % args["BLOCK_M"] == 0,
    "EVEN_N": lambda args: args["seq_k"] % args["BLOCK_N"] == 0,
}
_TUNING_KEY = ["seq_key", "programs_key", "head_dim", "CAUSAL", "DOCS"]


def _configs(shapes: list[tuple]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages[, TMA]) -> configs; TMA only where the kernel takes it."""
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, **({"TMA": tma[0]} if tma else {})},
                      num_warps=warps, num_stages=stages)
        for m, n, warps, stages, *tma in shapes
    ]


# The tile held in registers is the larger one; the streamed tile divides it, so the causal
# diagonal always falls on whole streamed tiles. Measured on an H100 (bf16): bulk (TMA) copies
# of K/V help four-warp forward tiles and slow eight-warp ones, so both are candidates.
_FWD_CONFIGS = _configs([(128, 128, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 8, 3, False),
                         (128, 64, 8, 4, False), (128, 64, 4, 3, True), (128, 64, 4, 4, True),
                         (64, 64, 4, 3, False), (64, 64, 4, 3, True), (64, 64, 4, 4, False)])
# At head dim 128 every dK/dV configuration but the last three spills registers on sm_90 (16 to 552
# bytes, `tools/kernel_resources.py --kernels attention`); those three compile without a spill.
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
                          (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 3)])
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)])

# Under the interpreter: small tiles (so short test sequences still span several), with the
# register tile twice the streamed one to exercise the diagonal logic.
_INTERPRETER_TILES = {"fwd": dict(BLOCK_M=32, BLOCK_N=16, TMA=False), "dkdv": dict(BLOCK_M=16, BLOCK_N=32),
                      "dq": dict(BLOCK_M=32, BLOCK_N=16)}


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether tiles of these tensors can come by bulk (TMA) copy: Hopper or newer, and every
    address and row step a multiple of 16 bytes, as the copy engine requires."""
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


def _drop_unusable_tma(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    if named_args["tma_ready"]:
        return configs
    return [c for c in configs if not c.kwargs.get("TMA", False)]


def _bench(kernel_call, quantiles=None):
    """Autotuning timer: kernels back to back with warm caches, host overhead excluded (the way
    the benchmarks and a training step see them), not one cold-cache call at a time."""
    ms = tuning_time_ms(kernel_call)
    return [ms, ms, ms] if quantiles is not None else ms


class _Kernel:
    """A kernel with its even-shape heuristics, autotuned on GPU and fixed under the interpreter.

    Called as ``kernel(length, programs_per_row, tile, *args)``: the grid is
    cdiv(length, BLOCK_<tile>) x programs_per_row, with ``tile`` "M" or "N".
    """

    def __init__(self, fn, configs: list[triton.Config], interpreter_meta: dict, prune=None, key=()):
        self.plain = triton.heuristics(_EVEN)(fn)
        self.tuned = triton.autotune(configs=configs, key=_TUNING_KEY + list(key), do_bench=_bench,
                                     prune_configs_by={"early_config_prune": prune} if prune else None,
                                     )(triton.heuristics(_EVEN)(fn))
        self.interpreter_meta = interpreter_meta

    def __call__(self, length: int, programs_per_row: int, tile: str, *args, **kwargs) -> None:
        if interpreting():
            rows = triton.cdiv(length, self.interpreter_meta["BLOCK_" + tile])
            self.plain[(rows, programs_per_row)](*args, **kwargs, **self.interpreter_meta)
        else:
            self.tuned[lambda meta: (triton.cdiv(length, meta["BLOCK_" + tile]), programs_per_row)](*args, **kwargs)


_fwd = _Kernel(_attn_fwd_kernel, _FWD_CONFIGS, _INTERPRETER_TILES["fwd"], prune=_drop_unusable_tma,
               key=("tma_ready",))
_dkdv = _Kernel(_attn_bwd_dkdv_kernel, _DKDV_CONFIGS, _INTERPRETER_TILES["dkdv"])
_dq = _Kernel(_attn_bwd_dq_kernel, _DQ_CONFIGS, _INTERPRETER_TILES["dq"])


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _flags(q: torch.Tensor, head_dim: int) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    return {
        "BLOCK_D": block_d,
        "EVEN_D": block_d == head_dim,
        "UPCAST": dot_upcast(q.dtype),
        "IEEE": q.dtype == torch.float32,
    }


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory Triton asks for when a kernel builds tensor descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:  # where Triton keeps the allocator it calls for descriptor scratch memory
    from triton.runtime._allocation import NullAllocator as _NullAllocator, _allocator as _triton_allocator
except ImportError:
    _NullAllocator = _triton_allocator = None


def _ensure_allocator() -> None:
    """Give Triton an allocator for descriptor scratch memory, unless the program set its own.
    Triton keeps it in a context variable, so this runs on every launching thread."""
    if hasattr(_triton_allocator, "get") and not isinstance(_triton_allocator.get(), _NullAllocator):
        return
    triton.set_allocator(_scratch)


def document_runs(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids -> (B, 3, S) int32: each position's document number (runs of equal consecutive
    ids, counted from 0), its document's first position and its document's end (exclusive)."""
    batch, seq = document_ids.shape
    positions = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    changes = document_ids[:, 1:] != document_ids[:, :-1]  # (B, S - 1): a new document starts after
    edge = torch.ones(batch, 1, dtype=torch.bool, device=document_ids.device)
    numbers = torch.cat([edge.logical_not(), changes], dim=1).cumsum(dim=1)
    starts = torch.where(torch.cat([edge, changes], dim=1), positions, 0).cummax(dim=1).values
    last = torch.cat([changes, edge], dim=1)  # the last position of each document
    ends = torch.where(last, positions + 1, seq).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([numbers, starts, ends], dim=1).to(torch.int32).contiguous()


def _document_args(runs: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(pointer, batch stride, positions, DOCS) for the kernels; without documents any tensor stands
    in, never read."""
    if runs is None:
        return like, 0, 0, False
    return runs, runs.stride(0), runs.shape[2], True


def attention_forward(q, k, v, causal: bool, softmax_scale: float, documents: torch.Tensor | None = None,
                      query_start: int = 0):
    """Returns (out (B, S, H, D), lse (B, H, S) fp32, natural log). ``documents``: (B, 3, N) from
    ``document_runs`` of one sequence in which the keys sit at positions [0, S_k) and the queries at
    [query_start, query_start + S_q), or None. A query whose document has no key here gets out 0
    and lse -inf."""
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((batch, num_heads, seq_q), torch.float32, q.device)
    doc, stride_docb, doc_len, docs = _document_args(documents, lse)
    tma_ready = 0
    if not interpreting():
        _ensure_allocator()
        tma_ready = int(_tma_ready(k, v))
    _fwd(seq_q, batch * num_heads, "M",
         q, k, v, out, lse, doc, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
         stride_docb, doc_len, query_start, num_heads, num_heads // num_kv_heads, seq_q, seq_k, head_dim,
         softmax_scale * LOG2E,
         seq_bucket(seq_k), seq_bucket(batch * num_heads), tma_ready,
         CAUSAL=causal, DOCS=docs, **_flags(q, head_dim))
    return out, lse


def attention_backward(do, q, k, v, out, lse, causal: bool, softmax_scale: float,
                       documents: torch.Tensor | None = None, query_start: int = 0):
    """Returns (dq, dk, dv), each shaped like its input; ``documents`` and ``query_start`` as in
    ``attention_forward``. ``out`` and ``lse`` may be those of a softmax over more keys than k
    holds (a block of a split key range): the gradients are then that softmax's, restricted to k."""
    batch, seq_q, num_heads, head_dim = q.shape
    _, seq_k, num_kv_heads, _ = k.shape
    group_size = num_heads // num_kv_heads
    flags = _flags(q, head_dim)
    delta = new_output((batch, num_heads, seq_q), torch.float32, q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(seq_q, 64), batch * num_heads)](
        out, do, delta, *_strides(out), *_strides(do), num_heads, seq_q, head_dim,
        BLOCK_M=64, BLOCK_D=flags["BLOCK_D"])
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    qk_scale_log2 = softmax_scale * LOG2E
    doc, stride_docb, doc_len, docs = _document_args(documents, delta)
    _dkdv(seq_k, batch * num_kv_heads, "N",
          q, k, v, do, lse, delta, dk, dv, doc,
          *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
          stride_docb, doc_len, query_start, num_heads, num_kv_heads, group_size, seq_q, seq_k, head_dim,
          softmax_scale, qk_scale_log2,
          seq_bucket(seq_q), seq_bucket(batch * num_kv_heads), CAUSAL=causal, DOCS=docs, **flags)
    _dq(seq_q, batch * num_heads, "M",
        q, k, v, do, lse, delta, dq, doc,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        stride_docb, doc_len, query_start, num_heads, group_size, seq_q, seq_k, head_dim, softmax_scale,
        qk_scale_log2,
        seq_bucket(seq_k), seq_bucket(batch * num_heads), CAUSAL=causal, DOCS=docs, **flags)
    return dq, dk, dv


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, documents: torch.Tensor | None = None,
                query_start: int = 0):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, causal, softmax_scale, documents, query_start)
        ctx.save_for_backward(q, k, v, out, lse, documents)
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.query_start = query_start
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, documents = ctx.saved_tensors
        dq, dk, dv = attention_backward(_last_dim_contiguous(do), q, k, v, out, lse, ctx.causal, ctx.softmax_scale,
                                        documents, ctx.query_start)
        return dq, dk, dv, None, None, None, None


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # the tile configurations are sized (shared memory, registers) for head dims up to 128


def check_document_ids(q: torch.Tensor, k: torch.Tensor, document_ids: torch.Tensor, query_start: int = 0,
                       causal: bool = False) -> None:
    """Per-token document ids (B, N) of one sequence holding the keys at [0, S_k) and the queries
    at [query_start, query_start + S_q): N = query_start + S_q >= S_k (self-attention: N = S_q = S_k)."""
    if query_start < 0 or (causal and query_start != 0):
        raise ValueError(
            f"query_start={query_start} places the queries after a non-causal key prefix; it must be >= 0, "
            f"and 0 for causal attention"
        )
    length = query_start + q.shape[1]
    if query_start == 0 and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"document_ids mask self-attention, but q has {q.shape[1]} positions and k {k.shape[1]}; "
            f"pass document_ids only when q and k cover the same positions, or give query_start for "
            f"queries that follow the keys"
        )
    if k.shape[1] > length:
        raise ValueError(
            f"with query_start={query_start} the queries end at position {length}, before the {k.shape[1]} keys "
            f"do; the keys must lie within the positions document_ids covers"
        )
    if document_ids.shape != (q.shape[0], length):
        raise ValueError(
            f"document_ids must be (batch, seq) = {(q.shape[0], length)}, one id per token, "
            f"got shape {tuple(document_ids.shape)}"
        )
    if document_ids.dtype.is_floating_point or document_ids.dtype.is_complex or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor, got {document_ids.dtype}")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    """Shape and dtype checks shared by every attention backend."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, seq_q, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch or head_dim"
        )
    if num_heads % k.shape[2] != 0:
        raise ValueError(
            f"q has {num_heads} heads, not a multiple of the {k.shape[2]} k/v heads; grouped-query attention "
            f"needs a whole number of query heads per k/v head"
        )
    if causal and seq_q != k.shape[1]:
        raise ValueError(
            f"causal attention needs q and k of the same length, got {seq_q} and {k.shape[1]}; "
            f"pass causal=False for cross attention"
        )
    if seq_q == 0 or k.shape[1] == 0:
        raise ValueError("attention over an empty sequence: q and k need at least one position")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, dropout_p: float = 0.0,
                    document_ids: torch.Tensor | None = None, query_start: int = 0) -> torch.Tensor:
    """softmax(q k^T * scale) v with q (B, S, H, D), k/v (B, S, KVH, D); returns (B, S, H, D).

    H must be a multiple of KVH (grouped-query attention: query head h reads k/v head
    h // (H // KVH)). ``softmax_scale`` defaults to 1/sqrt(D). Differentiable. ``dropout_p``
    completes the registry's attention signature: this kernel has no dropout, so it must be 0.
    ``document_ids`` (B, S) integer: each run of equal consecutive ids is a document (packed
    samples) whose queries attend only to its own keys; no tile outside a program's documents
    is visited. ``query_start`` (non-causal only): the queries follow a prefix of keys in one
    sequence, keys at positions [0, S_k), queries at [query_start, query_start + S_q), and
    ``document_ids`` (B, query_start + S_q) cover both (context parallelism's key prefixes); a
    query whose document has no key among them gets zeros.
    """
    if dropout_p != 0.0:
        raise ValueError(f"flash_attention has no attention dropout, got dropout_p={dropout_p}; use the torch backend")
    check_attention_inputs(q, k, v, causal)
    check_device(q, k, v)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention supports float16, bfloat16 and float32, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[-1]} is larger than the supported {MAX_HEAD_DIM}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    documents = None
    if document_ids is not None:
        check_document_ids(q, k, document_ids, query_start, causal)
        check_device(q, document_ids)
        documents = document_runs(document_ids)
    elif query_start != 0:
        raise ValueError(f"query_start={query_start} places queries among document_ids; pass document_ids with it")
    return FlashAttentionFunction.apply(q, k, v, causal, float(softmax_scale), documents, query_start)
