"""Fused attention against a float64 reference (Triton interpreter on CPU, or a GPU)."""

import math

import pytest
import torch
from kernel_checks import assert_matches_reference

from megatron_lite.kernels import flash_attention, reference
from megatron_lite.kernels import attention as attention_module
from megatron_lite.kernels._common import new_output, poisoned_outputs, seq_bucket

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = (torch.float32, torch.float16)


def _qkv(batch, seq, heads, kv_heads, head_dim, dtype):
    q = torch.randn(batch, seq, heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim, device=DEVICE, dtype=dtype)
    return q, k, v


# (batch, seq, heads, kv_heads, head_dim, causal, dtype): odd lengths that split tiles unevenly,
# GQA ratios 1/4/8, a head dim that needs padding (48), and exact tile multiples (64).
CASES = [
    (2, 37, 4, 1, 64, True, torch.float16),
    (2, 37, 4, 1, 64, False, torch.float32),
    (1, 45, 8, 1, 64, False, torch.float16),
    (1, 45, 8, 1, 64, True, torch.float32),
    (2, 33, 2, 2, 48, True, torch.float16),
    (1, 64, 2, 2, 64, False, torch.float16),
    (1, 64, 2, 2, 64, True, torch.float32),
    (1, 20, 2, 1, 128, True, torch.float16),
]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,causal,dtype", CASES)
def test_matches_float64_reference(batch, seq, heads, kv_heads, head_dim, causal, dtype):
    inputs = list(_qkv(batch, seq, heads, kv_heads, head_dim, dtype))
    assert_matches_reference(lambda q, k, v: flash_attention(q, k, v, causal),
                             lambda q, k, v: reference.flash_attention(q, k, v, causal), inputs)


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 accuracy is judged on GPU tensor cores")
@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_on_gpu(causal):
    inputs = list(_qkv(2, 300, 8, 2, 128, torch.bfloat16))
    assert_matches_reference(lambda q, k, v: flash_attention(q, k, v, causal),
                             lambda q, k, v: reference.flash_attention(q, k, v, causal), inputs)


def test_bfloat16_runs_under_the_interpreter():
    # The interpreter's bfloat16 dot is wrong unless the kernel upcasts; a coarse bound catches that.
    q, k, v = _qkv(1, 33, 2, 1, 64, torch.bfloat16)
    out = flash_attention(q, k, v, causal=True)
    want = reference.flash_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - want).abs().max() < 0.05


def test_softmax_scale_and_strided_inputs():
    # q, k, v as slices of one packed (B, S, 3, H, D) projection: no dense strides anywhere.
    packed = torch.randn(2, 29, 3, 4, 64, device=DEVICE, dtype=torch.float16)
    q, k, v = packed.unbind(dim=2)
    assert not q.is_contiguous()
    scale = 0.3 / math.sqrt(64)
    assert_matches_reference(lambda q, k, v: flash_attention(q, k, v, causal=True, softmax_scale=scale),
                             lambda q, k, v: reference.flash_attention(q, k, v, True, scale), [q, k, v])


def test_cross_attention_with_different_lengths():
    q = torch.randn(1, 19, 4, 64, device=DEVICE, dtype=torch.float32)
    k = torch.randn(1, 41, 2, 64, device=DEVICE, dtype=torch.float32)
    v = torch.randn(1, 41, 2, 64, device=DEVICE, dtype=torch.float32)
    assert_matches_reference(lambda q, k, v: flash_attention(q, k, v, causal=False),
                             lambda q, k, v: reference.flash_attention(q, k, v, False), [q, k, v])


def test_causal_output_ignores_future_keys():
    q, k, v = _qkv(1, 40, 2, 1, 64, torch.float32)
    out = flash_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, 20:] = torch.randn_like(k2[:, 20:])
    v2[:, 20:] = torch.randn_like(v2[:, 20:])
    out2 = flash_attention(q, k2, v2, causal=True)
    assert torch.equal(out[:, :20], out2[:, :20])
    assert not torch.allclose(out[:, 20:], out2[:, 20:])


