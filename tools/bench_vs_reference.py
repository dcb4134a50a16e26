"""Training tokens/s on CPU against Hugging Face transformers and a nanoGPT-style model, same shapes.

    python tools/bench_vs_reference.py                       # GPT-2 and Llama shapes, 2 threads
    python tools/bench_vs_reference.py --flavor llama --layers 4 --hidden 256 --seq 256 --batch 8

Each model trains on the same random tokens with the same batch, sequence length, thread count,
fp32 and torch's AdamW (fused where this torch has it): ours (``GPT``), transformers'
GPT2LMHeadModel or LlamaForCausalLM (SDPA attention), and for the gpt2 flavor a minimal
single-file GPT written here in nanoGPT's style. Models take turns for ``--rounds`` rounds of
``--steps`` timed steps each (after ``--warmup`` untimed steps), and the median round is reported,
so a neighbour's load on a shared machine hits every model alike; tokens per CPU-second of the
process (all threads) are reported beside wall-clock tokens/s, as load from other jobs inflates
wall time far more than CPU time.

The decode benchmark times one attention call per decode step (one new query against S cached
keys, a batch of padded prompts): ours with the additive bias generation now builds once per step,
ours with the boolean mask it used to pass (converted inside every call), and transformers' SDPA
attention function given the same additive mask; the fastest round counts (the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

StepLoss = Callable[[torch.Tensor], torch.Tensor]  # token ids (B, T) -> the scalar training loss

from megatron_lite.config import ModelConfig
from megatron_lite.model import ops
from megatron_lite.model.generation import attention_bias
from megatron_lite.model.gpt import GPT


class NanoBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.c_attn, self.attn_proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.c_fc, self.mlp_proj = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(H, dim=2)
        q, k, v = (t.view(B, T, self.heads, H // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoGPT(nn.Module):
    """GPT-2 in one screen: learned positions, pre-norm blocks, tied head."""

    def __init__(self, *, vocab: int, seq: int, hidden: int, heads: int, layers: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, hidden), nn.Embedding(seq, hidden)
        self.blocks = nn.ModuleList(NanoBlock(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))  # (B, T, H)
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def ours(args) -> tuple[nn.Module, StepLoss]:
    cfg = ModelConfig(flavor=args.flavor, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                      num_kv_heads=args.kv_heads if args.flavor == "llama" else None, seq_length=args.seq,
                      vocab_size=args.vocab, make_vocab_size_divisible_by=1, ffn_hidden_size=ffn_size(args))
    model = GPT(cfg)
    return model, lambda ids: model(ids, labels=ids).mean()


def ffn_size(args) -> int:
    return 4 * args.hidden if args.flavor == "gpt2" else 64 * ((8 * args.hidden // 3 + 63) // 64)


def hugging_face(args) -> tuple[nn.Module, StepLoss]:
    import transformers

    if args.flavor == "gpt2":
        config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden,
                                         n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                          intermediate_size=ffn_size(args), num_hidden_layers=args.layers,
                                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                          max_position_embeddings=args.seq, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    model.train()
    return model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss


def nano(args) -> tuple[nn.Module, StepLoss]:
    model = NanoGPT(vocab=args.vocab, seq=args.seq, hidden=args.hidden, heads=args.heads, layers=args.layers)
    return model, lambda ids: model(ids, ids)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_seconds(step_loss, optimizer, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one step per batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    for ids in batches:
        step_loss(ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_training(args) -> dict[str, dict[str, float]]:
    """Per model: tokens/s of wall time, and of this process's CPU time (all threads), which a
    neighbour's load on a shared machine disturbs far less."""
    builders = {"ours": ours, "hf": hugging_face}
    if args.flavor == "gpt2":
        builders["nanogpt"] = nano
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator) for _ in range(args.steps)]
    runs = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model, step_loss = build(args)
        optimizer = adamw(model)
        train_seconds(step_loss, optimizer, batches[: args.warmup])
        runs[name] = (step_loss, optimizer, [])
    for _ in range(args.rounds):
        for step_loss, optimizer, seconds in runs.values():
            seconds.append(train_seconds(step_loss, optimizer, batches))
    tokens = args.batch * args.seq * args.steps
    return {name: {"wall": tokens / statistics.median(wall for wall, _ in seconds),
                   "cpu": tokens / statistics.median(cpu for _, cpu in seconds)}
            for name, (_, _, seconds) in runs.items()}


