"""The benchmark's outputs: Markdown tables, PNG plots and the raw JSON, written under --out-dir."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def attention_markdown(results: list) -> list[str]:
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
                cells.append(f"{fmt(r.fwd_tflops)} / {fmt(r.bwd_tflops)} / {fmt(r.fwd_bwd_tflops)}{mem}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {first.batch} x {first.heads} | " + " | ".join(cells) + " |")
    return lines


def norms_markdown(results: list, copy_gbs: float) -> list[str]:
    providers = list(dict.fromkeys(r.provider for r in results))
    lines = [f"### Norms and elementwise ops (GB/s forward / backward; percent of the {copy_gbs:.0f} GB/s copy "
             "bandwidth)", "", "| op | N | rows | " + " | ".join(providers) + " |",
             "|---|---|---|" + "---|" * len(providers)]
    for kind, hidden in dict.fromkeys((r.kind, r.hidden) for r in results):
        row = {r.provider: r for r in results if (r.kind, r.hidden) == (kind, hidden)}
        cells = [f"{fmt(r.fwd_gbs, 0)} / {fmt(r.bwd_gbs, 0)} ({100 * r.fwd_copy_fraction:.0f}% / "
                 f"{100 * r.bwd_copy_fraction:.0f}%)" if (r := row.get(p)) else "n/a" for p in providers]
        lines.append(f"| {kind} | {hidden} | {next(iter(row.values())).rows} | " + " | ".join(cells) + " |")
    return lines


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(attention: list, norms: list, out_dir: Path, suffix: str) -> list[Path]:
    paths = plot_attention(attention, out_dir, suffix) if attention else []
    return paths + (plot_norms(norms, out_dir, suffix) if norms else [])


def plot_attention(attention: list, out_dir: Path, suffix: str) -> list[Path]:
    plt = _pyplot()
    combos = list(dict.fromkeys((r.head_dim, r.causal) for r in attention))
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
    path = out_dir / f"bench_attention{suffix}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_norms(norms: list, out_dir: Path, suffix: str) -> list[Path]:
    plt = _pyplot()
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


def write_report(smoke: bool, device_name: str, versions: str, dtype_name: str, copy_gbs: float, mm_tflops: float,
                 checks: list, attention: list, norms: list, out_dir: Path) -> None:
    """bench_kernels[_smoke].md (tables and plots) and .json (every result) under ``out_dir``."""
    suffix = "_smoke" if smoke else ""
    lines = [f"Device: {device_name}; {versions}; dtype {dtype_name}; command: `python tools/bench_kernels.py "
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
