"""Fixtures shared by the data tests: a small real corpus and a tokenizer trained on it."""

from __future__ import annotations

import pytest

from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
from megatron_lite.data.corpus import stdlib_corpus


@pytest.fixture(scope="session")
def corpus() -> dict[str, list[str]]:
    return stdlib_corpus(max_bytes=150_000)


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, corpus):
    tok = ByteLevelBPETokenizer.train(corpus["code"] + corpus["docstrings"], vocab_size=700)
    return tok.save(tmp_path_factory.mktemp("tok"))
