"""Benchmark (and on GPU, check) the Triton kernels next to the PyTorch and optional backends.

    python tools/bench_kernels.py                 # GPU: full sweep, Markdown + PNGs into docs/
    python tools/bench_kernels.py --check         # GPU: bf16/fp16 correctness against float64 first
    python tools/bench_kernels.py --smoke         # CPU: tiny sweep through the Triton interpreter
    python tools/bench_kernels.py --only norms    # GPU: one section (attention, norms, elementwise, cross_entropy)

Every backend timed is an entry of the kernel registry (megatron_lite.kernels.backends), the
function the model runs; the parts live in tools/kernel_bench: check, sweep and report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels import triton

import triton  # noqa: E402
from kernel_bench.check import SECTIONS, run_checks  # noqa: E402
from kernel_bench.report import write_report  # noqa: E402
from kernel_bench.sweep import copy_bandwidth_gbs, matmul_tflops, run_sweep  # noqa: E402


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sweep (the only mode without a GPU)")
    parser.add_argument("--check", action="store_true", help="check correctness against float64 first")
    parser.add_argument("--out-dir", default="docs", help="where the Markdown, JSON and PNGs go")
    parser.add_argument("--seqs", default="512,1024,2048,4096,8192,16384", help="attention sequence lengths")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--hiddens", default="1024,2048,4096,8192,16384", help="norm hidden sizes")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to check and time, of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)} in --only: choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA GPU: only --smoke runs here (the kernels go through the Triton interpreter)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = set(args.only.split(","))
    checks = run_checks(device, sections) if args.check else []
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device, cuda)
    mm_tflops = matmul_tflops(device, cuda)
    print(f"device-to-device copy {copy_gbs:.0f} GB/s, matmul {mm_tflops:.0f} TFLOP/s", flush=True)
    dtype = torch.float32 if not cuda else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    attention, norms = run_sweep(sections, args.smoke, _int_list(args.seqs), _int_list(args.head_dims),
                                 _int_list(args.hiddens), dtype, device, copy_gbs)
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter)"
    write_report(args.smoke, device_name, f"torch {torch.__version__}, triton {triton.__version__}",
                 str(dtype).replace("torch.", ""), copy_gbs, mm_tflops, checks, attention, norms, out_dir)
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
