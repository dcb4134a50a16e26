import io
import json
import random
import shutil

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_lite.data import TokenizerError, load_tokenizer
from megatron_lite.data.bytelevel import BYTE_TO_CHAR, ByteLevelBPETokenizer
from megatron_lite.data.sentencepiece_bpe import SentencePieceTokenizer

HARD_TEXTS = [
    "Hello, world! It's 2024; they'll've done it.",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符和日本語のテキスト、한국어 텍스트",
    "combining: e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 and Hangul jamo \u1100\u1161",
    "whitespace   runs\t\t\ttabs\n\n\nnewlines \u00a0nbsp\u2003em\u3000ideographic   ",
    "control \x00\x01\x07\x1b[31m\x1c\x1d\x1e\x1f\x7f\x85 end",
    "    leading spaces and trailing spaces    ",
    "def f(x):\n    return x**2  # comment\n\n\n",
    "numbers 3.14159 ١٢٣ ⅷ ² 10,000,000",
    "'s 't 're 've 'm 'll 'd 'S 'T",
    "",
    " ",
    "\u200b\u200d\ufeff zero widths",
    "mixed\u2028line\u2029separators\r\nCRLF\rCR",
]


def random_unicode(rng: random.Random, length: int) -> str:
    out = []
    for _ in range(length):
        plane = rng.random()
        if plane < 0.3:
            code = rng.randrange(0x20, 0x7F)
        elif plane < 0.4:
            code = rng.choice([0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C, 0x1C, 0x85, 0xA0, 0x2000, 0x3000])
        else:
            code = rng.randrange(0, 0x110000)
        if 0xD800 <= code <= 0xDFFF:  # lone surrogates cannot be encoded as UTF-8
            code = 0x41
        out.append(chr(code))
    return "".join(out)


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_unicode(rng, rng.randrange(0, 60)) for _ in range(count)]


