"""Time every op's backends from the kernel registry, the functions the model runs, next to baselines.

Attention FLOPs are counted as 4*B*H*S^2*D for the forward (halved when causal) and 2.5x
that for the backward. Norm bandwidth counts the bytes a perfect kernel must move (each
input read once, each output written once). Both are shown next to the device's measured
device-to-device copy bandwidth and bf16 matmul rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_lite.kernels import backends, layernorm, reference
from megatron_lite.kernels._common import gpu_time_ms

from .report import fmt

# ----------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], cuda: bool, rep_ms: int = 60) -> float:
    """Median milliseconds of ``fn`` (device events on GPU, a host clock on CPU)."""
    if cuda:
        return gpu_time_ms(fn, rounds=5, round_ms=rep_ms / 5)
    fn()  # the interpreter's first call traces the kernel
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_memory_mb(fn: Callable[[], object], cuda: bool) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, cuda: bool) -> float:
    numel = (1 << 28) if cuda else (1 << 20)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cuda, rep_ms=200)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops(device: torch.device, cuda: bool) -> float:
    n = 8192 if cuda else 256
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, cuda, rep_ms=200)
    return 2 * n**3 / ms / 1e9


# ----------------------------------------------------------------------------- attention


def attention_providers(cuda: bool) -> dict[str, Callable]:
    """The registry's attention backends (torch under each SDPA kernel on GPU) and the math reference."""
    torch_attention = backends.function("attention", "torch")
    providers: dict[str, Callable] = {"triton": backends.function("attention", "triton"),
                                      "torch eager": reference.flash_attention}
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                               ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                               ("sdpa math", SDPBackend.MATH)):
            providers[label] = _with_sdpa_backend(torch_attention, sdpa_kernel, backend)
    else:
        providers["sdpa"] = torch_attention
    if backends.flash_attn_available():
        providers["flash-attn"] = backends.function("attention", "flash_attn")
    return providers


def _with_sdpa_backend(torch_attention: Callable, sdpa_kernel, backend) -> Callable:
    def run(q, k, v, causal=True):
        with sdpa_kernel(backend):
            return torch_attention(q, k, v, causal=causal)

    return run


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    return 4 * batch * heads * seq * seq * head_dim / (2 if causal else 1)


@dataclass
class AttentionResult:
    provider: str
    seq: int
    head_dim: int
    causal: bool
    batch: int
    heads: int
    fwd_tflops: float | None = None
    bwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    peak_mb: float | None = None
    note: str = ""


def _materialises_scores(provider: str) -> bool:
    return provider in ("torch eager", "sdpa math")


def bench_attention_case(provider: str, fn: Callable, batch: int, heads: int, seq: int, head_dim: int,
                         causal: bool, dtype: torch.dtype, device: torch.device, cuda: bool) -> AttentionResult:
    result = AttentionResult(provider, seq, head_dim, causal, batch, heads)
    if _materialises_scores(provider) and batch * heads * seq * seq > (1 << 30):
        result.note = "skipped: (S, S) scores too large"
        return result
    q, k, v, do = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    try:
        out = fn(q, k, v, causal=causal)
        fwd_ms = time_ms(lambda: fn(q, k, v, causal=causal), cuda)
        bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), cuda)
        both = lambda: torch.autograd.grad(fn(q, k, v, causal=causal), (q, k, v), do)  # noqa: E731
        both_ms = time_ms(both, cuda)
        result.peak_mb = peak_memory_mb(both, cuda)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # an SDPA backend may refuse a shape
        result.note = f"failed: {str(exc).splitlines()[0][:80]}"
        return result
    flops = attention_flops(batch, heads, seq, head_dim, causal)
    result.fwd_tflops = flops / fwd_ms / 1e9
    result.bwd_tflops = 2.5 * flops / bwd_ms / 1e9
    result.fwd_bwd_tflops = 3.5 * flops / both_ms / 1e9
    return result


