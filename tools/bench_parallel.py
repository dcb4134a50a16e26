"""Measure pipeline bubbles and per-step communication next to their analytical values.

    python tools/bench_parallel.py                          # CPU: 4 gloo ranks, bubble + bytes tables
    python tools/bench_parallel.py --write docs/benchmarks.md   # ... and update its "## Parallelism" section
    python tools/bench_parallel.py --device cuda            # GPU: tokens/s of a data-parallel step
    python tools/bench_parallel.py --context-parallel --write docs/benchmarks.md   # CPU: cp=2 vs cp=1
    torchrun --nproc-per-node 8 tools/bench_parallel.py --device cuda   # the same at dp = 8

Bubble: the pipeline's own ``forward_backward`` over chunks that "compute" by sleeping a fixed
time per micro-batch (forward t, backward 2t, split evenly over a rank's virtual chunks), so the
measurement shows the schedule and not the CPU contention between ranks sharing cores. A rank's
busy time is the time spent in those sleeps; the bubble fraction is 1 - busy / makespan, next to
the theory (p-1)/(m+p-1) for all-forward-all-backward and 1F1B, and (p-1)/(v*m+p-1) for
interleaved 1F1B.

Bytes and throughput: training steps of a GPT-2 model through the trainer's own ``ParallelStep``
(grid, model chunks and optimizer built as a run builds them), fp32, per rank and group: the
analytical count (dp all-reduce 2(dp-1)/dp x gradient bytes; ZeRO-1 reduce-scatter plus
all-gather, each (dp-1)/dp x the flat parameter vector; pp: every micro-batch's activation
crosses every virtual-stage boundary once forward and its gradient once backward; embedding:
the tied word embedding's gradient summed over the first and last stage; plus the grad-norm
scalars), what the step recorded in ``CommStats``, and what the process really wrote to its
sockets (``wchar`` in /proc/self/io, gloo headers and the loss's all-reduces included).

Context parallelism (``--context-parallel``): ms per training step of a llama-style model on
long sequences, one rank at cp=1 against two ranks at cp=2 (each holding half of every
sequence) and two ranks at dp=2 (each holding whole sequences), the same global batch, plus
the bytes one step's K/V all-gathers move per rank.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, load_config
from megatron_lite.parallel.comm_stats import CommStats
from megatron_lite.parallel.context_parallel import split_sequence
from megatron_lite.parallel.launch import run_distributed
from megatron_lite.parallel.pipeline import forward_backward
from megatron_lite.training.optim import LossScaler
from megatron_lite.training.setup import autocast_context, build_model_chunks, resolve, seed_everything, setup_dims
from megatron_lite.training.step import ParallelStep, build_parallel_optimizer

TIMEOUT_S = 300.0  # collectives of a benchmark step on shared CPU cores can be slow


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


def _bubble_body(rank, world_size, num_micro_batches, stage_ms, repeats):
    rows = []
    schedules = (("all-forward-all-backward", "afab", 1), ("1F1B", "1f1b", 1), ("interleaved 1F1B, v=2", "1f1b", 2))
    for label, schedule, virtual_pp in schedules:
        busy = [0.0]
        chunks = [_TimedChunk(stage_ms / 1000 / virtual_pp, busy) for _ in range(virtual_pp)]
        batches = [torch.ones(4, 16) for _ in range(num_micro_batches)]
        last = rank == world_size - 1

        def forward_step(chunk, x, batch):
            out = chunks[chunk](batch if x is None else x)
            return out.sum() / num_micro_batches if last and chunk == virtual_pp - 1 else out

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


def bubble_table(world_size: int, num_micro_batches: int, stage_ms: float, repeats: int) -> str:
    per_rank = run_distributed(_bubble_body, world_size, num_micro_batches, stage_ms, repeats, timeout_s=TIMEOUT_S)
    p, m = world_size, num_micro_batches
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


# ----------------------------------------------------------------------------- the real step


def step_config(layout: tuple, hidden: int, layers: int, tokens: int, num_micro_batches: int, device: str,
                extra: tuple[str, ...] = ()) -> Config:
    """A GPT-2 run at ``layout`` = (dp, pp, virtual_pp, zero1): micro-batches of one sequence
    of ``tokens`` tokens, ``num_micro_batches`` of them per rank and step; ``extra`` overrides."""
    dp, pp, virtual_pp, zero1 = layout
    return load_config(None, [
        "model.flavor=gpt2", f"model.num_layers={layers}", f"model.hidden_size={hidden}",
        f"model.num_heads={max(1, hidden // 64)}", f"model.seq_length={tokens}", "model.vocab_size=1024",
        f"parallel.pp={pp}", f"parallel.virtual_pp={virtual_pp}", f"parallel.zero1={str(zero1).lower()}",
        f"parallel.timeout_s={TIMEOUT_S}", "train.micro_batch_size=1", f"train.global_batch_size={dp * num_micro_batches}",
        f"train.device={device}", "train.precision=" + ("bf16" if device == "cuda" else "fp32"), *extra,
    ])


class RealStep:
    """One rank's model chunks, optimizer and ``ParallelStep``, built as a training run builds them,
    stepping on fixed random tokens; ``comm_stats`` records every collective and send of a step."""

    def __init__(self, cfg: Config, comm_stats: CommStats | None = None):
        self.dims = setup_dims(cfg)
        self.cfg = cfg = resolve(cfg, read_data=False)  # random tokens: no tokenizer, no data
        seed_everything(cfg.train.seed)
        self.chunks = build_model_chunks(cfg, self.dims)
        self.optimizer, _ = build_parallel_optimizer(self.chunks, cfg.optim, cfg.parallel, self.dims)
        self.step = ParallelStep(self.chunks, self.optimizer, self.dims, cfg.parallel.pipeline_schedule,
                                 cfg.parallel.bucket_size_mb, comm_stats=comm_stats)
        self.scaler = LossScaler(dynamic=False)
        generator = torch.Generator().manual_seed(self.dims.dp_rank)
        shape = (cfg.train.micro_batch_size, cfg.model.seq_length)
        count = cfg.train.global_batch_size // cfg.train.micro_batch_size // self.dims.dp
        self.micro_batches = [  # the cp ranks of a replica draw the same sequences and keep their chunks
            tuple(self._local(torch.randint(0, cfg.model.vocab_size, shape, generator=generator)) for _ in range(2))
            for _ in range(count)
        ]

    def _local(self, tokens: torch.Tensor) -> torch.Tensor:
        return split_sequence(tokens, self.dims.cp_rank, self.dims.cp).to(self.dims.device)

    def run(self) -> None:
        self.step.forward_backward(self.micro_batches, autocast_context(self.cfg.train.precision, self.dims.device))
        self.step.optimizer_step(self.scaler, self.cfg.optim.grad_clip)

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for chunk in self.chunks for p in chunk.parameters())

    def tied_embedding_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for chunk in self.chunks for p in chunk.tied_embedding_params())


# ----------------------------------------------------------------------------- bytes


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar"))


def bytes_of_one_step(layout, hidden, layers, tokens, num_micro_batches) -> dict:
    stats = CommStats()
    real = RealStep(step_config(layout, hidden, layers, tokens, num_micro_batches, "cpu"), stats)
    for _ in range(2):  # the first step warms up; the second is measured
        stats.reset()
        before = _wchar()
        real.run()
        wire = _wchar() - before
    zero1 = layout[3]
    flat_bytes = real.optimizer.shard_size * real.dims.dp * 4 if zero1 else real.parameter_bytes()
    return {"stats": stats.as_dict(), "wire": wire, "grad_bytes": real.parameter_bytes(), "flat_bytes": flat_bytes,
            "embedding_bytes": real.tied_embedding_bytes(), "pp_rank": real.dims.pp_rank}


def _bytes_body(rank, world_size, layouts, hidden, layers, tokens, num_micro_batches):
    return [bytes_of_one_step(layout, hidden, layers, tokens, num_micro_batches) for layout in layouts]


def analytical_bytes(layout, result, tokens, hidden, num_micro_batches) -> dict[str, float]:
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
        out["pp"] = num_micro_batches * activation * boundaries + 2 * ring(pp) * 4
        out["embedding"] = 2 * ring(2) * result["embedding_bytes"]
    return out


def bytes_table(world_size: int, hidden: int, layers: int, tokens: int, num_micro_batches: int) -> str:
    half = world_size // 2
    layouts = [  # (dp, pp, virtual_pp, zero1)
        (world_size, 1, 1, False),
        (world_size, 1, 1, True),
        (1, world_size, 1, False),
        (2, half, 1, False),
        (2, half, 2, False),
    ]
    per_rank = run_distributed(_bytes_body, world_size, layouts, hidden, layers, tokens, num_micro_batches,
                               timeout_s=TIMEOUT_S)
    lines = [
        f"Bytes sent per rank in one fp32 training step (GPT-2, {layers} layers, hidden {hidden}, {tokens} tokens "
        f"per micro-batch, m={num_micro_batches}), mean over ranks, MB = 1e6 bytes. \"counted\" is what "
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
        analytic = [analytical_bytes(layout, r, tokens, hidden, num_micro_batches) for r in results]
        wire = statistics.mean(r["wire"] for r in results) / 1e6
        for kind in sorted({k for a in analytic for k in a}):
            expected = statistics.mean(a.get(kind, 0.0) for a in analytic) / 1e6
            counted = statistics.mean(r["stats"]["sent_bytes"].get(kind, 0.0) for r in results) / 1e6
            lines.append(f"| {name} | {kind} | {expected:.3f} | {counted:.3f} | {wire:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- context parallelism

CP_LAYOUTS = (("1 rank, cp=1", 1, 1), ("2 ranks, dp=2", 2, 1), ("2 ranks, cp=2", 2, 2))  # (name, ranks, cp)


def _cp_config(ranks: int, cp: int, hidden: int, layers: int, tokens: int, sequences: int) -> Config:
    """llama-style (rope, grouped-query) so the K/V all-gather moves nkv = nh / 4 heads."""
    heads = max(4, hidden // 64)
    dp = ranks // cp
    return step_config((dp, 1, 1, False), hidden, layers, tokens, sequences // dp, "cpu",
                       ("model.flavor=llama", f"model.num_heads={heads}", f"model.num_kv_heads={heads // 4}",
                        f"parallel.cp={cp}"))


def cp_step(rank, world_size, cp, hidden, layers, tokens, sequences, steps) -> dict:
    """One rank's median ms per step at cp (dp = world_size / cp) and the K/V MB its step moves."""
    real = RealStep(_cp_config(world_size, cp, hidden, layers, tokens, sequences))
    real.run()  # warm-up
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        real.run()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the last rank ends
        times.append(elapsed.item())
    cfg = real.cfg.model
    kv_bytes_per_layer = 2 * 2 * (cp - 1) / cp * tokens * cfg.num_kv_heads * cfg.head_dim * 4  # K, V; fwd + bwd
    sequences_per_rank = sequences // (world_size // cp)
    return {"ms": statistics.median(times) * 1e3, "kv_mb": kv_bytes_per_layer * layers * sequences_per_rank / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3}  # Linux: kilobytes


