"""Registers, spills and shared memory of the kernels' launch candidates, without a GPU.

    python tools/kernel_resources.py                                  # norms, sm_90, bf16
    python tools/kernel_resources.py --kernels attention --head-dims 64,128
    python tools/kernel_resources.py --hiddens 16384 --direction backward --arch 80
    python tools/kernel_resources.py --variants two_pass,two_pass_pipelined --json out.json

Every candidate a tuner would time on a GPU (the norms' rows per program, warps and backward
variants; the cross-entropy's chunk lengths and warps; the attention autotuner's tiles, warps,
pipeline stages and bulk copies) is compiled for the chosen architecture with the ptxas that
ships inside Triton, and the cubin's resource usage is read back with cuobjdump. A kernel whose
registers run out keeps values in local memory ("spill bytes", the per-thread stack frame;
LDL/STL are the spill loads and stores in the code), which costs bandwidth a bandwidth-bound
kernel cannot spare. Arguments are specialised as at run time: pointers 16-byte aligned, widths
and row strides divisible by 16 when they are; sequence lengths are taken to be multiples of
the tiles. The figures depend on the Triton version that compiles.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_resources.py compiles for a GPU: unset TRITON_INTERPRET (the interpreter has no registers)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_lite.kernels import attention, layernorm  # noqa: E402

ce_kernels = importlib.import_module("megatron_lite.kernels.cross_entropy")  # not the function of that name

KERNELS = ("norms", "cross_entropy", "attention")
_ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# Pointer arguments that are float32 whatever the inputs' dtype, and integer ones that are int64 or int32.
_FP32_POINTERS = {"MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL", "ROW_MAX", "SUM_EXP", "TARGET_LOGIT", "LSE", "DLOSS",
                  "DELTA"}
_INT64_POINTERS = {"TARGETS"}
_INT32_POINTERS = {"DOC"}
_FLOAT_SCALARS = {"eps", "qk_scale_log2", "softmax_scale"}


@dataclass
class Resources:
    kernel: str  # e.g. "layer_norm backward", "attention forward causal"
    size: int  # hidden size, vocabulary width or head dim
    setting: str  # the launch setting, as the tuner names it
    variant: str
    registers: int
    spill_bytes: int
    spill_loads: int
    spill_stores: int
    shared_bytes: int
    async_copies: int  # cp.async (LDGSTS) instructions: loads staged in shared memory
    bulk_copies: int  # TMA (UTMALDG) instructions


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        sys.exit(f"{path} is missing: this Triton build ships no NVIDIA tools, so nothing can be compiled offline")
    return str(path)


def compile_kernel(fn, dtype: str, aligned_ints: set[str], constexprs: dict, num_warps: int, arch: int,
                   num_stages: int = 3):
    """Compile ``fn`` for sm_<arch>; returns (the compiled kernel, cuobjdump's resource usage, the SASS)."""
    signature, attrs = {}, {}
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():  # pointers
            signature[name] = ("*fp32" if name in _FP32_POINTERS else "*i64" if name in _INT64_POINTERS
                               else "*i32" if name in _INT32_POINTERS else f"*{dtype}")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in aligned_ints:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    return kernel, usage, sass


def _resources(kernel_name: str, size: int, setting: str, variant: str, compiled) -> Resources:
    kernel, usage, sass = compiled
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    return Resources(kernel_name, size, setting, variant, registers=int(found[1]), spill_bytes=int(found[2]),
                     spill_loads=len(re.findall(r"\bLDL\b", sass)), spill_stores=len(re.findall(r"\bSTL\b", sass)),
                     shared_bytes=int(kernel.metadata.shared), async_copies=len(re.findall(r"\bLDGSTS\b", sass)),
                     bulk_copies=len(re.findall(r"\bUTMALDG\b", sass)))


def norm_resources(kind: str, direction: str, hidden: int, dtype: str, arch: int,
                   variants: set[str] | None = None) -> list[Resources]:
    """Every launch candidate of one norm kernel at one hidden size (rows a multiple of ROWS)."""
    block_n = triton.next_power_of_2(hidden)
    is_rms = kind == "rms_norm"
    aligned = {"stride_x", "stride_y", "stride_dy", "stride_dx", "n_cols"} if hidden % 16 == 0 else set()
    common = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms, BLOCK_N=block_n)
    results = []
    if direction == "forward":
        for rows, warps in layernorm._candidates(block_n, _ELEMENT_SIZE[dtype], layernorm._FWD_BYTES_PER_THREAD):
            compiled = compile_kernel(layernorm._norm_fwd_kernel, dtype, aligned, dict(common, ROWS=rows), warps, arch)
            results.append(_resources(f"{kind} forward", hidden, f"{rows} x {warps}", "-", compiled))
        return results
    for rows, warps in layernorm._candidates(block_n, _ELEMENT_SIZE[dtype], layernorm._BWD_BYTES_PER_THREAD):
        for variant in layernorm._backward_variants(rows, block_n):
            if variants is not None and variant not in variants:
                continue
            prefetch, reload_w, two_pass, stages = layernorm.BACKWARD_VARIANTS[variant]
            constexprs = dict(common, ROWS=rows, PREFETCH=prefetch, RELOAD_W=reload_w, TWO_PASS=two_pass,
                              STAGES=stages, EVEN_COLS=hidden == block_n, EVEN_ROWS=True)
            compiled = compile_kernel(layernorm._norm_bwd_kernel, dtype, aligned, constexprs, warps, arch)
            results.append(_resources(f"{kind} backward", hidden, f"{rows} x {warps}", variant, compiled))
    return results