def bench_attention(seqs: list[int], head_dims: list[int], tokens: int, model_width: int, dtype: torch.dtype,
                    device: torch.device, cuda: bool) -> list[AttentionResult]:
    results = []
    providers = attention_providers(cuda)
    for head_dim in head_dims:
        for causal in (True, False):
            for seq in seqs:
                batch, heads = max(1, tokens // seq), max(1, model_width // head_dim)
                for name, fn in providers.items():
                    results.append(bench_attention_case(name, fn, batch, heads, seq, head_dim, causal, dtype,
                                                        device, cuda))
                    if cuda:
                        torch.cuda.empty_cache()
                _print_attention_row(results[-len(providers):])
    return results


def _print_attention_row(rows: list[AttentionResult]) -> None:
    first = rows[0]
    cells = ", ".join(f"{r.provider} {fmt(r.fwd_tflops)}/{fmt(r.fwd_bwd_tflops)}" for r in rows)
    print(f"attention D={first.head_dim} causal={first.causal} S={first.seq}: {cells} (fwd/fwd+bwd TFLOP/s)",
          flush=True)


# ----------------------------------------------------------------------------- norms and elementwise ops


@dataclass
class NormResult:
    provider: str
    kind: str
    hidden: int
    rows: int
    fwd_gbs: float | None = None
    bwd_gbs: float | None = None
    fwd_copy_fraction: float | None = None
    bwd_copy_fraction: float | None = None
    note: str = ""


def norm_providers(kind: str) -> dict[str, Callable]:
    """``fn(x, weight, bias)`` for the registry's backends of norm ``kind`` and the float32 math reference."""
    def entry(name: str) -> Callable:
        fn = backends.function(kind, name)
        return fn if kind == "layer_norm" else (lambda x, w, b: fn(x, w))

    slow = reference.layer_norm if kind == "layer_norm" else (lambda x, w, b: reference.rms_norm(x, w))
    providers = {"triton": entry("triton"), "torch eager": entry("torch"), "torch reference": slow}
    if backends.apex_available():
        providers["apex"] = entry("apex")
    return providers


def bandwidth_case(provider: str, kind: str, fn: Callable, inputs: list[torch.Tensor], width: int, rows: int,
                   fwd_bytes: int, bwd_bytes: int, cuda: bool, copy_gbs: float,
                   replayable_backward: bool = True) -> NormResult:
    """Forward and backward GB/s of ``fn(*inputs)``, counting the bytes a perfect kernel must move.
    ``replayable_backward=False``: the backward consumes what forward saved (the torch loss turns its
    exponentials into the gradient in place), so it is timed as forward + backward minus forward."""
    result = NormResult(provider, kind, width, rows)
    params = [t for t in inputs if t.requires_grad]
    y = fn(*inputs)
    dy = torch.randn_like(y)
    fwd_ms = time_ms(lambda: fn(*inputs), cuda)
    if replayable_backward:
        bwd_ms = time_ms(lambda: torch.autograd.grad(y, params, dy, retain_graph=True), cuda)
    else:
        bwd_ms = max(time_ms(lambda: torch.autograd.grad(fn(*inputs), params, dy), cuda) - fwd_ms, 1e-6)
    result.fwd_gbs = fwd_bytes / fwd_ms / 1e6
    result.bwd_gbs = bwd_bytes / bwd_ms / 1e6
    result.fwd_copy_fraction = result.fwd_gbs / copy_gbs
    result.bwd_copy_fraction = result.bwd_gbs / copy_gbs
    return result


def bench_norm_case(provider: str, fn: Callable, kind: str, rows: int, hidden: int, dtype: torch.dtype,
                    device: torch.device, cuda: bool, copy_gbs: float) -> NormResult:
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_(True)
    b = (0.1 * torch.randn(hidden, device=device, dtype=dtype)).requires_grad_(kind == "layer_norm")
    tensor_bytes = x.numel() * x.element_size()
    param_bytes = hidden * w.element_size() * (2 if kind == "layer_norm" else 1)
    return bandwidth_case(provider, kind, fn, [x, w, b], hidden, rows,
                          fwd_bytes=2 * tensor_bytes + param_bytes,  # x in, y out
                          bwd_bytes=3 * tensor_bytes + 2 * param_bytes,  # x, dy in, dx out
                          cuda=cuda, copy_gbs=copy_gbs)


def _print_bandwidth_row(label: str, rows: list[NormResult]) -> None:
    print(f"{label}: " + ", ".join(f"{r.provider} {fmt(r.fwd_gbs, 0)}/{fmt(r.bwd_gbs, 0)}" for r in rows)
          + " (fwd/bwd GB/s)", flush=True)


def bench_norms(hiddens: list[int], elements: int, dtype: torch.dtype, device: torch.device, cuda: bool,
                copy_gbs: float) -> list[NormResult]:
    results = []
    for kind in ("layer_norm", "rms_norm"):
        for hidden in hiddens:
            rows = max(1, elements // hidden)
            providers = norm_providers(kind)
            for name, fn in providers.items():
                results.append(bench_norm_case(name, fn, kind, rows, hidden, dtype, device, cuda, copy_gbs))
            _print_bandwidth_row(f"{kind} N={hidden}", results[-len(providers):])
    _print_launch_picks()
    return results


def _print_launch_picks() -> None:
    """The launch settings the norm kernels timed on their first call, and which one won."""
    for direction, tuner, names in (("forward", layernorm._fwd_tuner, "ROWS, warps"),
                                    ("backward", layernorm._bwd_tuner, "ROWS, warps, programs per SM, variant")):
        for key, pick in tuner.picks.items():
            n_cols, rows_bucket, dtype, _, is_rms, _, _ = key
            kind = "rms_norm" if is_rms else "layer_norm"
            timed = ", ".join(f"{c}: {t * 1e3:.0f}us" for c, t in tuner.timings.get(key, []))
            print(f"launch pick {kind} {direction} N={n_cols} rows<={rows_bucket} {dtype}: ({names}) = {pick}"
                  + (f" [{timed}]" if timed else ""))


def _elementwise_providers(op: str) -> dict[str, Callable]:
    return {"triton": backends.function(op, "triton"), "torch eager": backends.function(op, "torch")}


def bench_elementwise(ffn_widths: list[int], head_dims: list[int], elements: int, dtype: torch.dtype,
                      device: torch.device, cuda: bool, copy_gbs: float) -> list[NormResult]:
    """SwiGLU over (rows, F) and RoPE over (1, T, H, D) with H * D = 4096 (or less when smoke-sized)."""
    results = []
    for width in ffn_widths:
        rows = max(1, elements // width)
        gate, up = (torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        tensor_bytes = gate.numel() * gate.element_size()
        for name, fn in _elementwise_providers("swiglu").items():
            results.append(bandwidth_case(name, "swiglu", fn, [gate, up], width, rows, fwd_bytes=3 * tensor_bytes,
                                          bwd_bytes=5 * tensor_bytes, cuda=cuda, copy_gbs=copy_gbs))
        _print_bandwidth_row(f"swiglu F={width}", results[-2:])
    for head_dim in head_dims:
        width = min(4096, elements // 4)
        tokens = max(1, elements // width)
        x = torch.randn(1, tokens, width // head_dim, head_dim, device=device, dtype=dtype, requires_grad=True)
        angles = torch.rand(1, tokens, 1, head_dim, device=device) * 100
        cos, sin = angles.cos(), angles.sin()
        moved = 2 * x.numel() * x.element_size() + 2 * cos.numel() * cos.element_size()  # x in, y out, tables
        for name, fn in _elementwise_providers("rope").items():
            results.append(bandwidth_case(name, f"rope D={head_dim}", lambda x, fn=fn: fn(x, cos, sin), [x], width,
                                          tokens, fwd_bytes=moved, bwd_bytes=moved, cuda=cuda, copy_gbs=copy_gbs))
        _print_bandwidth_row(f"rope D={head_dim}", results[-2:])
    return results


def bench_cross_entropy(vocabs: list[int], rows: int, dtype: torch.dtype, device: torch.device, cuda: bool,
                        copy_gbs: float) -> list[NormResult]:
    """Loss over (rows, vocab) logits: the forward reads them once, the backward reads them and writes dlogits."""
    fused, vocab_parallel = (backends.function("cross_entropy", name) for name in ("triton", "torch"))
    results = []
    for vocab in vocabs:
        logits = torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,), device=device)
        logit_bytes = logits.numel() * logits.element_size()
        # Per-token losses, as the model computes them: the registry's backends (the fused kernel and
        # the torch vocab-parallel loss) and, as a baseline, F.cross_entropy on a float32 copy.
        providers = {"triton": lambda x: fused(x, targets, vocab, None),
                     "torch vocab-parallel": lambda x: vocab_parallel(x, targets, vocab, None),
                     "torch eager": lambda x: reference.cross_entropy(x, targets, reduction="none")}
        for name, fn in providers.items():
            results.append(bandwidth_case(name, "cross_entropy", fn, [logits], vocab, rows, fwd_bytes=logit_bytes,
                                          bwd_bytes=2 * logit_bytes, cuda=cuda, copy_gbs=copy_gbs,
                                          replayable_backward=name != "torch vocab-parallel"))
        _print_bandwidth_row(f"cross_entropy V={vocab}", results[-len(providers):])
    return results


def run_sweep(sections: set[str], smoke: bool, seqs: list[int], head_dims: list[int], hiddens: list[int],
              dtype: torch.dtype, device: torch.device, copy_gbs: float) -> tuple[list[AttentionResult], list[NormResult]]:
    """The timed sections: smoke-sized shapes for the interpreter, or the given (and the models') shapes."""
    cuda = device.type == "cuda"
    if smoke:  # the interpreter runs every program in Python
        seqs, head_dims, hiddens = [16, 32], [64], [128, 512]
    elements = 4096 if smoke else 1 << 26
    attention, norms = [], []
    if "attention" in sections:
        tokens, width = (32, 128) if smoke else (16384, 2048)
        attention = bench_attention(seqs, head_dims, tokens=tokens, model_width=width, dtype=dtype, device=device,
                                    cuda=cuda)
    if "norms" in sections:
        norms += bench_norms(hiddens, elements=elements, dtype=dtype, device=device, cuda=cuda, copy_gbs=copy_gbs)
    if "elementwise" in sections:
        widths, rope_dims, elementwise_elements = ([256], [32], 2048) if smoke else ([4096, 11008, 14336], [64, 128],
                                                                                     elements)
        norms += bench_elementwise(widths, rope_dims, elements=elementwise_elements, dtype=dtype, device=device,
                                   cuda=cuda, copy_gbs=copy_gbs)
    if "cross_entropy" in sections:
        vocabs, rows = ([300], 4) if smoke else ([32000, 50304, 128256], 4096)
        norms += bench_cross_entropy(vocabs, rows=rows, dtype=dtype, device=device, cuda=cuda, copy_gbs=copy_gbs)
    return attention, norms
