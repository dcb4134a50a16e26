"""Registers, spills and shared memory of the norm kernels' launch candidates, without a GPU.

    python tools/kernel_resources.py                                  # both norms, sm_90, bf16
    python tools/kernel_resources.py --hiddens 16384 --direction backward --arch 80
    python tools/kernel_resources.py --variants two_pass,two_pass_pipelined --json out.json

Every candidate the launch tuner would time on a GPU (rows per program, warps, backward
variant) is compiled for the chosen architecture with the ptxas that ships inside Triton, and
the cubin's resource usage is read back with cuobjdump. A kernel whose registers run out keeps
values in local memory ("spill bytes", the per-thread stack frame; LDL/STL are the spill loads
and stores in the code), which costs memory bandwidth a bandwidth-bound kernel cannot spare.
Arguments are specialised as at run time: pointers 16-byte aligned, widths and row strides
divisible by 16 when they are. The figures depend on the Triton version that compiles.
"""

from __future__ import annotations

import argparse
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

from megatron_lite.kernels import layernorm  # noqa: E402

_TORCH_TO_TRITON = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_FP32_POINTERS = {"MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"}
_ROW_WIDTH_INTS = {"stride_x", "stride_y", "stride_dy", "stride_dx", "n_cols"}
_FLOAT_SCALARS = {"eps"}


@dataclass
class Resources:
    kind: str
    direction: str
    hidden: int
    rows: int
    warps: int
    variant: str
    registers: int
    spill_bytes: int
    spill_loads: int
    spill_stores: int
    shared_bytes: int
    async_copies: int


def _tool(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        sys.exit(f"{path} is missing: this Triton build ships no NVIDIA tools, so nothing can be compiled offline")
    return str(path)


def compile_kernel(fn, dtype: str, hidden: int, constexprs: dict, num_warps: int, arch: int):
    """Compile ``fn`` for sm_<arch>; returns (the compiled kernel, its cubin's cuobjdump outputs)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():  # pointers
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{_TORCH_TO_TRITON[dtype]}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _ROW_WIDTH_INTS and hidden % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    return kernel, usage, sass


def _resources(kind: str, direction: str, hidden: int, rows: int, warps: int, variant: str, compiled) -> Resources:
    kernel, usage, sass = compiled
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{usage}")
    return Resources(kind, direction, hidden, rows, warps, variant, registers=int(found[1]),
                     spill_bytes=int(found[2]), spill_loads=len(re.findall(r"\bLDL\b", sass)),
                     spill_stores=len(re.findall(r"\bSTL\b", sass)), shared_bytes=int(kernel.metadata.shared),
                     async_copies=len(re.findall(r"\bLDGSTS\b", sass)))


def norm_resources(kind: str, direction: str, hidden: int, dtype: str, arch: int,
                   variants: set[str] | None = None) -> list[Resources]:
    """Every launch candidate of one norm kernel at one hidden size (rows a multiple of ROWS)."""
    block_n = triton.next_power_of_2(hidden)
    is_rms = kind == "rms_norm"
    even_cols = hidden == block_n
    results = []
    if direction == "forward":
        for rows, warps in layernorm._candidates(block_n, _ELEMENT_SIZE[dtype], layernorm._FWD_BYTES_PER_THREAD):
            constexprs = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms, ROWS=rows, BLOCK_N=block_n)
            compiled = compile_kernel(layernorm._norm_fwd_kernel, dtype, hidden, constexprs, warps, arch)
            results.append(_resources(kind, direction, hidden, rows, warps, "-", compiled))
        return results
    for rows, warps in layernorm._candidates(block_n, _ELEMENT_SIZE[dtype], layernorm._BWD_BYTES_PER_THREAD):
        for variant in layernorm._backward_variants(rows, block_n):
            if variants is not None and variant not in variants:
                continue
            prefetch, reload_w, two_pass, stages = layernorm.BACKWARD_VARIANTS[variant]
            constexprs = dict(IS_RMS=is_rms, HAS_BIAS=not is_rms, ROWS=rows, BLOCK_N=block_n, PREFETCH=prefetch,
                              RELOAD_W=reload_w, TWO_PASS=two_pass, STAGES=stages, EVEN_COLS=even_cols,
                              EVEN_ROWS=True)
            compiled = compile_kernel(layernorm._norm_bwd_kernel, dtype, hidden, constexprs, warps, arch)
            results.append(_resources(kind, direction, hidden, rows, warps, variant, compiled))
    return results


def markdown(results: list[Resources]) -> list[str]:
    lines = ["| kernel | N | ROWS x warps | variant | registers | spill bytes (LDL / STL) | shared KiB | cp.async |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kind} {r.direction} | {r.hidden} | {r.rows} x {r.warps} | {r.variant} | {r.registers} | "
                     f"{r.spill_bytes} ({r.spill_loads} / {r.spill_stores}) | {r.shared_bytes / 1024:.1f} | "
                     f"{r.async_copies} |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="layer_norm,rms_norm")
    parser.add_argument("--direction", default="both", choices=("forward", "backward", "both"))
    parser.add_argument("--hiddens", default="1024,4096,8192,16384")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_ELEMENT_SIZE))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 (A100), 90 (H100), ...")
    parser.add_argument("--variants", default=None,
                        help=f"backward variants to compile (default: all the tuner offers): {','.join(layernorm.BACKWARD_VARIANTS)}")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    for kind in args.kinds.split(","):
        if kind not in ("layer_norm", "rms_norm"):
            parser.error(f"unknown kernel {kind!r}: choose layer_norm and/or rms_norm")
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
    results = []
    for kind in args.kinds.split(","):
        for direction in directions:
            for hidden in (int(h) for h in args.hiddens.split(",")):
                results += norm_resources(kind, direction, hidden, args.dtype, args.arch, variants)
    print(f"sm_{args.arch}, {args.dtype}, triton {triton.__version__}")
    print("\n".join(markdown(results)))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
