"""Benchmark (and on GPU, check) the Triton kernels next to the PyTorch and optional backends.

    python tools/bench_kernels.py                 # GPU: full sweep, Markdown + PNGs into docs/
    python tools/bench_kernels.py --check         # GPU: bf16/fp16 correctness against float64 first
    python tools/bench_kernels.py --smoke         # CPU: tiny sweep through the Triton interpreter
    python tools/bench_kernels.py --only norms    # GPU: one section (attention, norms, elementwise, cross_entropy)

Attention FLOPs are counted as 4*B*H*S^2*D for the forward (halved when causal) and 2.5x
that for the backward. Norm bandwidth counts the bytes a perfect kernel must move (each
input read once, each output written once). Both are shown next to the device's measured
device-to-device copy bandwidth and bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton

import triton  # noqa: E402

from megatron_lite.kernels import backends, layernorm, reference  # noqa: E402
from megatron_lite.kernels._common import gpu_time_ms  # noqa: E402
from megatron_lite.kernels.attention import flash_attention  # noqa: E402
from megatron_lite.kernels.cross_entropy import cross_entropy, vocab_parallel_cross_entropy  # noqa: E402
from megatron_lite.kernels.elementwise import apply_rotary, swiglu  # noqa: E402
from megatron_lite.kernels.layernorm import layer_norm, rms_norm  # noqa: E402
from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy as torch_vocab_parallel_cross_entropy  # noqa: E402

# The module, not the function of the same name that megatron_lite.kernels exports.
ce_kernels = importlib.import_module("megatron_lite.kernels.cross_entropy")

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
    providers: dict[str, Callable] = {"triton": flash_attention, "torch eager": reference.flash_attention}
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION),
                               ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                               ("sdpa math", SDPBackend.MATH)):
            providers[label] = _with_sdpa_backend(sdpa_kernel, backend)
    else:
        providers["sdpa"] = reference.sdpa_attention
    if backends.flash_attn_available():
        providers["flash-attn"] = backends.attention_function("flash_attn")
    return providers


def _with_sdpa_backend(sdpa_kernel, backend) -> Callable:
    def run(q, k, v, causal=True, softmax_scale=None):
        with sdpa_kernel(backend):
            return reference.sdpa_attention(q, k, v, causal, softmax_scale)

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
        out = fn(q, k, v, causal)
        fwd_ms = time_ms(lambda: fn(q, k, v, causal), cuda)
        bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), cuda)
        both = lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)  # noqa: E731
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
    cells = ", ".join(f"{r.provider} {_fmt(r.fwd_tflops)}/{_fmt(r.fwd_bwd_tflops)}" for r in rows)
    print(f"attention D={first.head_dim} causal={first.causal} S={first.seq}: {cells} (fwd/fwd+bwd TFLOP/s)",
          flush=True)


# ----------------------------------------------------------------------------- norms


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
    if kind == "layer_norm":
        providers = {"triton": layer_norm,
                     "torch eager": lambda x, w, b: torch.nn.functional.layer_norm(x, w.shape, w, b, 1e-5),
                     "torch reference": reference.layer_norm}
    else:
        providers = {"triton": lambda x, w, b: rms_norm(x, w),
                     "torch eager": lambda x, w, b: torch.nn.functional.rms_norm(x, w.shape, w, 1e-6),
                     "torch reference": lambda x, w, b: reference.rms_norm(x, w)}
    if backends.apex_available():
        apex_ln, apex_rms = backends.norm_functions("apex")
        providers["apex"] = apex_ln if kind == "layer_norm" else (lambda x, w, b: apex_rms(x, w))
    return providers


def bandwidth_case(provider: str, kind: str, fn: Callable, inputs: list[torch.Tensor], width: int, rows: int,
                   fwd_bytes: int, bwd_bytes: int, cuda: bool, copy_gbs: float) -> NormResult:
    """Forward and backward GB/s of ``fn(*inputs)``, counting the bytes a perfect kernel must move."""
    result = NormResult(provider, kind, width, rows)
    params = [t for t in inputs if t.requires_grad]
    y = fn(*inputs)
    dy = torch.randn_like(y)
    fwd_ms = time_ms(lambda: fn(*inputs), cuda)
    bwd_ms = time_ms(lambda: torch.autograd.grad(y, params, dy, retain_graph=True), cuda)
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
    print(f"{label}: " + ", ".join(f"{r.provider} {_fmt(r.fwd_gbs, 0)}/{_fmt(r.bwd_gbs, 0)}" for r in rows)
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
    from megatron_lite.kernels import layernorm

    for direction, tuner, names in (("forward", layernorm._fwd_tuner, "ROWS, warps"),
                                    ("backward", layernorm._bwd_tuner, "ROWS, warps, programs per SM, variant")):
        for key, pick in tuner.picks.items():
            n_cols, rows_bucket, dtype, _, is_rms, _, _ = key
            kind = "rms_norm" if is_rms else "layer_norm"
            timed = ", ".join(f"{c}: {t * 1e3:.0f}us" for c, t in tuner.timings.get(key, []))
            print(f"launch pick {kind} {direction} N={n_cols} rows<={rows_bucket} {dtype}: ({names}) = {pick}"
                  + (f" [{timed}]" if timed else ""))


def bench_elementwise(ffn_widths: list[int], head_dims: list[int], elements: int, dtype: torch.dtype,
                      device: torch.device, cuda: bool, copy_gbs: float) -> list[NormResult]:
    """SwiGLU over (rows, F) and RoPE over (1, T, H, D) with H * D = 4096 (or less when smoke-sized)."""
    results = []
    for width in ffn_widths:
        rows = max(1, elements // width)
        gate, up = (torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        tensor_bytes = gate.numel() * gate.element_size()
        for name, fn in {"triton": swiglu, "torch eager": reference.swiglu}.items():
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
        for name, fn in {"triton": apply_rotary, "torch eager": reference.apply_rotary}.items():
            results.append(bandwidth_case(name, f"rope D={head_dim}", lambda x, fn=fn: fn(x, cos, sin), [x], width,
                                          tokens, fwd_bytes=moved, bwd_bytes=moved, cuda=cuda, copy_gbs=copy_gbs))
        _print_bandwidth_row(f"rope D={head_dim}", results[-2:])
    return results


def bench_cross_entropy(vocabs: list[int], rows: int, dtype: torch.dtype, device: torch.device, cuda: bool,
                        copy_gbs: float) -> list[NormResult]:
    """Loss over (rows, vocab) logits: the forward reads them once, the backward reads them and writes dlogits."""
    results = []
    for vocab in vocabs:
        logits = torch.randn(rows, vocab, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,), device=device)
        logit_bytes = logits.numel() * logits.element_size()
        # Per-token losses, as the model computes them: the fused kernel, the torch vocab-parallel
        # loss (model.loss_backend=torch), and F.cross_entropy on a float32 copy.
        providers = {"triton": lambda x: vocab_parallel_cross_entropy(x, targets, vocab),
                     "torch vocab-parallel": lambda x: torch_vocab_parallel_cross_entropy(x, targets, vocab),
                     "torch eager": lambda x: reference.cross_entropy(x, targets, reduction="none")}
        for name, fn in providers.items():
            results.append(bandwidth_case(name, "cross_entropy", fn, [logits], vocab, rows, fwd_bytes=logit_bytes,
                                          bwd_bytes=2 * logit_bytes, cuda=cuda, copy_gbs=copy_gbs))
        _print_bandwidth_row(f"cross_entropy V={vocab}", results[-len(providers):])
    return results


# ----------------------------------------------------------------------------- correctness


@dataclass
class CheckResult:
    name: str
    dtype: str
    worst_ratio: float  # max over outputs of error / (2 * torch error + atol); <= 1 passes
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0


def _max_errors(outputs: list[torch.Tensor], refs: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    errs = {}
    for name, out, ref in zip(names, outputs, refs):
        diff = (out.double() - ref).abs()
        errs[name] = float("inf") if torch.isnan(out).any() else float(diff.max())
    return errs


def _worst_ratio(errors: dict[str, float], torch_errors: dict[str, float], atol: float) -> float:
    """The largest error / (2 x PyTorch's own error in that dtype + atol) over the outputs."""
    return max(errors[n] / (2 * torch_errors[n] + atol) for n in errors)


def check_case(name: str, fast: Callable, slow: Callable, inputs: list[torch.Tensor], atol: float) -> CheckResult:
    """Errors of ``fast`` and of ``slow`` (same dtype) against ``slow`` in float64, outputs and gradients."""
    names = ["out"] + [f"d{i}" for i in range(len(inputs))]
    dtype = inputs[0].dtype

    def run(fn, tensors, grad):
        tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
        out = fn(*tensors)
        grads = torch.autograd.grad(out, tensors, grad.to(out.dtype))
        return [out.detach()] + list(grads)

    grad = torch.randn_like(slow(*inputs).double())
    refs = [t.detach() for t in run(slow, [t.double() for t in inputs], grad)]
    fast_err = _max_errors(run(fast, inputs, grad), refs, names)
    torch_err = _max_errors(run(slow, inputs, grad), refs, names)
    return CheckResult(name, str(dtype).replace("torch.", ""), _worst_ratio(fast_err, torch_err, atol), fast_err)


def check_rotary(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> CheckResult:
    batch, seq, _, head_dim = shape
    angles = torch.rand(batch, seq, 1, head_dim, device=device, dtype=torch.float64) * 100
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(shape, device=device, dtype=dtype)
    return check_case(f"rope B={batch} T={seq} H={shape[2]} D={head_dim}",
                      lambda x: apply_rotary(x, cos.float(), sin.float()),
                      lambda x: reference.apply_rotary(x, cos, sin), [x], atol=1e-3)


def check_norm_backward_settings(kind: str, hidden: int, dtype: torch.dtype, device: torch.device,
                                 atol: float = 1e-3) -> list[CheckResult]:
    """Every launch setting the norm backward's tuner may pick (variants, rows per program,
    warps), each against float64: a training run only ever uses the one that wins on its GPU."""
    is_rms = kind == "rms_norm"
    x = torch.randn(64, hidden, device=device, dtype=dtype)
    w = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    b = None if is_rms else 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    dy = torch.randn_like(x)
    params = [w] if is_rms else [w, b]
    slow = reference.rms_norm if is_rms else reference.layer_norm

    def grads(tensors):
        tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
        return [g.detach() for g in torch.autograd.grad(slow(*tensors), tensors, dy.to(tensors[0].dtype))]

    refs = grads([t.double() for t in [x, *params]])
    names = ["dx", "dw"] + ([] if is_rms else ["db"])
    torch_err = _max_errors(grads([x, *params]), refs, names)
    _, mean, rstd = layernorm.norm_forward(x, w, b, 1e-6 if is_rms else 1e-5, is_rms)
    results = []
    default_per_sm = layernorm._BWD_PROGRAMS_PER_SM[0]
    for setting in layernorm.backward_candidates(triton.next_power_of_2(hidden), x.element_size()):
        if setting[2] != default_per_sm:  # programs per SM only changes how many partial sums are added
            continue
        dx = torch.full_like(x, float("nan"))
        out = layernorm._backward_launch(dy, x, w, mean, rstd, not is_rms, dx, setting)
        errs = _max_errors([t for t in out if t is not None], refs, names)
        results.append(CheckResult(f"{kind} N={hidden} backward {setting[3]} ROWS={setting[0]} warps={setting[1]}",
                                   str(dtype).replace("torch.", ""), _worst_ratio(errs, torch_err, atol), errs))
    return results


def check_cross_entropy_settings(vocab: int, dtype: torch.dtype, device: torch.device,
                                  atol: float = 1e-3) -> list[CheckResult]:
    """Every launch setting the cross-entropy tuner may pick, forward and backward, on a padded vocabulary."""
    padded = vocab + 64 - vocab % 64
    logits = 8 * torch.randn(64, padded, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (64,), device=device)
    targets[3] = -100
    dloss = torch.randn(64, device=device)

    def loss_and_grad(x):
        x = x.detach().clone().requires_grad_(True)
        loss = reference.cross_entropy(x[:, :vocab], targets, reduction="none")
        return [loss.detach(), torch.autograd.grad(loss, x, dloss.to(loss.dtype))[0]]

    names = ["loss", "dlogits"]
    refs = loss_and_grad(logits.double())
    torch_err = _max_errors(loss_and_grad(logits), refs, names)
    results = []
    for setting in ce_kernels.launch_settings(padded):
        row_max, sum_exp, target_logit = ce_kernels.forward_stats(logits, targets, 0, vocab, -100, setting)
        lse = row_max + torch.log(sum_exp)
        loss = (lse - target_logit).masked_fill(targets == -100, 0.0)
        grad = ce_kernels.backward_grad(logits, targets, lse, dloss, 0, vocab, -100, setting)
        errs = _max_errors([loss, grad], refs, names)
        results.append(CheckResult(f"cross_entropy V={vocab} padded to {padded} BLOCK_V={setting[0]} warps={setting[1]}",
                                   str(dtype).replace("torch.", ""), _worst_ratio(errs, torch_err, atol), errs))
    return results


def run_checks(device: torch.device, sections: set[str] | None = None) -> list[CheckResult]:
    """Correctness of every kernel in ``sections`` (default: all of _SECTIONS) against float64."""
    sections = set(sections or _SECTIONS)
    results = []
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16,)
    attn_shapes = [(2, 1000, 8, 2, 128, True), (1, 777, 8, 8, 64, False), (2, 300, 8, 1, 80, True),
                   (1, 4096, 16, 16, 128, True)]
    hiddens = (1000, 4096, 16384)
    rope_shape, vocab = (2, 100, 8, 128), 50304
    if device.type != "cuda":  # the interpreter runs every program in Python
        attn_shapes, hiddens, rope_shape, vocab = [(1, 40, 2, 1, 64, True)], (300,), (1, 6, 2, 32), 300
    for dtype in dtypes:
        for batch, seq, heads, kv_heads, head_dim, causal in attn_shapes if "attention" in sections else ():
            q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype)
            k, v = (torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
            label = f"attention B={batch} S={seq} H={heads}/{kv_heads} D={head_dim} causal={causal}"
            results.append(check_case(label, lambda q, k, v, c=causal: flash_attention(q, k, v, c),
                                      lambda q, k, v, c=causal: reference.flash_attention(q, k, v, c),
                                      [q, k, v], atol=1e-3))
        for hidden in hiddens:
            x = torch.randn(64, hidden, device=device, dtype=dtype)
            w = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
            b = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
            if "norms" in sections:
                results.append(check_case(f"layer_norm N={hidden}", layer_norm, reference.layer_norm, [x, w, b], 1e-3))
                results.append(check_case(f"rms_norm N={hidden}", rms_norm, reference.rms_norm, [x, w], 1e-3))
                if dtype == dtypes[0]:
                    for kind in ("layer_norm", "rms_norm"):
                        results += check_norm_backward_settings(kind, hidden, dtype, device)
            if "elementwise" in sections:
                results.append(check_case(f"swiglu N={hidden}", swiglu, reference.swiglu, [x, torch.randn_like(x)],
                                          1e-3))
        if "elementwise" in sections:
            results.append(check_rotary(rope_shape, dtype, device))
        if "cross_entropy" not in sections:
            continue
        logits = 8 * torch.randn(64, vocab, device=device, dtype=dtype)
        targets = torch.randint(0, vocab, (64,), device=device)
        results.append(check_case(f"cross_entropy V={vocab}", lambda x: cross_entropy(x, targets),
                                  lambda x: reference.cross_entropy(x, targets), [logits], atol=1e-3))
        padded = vocab + 64 - vocab % 64  # the model's loss: padded vocabulary, per-token losses
        wide = torch.cat([logits, 8 * torch.randn(64, padded - vocab, device=device, dtype=dtype)], dim=1)
        results.append(check_case(f"vocab_parallel_cross_entropy V={vocab} padded to {padded}",
                                  lambda x: vocab_parallel_cross_entropy(x, targets, vocab),
                                  lambda x: reference.cross_entropy(x[:, :vocab], targets, reduction="none"),
                                  [wide], atol=1e-3))
        if dtype == dtypes[0]:
            results += check_cross_entropy_settings(vocab, dtype, device)
    for r in results:
        print(f"{'ok  ' if r.passed else 'FAIL'} {r.dtype:8s} {r.name}: error/bound {r.worst_ratio:.2f} "
              f"(max errors {', '.join(f'{k} {v:.2e}' for k, v in r.errors.items())})", flush=True)
    return results


# ----------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def attention_markdown(results: list[AttentionResult]) -> list[str]:
    providers = list(dict.fromkeys(r.provider for r in results))
    lines = ["### Attention (TFLOP/s: forward / backward / forward+backward; peak MiB of forward+backward)", "",
             "| D | causal | S | B x H | " + " | ".join(providers) + " |",
             "|---|---|---|---|" + "---|" * len(providers)]
    keys = list(dict.fromkeys((r.head_dim, r.causal, r.seq) for r in results))
    for key in keys:
        row = {r.provider: r for r in results if (r.head_dim, r.causal, r.seq) == key}
        first = next(iter(row.values()))
        cells = []
        for p in providers:
            r = row.get(p)
            if r is None or r.fwd_tflops is None:
                cells.append("n/a" if r is None or not r.note else r.note.split(":")[0])
            else:
                mem = "" if r.peak_mb is None else f" ({r.peak_mb:.0f} MiB)"
                cells.append(f"{_fmt(r.fwd_tflops)} / {_fmt(r.bwd_tflops)} / {_fmt(r.fwd_bwd_tflops)}{mem}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {first.batch} x {first.heads} | " + " | ".join(cells) + " |")
    return lines


def norms_markdown(results: list[NormResult], copy_gbs: float) -> list[str]:
    providers = list(dict.fromkeys(r.provider for r in results))
    lines = [f"### Norms and elementwise ops (GB/s forward / backward; percent of the {copy_gbs:.0f} GB/s copy "
             "bandwidth)", "", "| op | N | rows | " + " | ".join(providers) + " |",
             "|---|---|---|" + "---|" * len(providers)]
    for kind, hidden in dict.fromkeys((r.kind, r.hidden) for r in results):
        row = {r.provider: r for r in results if (r.kind, r.hidden) == (kind, hidden)}
        cells = [f"{_fmt(r.fwd_gbs, 0)} / {_fmt(r.bwd_gbs, 0)} ({100 * r.fwd_copy_fraction:.0f}% / "
                 f"{100 * r.bwd_copy_fraction:.0f}%)" if (r := row.get(p)) else "n/a" for p in providers]
        lines.append(f"| {kind} | {hidden} | {next(iter(row.values())).rows} | " + " | ".join(cells) + " |")
    return lines


def plot(attention: list[AttentionResult], norms: list[NormResult], out_dir: Path, suffix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    combos = list(dict.fromkeys((r.head_dim, r.causal) for r in attention))
    if not combos:  # attention not timed (--only)
        return paths + (plot_norms(norms, out_dir, suffix) if norms else [])
    fig, axes = plt.subplots(len(combos), 2, figsize=(11, 3.2 * len(combos)), squeeze=False)
    for row, (head_dim, causal) in enumerate(combos):
        for col, metric in enumerate(("fwd_tflops", "fwd_bwd_tflops")):
            ax = axes[row][col]
            for provider in dict.fromkeys(r.provider for r in attention):
                pts = [(r.seq, getattr(r, metric)) for r in attention
                       if r.provider == provider and (r.head_dim, r.causal) == (head_dim, causal)
                       and getattr(r, metric) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{'forward' if col == 0 else 'forward+backward'}, D={head_dim}, causal={causal}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"bench_attention{suffix}.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths + (plot_norms(norms, out_dir, suffix) if norms else [])


def plot_norms(norms: list[NormResult], out_dir: Path, suffix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for col, metric in enumerate(("fwd_gbs", "bwd_gbs")):
        for kind in dict.fromkeys(r.kind for r in norms):
            for provider in dict.fromkeys(r.provider for r in norms):
                pts = [(r.hidden, getattr(r, metric)) for r in norms if r.kind == kind and r.provider == provider]
                if pts:
                    axes[col].plot(*zip(*pts), marker="o", label=f"{kind} {provider}")
        axes[col].set_xscale("log", base=2)
        axes[col].set_title("forward" if col == 0 else "backward")
        axes[col].set_xlabel("hidden size")
        axes[col].set_ylabel("GB/s")
        axes[col].legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / f"bench_norms{suffix}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------- main


_SECTIONS = ("attention", "norms", "elementwise", "cross_entropy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sweep (the only mode without a GPU)")
    parser.add_argument("--check", action="store_true", help="check correctness against float64 first")
    parser.add_argument("--out-dir", default="docs", help="where the Markdown, JSON and PNGs go")
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384", help="attention sequence lengths")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--hiddens", default="1024,2048,4096,8192,16384", help="norm hidden sizes")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--only", default=",".join(_SECTIONS),
                        help=f"comma-separated sections to check and time, of {','.join(_SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(_SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)} in --only: choose from {', '.join(_SECTIONS)}")
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA GPU: only --smoke runs here (the kernels go through the Triton interpreter)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checks = run_checks(device, set(args.only.split(","))) if args.check else []
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device, cuda)
    mm_tflops = matmul_tflops(device, cuda)
    print(f"device-to-device copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    dtype = torch.float32 if not cuda else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    wanted = set(args.only.split(","))
    attention, norms = [], []
    if args.smoke:
        if "attention" in wanted:
            attention = bench_attention([16, 32], [64], tokens=32, model_width=128, dtype=dtype, device=device,
                                        cuda=cuda)
        if "norms" in wanted:
            norms += bench_norms([128, 512], elements=4096, dtype=dtype, device=device, cuda=cuda, copy_gbs=copy_gbs)
        if "elementwise" in wanted:
            norms += bench_elementwise([256], [32], elements=2048, dtype=dtype, device=device, cuda=cuda,
                                       copy_gbs=copy_gbs)
        if "cross_entropy" in wanted:
            norms += bench_cross_entropy([300], rows=4, dtype=dtype, device=device, cuda=cuda, copy_gbs=copy_gbs)
    else:
        if "attention" in wanted:
            attention = bench_attention([int(s) for s in args.seqs.split(",")],
                                        [int(d) for d in args.head_dims.split(",")],
                                        tokens=16384, model_width=2048, dtype=dtype, device=device, cuda=cuda)
        if "norms" in wanted:
            norms += bench_norms([int(h) for h in args.hiddens.split(",")], elements=1 << 26, dtype=dtype,
                                 device=device, cuda=cuda, copy_gbs=copy_gbs)
        if "elementwise" in wanted:
            norms += bench_elementwise([4096, 11008, 14336], [64, 128], elements=1 << 26, dtype=dtype,
                                       device=device, cuda=cuda, copy_gbs=copy_gbs)
        if "cross_entropy" in wanted:
            norms += bench_cross_entropy([32000, 50304, 128256], rows=4096, dtype=dtype, device=device, cuda=cuda,
                                         copy_gbs=copy_gbs)
    write_report(args, device, dtype, copy_gbs, mm_tflops, checks, attention, norms, out_dir)
    return 0 if all(c.passed for c in checks) else 1


def write_report(args, device, dtype, copy_gbs, mm_tflops, checks, attention, norms, out_dir: Path) -> None:
    suffix = "_smoke" if args.smoke else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"Device: {name}; torch {torch.__version__}, triton {triton.__version__}; dtype "
             f"{str(dtype).replace('torch.', '')}; command: `python tools/bench_kernels.py "
             f"{' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Measured ceilings: device-to-device copy {copy_gbs:.0f} GB/s (read + write), "
             f"matmul {mm_tflops:.0f} TFLOP/s.", ""]
    if checks:
        failed = [c for c in checks if not c.passed]
        lines += [f"Correctness (--check): {len(checks) - len(failed)}/{len(checks)} cases within "
                  f"2x PyTorch's own error + atol against float64.", ""]
    if attention:
        lines += attention_markdown(attention) + [""]
    if norms:
        lines += norms_markdown(norms, copy_gbs) + [""]
    plots = plot(attention, norms, out_dir, suffix)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out_dir / f"bench_kernels{suffix}.md").write_text("\n".join(lines) + "\n")
    raw = {"attention": [asdict(r) for r in attention], "norms": [asdict(r) for r in norms],
           "checks": [asdict(c) | {"passed": c.passed} for c in checks], "copy_gbs": copy_gbs,
           "matmul_tflops": mm_tflops}
    (out_dir / f"bench_kernels{suffix}.json").write_text(json.dumps(raw, indent=1, default=_json_number))
    print("\n".join(lines))


def _json_number(value):
    return None if isinstance(value, float) and math.isinf(value) else str(value)


if __name__ == "__main__":
    sys.exit(main())
