"""Open a tokenizer directory, whichever tokenizer family wrote it. Kept apart from
``tokenizer.py`` (the interface every family imports) so no module imports one that imports it."""

from __future__ import annotations

from pathlib import Path

from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
from megatron_lite.data.sentencepiece_bpe import SentencePieceTokenizer
from megatron_lite.data.tokenizer import CONFIG_FILE, Tokenizer, TokenizerError, read_config


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Open any tokenizer directory this project saves, or one holding GPT-2 ``vocab.json`` +
    ``merges.txt``, a Hugging Face byte-level ``tokenizer.json``, or a SentencePiece ``tokenizer.model``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(
            f"tokenizer directory {directory} does not exist; train one with tools/train_tokenizer.py "
            f"or point data.tokenizer at a directory holding vocab.json + merges.txt, tokenizer.json or tokenizer.model"
        )
    config = read_config(directory)
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
        f"tokenizer.json (Hugging Face byte-level BPE) or tokenizer.model (SentencePiece); train one into it with "
        f"tools/train_tokenizer.py --output {directory}"
    )
