"""Our batched, compacting generation against transformers' ``generate`` on the same converted model:
greedy answers identical, ragged prompts, rows that stop at end-of-text at different steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megatron_lite.convert import convert_from_hf
from megatron_lite.data import load_tokenizer
from megatron_lite.model.generation import generate
from megatron_lite.model.gpt import GPT
from megatron_lite.training.checkpoint import load_full_state_dict
from tests.convert.test_hf import _random_hf_model, _save_hf_tokenizer

NEW_TOKENS = 8


def _converted(flavor: str, tokenizer_dir, tmp_path):
    """A random transformers model and the same weights converted to ours."""
    vocab = load_tokenizer(tokenizer_dir).vocab_size + 5
    hf = _random_hf_model(flavor, vocab, tied=flavor == "gpt2")
    hf.save_pretrained(tmp_path / "hf")
    _save_hf_tokenizer(flavor, tokenizer_dir, tmp_path / "hf")
    state, manifest = load_full_state_dict(convert_from_hf(tmp_path / "hf", tmp_path / "ours"))
    ours = GPT(manifest.model_config())
    ours.load_state_dict(state)
    return hf, ours.eval(), vocab


def _hf_greedy(hf, prompt: list[int], eod: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eod,
                      pad_token_id=eod)
    return out[0, len(prompt):].tolist()


def _hf_greedy_batched(hf, prompts: list[list[int]], eod: int) -> list[list[int]]:
    """transformers' own batching: left padding with an attention mask; rows past end-of-text are padded."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eod] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=attention, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eod,
                      pad_token_id=eod)[:, width:].tolist()
    return [row[: row.index(eod) + 1] if eod in row else row for row in out]


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_greedy_matches_transformers_generate_on_ragged_prompts_with_early_stops(flavor, tmp_path, request):
    tokenizer_dir = request.getfixturevalue("bytelevel_dir" if flavor == "gpt2" else "sentencepiece_dir")
    hf, ours, vocab = _converted(flavor, tokenizer_dir, tmp_path)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (1, 7, 3, 6, 2, 5)]
    free = [_hf_greedy(hf, p, eod=-1 % vocab) for p in prompts]  # an id no answer is likely to reach
    # Stop at a token some answers emit early and others never: rows leave the batch at different steps.
    eod = next(t for t in sorted({t for a in free for t in a[:-2]}) if any(t not in a for a in free))
    expected = [_hf_greedy(hf, p, eod) for p in prompts]
    assert any(len(a) < NEW_TOKENS for a in expected) and any(len(a) == NEW_TOKENS for a in expected)
    for batch_size in (None, 2):
        assert generate(ours, prompts, NEW_TOKENS, temperature=0, eod_id=eod, batch_size=batch_size) == expected
    assert _hf_greedy_batched(hf, prompts, eod) == expected


def test_bench_generate_checks_the_answers_and_prints_every_row(capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_generate", Path(__file__).resolve().parents[2] / "tools" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    bench.main(["--layers", "2", "--hidden", "32", "--heads", "4", "--vocab", "400", "--batch", "6",
                "--max-prompt", "10", "--new-tokens", "8", "--bucket", "2", "--repeat", "1"])
    torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "greedy answers identical to transformers' on every row: yes" in out
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines()
            if line.startswith("| ") and "CPU s" not in line}
    assert list(rows) == ["transformers generate", "ours, finished rows kept", "ours, compacting",
                          "ours, compacting, buckets of 2"]
    assert all(float(cells[2]) > 0 for cells in rows.values())
    generated = int(out.split(" generated (")[0].rsplit(", ", 1)[1])
    assert 6 <= generated < 6 * 8  # some rows stopped early
