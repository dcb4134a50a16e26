"""The byte-level BPE's heap-ordered merging against the plain rescanning algorithm it replaced.

The reference below rescans every neighbouring pair after each merge and merges every
occurrence of the best one; the tokenizer keeps a heap of candidate pairs instead. On a
vocabulary whose merges only use parts made by earlier merges (every trained one) the two
agree; where a merge list breaks that order, the tokenizer follows Hugging Face ``tokenizers``.
"""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from megatron_lite.data.bytelevel import BYTE_TO_CHAR, ByteLevelBPETokenizer


def reference_bpe(tok: ByteLevelBPETokenizer, piece: str) -> list[int]:
    ranks = {}
    for rank, (left, right) in enumerate(tok.merges):
        ranks.setdefault((tok.vocab[left], tok.vocab[right]), (rank, tok.vocab[left + right]))
    word = [tok.vocab[BYTE_TO_CHAR[b]] for b in piece.encode("utf-8")]
    while True:
        candidates = [ranks[pair] + (pair,) for pair in zip(word, word[1:]) if pair in ranks]
        if not candidates:
            return word
        _, new_id, pair = min(candidates)
        merged, i = [], 0
        while i < len(word):
            if tuple(word[i : i + 2]) == pair:
                merged.append(new_id)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged


def no_repeat_words(words: list[str], count: int, seed: int) -> list[str]:
    """Identifiers glued from two or three corpus words, each used once, so no cache ever hits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    while len(seen) < count:
        parts = rng.sample(words, rng.randint(2, 3))
        seen.add(parts[0].lower() + "".join(p.capitalize() for p in parts[1:]))
    return sorted(seen)


@pytest.fixture(scope="module")
def tokenizer(corpus) -> ByteLevelBPETokenizer:
    return ByteLevelBPETokenizer.train(corpus["code"] + corpus["docstrings"], vocab_size=2048)


def test_ids_equal_the_rescanning_algorithm_on_text_that_never_repeats(tokenizer, corpus):
    words = sorted({w for text in corpus["docstrings"] for w in text.split() if w.isalpha() and len(w) > 2})
    identifiers = no_repeat_words(words, 600, seed=0)
    rng = random.Random(1)
    shuffled = ["".join(rng.sample(w, len(w))) for w in identifiers[:200]]
    text = " ".join(identifiers + shuffled)
    pieces = tokenizer._pattern.findall(text)
    assert len(set(pieces)) == len(pieces)
    assert tokenizer.encode(text) == [i for piece in pieces for i in reference_bpe(tokenizer, piece)]


@pytest.mark.parametrize("piece", [" " * 300, "=" * 257, "ab" * 150, "é" * 99 + "x", "a", ""])
def test_long_and_degenerate_pieces(tokenizer, piece):
    assert tokenizer._bpe(piece) == reference_bpe(tokenizer, piece)


def test_out_of_order_merges_follow_hugging_face(tmp_path):
    # "ab"+"a" ranks before "a"+"b", though "ab" only exists after it: merging the leftmost
    # "a b" first lets "ab a" take the next "a", as tokenizers does (the rescanning algorithm
    # merged both "a b" first and gave [ab, ab]).
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    for token in ("ab", "aba", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tok = ByteLevelBPETokenizer(vocab, [("ab", "a"), ("a", "b")], {"eod": "<|endoftext|>", "pad": "<|endoftext|>"})
    tok.save(tmp_path)
    hf = HFTokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in ("abab", "ababab", "aabab", "ab ab"):
        assert tok.encode(text) == hf.encode(text).ids, text
    assert tok.encode("abab") == [vocab["aba"], vocab["b"]]