def cross_entropy_resources(direction: str, width: int, dtype: str, arch: int) -> list[Resources]:
    """Every (chunk length, warps) setting of the cross-entropy kernels for rows of ``width`` logits."""
    fn = ce_kernels._ce_fwd_kernel if direction == "forward" else ce_kernels._ce_bwd_kernel
    aligned = {"stride_row", "stride_drow"} if width % 16 == 0 else set()
    results = []
    for block, warps in ce_kernels.launch_settings(width):
        compiled = compile_kernel(fn, dtype, aligned, dict(BLOCK_V=block), warps, arch)
        results.append(_resources(f"cross_entropy {direction}", width, f"{block} x {warps}", "-", compiled))
    return results


def attention_resources(direction: str, head_dim: int, causal: bool, dtype: str, arch: int,
                        documents: bool = False) -> list[Resources]:
    """Every autotuner configuration of the attention kernels (forward, or the two backward ones);
    ``documents``: their document-masked build."""
    kernels = ([("forward", attention._attn_fwd_kernel, attention._FWD_CONFIGS)] if direction == "forward" else
               [("backward dK/dV", attention._attn_bwd_dkdv_kernel, attention._DKDV_CONFIGS),
                ("backward dQ", attention._attn_bwd_dq_kernel, attention._DQ_CONFIGS)])
    block_d = max(16, triton.next_power_of_2(head_dim))
    aligned = {name for fn in (k[1] for k in kernels) for name in fn.arg_names
               if name.startswith("stride_") or name in ("seq_q", "seq_k", "seq_key", "programs_key")}
    if head_dim % 16 == 0:
        aligned.add("head_dim")
    results = []
    for label, fn, configs in kernels:
        for config in configs:
            if config.kwargs.get("TMA") and arch < 90:  # pruned at run time before Hopper, as here
                continue
            constexprs = dict(dict(CAUSAL=causal, BLOCK_D=block_d, EVEN_M=True, EVEN_N=True, EVEN_D=block_d == head_dim,
                                   UPCAST=False, IEEE=dtype == "fp32", TMA=False, DOCS=documents), **config.kwargs)
            compiled = compile_kernel(fn, dtype, aligned, constexprs, config.num_warps, arch, config.num_stages)
            tma = " TMA" if config.kwargs.get("TMA") else ""
            setting = (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}, {config.num_warps} warps, "
                       f"{config.num_stages} stages{tma}")
            name = f"attention {label}{' causal' if causal else ''}{' documents' if documents else ''}"
            results.append(_resources(name, head_dim, setting, "-", compiled))
    return results


def markdown(results: list[Resources]) -> list[str]:
    lines = ["| kernel | size | setting | variant | registers | spill bytes (LDL / STL) | shared KiB | cp.async | TMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.size} | {r.setting} | {r.variant} | {r.registers} | "
                     f"{r.spill_bytes} ({r.spill_loads} / {r.spill_stores}) | {r.shared_bytes / 1024:.1f} | "
                     f"{r.async_copies} | {r.bulk_copies} |")
    return lines


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="norms", help=f"comma-separated, of {','.join(KERNELS)}")
    parser.add_argument("--norms", default="layer_norm,rms_norm", help="which norms (with --kernels norms)")
    parser.add_argument("--direction", default="both", choices=("forward", "backward", "both"))
    parser.add_argument("--hiddens", default="1024,4096,8192,16384", help="norm hidden sizes")
    parser.add_argument("--vocabs", default="50304", help="cross-entropy row widths (a rank's vocabulary shard)")
    parser.add_argument("--head-dims", default="64,128", help="attention head dims")
    parser.add_argument("--non-causal", action="store_true", help="attention: also the non-causal kernels")
    parser.add_argument("--documents", action="store_true",
                        help="attention: the document-masked kernels (data.document_mask) instead")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_ELEMENT_SIZE))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 (A100), 90 (H100), ...")
    parser.add_argument("--variants", default=None,
                        help=f"norm backward variants to compile (default: all the tuner offers): "
                             f"{','.join(layernorm.BACKWARD_VARIANTS)}")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.kernels.split(",")) - set(KERNELS))
    if unknown:
        parser.error(f"unknown kernel(s) {', '.join(unknown)} in --kernels: choose from {', '.join(KERNELS)}")
    for kind in args.norms.split(","):
        if kind not in ("layer_norm", "rms_norm"):
            parser.error(f"unknown norm {kind!r}: choose layer_norm and/or rms_norm")
    if args.variants is not None:
        unknown = sorted(set(args.variants.split(",")) - set(layernorm.BACKWARD_VARIANTS))
        if unknown:
            parser.error(f"unknown backward variant(s) {', '.join(unknown)}: choose from "
                         f"{', '.join(layernorm.BACKWARD_VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    directions = ("forward", "backward") if args.direction == "both" else (args.direction,)
    variants = None if args.variants is None else set(args.variants.split(","))
    wanted = args.kernels.split(",")
    results = []
    for direction in directions:
        if "norms" in wanted:
            for kind in args.norms.split(","):
                for hidden in _ints(args.hiddens):
                    results += norm_resources(kind, direction, hidden, args.dtype, args.arch, variants)
        if "cross_entropy" in wanted:
            for width in _ints(args.vocabs):
                results += cross_entropy_resources(direction, width, args.dtype, args.arch)
        if "attention" in wanted:
            for head_dim in _ints(args.head_dims):
                for causal in (True, False) if args.non_causal else (True,):
                    results += attention_resources(direction, head_dim, causal, args.dtype, args.arch,
                                                   args.documents)
    print(f"sm_{args.arch}, {args.dtype}, triton {triton.__version__}")
    print("\n".join(markdown(results)))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