def test_backward_is_bitwise_deterministic():
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 37, 8, 2, 64, torch.float16))
    grad_out = torch.randn_like(q)
    first = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), grad_out)
    second = torch.autograd.grad(flash_attention(q, k, v), (q, k, v), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_saved_log_sum_exp_is_the_row_logsumexp():
    q, k, v = _qkv(1, 37, 2, 1, 64, torch.float32)
    scale = 0.125
    _, lse = attention_module.attention_forward(q, k, v, causal=True, softmax_scale=scale)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().expand(-1, -1, 2, -1)) * scale
    scores = scores.masked_fill(torch.ones(37, 37, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)


def test_poisoned_outputs_start_as_nan():
    with poisoned_outputs():
        buffer = new_output((3, 4), torch.float16, torch.device(DEVICE))
    assert torch.isnan(buffer).all()
    with poisoned_outputs(False):
        assert not torch.isnan(new_output((3, 4), torch.float32, torch.device(DEVICE)).fill_(0)).any()


def test_autotuning_is_keyed_on_a_sequence_bucket():
    assert [seq_bucket(n) for n in (1, 100, 128, 129, 1000, 4096)] == [16, 128, 128, 256, 1024, 4096]
    held_tile = {attention_module._fwd: "BLOCK_M", attention_module._dq: "BLOCK_M", attention_module._dkdv: "BLOCK_N"}
    for kernel, held in held_tile.items():
        assert kernel.tuned.keys[:4] == ["seq_key", "programs_key", "head_dim", "CAUSAL"]
        streamed = "BLOCK_N" if held == "BLOCK_M" else "BLOCK_M"
        for config in kernel.tuned.configs:
            assert config.kwargs[held] % config.kwargs[streamed] == 0, (
                f"{config}: the streamed tile must divide the held tile for causal block skipping")


@pytest.mark.parametrize(
    "q_shape,kv_shape,kwargs,message",
    [
        ((2, 8, 4), (2, 8, 4), {}, "must be 4-D"),
        ((1, 8, 4, 16), (1, 8, 3, 16), {}, "not a multiple of the 3 k/v heads"),
        ((1, 8, 4, 16), (1, 9, 4, 16), {"causal": True}, "causal attention needs q and k of the same length"),
        ((1, 8, 4, 16), (1, 8, 4, 32), {}, "does not match q shape"),
        ((1, 8, 4, 512), (1, 8, 4, 512), {}, "head_dim 512 is larger than the supported 128"),
        ((1, 8, 4, 16), (1, 8, 4, 16), {"softmax_scale": -0.25}, "softmax_scale must be a positive finite number"),
        ((1, 8, 4, 16), (1, 8, 4, 16), {"softmax_scale": float("nan")}, "softmax_scale must be a positive finite"),
    ],
)
def test_bad_shapes_are_rejected(q_shape, kv_shape, kwargs, message):
    q = torch.randn(q_shape, device=DEVICE)
    k = torch.randn(kv_shape, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, k.clone(), **kwargs)


def test_bad_dtypes_are_rejected():
    q, k, v = _qkv(1, 8, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="must share a dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="supports float16, bfloat16 and float32"):
        flash_attention(q.double(), k.double(), v.double())


def test_cpu_tensors_without_the_interpreter_are_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        flash_attention(q, k, v)


@pytest.mark.parametrize("capability,head_dim,offset,ready", [
    ((9, 0), 8, 0, True),     # Hopper, every head and row starting on 16 bytes
    ((8, 0), 8, 0, False),    # Ampere has no TMA
    ((9, 0), 8, 1, False),    # a view starting one element in: base address not 16-byte aligned
    ((9, 0), 4, 0, False),    # head_dim 4 in fp16: heads start every 8 bytes
])
def test_bulk_copies_are_used_only_where_they_can_run(monkeypatch, capability, head_dim, offset, ready):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    storage = torch.zeros(2 * 8 * 2 * head_dim + offset, dtype=torch.float16)
    k = storage[offset:].view(2, 8, 2, head_dim)
    assert attention_module._tma_ready(k, k) == ready


@pytest.mark.parametrize("ready", [1, 0])
def test_bulk_copy_settings_are_tuning_candidates_only_for_ready_tensors(ready):
    configs = attention_module._FWD_CONFIGS
    assert any(c.kwargs["TMA"] for c in configs) and not all(c.kwargs["TMA"] for c in configs)
    kept = attention_module._drop_unusable_tma(configs, {"tma_ready": ready})
    assert kept == (configs if ready else [c for c in configs if not c.kwargs["TMA"]])
    # Readiness is part of the forward's tuning key, so a pick made for aligned tensors is not
    # reused for tensors that cannot take bulk copies.
    assert attention_module._fwd.tuned.keys[-1] == "tma_ready"


# ----------------------------------------------------------------------------- document masks


def _documents(batch_lengths) -> torch.Tensor:
    """(B, S) int32 ids from each row's document lengths."""
    rows = [torch.cat([torch.full((n,), d, dtype=torch.int32) for d, n in enumerate(lengths)])
            for lengths in batch_lengths]
    return torch.stack(rows).to(DEVICE)


# (seq, heads, kv_heads, head_dim, per-row document lengths, causal, dtype): documents shorter and
# longer than the interpreter's tiles (16 / 32), single-token documents, one document per row,
# an odd length that pads the last tile, and GQA.
DOCUMENT_CASES = [
    (45, 4, 2, 32, [[5, 17, 3, 20]], True, torch.float32),
    (45, 4, 2, 32, [[5, 17, 3, 20]], False, torch.float16),
    (37, 2, 1, 16, [[1, 36], [10, 1, 1, 10, 15]], True, torch.float16),
    (37, 2, 1, 16, [[1, 36], [10, 1, 1, 10, 15]], False, torch.float32),
    (64, 4, 1, 64, [[33, 31], [64]], True, torch.float32),
    (70, 2, 2, 48, [[16, 16, 16, 16, 6]], True, torch.float16),
]


@pytest.mark.parametrize("seq,heads,kv_heads,head_dim,lengths,causal,dtype", DOCUMENT_CASES)
def test_document_mask_matches_float64_reference(seq, heads, kv_heads, head_dim, lengths, causal, dtype):
    documents = _documents(lengths)
    inputs = list(_qkv(len(lengths), seq, heads, kv_heads, head_dim, dtype))
    assert_matches_reference(lambda q, k, v: flash_attention(q, k, v, causal, document_ids=documents),
                             lambda q, k, v: reference.flash_attention(q, k, v, causal, document_ids=documents),
                             inputs)


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 accuracy is judged on GPU tensor cores")
def test_document_mask_bfloat16_on_gpu():
    lengths = [[700, 13, 1, 300, 1034], [2048]]
    documents = _documents(lengths)
    inputs = list(_qkv(2, 2048, 8, 2, 128, torch.bfloat16))
    assert_matches_reference(lambda q, k, v: flash_attention(q, k, v, True, document_ids=documents),
                             lambda q, k, v: reference.flash_attention(q, k, v, True, document_ids=documents),
                             inputs)


@pytest.mark.parametrize("causal", [True, False])
def test_tiles_of_other_documents_are_skipped(causal):
    # Two documents of 32 tokens: every tile pairing them is fully masked. NaN in the first
    # document reaches the second one's outputs and gradients only through a tile that was not
    # skipped (a masked NaN score still multiplies NaN values into the sums).
    documents = _documents([[32, 32]])
    q, k, v = _qkv(1, 64, 2, 1, 32, torch.float32)
    for t in (q, k, v):
        t[:, :32] = float("nan")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = flash_attention(q, k, v, causal, document_ids=documents)
    grad_out = torch.randn_like(out)
    grad_out[:, :32] = float("nan")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    alone = [t[:, 32:].detach().clone().requires_grad_(True) for t in (q, k, v)]
    want = flash_attention(*alone, causal)
    want_grads = torch.autograd.grad(want, alone, grad_out[:, 32:])
    torch.testing.assert_close(out[:, 32:], want)
    for got, expected in zip((dq, dk, dv), want_grads):
        torch.testing.assert_close(got[:, 32:], expected)


def test_document_mask_backward_is_bitwise_deterministic():
    documents = _documents([[3, 20, 14], [37]])
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 37, 8, 2, 64, torch.float16))
    grad_out = torch.randn_like(q)
    first = torch.autograd.grad(flash_attention(q, k, v, document_ids=documents), (q, k, v), grad_out)
    second = torch.autograd.grad(flash_attention(q, k, v, document_ids=documents), (q, k, v), grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_document_ids_of_the_wrong_shape_or_kind_are_rejected():
    q, k, v = _qkv(2, 8, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"document_ids must be \(batch, seq\) = \(2, 8\), one id per token, got shape \(8,\)"):
        flash_attention(q, k, v, document_ids=torch.zeros(8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="document_ids must be an integer tensor, got torch.float32"):
        flash_attention(q, k, v, document_ids=torch.zeros(2, 8, device=DEVICE))
    long_k = torch.randn(2, 12, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="document_ids mask self-attention, but q has 8 positions and k 12"):
        flash_attention(q, long_k, long_k, causal=False, document_ids=torch.zeros(2, 8, dtype=torch.int32, device=DEVICE))


def test_document_runs_number_each_run_and_bound_it():
    ids = torch.tensor([[4, 4, 4, 9, 9, 4, 4, 1], [0, 0, 0, 0, 0, 0, 0, 0]], device=DEVICE)
    runs = attention_module.document_runs(ids)
    assert runs.dtype == torch.int32 and runs.shape == (2, 3, 8) and runs.is_contiguous()
    numbers, starts, ends = runs.unbind(dim=1)
    assert numbers.tolist() == [[0, 0, 0, 1, 1, 2, 2, 3], [0] * 8]
    assert starts.tolist() == [[0, 0, 0, 3, 3, 5, 5, 7], [0] * 8]
    assert ends.tolist() == [[3, 3, 3, 5, 5, 7, 7, 8], [8] * 8]


def test_a_repeated_id_starts_a_new_document():
    # Ids need not rise: [0]*20 + [1]*10 + [0]*15 is three documents, in the kernel and the reference.
    documents = torch.tensor([[0] * 20 + [1] * 10 + [0] * 15], device=DEVICE)
    numbered = _documents([[20, 10, 15]])
    q, k, v = _qkv(1, 45, 2, 1, 32, torch.float32)
    torch.testing.assert_close(flash_attention(q, k, v, document_ids=documents),
                               reference.flash_attention(q, k, v, document_ids=numbered), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- queries after a key prefix

# (keys, queries, heads, kv_heads, head_dim, per-row document lengths over keys + queries, dtype):
# context parallelism's prefix blocks. Documents crossing from the keys into the queries, queries
# whose document starts after the last key (they see nothing: zeros), a prefix shorter than one
# tile, and lengths that pad the last tile on either side.
PREFIX_CASES = [
    (48, 16, 4, 2, 32, [[5, 17, 30, 12]], torch.float32),
    (48, 16, 4, 2, 32, [[5, 50, 9], [64]], torch.float16),
    (37, 21, 2, 1, 16, [[1, 36, 1, 10, 10], [40, 18]], torch.float32),
    (8, 40, 2, 2, 48, [[3, 9, 36]], torch.float16),
    (64, 32, 4, 1, 64, [[16, 16, 16, 16, 16, 16]], torch.float32),
]


@pytest.mark.parametrize("keys,queries,heads,kv_heads,head_dim,lengths,dtype", PREFIX_CASES)
def test_queries_after_a_key_prefix_match_float64_reference(keys, queries, heads, kv_heads, head_dim, lengths, dtype):
    documents = _documents(lengths)
    q = torch.randn(len(lengths), queries, heads, head_dim, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(len(lengths), keys, kv_heads, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    assert_matches_reference(
        lambda q, k, v: flash_attention(q, k, v, False, document_ids=documents, query_start=keys),
        lambda q, k, v: reference.flash_attention(q, k, v, False, document_ids=documents, query_start=keys),
        [q, k, v])


def test_a_split_key_range_merges_to_the_joint_softmax():
    """The diagonal block (causal self-attention) and the key prefix (query_start), merged by their
    log-sum-exp, give causal document-masked attention over all keys, forward and backward: the
    backward of each block with the merged output and log-sum-exp is its share of the joint one."""
    prefix, chunk = 40, 24
    documents = _documents([[7, 45, 12], [52, 12]])  # (2, 64)
    q = torch.randn(2, chunk, 4, 32, device=DEVICE, dtype=torch.float32)
    k, v = (torch.randn(2, prefix + chunk, 2, 32, device=DEVICE, dtype=torch.float32) for _ in range(2))
    grad_out = torch.randn_like(q)
    scale = 32 ** -0.5
    diag = attention_module.document_runs(documents[:, prefix:])
    runs = attention_module.document_runs(documents)
    out_a, lse_a = attention_module.attention_forward(q, k[:, prefix:].contiguous(), v[:, prefix:].contiguous(),
                                                      True, scale, diag)
    out_b, lse_b = attention_module.attention_forward(q, k[:, :prefix].contiguous(), v[:, :prefix].contiguous(),
                                                      False, scale, runs, prefix)
    assert torch.isinf(lse_b[1, :, 12:]).all() and (out_b[1, 12:] == 0).all()  # a document after every key
    lse = torch.logaddexp(lse_a, lse_b)
    out = (out_a * torch.exp(lse_a - lse).transpose(1, 2)[..., None]
           + out_b * torch.exp(lse_b - lse).transpose(1, 2)[..., None])
    dq_a, dk_a, dv_a = attention_module.attention_backward(grad_out, q, k[:, prefix:].contiguous(),
                                                           v[:, prefix:].contiguous(), out, lse, True, scale, diag)
    dq_b, dk_b, dv_b = attention_module.attention_backward(grad_out, q, k[:, :prefix].contiguous(),
                                                           v[:, :prefix].contiguous(), out, lse, False, scale, runs,
                                                           prefix)
    # the reference: the chunk's queries as the last rows of causal attention over the whole sequence
    full_q = torch.cat([torch.zeros(2, prefix, 4, 32, device=DEVICE), q], dim=1).double().requires_grad_()
    k64, v64 = (t.double().requires_grad_() for t in (k, v))
    want = reference.flash_attention(full_q, k64, v64, True, document_ids=documents)[:, prefix:]
    want.backward(grad_out.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((dq_a + dq_b).double(), full_q.grad[:, prefix:], rtol=1e-5, atol=1e-5)
    # the zero queries of the reference add nothing to dK, dV
    torch.testing.assert_close(torch.cat([dk_b, dk_a], dim=1).double(), k64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([dv_b, dv_a], dim=1).double(), v64.grad, rtol=1e-5, atol=1e-5)


def test_query_start_errors():
    q, k, v = _qkv(1, 8, 2, 2, 16, torch.float32)
    ids = torch.zeros(1, 12, dtype=torch.int32, device=DEVICE)
    long_k = torch.randn(1, 12, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="query_start=4 places the queries after a non-causal key prefix; it must be "
                                         ">= 0, and 0 for causal"):
        flash_attention(q, k, v, True, document_ids=ids, query_start=4)
    with pytest.raises(ValueError, match="query_start=2 places queries among document_ids; pass document_ids"):
        flash_attention(q, k, v, False, query_start=2)
    with pytest.raises(ValueError, match="with query_start=2 the queries end at position 10, before the 12 keys"):
        flash_attention(q, long_k, long_k, False, document_ids=ids[:, :10], query_start=2)
    with pytest.raises(ValueError, match=r"document_ids must be \(batch, seq\) = \(1, 12\), one id per token, got "
                                         r"shape \(1, 10\)"):
        flash_attention(q, k[:, :4], v[:, :4], False, document_ids=ids[:, :10], query_start=4)


def test_key_prefix_tiles_of_other_documents_are_skipped():
    # Keys: document A (32) then B (32); the 32 queries continue B. NaN keys of A reach B's results,
    # and A's dK/dV become anything but zero, only through a tile that was not skipped.
    documents = _documents([[32, 64]])  # (1, 96): A at [0, 32), B at [32, 96)
    q = torch.randn(1, 32, 2, 32, device=DEVICE)
    k, v = (torch.randn(1, 64, 1, 32, device=DEVICE) for _ in range(2))
    k[:, :32], v[:, :32] = float("nan"), float("nan")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = flash_attention(q, k, v, False, document_ids=documents, query_start=64)
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    alone = [t.detach().clone().requires_grad_(True) for t in (q, k[:, 32:], v[:, 32:])]
    want = flash_attention(*alone, False)
    want_dq, want_dk, want_dv = torch.autograd.grad(want, alone, grad_out)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dq, want_dq)
    torch.testing.assert_close(dk[:, 32:], want_dk)
    torch.testing.assert_close(dv[:, 32:], want_dv)
    assert (dk[:, :32] == 0).all() and (dv[:, :32] == 0).all()
