"""Tokenizers across the conversion: ours -> files ``AutoTokenizer`` opens, and back.

Byte-level BPE already saves a ``tokenizer.json``. A SentencePiece model is exported as its
``tokenizer.model`` plus a ``tokenizer.json`` that reproduces SentencePiece's own encoding
(BPE merges ordered by piece score, byte fallback, no dummy prefix unless the model adds one,
no BOS), so both sides give the same ids; ``transformers``' Llama tokenizer would instead
impose its own prefix-space convention.

Chat templates travel both ways: the export writes a ``chat_template`` into tokenizer_config.json
(the one the tokenizer carries, imported earlier, else ours, which renders role tokens exactly as
the SFT data does); the import keeps a model's template as ``chat_template.jinja`` beside our
tokenizer files, where ``rlhf.chat_template: hf`` finds it.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lite.convert.tensor_io import ConversionError
from megatron_lite.data import TokenizerError, load_tokenizer
from megatron_lite.data.tokenizer import CONFIG_FILE, Tokenizer
from megatron_lite.rlhf.chat_template import CHAT_TEMPLATE_FILE, native_chat_template, read_chat_template

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
SPACE = "\u2581"  # SentencePiece's visible space


def _load(directory: Path) -> Tokenizer:
    try:
        return load_tokenizer(directory)
    except TokenizerError as exc:
        raise ConversionError(f"cannot read the tokenizer in {directory}: {exc}") from exc


def _check_vocab(tokenizer: Tokenizer, vocab_size: int, directory: Path) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ConversionError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's vocabulary has only "
            f"{vocab_size} rows; the tokenizer does not belong to this model"
        )


def export_tokenizer(tokenizer_dir: Path, out_dir: Path, vocab_size: int) -> dict[str, int]:
    """Write the checkpoint's tokenizer for ``AutoTokenizer``; return the eos and pad ids."""
    if not tokenizer_dir.is_dir():
        raise ConversionError(
            f"{tokenizer_dir.parent} has no tokenizer/ directory (the run was saved without data.tokenizer); "
            f"copy the training tokenizer directory there as tokenizer/"
        )
    tokenizer = _load(tokenizer_dir)
    _check_vocab(tokenizer, vocab_size, tokenizer_dir)
    tokenizer.save(out_dir)
    config_path = out_dir / CONFIG_FILE
    config = json.loads(config_path.read_text())
    if tokenizer.kind == "sentencepiece":
        (out_dir / "tokenizer.json").write_text(json.dumps(sentencepiece_hf_json(tokenizer.model_proto), ensure_ascii=False))
        # the generic fast class reads tokenizer.json as written; LlamaTokenizer would rebuild its own pipeline
        config.update(tokenizer_class="PreTrainedTokenizerFast", unk_token="<unk>")
    template = read_chat_template(tokenizer_dir) or native_chat_template(tokenizer)
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {"eos": tokenizer.eod_id, "pad": tokenizer.pad_id}


def import_tokenizer(hf_dir: Path, out_dir: Path, vocab_size: int) -> Path:
    """Save the Hugging Face directory's tokenizer in our format under ``out_dir``."""
    if not any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ConversionError(
            f"{hf_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save it next to the model with "
            f"tokenizer.save_pretrained(DIR) so the checkpoint can carry it"
        )
    tokenizer = _load(hf_dir)
    _check_vocab(tokenizer, vocab_size, hf_dir)
    tokenizer.save(out_dir)
    template = read_chat_template(hf_dir)
    if template is not None:
        (out_dir / CHAT_TEMPLATE_FILE).write_text(template)
    return out_dir


def sentencepiece_hf_json(model_proto: bytes) -> dict:
    """A ``tokenizers`` BPE serialisation that encodes exactly like the SentencePiece BPE model."""
    import sentencepiece as spm

    from megatron_lite.data.sentencepiece_bpe import added_pieces

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    dummy_prefix = sp.encode("x", out_type=str)[0].startswith(SPACE)
    normalizers = [{"type": "Prepend", "prepend": SPACE}] if dummy_prefix else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
    if dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    model = {
        "type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()), "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
        "vocab": {piece: i for i, piece in enumerate(pieces)}, "merges": _merges_by_score(sp, pieces),
    }
    # Matched on the raw text with no stripping, as SentencePieceTokenizer.encode splits them out
    added = [
        {"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, special in added_pieces(model_proto).items()
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
        "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders}, "model": model,
    }


def _merges_by_score(sp, pieces: list[str]) -> list[list[str]]:
    """SentencePiece BPE joins the adjacent pair whose result scores highest; as ranked merges
    that is every split of every piece into two pieces, ordered by the joined piece's score."""
    mergeable = {
        piece: i for i, piece in enumerate(pieces)
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    ranked = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-sp.get_score(piece_id), piece_id, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]
