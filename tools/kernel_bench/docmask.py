"""Document-masked attention: the Triton kernel with per-token document ids next to the torch
backend (one SDPA call per document), SDPA with a (B, 1, S, S) block mask and flex-attention
(GPU); without Triton, the torch paths alone (a CPU's choice between them).

Packed rows of ragged documents (lengths drawn log-normally around ``mean_document``, seeded).
TFLOP/s count only the pairs a document mask leaves visible: 4 * H * D per visible (query, key)
pair forward, 2.5x that backward. The unmasked causal kernel is timed beside them, counted on
its own (all causal) pairs, to show what skipping masked pairs saves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from megatron_lite.kernels import backends

from .report import fmt
from .sweep import peak_memory_mb, time_ms


@dataclass
class DocmaskResult:
    provider: str
    seq: int
    batch: int
    heads: int
    head_dim: int
    documents: int
    visible_fraction: float  # visible pairs / causal pairs
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mb: float | None = None
    note: str = ""


def ragged_lengths(seq: int, mean_document: int, rng: np.random.Generator) -> list[int]:
    """Document lengths filling ``seq`` exactly, log-normal around ``mean_document``, at least 1."""
    lengths, left = [], seq
    while left > 0:
        n = int(min(left, max(1, rng.lognormal(np.log(mean_document), 1.0))))
        lengths.append(n)
        left -= n
    return lengths


def document_ids(batch_lengths: list[list[int]], device: torch.device) -> torch.Tensor:
    rows = [np.repeat(np.arange(len(lengths), dtype=np.int32), lengths) for lengths in batch_lengths]
    return torch.from_numpy(np.stack(rows)).to(device)


def visible_pairs(batch_lengths: list[list[int]]) -> int:
    """Causal (query, key) pairs inside documents, over the batch."""
    return sum(n * (n + 1) // 2 for lengths in batch_lengths for n in lengths)


UNMASKED = " (no mask)"  # a provider timing plain causal attention, counted on all causal pairs


def providers(documents: torch.Tensor, cuda: bool, with_triton: bool = True) -> dict[str, Callable]:
    """name -> fn(q, k, v) computing document-masked causal attention, and one unmasked causal baseline."""
    torch_attention = backends.function("attention", "torch")
    seq = documents.shape[1]
    block_mask = (documents[:, None, :, None] == documents[:, None, None, :]) & torch.ones(
        seq, seq, dtype=torch.bool, device=documents.device).tril()  # (B, 1, S, S)
    found = {
        "torch per-document sdpa": lambda q, k, v: torch_attention(q, k, v, causal=True, document_ids=documents),
        "sdpa block mask": lambda q, k, v: torch_attention(q, k, v, causal=True, mask=block_mask),
        "sdpa causal" + UNMASKED: lambda q, k, v: torch_attention(q, k, v, causal=True),
    }
    if with_triton:
        triton_attention = backends.function("attention", "triton")
        found["triton"] = lambda q, k, v: triton_attention(q, k, v, causal=True, document_ids=documents)
        found["triton causal" + UNMASKED] = lambda q, k, v: triton_attention(q, k, v, causal=True)
    if cuda:
        flex = _flex_attention(documents)
        if flex is not None:
            found["flex-attention"] = flex
    return found


def _flex_attention(documents: torch.Tensor) -> Callable | None:
    """Compiled flex-attention with a block mask of causal, same-document pairs; None when absent."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    batch, seq = documents.shape
    block_mask = create_block_mask(same_document_causal, batch, None, seq, seq, device=documents.device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # flex-attention takes (B, H, S, D)
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return run


def bench_case(name: str, fn: Callable, q, k, v, visible: int, result: DocmaskResult, cuda: bool) -> DocmaskResult:
    do = torch.randn_like(q)
    try:
        fwd_ms = time_ms(lambda: fn(q, k, v), cuda)
        both = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)  # noqa: E731
        both_ms = time_ms(both, cuda)
        result.peak_mb = peak_memory_mb(both, cuda)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # a backend may refuse a shape
        result.note = f"failed: {str(exc).splitlines()[0][:80]}"
        return result
    pairs = result.batch * result.seq * (result.seq + 1) // 2 if name.endswith(UNMASKED) else visible
    flops = 4 * result.heads * result.head_dim * pairs
    result.fwd_tflops = flops / fwd_ms / 1e9
    result.fwd_bwd_tflops = 3.5 * flops / both_ms / 1e9
    result.fwd_bwd_ms = both_ms
    return result


def run_docmask(seqs: list[int], tokens: int, heads: int, head_dim: int, mean_document: int, dtype: torch.dtype,
                device: torch.device, with_triton: bool = True) -> list[DocmaskResult]:
    cuda = device.type == "cuda"
    rng = np.random.default_rng(0)
    results = []
    for seq in seqs:
        batch = max(1, tokens // seq)
        lengths = [ragged_lengths(seq, mean_document, rng) for _ in range(batch)]
        documents = document_ids(lengths, device)
        visible = visible_pairs(lengths)
        q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        row = []
        for name, fn in providers(documents, cuda, with_triton).items():
            base = DocmaskResult(name, seq, batch, heads, head_dim, sum(map(len, lengths)),
                                 visible / (batch * seq * (seq + 1) // 2))
            row.append(bench_case(name, fn, q, k, v, visible, base, cuda))
            if cuda:
                torch.cuda.empty_cache()
        print(f"docmask S={seq} B={batch} documents={row[0].documents} visible={100 * row[0].visible_fraction:.1f}%: "
              + ", ".join(f"{r.provider} {fmt(r.fwd_tflops, 3)}/{fmt(r.fwd_bwd_tflops, 3)} ({fmt(r.fwd_bwd_ms)} ms)"
                          for r in row)
              + " (fwd/fwd+bwd TFLOP/s on visible pairs, fwd+bwd ms)", flush=True)
        results += row
    return results


def docmask_markdown(results: list[DocmaskResult], device_name: str, dtype: str) -> list[str]:
    names = list(dict.fromkeys(r.provider for r in results))
    lines = [f"### Document-masked attention on {device_name}, {dtype} (TFLOP/s on visible pairs: forward / "
             "forward+backward; forward+backward ms; peak MiB)", "",
             "| S | B x H x D | documents | visible pairs | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for seq in dict.fromkeys(r.seq for r in results):
        row = {r.provider: r for r in results if r.seq == seq}
        first = next(iter(row.values()))
        cells = []
        for name in names:
            r = row.get(name)
            if r is None or r.fwd_tflops is None:
                cells.append("n/a" if r is None else r.note.split(":")[0])
            else:
                memory = "" if r.peak_mb is None else f", {r.peak_mb:.0f} MiB"
                cells.append(f"{fmt(r.fwd_tflops, 3)} / {fmt(r.fwd_bwd_tflops, 3)} ({fmt(r.fwd_bwd_ms)} ms{memory})")
        lines.append(f"| {seq} | {first.batch} x {first.heads} x {first.head_dim} | {first.documents} | "
                     f"{100 * first.visible_fraction:.1f}% | " + " | ".join(cells) + " |")
    return lines


def as_json(results: list[DocmaskResult]) -> list[dict]:
    return [asdict(r) for r in results]
