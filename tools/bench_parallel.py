"""Measure pipeline bubbles and per-step communication next to their analytical values.

    python tools/bench_parallel.py                          # CPU: 4 gloo ranks, bubble + bytes tables
    python tools/bench_parallel.py --write docs/benchmarks.md   # ... and update its "## Parallelism" section
    python tools/bench_parallel.py --device cuda            # GPU: tokens/s of a data-parallel step
    torchrun --nproc-per-node 8 tools/bench_parallel.py --device cuda   # the same at dp = 8

Bubble: every chunk "computes" by sleeping a fixed time per micro-batch (forward t, backward 2t,
split evenly over a rank's virtual chunks), so the measurement shows the schedule and not the
CPU contention between ranks sharing cores. A rank's busy time is the time spent in those
sleeps; the bubble fraction is 1 - busy / makespan, next to the theory (p-1)/(m+p-1) for
all-forward-all-backward and 1F1B, and (p-1)/(v*m+p-1) for interleaved 1F1B.

Bytes: one training step of a stack of MLP blocks (Linear h->4h, GELU, Linear 4h->h) in fp32,
per rank and group: the analytical count (dp all-reduce 2(dp-1)/dp x gradient bytes; ZeRO-1
reduce-scatter plus all-gather, each (dp-1)/dp x the flat parameter vector; pp: every
micro-batch's activation crosses every virtual-stage boundary once forward and its gradient
once backward; plus the grad-norm scalars), what the code recorded in ``CommStats``, and what
the process really wrote to its sockets (``wchar`` in /proc/self/io, gloo headers included).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.data_parallel import GradReducer, Zero1AdamW, pipeline_grad_sync
from megatron_lite.parallel.dims import group_ranks
from megatron_lite.parallel.grad_norm import clip_grad_norm
from megatron_lite.parallel.pipeline import forward_backward

# ----------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=300))
    try:
        queue.put((rank, fn(rank, world_size, *args)))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args) -> list:
    """``fn(rank, world_size, *args)`` on gloo ranks in child processes; results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return [results[r] for r in range(world_size)]


# ----------------------------------------------------------------------------- bubble


class _Sleep(torch.autograd.Function):
    """Identity whose forward and backward take a fixed time, adding it to ``busy[0]``."""

    @staticmethod
    def forward(ctx, x, forward_s, backward_s, busy):
        ctx.backward_s, ctx.busy = backward_s, busy
        busy[0] += _sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.busy[0] += _sleep(ctx.backward_s)
        return grad, None, None, None


def _sleep(seconds: float) -> float:
    start = time.perf_counter()
    time.sleep(seconds)
    return time.perf_counter() - start


class _TimedChunk(nn.Module):
    def __init__(self, forward_s: float, busy: list[float]):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.forward_s, self.busy = forward_s, busy

    def forward(self, x):
        return _Sleep.apply(x * self.scale, self.forward_s, 2 * self.forward_s, self.busy)


def _bubble_body(rank, world_size, num_microbatches, stage_ms, repeats):
    rows = []
    schedules = (("all-forward-all-backward", "afab", 1), ("1F1B", "1f1b", 1), ("interleaved 1F1B, v=2", "1f1b", 2))
    for label, schedule, virtual_pp in schedules:
        busy = [0.0]
        chunks = [_TimedChunk(stage_ms / 1000 / virtual_pp, busy) for _ in range(virtual_pp)]
        batches = [torch.ones(4, 16) for _ in range(num_microbatches)]
        last = rank == world_size - 1

        def forward_step(chunk, x, batch):
            out = chunks[chunk](batch if x is None else x)
            return out.sum() / num_microbatches if last and chunk == virtual_pp - 1 else out

        fractions = []
        for _ in range(repeats):
            busy[0] = 0.0
            dist.barrier()
            start = time.perf_counter()
            forward_backward(
                chunks, batches, forward_step, schedule, pp_rank=rank, pp_size=world_size, tensor_shape=(4, 16)
            )
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the last rank ends
            fractions.append(1 - busy[0] / elapsed.item())
        rows.append((label, virtual_pp, statistics.median(fractions)))
    return rows


