"""Activation recomputation: saved-activation bytes and forward + backward time per mode. Prints Markdown.

    python tools/bench_recompute.py [--flavor gpt2] [--layers 4] [--hidden 256] [--heads 8] [--seq 256]
                                    [--micro-batch 4] [--dropout 0.1] [--repeat 5] [--threads 1]

One process, fp32, on CPU (GPU figures: ``tools/bench_train.py`` with ``train.recompute=...``).
Rows: ``none``; the two parts of ``selective``, each forced on alone (the attention core, the
MLP activation); ``selective`` as ``train.recompute=selective`` runs it (the attention core only
where the attention keeps its probabilities, see ``model/recompute.py``); ``full`` for the first
half of the layers (``train.recompute_layers``) and for all. Bytes are those autograd keeps for
backward, counted as ``training/activation_memory.py`` counts them; times are the best of
``--repeat`` forward + backward passes of one micro-batch, every mode in turn, in CPU seconds of
the process on ``--threads`` threads (1 by default): on a shared machine the wall clock mostly
measures the neighbours, the CPU time spent on the step does not.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from megatron_lite.config import FLAVOR_PRESETS, ModelConfig
from megatron_lite.model.gpt import GPT
from megatron_lite.model.recompute import RecomputePolicy
from megatron_lite.training.activation_memory import saved_tensor_bytes

VOCAB = 512


def variants(num_layers: int) -> dict[str, tuple[RecomputePolicy, tuple[bool, bool] | None]]:
    """name: (policy, None or forced (recompute the attention core, recompute the MLP activation))."""
    selective = RecomputePolicy("selective")
    return {
        "none": (RecomputePolicy(), None),
        "attention core only": (selective, (True, False)),
        "MLP activation only": (selective, (False, True)),
        "selective": (selective, None),
        f"full, first {num_layers // 2} of {num_layers} layers": (RecomputePolicy("full", max(1, num_layers // 2)), None),
        "full": (RecomputePolicy("full"), None),
    }


def build(cfg: ModelConfig, policy: RecomputePolicy, forced: tuple[bool, bool] | None) -> GPT:
    model = GPT(cfg, seed=1, recompute=policy)
    for block in model.layers.values() if forced else ():  # the rows that measure one half of selective
        block.attention.recompute_core, block.mlp.recompute_activation = forced
    return model.train()


def step_seconds(model: GPT, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.process_time()
    model(tokens, labels).mean().backward()
    took = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", choices=sorted(FLAVOR_PRESETS), default="gpt2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(flavor=args.flavor, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                      seq_length=args.seq, vocab_size=VOCAB, dropout=args.dropout)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=generator)
    labels = torch.randint(0, VOCAB, (args.micro_batch, args.seq), generator=generator)

    models = {name: build(cfg, *variant) for name, variant in variants(args.layers).items()}
    saved = {}
    for name, model in models.items():
        saved[name], loss = saved_tensor_bytes(lambda: model(tokens, labels), list(model.parameters()))
        loss.mean().backward()  # also the untimed first pass
        model.zero_grad(set_to_none=True)
    best = {name: float("inf") for name in models}
    for _ in range(args.repeat):
        for name, model in models.items():
            best[name] = min(best[name], step_seconds(model, tokens, labels))

    print(f"{args.flavor}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
          f"micro-batch {args.micro_batch}, dropout {args.dropout}, fp32; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    print("| mode | saved activations (MiB) | vs none | forward + backward (CPU ms) | vs none |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        print(f"| {name} | {saved[name] / 2**20:.2f} | {saved[name] / saved['none']:.2f}x | "
              f"{best[name] * 1e3:.1f} | {best[name] / best['none']:.2f}x |")


if __name__ == "__main__":
    main()
