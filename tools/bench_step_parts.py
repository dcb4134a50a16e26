"""Time two parts of a training step against what torch offers for the same job. Prints Markdown.

    python tools/bench_step_parts.py [--tokens 2048] [--vocab-size 50257] [--padded-vocab 50304] [--repeat 7]

The loss: the torch vocab-parallel cross entropy at tp = 1 next to ``F.cross_entropy`` on the
same logits (forward, and forward + backward), with the bytes each keeps for its backward.
The optimizer: torch AdamW's fused kernel next to its for-loop and foreach forms on a GPT-like
set of fp32 parameters, and whether their updates are identical. Each contender runs in turn,
``--repeat`` times, and the best time is kept, so a slow spell of a shared machine falls on all.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F

from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.training.optim import torch_fused_adamw_supports


def best_times(runs: dict, repeat: int) -> dict:
    """Best seconds of each ``runs`` entry (a function returning its own timings as a tuple),
    after one untimed call each (first-call set-up, allocator growth)."""
    for run in runs.values():
        run()
    best: dict = {}
    for _ in range(repeat):
        for name, run in runs.items():
            took = run()
            best[name] = tuple(min(a, b) for a, b in zip(best.get(name, took), took))
    return best


def loss_run(loss_fn, logits: torch.Tensor, upstream: torch.Tensor):
    def run() -> tuple[float, float]:
        x = logits.detach().requires_grad_()
        start = time.perf_counter()
        loss = loss_fn(x)
        forward = time.perf_counter()
        (loss * upstream).sum().backward()
        return forward - start, time.perf_counter() - start

    return run


def saved_bytes(loss_fn, logits: torch.Tensor) -> int:
    """Bytes of the storages a loss keeps for backward, each counted once (two ops often save one)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(logits.detach().requires_grad_())
    return sum(storages.values())


def bench_loss(tokens: int, vocab_size: int, padded_vocab: int, repeat: int, rows: list[str]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, tokens, padded_vocab)
    labels = torch.randint(0, vocab_size, (1, tokens))
    upstream = torch.rand(1, tokens)
    losses = {
        "ours": lambda x: vocab_parallel_cross_entropy(x, labels, vocab_size),
        "F.cross_entropy": lambda x: F.cross_entropy(
            x[..., :vocab_size].reshape(-1, vocab_size), labels.reshape(-1), reduction="none"
        ).view(1, tokens),
    }
    best = best_times({name: loss_run(fn, logits, upstream) for name, fn in losses.items()}, repeat)
    saved = {name: saved_bytes(fn, logits) / 2**20 for name, fn in losses.items()}
    (ours_fwd, ours_total), (torch_fwd, torch_total) = best["ours"], best["F.cross_entropy"]
    label = f"loss, {tokens} tokens x vocab {vocab_size} (padded {padded_vocab}), fp32"
    rows.append(f"| {label}, forward | {ours_fwd * 1e3:.1f} ms | {torch_fwd * 1e3:.1f} ms | {torch_fwd / ours_fwd:.2f}x |")
    rows.append(f"| {label}, forward + backward | {ours_total * 1e3:.1f} ms | {torch_total * 1e3:.1f} ms | "
                f"{torch_total / ours_total:.2f}x |")
    rows.append(f"| {label}, kept for backward | {saved['ours']:.1f} MiB | {saved['F.cross_entropy']:.1f} MiB | |")


def gpt_like_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    attention = [(3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,)]
    mlp = [(4 * hidden, hidden), (4 * hidden,), (hidden, 4 * hidden), (hidden,)]
    norms = [(hidden,), (hidden,)]
    return (attention + mlp + norms) * layers + [(vocab, hidden)]


def adamw_runs(shapes, kinds: dict) -> tuple[dict, dict]:
    """One optimizer per kind over identical parameters, fed identical gradients."""
    optimizers, params_of = {}, {}
    for kind, options in kinds.items():
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
        groups = [{"params": [p for p in params if p.ndim == 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizers[kind] = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **options)
        params_of[kind] = params
    step = {"count": 0}

    def make_run(kind):
        def run() -> tuple[float]:
            generator = torch.Generator().manual_seed(1000 + step["count"] // len(kinds))
            step["count"] += 1
            for param in params_of[kind]:
                param.grad = torch.randn(param.shape, generator=generator)
            start = time.perf_counter()
            optimizers[kind].step()
            return (time.perf_counter() - start,)

        return run

    return {kind: make_run(kind) for kind in kinds}, params_of


def bench_adamw(hidden: int, layers: int, vocab: int, repeat: int, rows: list[str]) -> None:
    shapes = gpt_like_shapes(hidden, layers, vocab)
    count = sum(torch.Size(shape).numel() for shape in shapes)
    kinds = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}}
    if torch_fused_adamw_supports(torch.device("cpu"), torch.float32):
        kinds["fused"] = {"fused": True}
    runs, params_of = adamw_runs(shapes, kinds)
    best = best_times(runs, repeat)
    label = f"AdamW step, {count / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors"
    if "fused" not in best:
        rows.append(f"| {label} | no fused AdamW on CPU in torch {torch.__version__} | "
                    f"{best['for-loop'][0] * 1e3:.1f} ms (for-loop) | |")
        return
    fused = best["fused"][0]
    for kind in ("for-loop", "foreach"):
        same = all(torch.equal(a, b) for a, b in zip(params_of["fused"], params_of[kind]))
        diff = max((a - b).abs().max().item() for a, b in zip(params_of["fused"], params_of[kind]))
        rows.append(f"| {label}, fused vs {kind} | {fused * 1e3:.1f} ms | {best[kind][0] * 1e3:.1f} ms "
                    f"(after {repeat + 1} steps: {'identical' if same else f'max |difference| {diff:.1e}'}) | "
                    f"{best[kind][0] / fused:.2f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per loss call (micro-batch x sequence)")
    parser.add_argument("--vocab-size", type=int, default=50257)
    parser.add_argument("--padded-vocab", type=int, default=50304, help="logit columns, >= --vocab-size")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size of the AdamW parameter set")
    parser.add_argument("--layers", type=int, default=4, help="layers of the AdamW parameter set")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.padded_vocab < args.vocab_size:
        parser.error(f"--padded-vocab {args.padded_vocab} is smaller than --vocab-size {args.vocab_size}")
    rows = ["| measurement | megatron-lite | torch | torch time / ours |", "|---|---|---|---|"]
    for padded in sorted({args.vocab_size, args.padded_vocab}):
        bench_loss(args.tokens, args.vocab_size, padded, args.repeat, rows)
    bench_adamw(args.hidden, args.layers, args.vocab_size, args.repeat, rows)
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; best of "
          f"{args.repeat}.\n\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
