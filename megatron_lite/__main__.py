"""Command line: ``python -m megatron_lite <command>`` (also the ``megatron-lite`` script).

    pretrain --config FILE [section.key=value ...]     train (works under torchrun)
    sft | rm | dpo | ppo --config FILE [section.key=value ...]
                                                       fine-tuning stages: supervised, reward model,
                                                       direct preference optimization, PPO (torchrun too)
    demo [--steps N] [--out DIR] [--device D]          build the demo corpus, train, evaluate, sample
    generate --load DIR --prompt TEXT [--chat] [...]   continue prompts from a checkpoint
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
              "ppo": "PPO (and PPO-ptx) against a reward model, sampling answers to prompts"}
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
    from megatron_lite.training.trainer import Trainer

    if not Path(args.config).is_file():
        raise ConfigError(f"{args.config} not found; run the demo from a clone of the repository or pass --config")
    out = Path(args.out)
    overrides = [
        f"data.demo_dir={args.data_dir}",
        f"train.device={args.device}",
        f"log.dir={out}",
        f"checkpoint.save={out / 'checkpoint'}",
    ]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(args.config, overrides + list(args.overrides))
    _share_cpu_politely(args.device)
    if cfg.optim.warmup_steps > cfg.train.max_steps // 2:  # a short --steps run still gets to decay
        cfg.optim.warmup_steps = cfg.train.max_steps // 10
    trainer = Trainer(cfg)
    result = trainer.train()
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


def generate_text(load: str | Path, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, device: str = "auto",
                  chat: bool = False) -> list[str]:
    """Load a checkpoint at tp=1 on one device and return each prompt's continuation (with
    ``chat``, each prompt is a user turn and the continuation the assistant's answer)."""
    import torch

    from megatron_lite.data import load_tokenizer
    from megatron_lite.model.generation import generate
    from megatron_lite.training.checkpoint import CheckpointError, load_full_state_dict, resolve_checkpoint_dir
    from megatron_lite.training.trainer import model_config_from_manifest

    ckpt_dir = resolve_checkpoint_dir(load)
    if not (ckpt_dir / "tokenizer").is_dir():
        raise CheckpointError(f"{ckpt_dir} has no tokenizer/ directory; it was saved without data.tokenizer")
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer")
    state, manifest = load_full_state_dict(ckpt_dir)
    if any(name.startswith("value_head.") for name in state):
        raise CheckpointError(f"{ckpt_dir} is a reward model (a value head, no vocabulary head): it scores "
                              f"answers and cannot generate; load an SFT, DPO or pretraining checkpoint")
    model = _single_device_model(model_config_from_manifest(manifest), state, device)
    if chat:
        from megatron_lite.rlhf.data import prompt_ids

        encoded = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        encoded = [tokenizer.encode(p) for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ConfigError("every --prompt must encode to at least one token; pass non-empty text")
    with torch.no_grad():
        outputs = generate(model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eod_id=tokenizer.eod_id, seed=seed)
    return [tokenizer.decode(list(ids)) for ids in outputs]


def _single_device_model(model_cfg, state: dict, device: str):
    import torch

    from megatron_lite.model.gpt import GPT

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device auto or cpu")
    target = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    model = GPT(model_cfg)
    model.load_state_dict(state, strict=True)
    return model.to(target).eval()


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    texts = generate_text(args.load, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          args.seed, args.device, args.chat)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}", flush=True)
        print("-" * 40, flush=True)
    return 0


COMMANDS = {"pretrain": cmd_pretrain, "sft": cmd_stage, "rm": cmd_stage, "dpo": cmd_stage, "ppo": cmd_stage,
            "demo": cmd_demo, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    from megatron_lite.rlhf.data import RLHFDataError
    from megatron_lite.training.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, RLHFDataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
