"""Command line: ``python -m megatron_lite <command>`` (also the ``megatron-lite`` script).

    pretrain --config FILE [section.key=value ...]     train (works under torchrun)
    sft | rm | dpo | ppo | grpo --config FILE [section.key=value ...]
                                                       fine-tuning stages: supervised, reward model,
                                                       direct preference optimization, PPO, GRPO and
                                                       the other critic-free methods (torchrun too)
    demo [--steps N] [--out DIR] [--device D]          build the demo corpus, train, evaluate, sample
    generate --load DIR --prompt TEXT [--chat] [...]   continue prompts from a checkpoint
    plan --config FILE [overrides] [--world-size N] [--gpu-memory 80GB] [--json]
                                                       memory per rank before launching; layouts that fit
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_lite.config import ConfigError, load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _is_rank0():
        print(text, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-lite", description="Megatron-style GPT training")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pretrain = commands.add_parser("pretrain", help="pretrain a GPT from a YAML config")
    pretrain.add_argument("--config", required=True, help="YAML file (see configs/)")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2")

    stages = {"sft": "supervised fine-tuning on prompt/response records",
              "rm": "train a reward model on preference pairs",
              "dpo": "direct preference optimization on preference pairs",
              "ppo": "PPO (and PPO-ptx) against a reward model, sampling answers to prompts",
              "grpo": "GRPO, Dr. GRPO, RLOO or REINFORCE++ on groups of answers scored by reward functions"}
    for name, text in stages.items():
        stage = commands.add_parser(name, help=text)
        stage.add_argument("--config", required=True, help=f"YAML file (e.g. configs/{name}.yaml)")
        stage.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. rlhf.data=pairs.jsonl")

    demo = commands.add_parser("demo", help="train the small demo model on the standard-library corpus")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.yaml)")
    demo.add_argument("--out", default="runs/demo", help="directory for logs and the checkpoint")
    demo.add_argument("--data-dir", default="data/demo", help="where the demo corpus and tokenizer are built")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="config to train (default: configs/demo.yaml)")
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides")

    gen = commands.add_parser("generate", help="continue prompts with a trained checkpoint")
    gen.add_argument("--load", required=True, help="checkpoint directory (a save dir or one iter_* dir)")
    gen.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user turn and let the model answer (after sft/dpo)")
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    plan = commands.add_parser("plan", help="memory per rank of a config, and the layouts that fit a GPU")
    plan.add_argument("--config", required=True, help="YAML file (see configs/)")
    plan.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2")
    plan.add_argument("--world-size", type=int, default=None, help="GPUs in the run (default: tp x pp, dp = 1)")
    plan.add_argument("--gpu-memory", default=None, help="list the layouts that fit this much per GPU, e.g. 80GB")
    plan.add_argument("--top", type=int, default=10, help="layouts to list with --gpu-memory")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser


def cmd_pretrain(args: argparse.Namespace) -> int:
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg).train()
    if result.interrupted:
        _say(f"stopped at step {result.steps} on SIGTERM; resume with checkpoint.load={cfg.checkpoint.save}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from megatron_lite.rlhf import STAGES
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    result = Trainer(cfg, task=STAGES[args.command]).train()
    if result.interrupted:
        _say(f"stopped at step {result.steps} on SIGTERM; resume with checkpoint.load={cfg.checkpoint.save}")
    elif result.losses:
        _say(f"{args.command}: loss {result.losses[0]:.4f} at the first step -> {result.losses[-1]:.4f} at step {result.steps}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from megatron_lite.inference import generate_text
    from megatron_lite.training.setup import resolve, setup_dims
    from megatron_lite.training.trainer import Trainer

    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config} not found; run the demo from a clone of the repository or pass --config")
    out = Path(args.out)
    overrides = [
        f"data.demo_dir={args.data_dir}",
        f"train.device={args.device}",
        f"log.dir={out}",
        f"checkpoint.save={out / 'checkpoint'}",
        "checkpoint.overwrite=true",  # rerunning the demo replaces its own previous run
    ]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(args.config, overrides + list(args.overrides))
    _share_cpu_politely(args.device)
    dims = setup_dims(cfg)
    cfg = resolve(cfg, dims.rank == 0, short_run_warmup=True)  # a short --steps run still gets to decay
    result = Trainer(cfg, dims).train()
    _say(f"loss: {result.losses[0]:.3f} at the first step -> {result.losses[-1]:.3f} at step {result.steps}")
    if result.val_losses:
        _say(f"validation loss {result.val_losses[-1][1]:.3f}")
    if _is_rank0() and result.checkpoint_dir is not None:
        _say(f"checkpoint: {result.checkpoint_dir}")
        prompt = "def "
        sample = generate_text(result.checkpoint_dir, [prompt], 48, temperature=0.8, top_k=40, seed=0)[0]
        _say(f"sample (prompt {prompt!r}):\n{prompt}{sample}")
        _say(f"more: python -m megatron_lite generate --load {cfg.checkpoint.save} --prompt 'import '")
    return 0


def _share_cpu_politely(device: str) -> None:
    """The demo model is small: on CPU, half the cores run it faster than all of them once
    anything else is running (threads of small ops spin waiting for each other)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def cmd_generate(args: argparse.Namespace) -> int:
    from megatron_lite.inference import generate_text

    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    texts = generate_text(args.load, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.seed, args.device, args.chat)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}", flush=True)
        print("-" * 40, flush=True)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from megatron_lite.training import planner

    cfg = load_config(args.config, args.overrides)
    world_size = args.world_size if args.world_size is not None else cfg.parallel.tp * cfg.parallel.pp
    gpu_bytes = planner.parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
    if args.top < 1:
        raise ConfigError(f"--top must be positive, got {args.top}")
    plan = planner.plan_memory(cfg, world_size)
    cost = planner.CostModel()
    fits = planner.fitting_layouts(cfg, world_size, gpu_bytes, cost) if gpu_bytes is not None else None
    if args.json:
        print(json.dumps(planner.plan_json(plan, fits, cost), indent=1))
        return 0
    print(planner.format_plan(plan))
    if fits is not None:
        print()
        print(planner.format_fits(fits, gpu_bytes, world_size, cost, args.top))
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "sft": cmd_stage, "rm": cmd_stage, "dpo": cmd_stage, "ppo": cmd_stage,
            "grpo": cmd_stage, "demo": cmd_demo, "generate": cmd_generate, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    from megatron_lite.cli import run_reporting
    from megatron_lite.parallel.session import process_group_session

    args = build_parser().parse_args(argv)

    def run_command() -> int:
        with process_group_session():  # torn down on every exit path, before an error is reported
            return COMMANDS[args.command](args)

    return run_reporting(run_command)


if __name__ == "__main__":
    sys.exit(main())