def bubble_table(world_size: int, num_microbatches: int, stage_ms: float, repeats: int) -> str:
    per_rank = run_gloo(_bubble_body, world_size, num_microbatches, stage_ms, repeats)
    p, m = world_size, num_microbatches
    lines = [
        f"Pipeline bubble, p={p} stages, m={m} micro-batches, forward {stage_ms:g} ms and backward "
        f"{2 * stage_ms:g} ms per micro-batch per stage (sleep-timed), median of {repeats} steps, "
        f"mean over ranks:",
        "",
        "| schedule | measured bubble | theory | formula |",
        "|---|---|---|---|",
    ]
    for i, (label, v, _) in enumerate(per_rank[0]):
        measured = statistics.mean(rows[i][2] for rows in per_rank)
        theory = (p - 1) / (v * m + p - 1)
        formula = f"(p-1)/(m+p-1) = {p - 1}/{m + p - 1}" if v == 1 else f"(p-1)/(v*m+p-1) = {p - 1}/{v * m + p - 1}"
        lines.append(f"| {label} | {measured:.3f} | {theory:.3f} | {formula} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bytes


def _mlp_block(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def _make_groups(rank: int, dp: int, pp: int):
    """This rank's (dp_group, pp_group, dp_rank, pp_rank) for a tp=1 grid; every rank builds all groups."""
    mine = {}
    for kind, groups in group_ranks(1, dp, pp).items():
        if kind == "embedding":
            continue
        for ranks in groups:
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = group
    return mine["dp"], mine["pp"], rank % dp, rank // dp


def _bytes_step(rank, layout, hidden, layers, tokens, num_microbatches):
    dp, pp, virtual_pp, zero = layout
    dp_group, pp_group, dp_rank, pp_rank = _make_groups(rank, dp, pp)
    torch.manual_seed(0)
    per_chunk = layers // (pp * virtual_pp)
    chunks = [nn.Sequential(*[_mlp_block(hidden) for _ in range(per_chunk)]) for _ in range(virtual_pp)]
    params = [p for c in chunks for p in c.parameters()]
    stats = CommStats()
    if zero:
        optimizer, reducers = Zero1AdamW(params, dp_group, lr=1e-4, comm_stats=stats), []
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        reducers = [GradReducer(c.parameters(), dp_group, 1.0, comm_stats=stats) for c in chunks]
    batches = [torch.randn(tokens, hidden) for _ in range(num_microbatches)]
    last_virtual = pp * virtual_pp - 1

    def forward_step(chunk, x, batch):
        out = chunks[chunk](batch if x is None else x)
        return out.pow(2).mean() / num_microbatches if chunk * pp + pp_rank == last_virtual else out

    for step in range(2):  # the first step warms up; the second is measured
        stats.reset()
        before = _wchar()
        forward_backward(
            chunks, batches, forward_step, "1f1b", pp_group=pp_group, pp_rank=pp_rank, pp_size=pp,
            tensor_shape=(tokens, hidden), grad_sync=pipeline_grad_sync(reducers) if reducers else None,
            comm_stats=stats,
        )
        if zero:
            optimizer.reduce_gradients()
            clip_grad_norm(optimizer.grad_shards(), 1.0, None, pp_group, dp_group, comm_stats=stats)
        else:
            for reducer in reducers:
                reducer.finish_grad_sync()
            clip_grad_norm(params, 1.0, None, pp_group, None, comm_stats=stats)
        optimizer.step()
        if zero:
            optimizer.zero_grad()
        else:
            for reducer in reducers:
                reducer.zero_grad()
        wire = _wchar() - before
    grad_bytes = sum(p.numel() * 4 for p in params)
    flat_bytes = optimizer.shard_size * dp * 4 if zero else grad_bytes
    return {"stats": stats.as_dict(), "wire": wire, "grad_bytes": grad_bytes, "flat_bytes": flat_bytes,
            "pp_rank": pp_rank}


def _bytes_body(rank, world_size, layouts, hidden, layers, tokens, num_microbatches):
    return [_bytes_step(rank, layout, hidden, layers, tokens, num_microbatches) for layout in layouts]


def _analytical(layout, result, tokens, hidden, num_microbatches) -> dict[str, float]:
    dp, pp, virtual_pp, zero = layout
    ring = lambda n: (n - 1) / n  # noqa: E731
    out = {}
    if dp > 1:
        if zero:
            out["dp"] = 2 * ring(dp) * result["flat_bytes"] + 2 * ring(dp) * 4
        else:
            out["dp"] = 2 * ring(dp) * result["grad_bytes"]
    if pp > 1:
        activation = tokens * hidden * 4
        first, last = result["pp_rank"] == 0, result["pp_rank"] == pp - 1
        boundaries = 2 * virtual_pp - first - last  # chunks that send forward + chunks that send back
        out["pp"] = num_microbatches * activation * boundaries + 2 * ring(pp) * 4
    return out


def bytes_table(world_size: int, hidden: int, layers: int, tokens: int, num_microbatches: int) -> str:
    half = world_size // 2
    layouts = [  # (dp, pp, virtual_pp, zero1)
        (world_size, 1, 1, False),
        (world_size, 1, 1, True),
        (1, world_size, 1, False),
        (2, half, 1, False),
        (2, half, 2, False),
    ]
    per_rank = run_gloo(_bytes_body, world_size, layouts, hidden, layers, tokens, num_microbatches)
    lines = [
        f"Bytes sent per rank in one fp32 training step ({layers} MLP blocks, hidden {hidden}, {tokens} tokens "
        f"per micro-batch, m={num_microbatches}), mean over ranks, MB = 1e6 bytes. \"counted\" is what "
        f"CommStats recorded (ring-algorithm bytes); \"wire\" is everything the process wrote to sockets "
        f"in the step (all groups, gloo headers included):",
        "",
        "| layout | group | analytical MB | counted MB | wire MB (all groups) |",
        "|---|---|---|---|---|",
    ]
    for i, layout in enumerate(layouts):
        dp, pp, virtual_pp, zero = layout
        name = f"dp={dp} pp={pp}" + (f" v={virtual_pp}" if virtual_pp > 1 else "") + (" ZeRO-1" if zero else "")
        results = [r[i] for r in per_rank]
        analytic = [_analytical(layout, r, tokens, hidden, num_microbatches) for r in results]
        wire = statistics.mean(r["wire"] for r in results) / 1e6
        for kind in sorted({k for a in analytic for k in a}):
            expected = statistics.mean(a.get(kind, 0.0) for a in analytic) / 1e6
            counted = statistics.mean(r["stats"]["sent_bytes"].get(kind, 0.0) for r in results) / 1e6
            lines.append(f"| {name} | {kind} | {expected:.3f} | {counted:.3f} | {wire:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- GPU throughput


def cuda_throughput(hidden: int, layers: int, tokens: int, num_microbatches: int, steps: int) -> str:
    """Tokens/s of a data-parallel step on this rank's GPU; dp = the torchrun world size (1 alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timedelta(seconds=300))
    group = dist.group.WORLD if world_size > 1 else None
    rows = []
    for zero in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(*[_mlp_block(hidden) for _ in range(layers)]).cuda()
        if zero:
            optimizer, reducers = Zero1AdamW(model.parameters(), group, lr=1e-4), []
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            reducers = [GradReducer(model.parameters(), group, 25.0)]
        batches = [torch.randn(tokens, hidden, device="cuda") for _ in range(num_microbatches)]

        def forward_step(chunk, x, batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(batch).float().pow(2).mean() / num_microbatches

        def step():
            forward_backward([model], batches, forward_step, "1f1b", tensor_shape=(tokens, hidden), device="cuda",
                             grad_sync=pipeline_grad_sync(reducers) if reducers else None)
            for reducer in reducers:
                reducer.finish_grad_sync()
            optimizer.step()
            optimizer.zero_grad() if zero else reducers[0].zero_grad()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / steps
        tokens_per_s = world_size * num_microbatches * tokens / elapsed
        tflops_per_gpu = 6 * sum(p.numel() for p in model.parameters()) * tokens_per_s / world_size / 1e12
        rows.append((zero, tokens_per_s, tflops_per_gpu, elapsed * 1e3))
    name = torch.cuda.get_device_name()
    lines = [
        f"{name}, dp={world_size}: {layers} MLP blocks, hidden {hidden}, bf16 autocast, fp32 weights, "
        f"{num_microbatches} micro-batches of {tokens} tokens per rank per step, mean of {steps} steps:",
        "",
        "| optimizer | tokens/s (all ranks) | TFLOP/s per GPU (6 x params x tokens/s) | ms/step |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {'ZeRO-1 AdamW' if z else 'AdamW + bucketed all-reduce'} | {tps:,.0f} | {tf:.0f} | {ms:.1f} |"
        for z, tps, tf, ms in rows
    ]
    if world_size > 1:
        dist.destroy_process_group()
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output


def _heading_level(line: str) -> int:
    match = re.match(r"(#+) ", line)
    return len(match.group(1)) if match else 0


def _heading_span(lines: list[str], heading: str, start: int = 0, stop: int | None = None) -> tuple[int, int] | None:
    """Line range of ``heading`` and its body, up to the next heading of the same or a higher level."""
    stop = len(lines) if stop is None else stop
    level = _heading_level(heading)
    for i in range(start, stop):
        if lines[i].rstrip() == heading:
            end = next((j for j in range(i + 1, stop) if 0 < _heading_level(lines[j]) <= level), stop)
            return i, end
    return None


def write_section(path: Path, subtitle: str, body: str) -> None:
    """Put ``body`` under ``### subtitle`` inside ``## Parallelism`` of ``path``; other sections stay."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks"]
    outer = _heading_span(lines, "## Parallelism")
    if outer is None:
        lines += ["", "## Parallelism", ""]
        outer = _heading_span(lines, "## Parallelism")
    block = [f"### {subtitle}", "", *body.strip().splitlines(), ""]
    inner = _heading_span(lines, f"### {subtitle}", outer[0] + 1, outer[1])
    if inner is not None:
        lines[inner[0] : inner[1]] = block
    else:
        end = outer[1]
        while end > outer[0] + 1 and not lines[end - 1].strip():
            end -= 1
        lines[end : outer[1]] = ["", *block]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--world-size", type=int, default=4, help="gloo ranks on CPU (pipeline stages for the bubble)")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--stage-ms", type=float, default=20.0, help="forward time per micro-batch per stage")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=None, help="default 256 on CPU, 2048 on GPU")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch; default 128 CPU, 8192 GPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (GPU)")
    parser.add_argument("--write", type=Path, default=None, help="update the Parallelism section of this Markdown file")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda needs a CUDA GPU; run without it for the CPU (gloo) benchmark")
        report = cuda_throughput(args.hidden or 2048, args.layers, args.tokens or 8192, args.micro_batches, args.steps)
    else:
        if args.layers % args.world_size or args.world_size % 2:
            sys.exit(
                f"--layers={args.layers} must split evenly over --world-size={args.world_size} stages, "
                f"and the world size must be even (the dp=2 layouts halve it)"
            )
        report = "\n\n".join([
            bubble_table(args.world_size, args.micro_batches, args.stage_ms, args.repeats),
            bytes_table(args.world_size, args.hidden or 256, args.layers, args.tokens or 128, args.micro_batches),
        ])
    command = "python tools/bench_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = f"`{command.strip()}`\n\n{report}"
    print(report)
    if args.write is not None and int(os.environ.get("RANK", "0")) == 0:
        write_section(args.write, "GPU throughput" if args.device == "cuda" else "CPU, gloo", report)


if __name__ == "__main__":
    main()
