"""Step time with and without ``train.compile``, the two models' steps interleaved so that both see
the same load on a shared machine.

    python tools/bench_compile.py --config configs/demo.yaml model.vocab_size=2048 train.device=cpu

Builds the config's model twice (eager, and with each transformer layer compiled), times the
first compiled step (compilation), then ``--steps`` pairs of steps, one of each model in turn on
the same random tokens, and prints the median step time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from megatron_lite.cli import run_reporting
from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.setup import seed_everything, setup_dims
from megatron_lite.training.trained_model import build_trained_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each model")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (model.vocab_size must be set)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def timed_step(model, micro_batches) -> float:
    start = time.perf_counter()
    loss, _, _ = model.train_on(micro_batches)
    loss.item()  # the step is done once its loss can be read
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    models, cfg = {}, None
    for compiled in (False, True):
        cfg = load_config(args.config, list(args.overrides) + [f"train.compile={str(compiled).lower()}"])
        if cfg.model.vocab_size <= 0:
            raise ConfigError("set model.vocab_size=N: the benchmark trains on random tokens")
        seed_everything(cfg.train.seed)
        models[compiled] = build_trained_model(cfg, setup_dims(cfg))
    generator = torch.Generator().manual_seed(0)
    device = models[False].dims.device
    shape = (cfg.train.micro_batch_size, cfg.model.seq_length)
    accumulation = cfg.train.global_batch_size // cfg.train.micro_batch_size
    batches = [[tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=generator).to(device) for _ in range(2))
                for _ in range(accumulation)] for _ in range(args.steps + 1)]
    timed_step(models[False], batches[0])
    compile_seconds = timed_step(models[True], batches[0])
    times = {False: [], True: []}
    for batch in batches[1:]:
        for compiled in (False, True):
            times[compiled].append(timed_step(models[compiled], batch))
    eager, compiled = statistics.median(times[False]), statistics.median(times[True])
    return {"eager_s": eager, "compiled_s": compiled, "speedup": eager / compiled, "compile_s": compile_seconds}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)

    def bench() -> int:
        r = run(args)
        print(f"eager {r['eager_s'] * 1e3:.1f} ms/step | compiled {r['compiled_s'] * 1e3:.1f} ms/step | "
              f"speedup {r['speedup']:.2f}x | first compiled step {r['compile_s']:.1f} s")
        return 0

    return run_reporting(bench)


if __name__ == "__main__":
    sys.exit(main())
