"""Rollout generation: tokens/s of ``megatron_lite.model.generation.generate`` against transformers'
``generate`` on the same converted model. Prints Markdown.

    python tools/bench_generate.py [--flavor llama] [--layers 4] [--hidden 256] [--heads 8] [--vocab 2048]
                                   [--batch 32] [--min-prompt 4] [--max-prompt 48] [--new-tokens 48]
                                   [--fill 0.5] [--bucket 16] [--repeat 3] [--threads 1]

A random transformers model (Llama or GPT-2) is saved with a small byte-level tokenizer, converted
with ``convert_from_hf`` and loaded into our GPT. Prompts are random with lengths spread over
[--min-prompt, --max-prompt]; the end-of-text id is the token that stops the free-running greedy
answers soonest, and its output row is scaled up in both models until the answers fill about
--fill of the token limit, so rows stop at many different steps, as sampled rollouts do. Every row runs
greedy, fp32, on CPU; every row's answers are checked identical to transformers' before anything is printed.
Rows: transformers (left padding with an attention mask; its finished rows stay in the batch),
ours with finished rows kept (``compact=False``: the path before compaction), ours compacting,
ours compacting in length buckets of ``--bucket`` prompts. Times are the best of ``--repeat`` runs
in CPU seconds of the process on ``--threads`` threads: on a shared machine the wall clock mostly
measures the neighbours. Tokens/s counts the answer tokens (up to and including end-of-text).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog. 0123456789\n",
          "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"]


def hf_model(flavor: str, layers: int, hidden: int, heads: int, vocab: int, positions: int):
    """A random transformers model in eval mode, its norms and biases moved off 1 and 0."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if flavor == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers,
                                           n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=heads,
                                             num_key_value_heads=max(1, heads // 2), max_position_embeddings=positions))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "ln" in name or "norm" in name else 0.0))
    return model.eval()


def converted(hf, workdir: Path):
    """Our GPT holding ``hf``'s weights, through the converter a user runs."""
    from transformers import PreTrainedTokenizerFast

    from megatron_lite.convert import convert_from_hf
    from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
    from megatron_lite.model.gpt import GPT
    from megatron_lite.training.checkpoint import load_full_state_dict

    tokenizer = ByteLevelBPETokenizer.train(CORPUS * 10, 300).save(workdir / "tokenizer")
    hf.save_pretrained(workdir / "hf")
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer / "tokenizer.json"),
                            eos_token="<|endoftext|>").save_pretrained(workdir / "hf")
    state, manifest = load_full_state_dict(convert_from_hf(workdir / "hf", workdir / "ours"))
    model = GPT(manifest.model_config())
    model.load_state_dict(state)
    return model.eval()


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, eod: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eod] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=attention, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False,
                      eos_token_id=eod, pad_token_id=eod)[:, width:].tolist()
    return [row[: row.index(eod) + 1] if eod in row else row for row in out]


def stop_token(answers: list[list[int]]) -> int:
    """The token that, as end-of-text, stops the free-running answers soonest in all."""

    def kept(token: int) -> int:
        return sum(a.index(token) + 1 if token in a else len(a) for a in answers)

    return min(sorted({t for a in answers for t in a}), key=kept)


def boost_until_filled(hf, ours, prompts, new_tokens: int, eod: int, fill: float) -> None:
    """Scales ``eod``'s output row in both models (so they keep the same weights) until the greedy
    answers fill about ``fill`` of the token limit: rows then stop at many different steps, as
    sampled rollouts do (the fill reached is printed with the table)."""
    from megatron_lite.model.generation import generate

    ours_head = ours.output.weight if ours.output is not None else ours.embedding.word.weight
    rows = (ours_head, hf.get_output_embeddings().weight)
    applied = 1.0
    for scale in (1.15**k for k in range(16)):  # up to about 8x, in small steps
        for row in rows:
            row[eod] *= scale / applied
        applied = scale
        answers = generate(ours, prompts, new_tokens, temperature=0, eod_id=eod)
        if sum(len(a) for a in answers) <= fill * len(prompts) * new_tokens:
            break


def best_seconds(run, repeat: int) -> tuple[float, list[list[int]]]:
    best, answers = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        answers = run()
        best = min(best, time.process_time() - start)
    return best, answers


def main(argv: list[str] | None = None) -> None:
    from megatron_lite.model.generation import generate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", choices=["gpt2", "llama"], default="llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=4)
    parser.add_argument("--max-prompt", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--fill", type=float, default=0.5)
    parser.add_argument("--bucket", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf = hf_model(args.flavor, args.layers, args.hidden, args.heads, args.vocab, args.max_prompt + args.new_tokens)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.linspace(args.min_prompt, args.max_prompt, args.batch).round().long()
    lengths = lengths[torch.randperm(args.batch, generator=generator)].tolist()  # ragged, in no order
    prompts = [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ours = converted(hf, Path(tmp))
        eod = stop_token(generate(ours, prompts, args.new_tokens, temperature=0))
        boost_until_filled(hf, ours, prompts, args.new_tokens, eod, args.fill)
        runs = {
            "transformers generate": lambda: hf_generate(hf, prompts, args.new_tokens, eod),
            "ours, finished rows kept": lambda: generate(ours, prompts, args.new_tokens, 0, eod_id=eod, compact=False),
            "ours, compacting": lambda: generate(ours, prompts, args.new_tokens, 0, eod_id=eod),
            f"ours, compacting, buckets of {args.bucket}":
                lambda: generate(ours, prompts, args.new_tokens, 0, eod_id=eod, batch_size=args.bucket),
        }
        results = {name: best_seconds(run, args.repeat) for name, run in runs.items()}
    reference = results["transformers generate"][1]
    differing = [name for name, (_, answers) in results.items() if answers != reference]
    if differing:
        raise SystemExit(f"greedy answers differ from transformers' in: {', '.join(differing)}")
    tokens = sum(len(a) for a in reference)
    print(f"{args.flavor}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
          f"{args.batch} prompts of {args.min_prompt}-{args.max_prompt} tokens, up to {args.new_tokens} new tokens, "
          f"{tokens} generated ({tokens / (args.batch * args.new_tokens):.0%} of the limit), greedy, fp32; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}\n")
    print("greedy answers identical to transformers' on every row: yes\n")
    print("| generation | CPU s | tokens/s | vs transformers |")
    print("|---|---:|---:|---:|")
    hf_seconds = results["transformers generate"][0]
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds:.3f} | {tokens / seconds:.0f} | {hf_seconds / seconds:.2f}x |")


if __name__ == "__main__":
    main()
