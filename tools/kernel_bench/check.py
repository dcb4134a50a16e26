"""Correctness of the registry's Triton entries (and of every launch setting their tuners may pick)
against float64, in the dtypes the model trains in.

A case passes when its largest error is within 2x PyTorch's own error in that dtype plus atol.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton

from megatron_lite.kernels import backends, layernorm, reference

# The module, not the function of the same name that megatron_lite.kernels exports.
ce_kernels = importlib.import_module("megatron_lite.kernels.cross_entropy")

SECTIONS = ("attention", "norms", "elementwise", "cross_entropy")


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    return CheckResult(name, _dtype_name(dtype), _worst_ratio(fast_err, torch_err, atol), fast_err)


def check_rotary(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> CheckResult:
    batch, seq, _, head_dim = shape
    angles = torch.rand(batch, seq, 1, head_dim, device=device, dtype=torch.float64) * 100
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(shape, device=device, dtype=dtype)
    rope = backends.function("rope", "triton")
    return check_case(f"rope B={batch} T={seq} H={shape[2]} D={head_dim}",
                      lambda x: rope(x, cos.float(), sin.float()),
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
                                   _dtype_name(dtype), _worst_ratio(errs, torch_err, atol), errs))
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
                                   _dtype_name(dtype), _worst_ratio(errs, torch_err, atol), errs))
    return results


def _check_attention(shapes: list[tuple], dtype: torch.dtype, device: torch.device) -> list[CheckResult]:
    attention = backends.function("attention", "triton")
    results = []
    for batch, seq, heads, kv_heads, head_dim, causal in shapes:
        q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, seq, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
        label = f"attention B={batch} S={seq} H={heads}/{kv_heads} D={head_dim} causal={causal}"
        results.append(check_case(label, lambda q, k, v, c=causal: attention(q, k, v, causal=c),
                                  lambda q, k, v, c=causal: reference.flash_attention(q, k, v, c),
                                  [q, k, v], atol=1e-3))
    return results


def _check_hidden_size(hidden: int, sections: set[str], dtype: torch.dtype, with_settings: bool,
                       device: torch.device) -> list[CheckResult]:
    """The norms (and, with ``with_settings``, each backward launch setting) and SwiGLU at one hidden size."""
    x = torch.randn(64, hidden, device=device, dtype=dtype)
    w = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    b = 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    results = []
    if "norms" in sections:
        results.append(check_case(f"layer_norm N={hidden}", backends.function("layer_norm", "triton"),
                                  reference.layer_norm, [x, w, b], 1e-3))
        results.append(check_case(f"rms_norm N={hidden}", backends.function("rms_norm", "triton"),
                                  reference.rms_norm, [x, w], 1e-3))
        if with_settings:
            for kind in ("layer_norm", "rms_norm"):
                results += check_norm_backward_settings(kind, hidden, dtype, device)
    if "elementwise" in sections:
        results.append(check_case(f"swiglu N={hidden}", backends.function("swiglu", "triton"), reference.swiglu,
                                  [x, torch.randn_like(x)], 1e-3))
    return results


def _check_cross_entropy(vocab: int, dtype: torch.dtype, with_settings: bool,
                         device: torch.device) -> list[CheckResult]:
    logits = 8 * torch.randn(64, vocab, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (64,), device=device)
    results = [check_case(f"cross_entropy V={vocab}", lambda x: ce_kernels.cross_entropy(x, targets),
                          lambda x: reference.cross_entropy(x, targets), [logits], atol=1e-3)]
    padded = vocab + 64 - vocab % 64  # the model's loss: padded vocabulary, per-token losses
    wide = torch.cat([logits, 8 * torch.randn(64, padded - vocab, device=device, dtype=dtype)], dim=1)
    fused = backends.function("cross_entropy", "triton")
    results.append(check_case(f"vocab_parallel_cross_entropy V={vocab} padded to {padded}",
                              lambda x: fused(x, targets, vocab, None),
                              lambda x: reference.cross_entropy(x[:, :vocab], targets, reduction="none"),
                              [wide], atol=1e-3))
    if with_settings:
        results += check_cross_entropy_settings(vocab, dtype, device)
    return results


def run_checks(device: torch.device, sections: set[str] | None = None) -> list[CheckResult]:
    """Correctness of every kernel in ``sections`` (default: all of SECTIONS) against float64."""
    sections = set(sections or SECTIONS)
    results = []
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16,)
    attn_shapes = [(2, 1000, 8, 2, 128, True), (1, 777, 8, 8, 64, False), (2, 300, 8, 1, 80, True),
                   (1, 4096, 16, 16, 128, True)]
    hiddens = (1000, 4096, 16384)
    rope_shape, vocab = (2, 100, 8, 128), 50304
    if device.type != "cuda":  # the interpreter runs every program in Python
        attn_shapes, hiddens, rope_shape, vocab = [(1, 40, 2, 1, 64, True)], (300,), (1, 6, 2, 32), 300
    for dtype in dtypes:
        with_settings = dtype == dtypes[0]  # every launch setting once, in the first dtype
        if "attention" in sections:
            results += _check_attention(attn_shapes, dtype, device)
        for hidden in hiddens:
            results += _check_hidden_size(hidden, sections, dtype, with_settings, device)
        if "elementwise" in sections:
            results.append(check_rotary(rope_shape, dtype, device))
        if "cross_entropy" in sections:
            results += _check_cross_entropy(vocab, dtype, with_settings, device)
    for r in results:
        print(f"{'ok  ' if r.passed else 'FAIL'} {r.dtype:8s} {r.name}: error/bound {r.worst_ratio:.2f} "
              f"(max errors {', '.join(f'{k} {v:.2e}' for k, v in r.errors.items())})", flush=True)
    return results