def cp_table(results: list[dict], hidden: int, layers: int, tokens: int, sequences: int, steps: int) -> str:
    """The table of ``cp_step``'s rank-0 result for each of ``CP_LAYOUTS``, in that order."""
    rows = [(name, r["ms"], sequences * tokens / r["ms"] * 1e3, r["kv_mb"], r["peak_rss_mb"])
            for (name, _, _), r in zip(CP_LAYOUTS, results)]
    base = rows[0][1]
    lines = [
        f"Context parallelism on gloo, fp32, one thread per rank: llama-style model ({layers} layers, hidden "
        f"{hidden}, grouped-query attention with nh/nkv = 4), {sequences} sequences of {tokens} tokens per step, "
        f"median of {steps} steps. K/V MB: what the step's all-gathers (forward) and reduce-scatters (backward) "
        f"move per rank, (cp-1)/cp x K and V of every layer and of the rank's sequences. Peak RSS: the rank "
        f"process's resident memory high-water mark (model, optimizer, activations, interpreter):",
        "",
        "| layout | ms/step | tokens/s | speed-up vs 1 rank | K/V MB per rank | peak RSS MB per rank |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {ms:.0f} | {tps:,.0f} | {base / ms:.2f}x | {kv:.3f} | {rss:,.0f} |"
              for name, ms, tps, kv, rss in rows]
    lines += ["", "At the same number of ranks cp=2 and dp=2 do the same arithmetic; cp adds the K/V exchange and "
              "halves the activations a rank holds for one micro-batch (a sequence's tokens are split, not the batch), "
              "which is what it is for: sequences whose activations one device cannot hold."]
    return "\n".join(lines)


