"""The tokenizer interface and the special tokens every tokenizer carries.

A tokenizer directory describes itself with ``tokenizer_config.json``: Hugging Face's keys
(``tokenizer_class``, ``eos_token``, ...) so ``transformers.AutoTokenizer`` can open it, plus a
``megatron_lite`` entry naming the backend and the id of every special token. Directories
written by other tools are recognised by the files they hold (see ``tokenizer_dir.load_tokenizer``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from megatron_lite.errors import UserError


CONFIG_FILE = "tokenizer_config.json"

# role -> token text. "eod" separates documents in the packed stream; the chat roles mark turns.
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {
    "eod": "<|endoftext|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
CHAT_ROLES = ("system", "user", "assistant")
# How encode treats special-token strings inside the text: "all" splits each one out as its id,
# "none" encodes it as ordinary characters.
SPECIAL_MODES = ("all", "none")


class TokenizerError(UserError, ValueError):
    """A tokenizer directory or argument the user can fix; the message says how."""


class AddedTokenMatcher:
    """Finds whole-token strings in text the way Hugging Face's added vocabulary does with the
    flags we export (no stripping, not normalized, not single-word): the leftmost occurrence
    first, the longest one where several start at the same character, never overlapping."""

    def __init__(self, text_ids: dict[str, int]):
        empty = [token_id for text, token_id in text_ids.items() if not text]
        if empty:
            raise TokenizerError(
                f"special token id {empty[0]} has an empty text, which would match between every two characters; "
                f"give every special token a non-empty text such as <|endoftext|>"
            )
        self.text_ids = dict(text_ids)
        # longest first: a regex alternation takes the first alternative that matches at a position
        longest_first = sorted(self.text_ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        # one substring test rejects most texts before the regex runs (e.g. "<|" for <|...|> tokens)
        self._prefix = os.path.commonprefix(longest_first)

    def may_occur(self, text: str) -> bool:
        return self._pattern is not None and self._prefix in text

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """Non-empty pieces of ``text`` in order: (token text, its id) or (ordinary text, None)."""
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                yield text[start : match.start()], None
            yield match.group(), self.text_ids[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:], None


class Tokenizer:
    """What the rest of the system relies on. A backend implements ``_encode_ordinary`` and the
    four methods below it, sets ``special_ids`` and calls ``_set_added_tokens``."""

    special_ids: dict[str, int]  # role -> id, always holding "eod" and "pad"
    added_tokens: dict[str, int]  # text -> id of every token encode(allowed_special="all") matches whole

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, allowed_special: str = "all") -> list[int]:
        """Token ids for ``text``.

        ``allowed_special="all"`` turns each special-token string inside ``text`` into that
        token's id, as Hugging Face does with the ``tokenizer.json`` this project writes, so both
        give the same ids. ``"none"`` encodes such strings as ordinary characters, for text in
        which "<|endoftext|>" is something written rather than a document boundary.
        """
        matcher = self._matchers.get(allowed_special) if isinstance(allowed_special, str) else None
        if matcher is None:
            raise TokenizerError(
                f"allowed_special={allowed_special!r} is not one of {', '.join(map(repr, SPECIAL_MODES))}: "
                f"'all' encodes special-token strings as their ids, 'none' as plain text"
            )
        if not matcher.may_occur(text):
            return self._encode_ordinary(text)
        ids: list[int] = []
        for piece, token_id in matcher.split(text):
            if token_id is None:
                ids.extend(self._encode_ordinary(piece))
            else:
                ids.append(token_id)
        return ids

    def _set_added_tokens(self, added: dict[str, tuple[int, bool]]) -> None:
        """``added``: text -> (id, is special). Special ones are matched only under
        ``allowed_special="all"``; the others always, as Hugging Face treats its non-special
        added tokens (SentencePiece's user-defined symbols are exported as those)."""
        self.added_tokens = {text: token_id for text, (token_id, _) in added.items()}
        ordinary = {text: token_id for text, (token_id, special) in added.items() if not special}
        self._matchers = {"all": AddedTokenMatcher(self.added_tokens), "none": AddedTokenMatcher(ordinary)}

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids for ``text`` with special-token strings treated as ordinary characters."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        raise NotImplementedError

    @property
    def kind(self) -> str:
        raise NotImplementedError

    @property
    def eod_id(self) -> int:
        return self.special_ids["eod"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    def role_id(self, role: str) -> int:
        """Id of a chat-role token (``system``, ``user``, ``assistant``)."""
        if role not in self.special_ids:
            have = ", ".join(sorted(self.special_ids))
            raise TokenizerError(
                f"this tokenizer has no {role!r} token (it has: {have}); train one with "
                f"tools/train_tokenizer.py, which adds the chat-role tokens by default"
            )
        return self.special_ids[role]

    def _write_config(self, directory: Path, hf_class: str, special_text: dict[str, str]) -> None:
        config = {
            "tokenizer_class": hf_class,
            "eos_token": special_text.get("eod"),
            "pad_token": special_text.get("pad"),
            "model_max_length": 1_000_000_000,
            "megatron_lite": {"type": self.kind, "special_ids": self.special_ids, "special_tokens": special_text},
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def read_config(directory: Path) -> dict | None:
    """The ``megatron_lite`` entry of a directory's tokenizer config; None when there is none."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}); delete it or re-save the tokenizer") from exc
    return config.get("megatron_lite") if isinstance(config, dict) else None
