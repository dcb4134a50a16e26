"""GPT-2 style byte-level BPE: encoding, decoding, GPT-2 / Hugging Face file formats, training.

Text is split into pre-tokens by the GPT-2 pattern, each pre-token's UTF-8 bytes start as one
symbol per byte, and ranked merges join neighbouring symbols, lowest rank first. The files store
every byte as a printable character (``bytes_to_unicode``) so that vocab.json stays readable; in
memory the encoder works on integer ids and never builds those strings.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import regex

from megatron_lite.data.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer, TokenizerError, read_config

# Contractions, letter runs, digit runs and punctuation runs each take one optional leading
# space; whitespace before a word is left for the word, trailing whitespace stays together.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CACHE_LIMIT = 1 << 20  # pre-tokens remembered before the cache starts over
_GONE = -1  # a byte position merged into the part on its left; no merge pair contains it


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes stand for themselves, the other
    68 bytes take the code points from 256 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _token_bytes(token: str) -> bytes:
    return bytes(CHAR_TO_BYTE[c] for c in token)


def _is_byte_token(token: str) -> bool:
    return all(c in CHAR_TO_BYTE for c in token)


class ByteLevelBPETokenizer(Tokenizer):
    """A byte-level BPE vocabulary; ids match Hugging Face's BPE on the same files."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict[str, str]):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.special_tokens = dict(special_tokens)  # role -> token text, each one in vocab
        missing_bytes = [BYTE_TO_CHAR[b] for b in range(256) if BYTE_TO_CHAR[b] not in self.vocab]
        if missing_bytes:
            raise TokenizerError(
                f"byte-level vocabulary lacks {len(missing_bytes)} of the 256 byte tokens "
                f"(e.g. {missing_bytes[0]!r}); it cannot encode every string - is this a byte-level BPE vocab.json?"
            )
        self.special_ids = {role: self.vocab[text] for role, text in self.special_tokens.items()}
        self._set_added_tokens({text: (self.vocab[text], True) for text in self.special_tokens.values()})
        self._byte_ids = [self.vocab[BYTE_TO_CHAR[b]] for b in range(256)]
        self._merge_rank = self._build_merge_ranks()
        self._merged_ids = [self.vocab[left + right] for left, right in self.merges]  # by rank
        self._id_bytes = self._build_id_bytes()
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, list[int]] = {}

    def _build_merge_ranks(self) -> dict[tuple[int, int], int]:
        """(left id, right id) -> rank of the first merge of that pair."""
        ranks = {}
        for rank, (left, right) in enumerate(self.merges):
            for part in (left, right, left + right):
                if part not in self.vocab:
                    raise TokenizerError(f"merge #{rank} ({left!r} {right!r}) uses {part!r}, which is not in the vocabulary")
            ranks.setdefault((self.vocab[left], self.vocab[right]), rank)
        return ranks

    def _build_id_bytes(self) -> list[bytes]:
        out = [b""] * (max(self.vocab.values()) + 1)
        for token, idx in self.vocab.items():
            out[idx] = _token_bytes(token) if _is_byte_token(token) else token.encode("utf-8")
        for text in self.special_tokens.values():
            out[self.vocab[text]] = text.encode("utf-8")
        return out

    @property
    def kind(self) -> str:
        return "bytelevel"

    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    # ---- encoding -------------------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in self._pattern.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._bpe(piece)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = piece_ids
            ids.extend(piece_ids)
        return ids

    def _bpe(self, piece: str) -> list[int]:
        """Apply the lowest-ranked merge among neighbouring parts, the leftmost on a tie, until none applies.

        The parts are a linked list over byte positions (a merged part keeps its left position)
        and the candidate pairs a heap of (rank, position). A merge changes its neighbours' pairs,
        so an entry goes stale instead of being removed: it is dropped when popped, since the
        pair now at its position has another rank (or none).
        """
        word = list(map(self._byte_ids.__getitem__, piece.encode("utf-8")))
        size = len(word)
        rank_of = self._merge_rank.get
        heap = [(rank, position) for position, rank in enumerate(map(rank_of, zip(word, word[1:]))) if rank is not None]
        if not heap:
            return word
        heapq.heapify(heap)
        word.append(_GONE)  # past the last part; index -1 reads it too, before the first part
        after = list(range(1, size + 1))
        before = list(range(-1, size))
        merged_ids = self._merged_ids
        while heap:
            rank, position = heapq.heappop(heap)
            right = after[position]
            if rank_of((word[position], word[right])) != rank:
                continue
            word[position] = merged_ids[rank]
            word[right] = _GONE
            right = after[position] = after[right]
            before[right] = position
            new_rank = rank_of((word[position], word[right]))
            if new_rank is not None:
                heapq.heappush(heap, (new_rank, position))
            left = before[position]
            new_rank = rank_of((word[left], word[position]))
            if new_rank is not None:
                heapq.heappush(heap, (new_rank, left))
        return [part for part in word if part != _GONE]

    def decode(self, ids) -> str:
        table = self._id_bytes
        try:
            raw = b"".join([table[int(i)] for i in ids])
        except IndexError:
            bad = next(int(i) for i in ids if not 0 <= int(i) < len(table))
            raise TokenizerError(f"token id {bad} is outside the vocabulary (size {len(table)})") from None
        return raw.decode("utf-8", errors="replace")

    # ---- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """vocab.json + merges.txt (GPT-2 format), tokenizer.json (Hugging Face), tokenizer_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False))
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in self.merges]
        (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (directory / "tokenizer.json").write_text(json.dumps(self.to_hf_json(), ensure_ascii=False))
        self._write_config(directory, "PreTrainedTokenizerFast", self.special_tokens)
        return directory

    def to_hf_json(self) -> dict:
        """The ``tokenizers`` serialisation of this vocabulary (BPE model, ByteLevel everything else)."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        # No stripping of neighbouring spaces, no word-boundary condition, matched on the raw text:
        # Hugging Face then splits special tokens out exactly where AddedTokenMatcher does.
        added = [
            {"id": self.vocab[text], "content": text, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for text in sorted(set(self.special_tokens.values()), key=lambda t: self.vocab[t])
        ]
        model = {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": self.vocab, "merges": [f"{a} {b}" for a, b in self.merges],
        }
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False},
            "decoder": byte_level, "model": model,
        }

    @classmethod
    def load(cls, directory: str | Path) -> "ByteLevelBPETokenizer":
        directory = Path(directory)
        vocab = _read_json(directory / "vocab.json")
        merges = _read_merges(directory / "merges.txt")
        config = read_config(directory)
        special = config.get("special_tokens") if config else None
        return cls(vocab, merges, special if special is not None else _guess_special(vocab))

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "ByteLevelBPETokenizer":
        """Read a Hugging Face ``tokenizer.json`` whose model is BPE over ByteLevel pre-tokens."""
        path = Path(path)
        data = _read_json(path)
        model = data.get("model") or {}
        pre = data.get("pre_tokenizer") or {}
        pre_types = [p.get("type") for p in pre.get("pretokenizers", [pre])]
        if model.get("type") != "BPE" or "ByteLevel" not in pre_types:
            raise TokenizerError(
                f"{path} is a {model.get('type')} model with pre-tokenizer {pre_types}; only byte-level BPE "
                f"(model BPE, pre_tokenizer ByteLevel) is supported - use a SentencePiece tokenizer.model otherwise"
            )
        vocab = dict(model["vocab"])
        for added in data.get("added_tokens") or []:
            vocab.setdefault(added["content"], added["id"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        config = read_config(path.parent)
        special = config.get("special_tokens") if config else None
        return cls(vocab, merges, special if special is not None else _guess_special(vocab))

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: dict[str, str] | None = None,
        min_frequency: int = 2,
        progress: Callable[[int, int], None] | None = None,
    ) -> "ByteLevelBPETokenizer":
        """Learn merges from ``texts`` until the vocabulary (bytes + merges + specials) has ``vocab_size`` ids."""
        special_tokens = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        specials = list(dict.fromkeys(special_tokens.values()))
        num_merges = vocab_size - 256 - len(specials)
        if num_merges < 0:
            raise TokenizerError(
                f"vocab_size={vocab_size} is smaller than the 256 byte tokens plus {len(specials)} special tokens; "
                f"use at least {256 + len(specials)}"
            )
        if "eod" not in special_tokens or "pad" not in special_tokens:
            raise TokenizerError("special_tokens must name an 'eod' and a 'pad' token")
        pair_ids = learn_merges(pre_token_counts(texts), num_merges, min_frequency, progress)
        vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
        id_text = [BYTE_TO_CHAR[b] for b in range(256)]
        merges = []
        for left, right in pair_ids:
            merges.append((id_text[left], id_text[right]))
            id_text.append(id_text[left] + id_text[right])
            vocab[id_text[-1]] = len(vocab)
        for text in specials:
            if text in vocab:
                raise TokenizerError(f"special token {text!r} collides with a learned token; choose another text")
            vocab[text] = len(vocab)
        return cls(vocab, merges, special_tokens)


def _merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of ``pair``, scanning left to right."""
    left, right = pair
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == left and word[i + 1] == right:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if (number == 1 and line.startswith("#version")) or not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{path}:{number}: expected two space-separated tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _guess_special(vocab: dict[str, int]) -> dict[str, str]:
    """Special tokens of a vocabulary saved elsewhere: the known end-of-text spellings; pad falls
    back to the end-of-text token, as GPT-2 users do."""
    special = {role: text for role, text in DEFAULT_SPECIAL_TOKENS.items() if text in vocab}
    if "eod" not in special:
        for text in ("</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"):
            if text in vocab:
                special["eod"] = text
                break
        else:
            raise TokenizerError(
                "the vocabulary has no end-of-document token (<|endoftext|>, </s>, <|end_of_text|>, <eos>); "
                "add one, or save the tokenizer with this project so tokenizer_config.json names it"
            )
    special.setdefault("pad", special["eod"])
    return special


# ---- training ------------------------------------------------------------------------------
def pre_token_counts(texts: Iterable[str]) -> Counter:
    pattern = regex.compile(GPT2_PATTERN)
    counts: Counter = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


def learn_merges(
    counts: Counter, num_merges: int, min_frequency: int = 2, progress: Callable[[int, int], None] | None = None
) -> list[tuple[int, int]]:
    """Merges as (left id, right id) pairs; merge k creates id 256 + k.

    Pair counts are kept up to date incrementally: a merge only revisits the words holding that
    pair. The most frequent pair comes from a heap with lazy deletion (stale entries are skipped
    when their count no longer matches); ties go to the smallest (left id, right id).
    """
    words = [list(piece.encode("utf-8")) for piece in counts]
    freqs = list(counts.values())
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for index, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue
        if -neg_count < min_frequency:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        changed = _apply_merge(words, freqs, pair, new_id, pair_counts, where)
        for other in changed:
            count = pair_counts.get(other, 0)
            if count > 0:
                heapq.heappush(heap, (-count, other))
        if progress is not None:
            progress(len(merges), num_merges)
    return merges


def _apply_merge(words, freqs, pair, new_id, pair_counts, where) -> set[tuple[int, int]]:
    changed: set[tuple[int, int]] = set()
    for index in sorted(where.pop(pair, ())):
        word, freq = words[index], freqs[index]
        merged = _merge_pair(word, pair, new_id)
        if len(merged) == len(word):
            continue
        for old in zip(word, word[1:]):
            pair_counts[old] -= freq
            changed.add(old)
        for new in zip(merged, merged[1:]):
            pair_counts[new] = pair_counts.get(new, 0) + freq
            where.setdefault(new, set()).add(index)
            changed.add(new)
        words[index] = merged
    pair_counts.pop(pair, None)
    changed.discard(pair)
    return changed
