"""The tokenizer interface, the special tokens every tokenizer carries, and ``load_tokenizer``.

A tokenizer directory describes itself with ``tokenizer_config.json``: Hugging Face's keys
(``tokenizer_class``, ``eos_token``, ...) so ``transformers.AutoTokenizer`` can open it, plus a
``megatron_lite`` entry naming the backend and the id of every special token. Directories
written by other tools are recognised by the files they hold (see ``load_tokenizer``).
"""

from __future__ import annotations

import json
from pathlib import Path

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


class TokenizerError(ValueError):
    """A tokenizer directory or argument the user can fix; the message says how."""


class Tokenizer:
    """What the rest of the system relies on; the backends fill in the five methods below."""

    special_ids: dict[str, int]  # role -> id, always holding "eod" and "pad"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
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


def _read_config(directory: Path) -> dict | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}); delete it or re-save the tokenizer") from exc
    return config.get("megatron_lite") if isinstance(config, dict) else None


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Open any tokenizer directory this project saves, or one holding GPT-2 ``vocab.json`` +
    ``merges.txt``, a Hugging Face byte-level ``tokenizer.json``, or a SentencePiece ``tokenizer.model``."""
    from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
    from megatron_lite.data.sentencepiece_bpe import SentencePieceTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(
            f"tokenizer directory {directory} does not exist; train one with tools/train_tokenizer.py "
            f"or point data.tokenizer at a directory holding vocab.json + merges.txt, tokenizer.json or tokenizer.model"
        )
    config = _read_config(directory)
    kind = config.get("type") if config else None
    if kind == "sentencepiece" or (kind is None and (directory / "tokenizer.model").is_file()):
        return SentencePieceTokenizer.load(directory)
    if kind == "bytelevel" or kind is None:
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return ByteLevelBPETokenizer.load(directory)
        if (directory / "tokenizer.json").is_file():
            return ByteLevelBPETokenizer.from_hf_json(directory / "tokenizer.json")
    if kind not in (None, "bytelevel", "sentencepiece"):
        raise TokenizerError(f"{directory / CONFIG_FILE} names tokenizer type {kind!r}; expected bytelevel or sentencepiece")
    raise TokenizerError(
        f"{directory} holds no tokenizer: expected vocab.json + merges.txt (GPT-2 byte-level BPE), "
        f"tokenizer.json (Hugging Face byte-level BPE) or tokenizer.model (SentencePiece)"
    )
