"""Continue prompts with a saved checkpoint on one device (the ``generate`` and ``demo`` commands)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lite.config import ConfigError, ModelConfig


def generate_text(load: str | Path, prompts: list[str], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, device: str = "auto",
                  chat: bool = False) -> list[str]:
    """Load a checkpoint at tp=1 on one device and return each prompt's continuation (with
    ``chat``, each prompt is a user turn rendered as the checkpoint's run rendered its data,
    ``rlhf.chat_template``, and the continuation the assistant's answer)."""
    from megatron_lite.data import load_tokenizer
    from megatron_lite.model.generation import generate
    from megatron_lite.training.checkpoint import CheckpointError, load_full_state_dict, resolve_checkpoint_dir

    ckpt_dir = resolve_checkpoint_dir(load)
    if not (ckpt_dir / "tokenizer").is_dir():
        raise CheckpointError(f"{ckpt_dir} has no tokenizer/ directory; it was saved without data.tokenizer")
    tokenizer = load_tokenizer(ckpt_dir / "tokenizer")
    state, manifest = load_full_state_dict(ckpt_dir)
    if any(name.startswith("value_head.") for name in state):
        raise CheckpointError(f"{ckpt_dir} is a reward model (a value head, no vocabulary head): it scores "
                              f"answers and cannot generate; load an SFT, DPO or pretraining checkpoint")
    model = single_device_model(manifest.model_config(), state, device)
    if chat:
        from megatron_lite.rlhf.data import chat_format

        rendering = chat_format(manifest.config.get("rlhf", {}).get("chat_template", "native"), tokenizer,
                                ckpt_dir / "tokenizer")
        encoded = [rendering.prompt([{"role": "user", "content": p}]) for p in prompts]
    else:
        encoded = [tokenizer.encode(p) for p in prompts]
    if any(len(ids) == 0 for ids in encoded):
        raise ConfigError("every --prompt must encode to at least one token; pass non-empty text")
    with torch.no_grad():
        outputs = generate(model, encoded, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eod_id=tokenizer.eod_id, seed=seed)
    return [tokenizer.decode(list(ids)) for ids in outputs]


def single_device_model(model_cfg: ModelConfig, state: dict, device: str = "auto"):
    """A tp=1 ``GPT`` holding ``state`` in eval mode on ``device`` (auto: CUDA when visible)."""
    from megatron_lite.model.gpt import GPT

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is visible; use --device auto or cpu")
    target = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    model = GPT(model_cfg)
    model.load_state_dict(state, strict=True)
    return model.to(target).eval()
