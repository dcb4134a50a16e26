"""fp32 next to Megatron mixed precision (and the autocast it replaced) on one process. Prints Markdown.

    python tools/bench_precision.py [--layers 4] [--hidden 256] [--heads 8] [--seq 256] [--vocab 8192]
                                    [--micro-batch 4] [--micro-batches 2] [--steps 3] [--repeat 3] [--zero1]
                                    [--only fp32,autocast,bf16,fp16]

Each contender is a ``TrainedModel`` of the same shape stepping on the same tokens:
- ``fp32``: fp32 weights, torch AdamW on them;
- ``fp32 + bf16 autocast``: the former ``train.precision=bf16``: fp32 weights cast by autocast in every
  micro-batch;
- ``bf16`` / ``fp16``: 16-bit weights, fp32 main grads in the bucket buffers, fp32 main params in the
  optimizer (fp16 with its dynamic loss scale).
Reported per contender: the best step time (wall clock and process CPU time) over ``--repeat`` rounds
of ``--steps`` steps (contenders take turns, so a slow spell of a shared machine falls on all), the bytes of the weights, of the
gradient buffers and of the optimizer (fp32 masters and AdamW moments), and the bytes one micro-batch
keeps for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time

import torch

from megatron_lite.config import load_config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.trained_model import TrainedModel, build_trained_model

CONTENDERS = {  # --only key: (row name, train.precision, forward context or None for the model's own)
    "fp32": ("fp32", "fp32", None),
    "autocast": ("fp32 + bf16 autocast", "fp32", lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    "bf16": ("bf16", "bf16", None),
    "fp16": ("fp16", "fp16", None),
}


def build(args, precision: str) -> TrainedModel:
    cfg = load_config(None, [
        f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", f"model.num_heads={args.heads}",
        f"model.seq_length={args.seq}", f"model.vocab_size={args.vocab}", "train.device=cpu",
        f"train.precision={precision}", f"parallel.zero1={str(args.zero1).lower()}", "optim.warmup_steps=0",
    ])
    torch.manual_seed(0)
    return build_trained_model(cfg, ParallelDims.single())


def micro_batches(args) -> list:
    tokens = torch.randint(0, args.vocab, (args.micro_batch * args.micro_batches, args.seq + 1),
                           generator=torch.Generator().manual_seed(0))
    return [(mb[:, :-1], mb[:, 1:]) for mb in tokens.split(args.micro_batch)]


def step(model: TrainedModel, batches, forward_context) -> None:
    if forward_context is None:
        model.train_on(batches)
        return
    model.parallel_step.forward_backward(batches, forward_context(), model.scaler.scale)
    model.parallel_step.optimizer_step(model.scaler, model.grad_clip)


def timed_steps(model: TrainedModel, batches, forward_context, steps: int) -> tuple[float, float]:
    """Seconds per step: wall clock, and CPU time of this process (all its threads), which a
    machine shared with other jobs disturbs far less."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(model, batches, forward_context)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def memory(model: TrainedModel) -> dict[str, int]:
    """Bytes of the weights, the gradient buffers and the optimizer's tensors, each storage once."""
    params = [p for _, p in model.named_params]
    reducers = model.parallel_step.grad_sync.reducers
    grads = [b.buffer for r in reducers for b in r.buckets] + [b.grad_shard for r in reducers for b in r.buckets
                                                               if b.grad_shard is not None]
    optimizer = model.optimizer
    if hasattr(optimizer, "main_params"):  # 16-bit weights: fp32 main params and the inner AdamW's state
        state = [t for m in optimizer.main_params for t in [m, *optimizer.inner.state[m].values()] if torch.is_tensor(t)]
    elif hasattr(optimizer, "_sharded"):
        state = [t for sb in optimizer._sharded for t in (sb.master, sb.exp_avg, sb.exp_avg_sq)]
    else:  # fp32 AdamW: the weights are the masters; only the moments are extra
        state = [t for p in params for t in optimizer.state[p].values() if torch.is_tensor(t) and t.ndim > 0]
    return {"weights": _storage_bytes(params), "gradients": _storage_bytes(grads), "optimizer": _storage_bytes(state)}


def saved_for_backward(model: TrainedModel, batch, forward_context) -> int:
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    tokens, labels = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (forward_context or contextlib.nullcontext)():
        loss = model.chunks[0](tokens, labels=labels).float().mean()
    loss.backward()
    model.parallel_step.zero_grad()
    return sum(storages.values())


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--zero1", action="store_true", help="ZeRO-1 AdamW (dp=1) instead of plain AdamW")
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help="comma-separated contenders (fp32 always runs: the baseline); a CPU without fp16 "
                             "arithmetic emulates fp16 matmuls, slowly")
    args = parser.parse_args(argv)
    chosen = ["fp32"] + [key for key in args.only.split(",") if key != "fp32"]
    unknown = [key for key in chosen if key not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown} in --only; choose from {', '.join(CONTENDERS)}")
    batches = micro_batches(args)
    models = {key: build(args, CONTENDERS[key][1]) for key in chosen}
    best: dict[str, tuple[float, float]] = {}
    for key, model in models.items():  # first-call set-up, allocator growth
        step(model, batches, CONTENDERS[key][2])
    for _ in range(args.repeat):
        for key, model in models.items():
            took = timed_steps(model, batches, CONTENDERS[key][2], args.steps)
            best[key] = tuple(min(a, b) for a, b in zip(best.get(key, took), took))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"GPT-2 {args.layers} layers, hidden {args.hidden}, seq {args.seq}, vocab {args.vocab}, "
          f"{args.micro_batches} micro-batches of {args.micro_batch}, {'ZeRO-1' if args.zero1 else 'AdamW'}\n")
    print("| precision | step, wall (ms) | step, CPU time (ms) | fp32 CPU time / this | weights (MiB) | "
          "grad buffers (MiB) | optimizer (MiB) | saved for backward per micro-batch (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, model in models.items():
        sizes = memory(model)
        saved = saved_for_backward(model, batches[0], CONTENDERS[key][2])
        wall, cpu = best[key]
        print(f"| {CONTENDERS[key][0]} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {best['fp32'][1] / cpu:.2f}x | {mib(sizes['weights'])} | "
              f"{mib(sizes['gradients'])} | {mib(sizes['optimizer'])} | {mib(saved)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