def measure_cp(hidden: int, layers: int, tokens: int, sequences: int, steps: int) -> str:
    results = [run_distributed(cp_step, ranks, cp, hidden, layers, tokens, sequences, steps, timeout_s=TIMEOUT_S)[0]
               for _, ranks, cp in CP_LAYOUTS]
    return cp_table(results, hidden, layers, tokens, sequences, steps)


# ----------------------------------------------------------------------------- GPU throughput


def cuda_throughput(hidden: int, layers: int, tokens: int, num_micro_batches: int, steps: int) -> str:
    """Tokens/s of a data-parallel step on this rank's GPU; dp = the torchrun world size (1 alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rows = []
    for zero1 in (False, True):
        real = RealStep(step_config((world_size, 1, 1, zero1), hidden, layers, tokens, num_micro_batches, "cuda"))
        for _ in range(3):
            real.run()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            real.run()
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / steps
        tokens_per_s = world_size * num_micro_batches * tokens / elapsed
        parameters = real.parameter_bytes() / 4
        tflops_per_gpu = 6 * parameters * tokens_per_s / world_size / 1e12
        rows.append((zero1, tokens_per_s, tflops_per_gpu, elapsed * 1e3))
    lines = [
        f"{torch.cuda.get_device_name()}, dp={world_size}: GPT-2, {layers} layers, hidden {hidden}, bf16 weights, "
        f"fp32 main grads and main params, {num_micro_batches} micro-batches of {tokens} tokens per rank per step, mean of {steps} steps:",
        "",
        "| optimizer | tokens/s (all ranks) | TFLOP/s per GPU (6 x params x tokens/s) | ms/step |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {'ZeRO-1 AdamW' if z else 'AdamW + bucketed all-reduce'} | {tps:,.0f} | {tf:.0f} | {ms:.1f} |"
        for z, tps, tf, ms in rows
    ]
    if dist.is_initialized():
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
    parser.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch; default 128 CPU, 2048 GPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (GPU)")
    parser.add_argument("--write", type=Path, default=None, help="update the Parallelism section of this Markdown file")
    parser.add_argument("--context-parallel", action="store_true",
                        help="CPU: ms/step at cp=2 vs cp=1 and dp=2 on long sequences (--tokens default 2048)")
    args = parser.parse_args(argv)
    if args.context_parallel:
        report = measure_cp(args.hidden or 256, args.layers, args.tokens or 2048, 2, args.repeats)
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda needs a CUDA GPU; run without it for the CPU (gloo) benchmark")
        report = cuda_throughput(args.hidden or 2048, args.layers, args.tokens or 2048, args.micro_batches, args.steps)
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
        subtitle = "GPU throughput" if args.device == "cuda" else "CPU, gloo"
        write_section(args.write, "Context parallelism, CPU, gloo" if args.context_parallel else subtitle, report)


if __name__ == "__main__":
    main()