def special_positions(specials: list[str]) -> list[str]:
    """Each special-token string at the start, at the end, alone, doubled, next to other ones,
    inside a word, between spaces and newlines, and cut in half (which is plain text)."""
    texts = []
    for special in specials:
        texts += [special, special + special, f"{special}hello", f"hello{special}", f"hel{special}lo",
                  f" {special} ", f"a  {special}  b", f"\n{special}\n", f"x{special}{specials[0]} y",
                  special[: len(special) // 2], f"a{special[:-1]} b", f"{special[1:]}{special}"]
    texts.append("".join(specials) + " tail " + " ".join(specials))
    return texts


def spliced_texts(specials: list[str], count: int, seed: int = 0) -> list[str]:
    """Random Unicode with special-token strings and halves of them spliced in."""
    rng = random.Random(seed)
    halves = [s[: len(s) // 2] for s in specials] + [s[len(s) // 2 :] for s in specials]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randrange(1, 6)):
            parts.append(random_unicode(rng, rng.randrange(0, 12)))
            parts.append(rng.choice(specials * 3 + halves + [" ", "  ", "\n"]))
        texts.append("".join(parts))
    return texts


def hf_from_files(directory) -> HFTokenizer:
    hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def test_round_trip_random_unicode(trained_dir):
    tok = load_tokenizer(trained_dir)
    for text in HARD_TEXTS + random_texts(400):
        assert tok.decode(tok.encode(text)) == text


def test_matches_hf_bytelevel_bpe_on_vocab_and_merges(trained_dir):
    ours = load_tokenizer(trained_dir)
    hf = hf_from_files(trained_dir)
    texts = HARD_TEXTS + random_texts(400, seed=1)
    for text in texts:
        assert ours.encode(text) == hf.encode(text).ids, repr(text)


def test_exported_tokenizer_json_loads_in_tokenizers_and_transformers(trained_dir):
    ours = load_tokenizer(trained_dir)
    hf = HFTokenizer.from_file(str(trained_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(trained_dir / "tokenizer.json"))
    for text in HARD_TEXTS + random_texts(200, seed=2):
        ids = ours.encode(text)
        assert hf.encode(text).ids == ids, repr(text)
        assert fast.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf.decode(ids) == text
    assert hf.token_to_id("<|endoftext|>") == ours.eod_id
    assert hf.get_vocab_size() == ours.vocab_size


def test_trained_merges_match_hand_worked_corpus():
    # Pre-tokens: "hug" x1, " hug" x2, " pug" x1, " pun" x1. Pair counts: u-g 4, h-u 3, then
    # h-ug 3; then " "-p and " "-hug tie at 2 and the smaller id pair (" ", "p") wins; then " "-hug.
    tok = ByteLevelBPETokenizer.train(["hug hug hug pug pun"], vocab_size=256 + 4 + 5)
    space = BYTE_TO_CHAR[ord(" ")]
    assert tok.merges == [("u", "g"), ("h", "ug"), (space, "p"), (space, "hug")]
    assert tok.vocab["ug"] == 256 and tok.vocab[space + "hug"] == 259
    assert tok.encode(" hug") == [259]
    assert tok.encode(" pun") == [258, ord("u"), ord("n")]
    assert tok.special_ids == {"eod": 260, "pad": 261, "system": 262, "user": 263, "assistant": 264}


def test_pair_counts_follow_earlier_merges():
    # "abababab" x1, " abababab" x49, " cdcdcd" x50, " abcd" x50: a-b 250, c-d 200 come first;
    # only after a-b is merged does ab-ab (3 per "abababab" word, 150) exist and beat b-a's old 150.
    text = "abababab cdcdcd abcd " * 50
    tok = ByteLevelBPETokenizer.train([text], vocab_size=256 + 3 + 5)
    assert tok.merges == [("a", "b"), ("c", "d"), ("ab", "ab")]
    assert tok.vocab_size == 264
    assert tok.encode(" abababab") == [ord(" "), 258, 258]


def test_plain_gpt2_directory_and_hf_json_directory(tmp_path, trained_dir):
    plain = tmp_path / "gpt2"
    plain.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(trained_dir / name, plain / name)
    tok = load_tokenizer(plain)
    assert tok.eod_id == json.loads((plain / "vocab.json").read_text())["<|endoftext|>"]
    hf_only = tmp_path / "hf"
    hf_only.mkdir()
    shutil.copy(trained_dir / "tokenizer.json", hf_only / "tokenizer.json")
    tok2 = load_tokenizer(hf_only)
    text = HARD_TEXTS[1] + HARD_TEXTS[3]
    assert tok.encode(text) == tok2.encode(text) == load_tokenizer(trained_dir).encode(text)
    assert tok2.vocab_size == tok.vocab_size


def test_tokenizer_errors(tmp_path, trained_dir):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(trained_dir / "vocab.json", bad / "vocab.json")
    (bad / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match=r"merges.txt:2: expected two"):
        load_tokenizer(bad)
    (bad / "merges.txt").write_text("#version: 0.2\nzz qq\n")
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="at least 261"):
        ByteLevelBPETokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        load_tokenizer(trained_dir).decode([10**6])
    no_roles = ByteLevelBPETokenizer.train(["abc abc"], 300, {"eod": "<|endoftext|>", "pad": "<|pad|>"})
    assert no_roles.vocab_size == 260 and no_roles.pad_id == 259  # 2 merges (ab, abc) occur twice; then specials
    with pytest.raises(TokenizerError, match="no 'user' token .*tools/train_tokenizer.py"):
        no_roles.role_id("user")


def test_sentencepiece_backend_round_trip(tmp_path, corpus):
    tok = SentencePieceTokenizer.train(corpus["docstrings"][:400], vocab_size=600)
    tok.save(tmp_path / "sp")
    loaded = load_tokenizer(tmp_path / "sp")
    assert loaded.kind == "sentencepiece"
    assert loaded.special_ids["eod"] == 2 and loaded.special_ids["pad"] == 3
    assert loaded.role_id("user") == tok.role_id("user") != 0
    for text in HARD_TEXTS + corpus["docstrings"][400:420]:
        ids = loaded.encode(text)
        assert ids == tok.encode(text)
        assert loaded.decode(ids) == text, repr(text)
    assert max(loaded.encode(HARD_TEXTS[2])) < loaded.vocab_size == 600


# ----------------------------------------------------------------------------- special-token strings in text


def test_special_strings_become_their_ids_by_default(trained_dir):
    tok = load_tokenizer(trained_dir)
    eod, pad, user = tok.eod_id, tok.pad_id, tok.role_id("user")
    plain = lambda text: tok.encode(text, allowed_special="none")  # noqa: E731
    assert tok.encode("<|endoftext|>") == [eod]
    assert tok.encode("<|endoftext|><|pad|><|user|>") == [eod, pad, user]
    assert tok.encode("hel<|user|>lo") == plain("hel") + [user] + plain("lo")
    space = tok.vocab[BYTE_TO_CHAR[ord(" ")]]
    assert tok.encode(" <|user|> ") == [space, user, space]  # neighbouring spaces are not absorbed
    assert tok.encode("a <|endoftext|>\nb") == plain("a ") + [eod] + plain("\nb")
    assert tok.encode("<|endoftext") == plain("<|endoftext") and eod not in plain("<|endoftext")
    assert tok.encode("<|endoftext|>", allowed_special="none") == plain("<|endoftext|>")
    assert len(plain("<|endoftext|>")) > 1 and tok.decode(plain("x<|endoftext|>")) == "x<|endoftext|>"
    assert tok.decode(tok.encode("x<|endoftext|>y<|pad|>")) == "x<|endoftext|>y<|pad|>"
    assert tok.added_tokens == {text: tok.vocab[text] for text in tok.special_tokens.values()}


def test_leftmost_then_longest_special_wins():
    tok = ByteLevelBPETokenizer.train(["abc abd"], 300, {"eod": "<|endoftext|>", "pad": "<|end", "x": "<|endoftext|>x"})
    eod, short, long = tok.special_ids["eod"], tok.special_ids["pad"], tok.special_ids["x"]
    plain = lambda text: tok.encode(text, allowed_special="none")  # noqa: E731
    assert tok.encode("<|endoftext|>x") == [long]
    assert tok.encode("<|endoftext|>y") == [eod] + plain("y")
    assert tok.encode("<|endoftext<|end|>") == [short] + plain("oftext") + [short] + plain("|>")
    hf = HFTokenizer.from_str(json.dumps(tok.to_hf_json()))
    for text in ["<|endoftext|>x", "<|endoftext<|end|>", "a<|end<|endoftext|>xb"]:
        assert tok.encode(text) == hf.encode(text).ids, repr(text)


def test_special_strings_match_hf_tokenizers_and_transformers(trained_dir):
    ours = load_tokenizer(trained_dir)
    specials = list(dict.fromkeys(ours.special_tokens.values()))
    texts = special_positions(specials) + spliced_texts(specials, 300, seed=3)
    hf = HFTokenizer.from_file(str(trained_dir / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(trained_dir / "tokenizer.json"))
    old_ids = hf_from_files(trained_dir)  # no added tokens: every string is plain text
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text).ids == ids, repr(text)
        assert fast.encode(text, add_special_tokens=False) == ids, repr(text)
        assert ours.decode(ids) == text
        plain = ours.encode(text, allowed_special="none")
        assert plain == old_ids.encode(text).ids, repr(text)
        assert ours.decode(plain) == text
    special_ids = set(ours.special_ids.values())
    assert sum(bool(special_ids & set(ours.encode(t))) for t in texts) > 250  # the texts do exercise the split
    hf.encode_special_tokens = True  # Hugging Face's own switch for "special strings are text"
    assert all(hf.encode(t).ids == ours.encode(t, allowed_special="none") for t in texts)


def test_encode_arguments_are_checked():
    with pytest.raises(TokenizerError, match=r"allowed_special='some' is not one of 'all', 'none'"):
        ByteLevelBPETokenizer.train(["abc"], 300).encode("abc", allowed_special="some")
    with pytest.raises(TokenizerError, match=r"allowed_special=True is not one of"):
        ByteLevelBPETokenizer.train(["abc"], 300).encode("abc", allowed_special=True)
    with pytest.raises(TokenizerError, match="has an empty text.*non-empty text such as"):
        ByteLevelBPETokenizer.train(["abc"], 300, {"eod": "", "pad": "<|pad|>"})


def train_sentencepiece(texts, **options) -> SentencePieceTokenizer:
    model = io.BytesIO()
    lines = (line for text in texts for line in text.split("\n") if line)
    settings = dict(model_type="bpe", vocab_size=500, byte_fallback=True, normalization_rule_name="identity",
                    add_dummy_prefix=False, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                    control_symbols=["<|user|>"], minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **{**settings, **options})
    return SentencePieceTokenizer(model.getvalue())


def test_sentencepiece_special_and_user_defined_pieces(corpus):
    tok = train_sentencepiece(corpus["docstrings"][:300], user_defined_symbols=["<sep>"])
    sp = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    sep, user = sp.piece_to_id("<sep>"), tok.role_id("user")
    assert tok.added_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<|user|>": user, "<sep>": sep}
    text = "a</s>b <|user|>hi<sep>x<unk>"
    ids = tok.encode(text)
    assert ids == sp.encode("a") + [2] + sp.encode("b ") + [user] + sp.encode("hi") + [sep] + sp.encode("x") + [0]
    plain = tok.encode(text, allowed_special="none")  # control pieces are text; user-defined ones stay pieces
    assert plain == sp.encode(text) and sep in plain and not {0, 2, user} & set(plain)
    for text in special_positions(list(tok.added_tokens)) + spliced_texts(list(tok.added_tokens), 100, seed=4):
        assert tok.decode(tok.encode(text)) == text, repr(text)
        assert tok.decode(tok.encode(text, allowed_special="none")) == text, repr(text)
    assert tok.decode([2, 1, 0]) == "</s><s><unk>"  # shown, as the byte-level backend shows its specials


def test_sentencepiece_dummy_prefix_model_round_trips_around_specials(corpus):
    tok = train_sentencepiece(corpus["docstrings"][:300], add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    # every run between special tokens gets its own dummy prefix, as in Hugging Face's Prepend normalizer
    assert tok.encode("a</s>b") == sp.encode("a") + [2] + sp.encode("b") and sp.encode("b")[0] != sp.encode("ab")[1]
    for text in ["a</s>b", " </s> x", "<s><|user|>  q", "x<|user|>"]:
        assert tok.decode(tok.encode(text)) == text, repr(text)
