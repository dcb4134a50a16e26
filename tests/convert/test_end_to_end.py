"""The user's path: pretrain a tiny model, convert it with the command-line tools, generate in
transformers and in megatron-lite, and generate again from the checkpoint converted back.

The commands run in this process through their ``main(argv)`` (the code a shell would run),
which spares four interpreter start-ups on a 2-core CI machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_lite.__main__ import main as cli_main
from megatron_lite.data import load_tokenizer
from megatron_lite.model.generation import generate
from megatron_lite.model.gpt import GPT
from megatron_lite.training.checkpoint import load_full_state_dict, read_manifest, resolve_checkpoint_dir

REPO = Path(__file__).resolve().parents[2]
PROMPT = "def "
NEW_TOKENS = 10


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(capsys, main, *args: str) -> str:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, f"{args} failed:\n{out}\n{err}"
    return out


def _pretrain(capsys, data, run_dir: Path) -> Path:
    mixture = "[" + ", ".join(f"{{prefix: {p}, weight: {w}}}" for p, w in data.mixture) + "]"
    _run(capsys, cli_main, "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
         "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
         "model.make_vocab_size_divisible_by=16", "data.demo=false", f"data.tokenizer={data.tokenizer_dir}",
         f"data.mixture={mixture}", f"data.cache_dir={run_dir}/index-cache", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.max_steps=3", "optim.warmup_steps=1", "train.eval_interval=0",
         "train.device=cpu", f"checkpoint.save={run_dir}/checkpoint", f"log.dir={run_dir}/log", "log.tensorboard=false")
    return run_dir / "checkpoint"


def _our_greedy(ckpt: Path, prompt_ids: list[int], eod_id: int) -> list[int]:
    state, manifest = load_full_state_dict(ckpt)
    model = GPT(manifest.model_config())
    model.load_state_dict(state)
    return generate(model, [prompt_ids], NEW_TOKENS, temperature=0.0, eod_id=eod_id)[0]


def test_trained_checkpoint_converts_and_generates_the_same(tmp_path, capsys):
    from megatron_lite.data.demo import build_demo_data

    data = build_demo_data(tmp_path / "data", vocab_size=300, max_bytes=200_000, progress=False)
    ckpt = _pretrain(capsys, data, tmp_path / "run")
    assert read_manifest(ckpt).iteration == 3

    hf_dir = tmp_path / "hf"
    assert "wrote" in _run(capsys, _tool("convert_to_hf"), "--load", str(ckpt), "--output", str(hf_dir))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours_tokenizer = load_tokenizer(resolve_checkpoint_dir(ckpt) / "tokenizer")
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    assert prompt_ids == ours_tokenizer.encode(PROMPT) and model.generation_config.eos_token_id == ours_tokenizer.eod_id
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    hf_new = hf_out[0, len(prompt_ids):].tolist()
    ours_new = _our_greedy(ckpt, prompt_ids, ours_tokenizer.eod_id)
    assert len(ours_new) >= 1 and hf_new == ours_new

    back = tmp_path / "back"
    _run(capsys, _tool("convert_from_hf"), "--hf", str(hf_dir), "--output", str(back), "--tp", "2")
    printed = _run(capsys, cli_main, "generate", "--load", str(back), "--prompt", PROMPT,
                   "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu")
    assert printed.startswith(PROMPT + tokenizer.decode(hf_new) + "\n")
    _finetune_starts_from(back, data, tmp_path / "finetune")


def _finetune_starts_from(ckpt: Path, data, run_dir: Path) -> None:
    """``pretrain`` with checkpoint.finetune=true starts from exactly the converted weights (here
    at tp=1 from a tp=2 checkpoint, and with another vocabulary padding) and trains on."""
    from megatron_lite.config import load_config
    from megatron_lite.training.trainer import Trainer

    mixture = "[" + ", ".join(f"{{prefix: {p}, weight: {w}}}" for p, w in data.mixture) + "]"
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "model.make_vocab_size_divisible_by=16", "data.demo=false", f"data.tokenizer={data.tokenizer_dir}",
        f"data.mixture={mixture}", f"data.cache_dir={run_dir}/index-cache", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.max_steps=1", "optim.warmup_steps=0", "train.eval_interval=0",
        "train.device=cpu", f"checkpoint.load={ckpt}", "checkpoint.finetune=true", f"checkpoint.save={run_dir}/ck",
        f"log.dir={run_dir}/log",
        "log.tensorboard=false"])
    trainer = Trainer(cfg)
    converted, _ = load_full_state_dict(ckpt)
    vocab = cfg.model.vocab_size
    for name, param in trainer.model.chunks[0].named_parameters():
        expected = converted[name][:vocab] if name.startswith("embedding.word") else converted[name]
        assert torch.equal(param.detach()[: expected.shape[0]], expected), name
    assert trainer.step == 0 and trainer.train().steps == 1