def bench_decode_attention(args) -> dict[str, float]:
    """Microseconds per attention call of one decode step at ``--seq`` cached keys."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads, kv_heads = args.heads, args.kv_heads if args.flavor == "llama" else args.heads
    head_dim, batch, keys = args.hidden // args.heads, args.batch, args.seq
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, heads, head_dim, generator=generator)  # (B, 1, nh, hd)
    k = torch.randn(batch, keys, kv_heads, head_dim, generator=generator)  # (B, S, nkv, hd)
    v = torch.randn(batch, keys, kv_heads, head_dim, generator=generator)
    pads = torch.arange(batch) % 4  # padded prompts: each row hides its first few keys
    allowed = (torch.arange(keys).unsqueeze(0) >= pads.unsqueeze(1))[:, None, None, :]  # (B, 1, 1, S)
    bias = attention_bias(allowed, q.dtype)
    hf_module = nn.Module()
    hf_module.num_key_value_groups, hf_module.is_causal = heads // kv_heads, True
    hf_q, hf_k, hf_v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # HF's (B, heads, T, hd)
    calls = {
        "ours (bias built once per step)": lambda: ops.attention(q, k, v, False, "torch", 0.0, bias),
        "ours (boolean mask, converted per call)": lambda: ops.attention(q, k, v, False, "torch", 0.0, allowed),
        "hf sdpa_attention_forward": lambda: sdpa_attention_forward(hf_module, hf_q, hf_k, hf_v, bias,
                                                                    scaling=1 / math.sqrt(head_dim)),
    }
    timings = {name: [] for name in calls}
    repeats = max(1, args.decode_calls)
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, call in calls.items():
                call()
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                timings[name].append((time.perf_counter() - start) / repeats * 1e6)
    return {name: min(values) for name, values in timings.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", choices=("gpt2", "llama", "both"), default="both")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="llama only")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-calls", type=int, default=200, help="attention calls timed per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for every model")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    positive = ("layers", "hidden", "heads", "kv_heads", "seq", "batch", "vocab", "steps", "rounds", "threads")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0 or args.warmup > args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps}], got {args.warmup}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        parser.error(f"--hidden ({args.hidden}) must divide by --heads ({args.heads}) and --heads by --kv-heads "
                     f"({args.kv_heads})")
    return args


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    flavors = ("gpt2", "llama") if args.flavor == "both" else (args.flavor,)
    results = {}
    for flavor in flavors:
        flavored = argparse.Namespace(**{**vars(args), "flavor": flavor})
        results[flavor] = {"train_tokens_per_s": bench_training(flavored),
                           "decode_attention_us": bench_decode_attention(flavored)}
    return results


def markdown(args, results: dict) -> str:
    shape = (f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, batch {args.batch}, "
             f"vocab {args.vocab}, {args.threads} threads, fp32, AdamW")
    lines = [f"Training, {shape}:", "",
             "| flavor | model | tokens/s (wall) | ours / it | tokens per CPU-second | ours / it |",
             "|---|---|---|---|---|---|"]
    for flavor, r in results.items():
        ours_rate = r["train_tokens_per_s"]["ours"]
        for name, rate in r["train_tokens_per_s"].items():
            lines.append(f"| {flavor} | {name} | {rate['wall']:,.0f} | {ours_rate['wall'] / rate['wall']:.2f}x | "
                         f"{rate['cpu']:,.0f} | {ours_rate['cpu'] / rate['cpu']:.2f}x |")
    lines += ["", f"Decode attention call ({args.batch} padded rows, {args.seq} cached keys):", "",
              "| flavor | call | us per call |", "|---|---|---|"]
    for flavor, r in results.items():
        for name, micros in r["decode_attention_us"].items():
            lines.append(f"| {flavor} | {name} | {micros:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(json.dumps(results, indent=1) if args.json else markdown(args, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
