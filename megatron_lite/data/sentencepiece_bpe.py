"""SentencePiece BPE (Llama style) behind the project's tokenizer interface.

Trained with byte fallback, so no text is ever unknown, and with identity normalisation and
no dummy prefix, so decoding gives back the text that was encoded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from megatron_lite.data.tokenizer import CHAT_ROLES, DEFAULT_SPECIAL_TOKENS, Tokenizer, TokenizerError

MODEL_FILE = "tokenizer.model"
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # ModelProto.SentencePiece.Type values


def added_pieces(model_proto: bytes) -> dict[int, bool]:
    """Id -> whether the piece is special, for the pieces matched as whole strings rather than
    built by merges: <unk> and control pieces (special), user-defined symbols (not special).

    SentencePiece itself always matches user-defined symbols in text and never control pieces;
    Hugging Face calls these "added tokens" and splits out both kinds (special ones only while
    special tokens are allowed)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    return {
        piece_id: piece.type != _USER_DEFINED
        for piece_id, piece in enumerate(model.pieces)
        if piece.type in (_UNKNOWN, _CONTROL, _USER_DEFINED)
    }


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.special_ids = self._find_special_ids()
        added = added_pieces(model_proto)
        self._set_added_tokens({self._sp.id_to_piece(i): (i, special) for i, special in added.items()})
        # SentencePiece decodes control pieces to nothing and <unk> to " ⁇ "; showing every added
        # piece as its text, each run between them decoded on its own (which drops the dummy
        # prefix encode gave that run), makes decode(encode(text)) give back text
        self._added_ids = frozenset(added)

    def _find_special_ids(self) -> dict[str, int]:
        sp = self._sp
        if sp.eos_id() < 0:
            raise TokenizerError("the SentencePiece model has no end-of-sentence piece (eos_id = -1); retrain with one")
        special = {"eod": sp.eos_id(), "pad": sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()}
        for role in CHAT_ROLES:
            piece_id = sp.piece_to_id(DEFAULT_SPECIAL_TOKENS[role])
            if piece_id != sp.unk_id():
                special[role] = piece_id
        return special

    @property
    def kind(self) -> str:
        return "sentencepiece"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if self._added_ids.isdisjoint(ids):
            return self._sp.decode(ids)
        parts, run = [], []
        for token_id in ids:
            if token_id in self._added_ids:
                parts += [self._sp.decode(run), self._sp.id_to_piece(token_id)]
                run = []
            else:
                run.append(token_id)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self.model_proto)
        text = {role: self._sp.id_to_piece(i) for role, i in self.special_ids.items()}
        self._write_config(directory, "LlamaTokenizer", text)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SentencePieceTokenizer":
        path = Path(directory) / MODEL_FILE
        if not path.is_file():
            raise TokenizerError(f"{path} does not exist; a SentencePiece tokenizer directory holds {MODEL_FILE}")
        try:
            return cls(path.read_bytes())
        except RuntimeError as exc:
            raise TokenizerError(f"{path} is not a valid SentencePiece model: {exc}") from exc

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, num_threads: int = 1) -> "SentencePieceTokenizer":
        """BPE with byte fallback; ids 0-3 are <unk>, <s>, </s> (end of document), <pad>,
        followed by the chat-role control tokens."""
        minimum = 4 + len(CHAT_ROLES) + 256
        if vocab_size < minimum:
            raise TokenizerError(f"vocab_size={vocab_size} is too small for SentencePiece with byte fallback; use >= {minimum}")
        model = io.BytesIO()
        lines = (line for text in texts for line in text.split("\n") if line)
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            control_symbols=[DEFAULT_SPECIAL_TOKENS[role] for role in CHAT_ROLES],
            num_threads=num_threads,
            minloglevel=2,
        )
        return cls(model.getvalue())
