"""Tiny tokenizer and tiny instruction / preference files for the fine-tuning stages."""

from __future__ import annotations

import json

import pytest

from tests.training.tiny import build_tiny_data

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta",
         "iota", "rho", "tau", "phi", "chi", "psi"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="session")
def tiny_stage_data(tmp_path_factory):
    """(tiny tokenizer build, sft.jsonl, preference.jsonl): "repeat <w>" answered with "<w> <w>";
    the preferred answer repeats the word, the rejected one names the next word."""
    root = tmp_path_factory.mktemp("stage-data")
    data = build_tiny_data(root / "tiny")
    sft, pairs = root / "sft.jsonl", root / "preference.jsonl"
    with open(sft, "w") as f_sft, open(pairs, "w") as f_pairs:
        for i, word in enumerate(WORDS * 2):
            other = WORDS[(i + 1) % len(WORDS)]
            prompt = f"repeat {word}" if i < len(WORDS) else f"say {word} twice"
            f_sft.write(json.dumps({"prompt": prompt, "response": f"{word} {word}"}) + "\n")
            f_pairs.write(json.dumps({"prompt": prompt, "chosen": f"{word} {word}", "rejected": other}) + "\n")
    return data, sft, pairs
