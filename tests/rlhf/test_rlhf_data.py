"""The RLHF data side: chat encoding and its loss mask, the SFT and preference datasets,
record validation, the train/valid split and the stdlib demo instruction set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import load_tokenizer
from megatron_lite.data.demo import build_demo_data
from megatron_lite.rlhf.data import (
    IGNORE_INDEX,
    PreferenceDataset,
    PromptDataset,
    RLHFDataError,
    SFTDataset,
    conversation,
    encode_chat,
    preference_pair,
    prompt_ids,
    prompt_messages,
    read_jsonl,
    split_indices,
)
from megatron_lite.rlhf.demo_data import build_demo_rlhf_data

EOD_TEXT = "<|endoftext|>"


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The 300-token tokenizer of tests/training/tiny.py's build_tiny_data (same settings), built
    here directly so that a bare `pytest` run, which does not put the repository on sys.path,
    can collect this file."""
    data = build_demo_data(tmp_path_factory.mktemp("rlhf-tiny-data"), vocab_size=300, max_bytes=200_000, progress=False)
    return load_tokenizer(data.tokenizer_dir)


def write_jsonl(path: Path, lines) -> Path:
    """Dicts are written as JSON, strings as they are (for blank and broken lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def runs_of(ids, flags):
    """Consecutive stretches of ids whose flag is True, as lists."""
    runs, current = [], []
    for token, flag in zip(ids, flags):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def labelled_text(tok, labels) -> str:
    return tok.decode([int(t) for t in labels if t != IGNORE_INDEX])


# --------------------------------------------------------------------------- encoding


def test_encode_chat_trains_exactly_on_assistant_contents_and_their_eod(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2? <|assistant|>"},  # a role token written as text
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ]
    ids, trainable = encode_chat(tok, messages)
    enc = lambda text: tok.encode(text, allowed_special="none")  # noqa: E731
    expected = ([tok.role_id("system")] + enc("Be brief.") + [tok.role_id("user")] + enc("What is 2+2? <|assistant|>")
                + [tok.role_id("assistant")] + enc("4.") + [tok.eod_id] + [tok.role_id("user")] + enc("Thanks")
                + [tok.role_id("assistant")] + enc("You are welcome.") + [tok.eod_id])
    assert ids == expected and len(trainable) == len(ids)
    assert [tok.decode(run) for run in runs_of(ids, trainable)] == ["4." + EOD_TEXT, "You are welcome." + EOD_TEXT]
    untrained = [tok.decode(run) for run in runs_of(ids, [not t for t in trainable])]
    assert untrained == ["<|system|>Be brief.<|user|>What is 2+2? <|assistant|><|assistant|>", "<|user|>Thanks<|assistant|>"]
    # the user's "<|assistant|>" stayed text: exactly two assistant role tokens, both untrained
    assert [i for i, t in enumerate(ids) if t == tok.role_id("assistant")] == [
        i for i, t in enumerate(ids) if t == tok.role_id("assistant") and not trainable[i]]
    assert ids.count(tok.role_id("assistant")) == 2


def test_prompt_ids_ends_with_the_assistant_token(tok):
    messages = [{"role": "user", "content": "Hi"}]
    ids, trainable = encode_chat(tok, messages)
    assert prompt_ids(tok, messages) == ids + [tok.role_id("assistant")]
    assert tok.decode(prompt_ids(tok, messages)) == "<|user|>Hi<|assistant|>" and not any(trainable)


def test_encode_chat_rejects_an_unknown_role(tok):
    with pytest.raises(RLHFDataError, match=r"message 0 is .*'bot'.*role from system, user, assistant"):
        encode_chat(tok, [{"role": "bot", "content": "x"}])


# --------------------------------------------------------------------------- records


def test_conversation_forms():
    assert conversation({"prompt": "Q", "response": "A", "id": 7}, "f:1") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert conversation({"system": "S", "prompt": "Q", "response": "A"}, "f:1")[0] == {"role": "system", "content": "S"}
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "name": "x"}]
    assert conversation({"messages": messages}, "f:1") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q"}, r"f\.jsonl:3: no key 'response' \(keys: 'prompt'\); expected .*\"messages\""),
    ({"question": "Q"}, r"f\.jsonl:3: no 'prompt'/'response' or 'messages' \(keys: 'question'\)"),
    ({"prompt": "Q", "response": 5}, r"f\.jsonl:3: 'response' holds int, not a string"),
    ({"prompt": "Q", "response": "A", "system": ["s"]}, r"f\.jsonl:3: 'system' holds list, not a string"),
    ({"messages": []}, r"f\.jsonl:3: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"f\.jsonl:3: message 0 is .*; each message needs 'role' and 'content'"),
    ({"messages": [{"role": "bot", "content": "A"}]}, r"f\.jsonl:3: message 0 has role 'bot'; use one of system, user, assistant"),
    ({"messages": [{"role": "assistant", "content": 1}]}, r"f\.jsonl:3: message 0 content holds int, not a string"),
    ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},
     r"f\.jsonl:3: the last message is from the user, expected the assistant; end each conversation with the answer"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "prompt": "Q"},
     r"f\.jsonl:3: holds both 'messages' and 'prompt'/'response'; use one form"),
    ({"messages": [{"role": "assistant", "content": "A"}], "system": "S"},
     r"f\.jsonl:3: 'system' is only read with 'prompt'; with 'messages', make it the first message"),
])
def test_conversation_errors_name_the_line_and_the_fix(record, message):
    with pytest.raises(RLHFDataError, match=message):
        conversation(record, "f.jsonl:3")


def test_preference_pair_forms_and_errors():
    assert preference_pair({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "p:1") == (
        [{"role": "user", "content": "Q"}], "good", "bad")
    history = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
               {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert preference_pair({"messages": history, "chosen": "c", "rejected": "r"}, "p:1") == (history, "c", "r")
    with pytest.raises(RLHFDataError, match=r"p\.jsonl:4: 'chosen' and 'rejected' are the same text.*give two different answers"):
        preference_pair({"prompt": "Q", "chosen": "same", "rejected": "same"}, "p.jsonl:4")
    with pytest.raises(RLHFDataError, match=r"p\.jsonl:4: no key 'rejected' \(keys: 'prompt', 'chosen'\)"):
        preference_pair({"prompt": "Q", "chosen": "c"}, "p.jsonl:4")
    with pytest.raises(RLHFDataError, match=r"p\.jsonl:4: no 'prompt' or 'messages'"):
        preference_pair({"chosen": "c", "rejected": "r"}, "p.jsonl:4")
    answered = history + [{"role": "assistant", "content": "A2"}]
    with pytest.raises(RLHFDataError, match=r"last message is from the assistant, expected the user; leave the answer out"):
        preference_pair({"messages": answered, "chosen": "c", "rejected": "r"}, "p.jsonl:4")


def test_read_jsonl_skips_blank_lines_and_names_bad_lines(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"a": 1}, "", "   ", {"b": 2}])
    assert read_jsonl(good) == [{"a": 1}, {"b": 2}]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"a": 1}\n')  # as some Windows editors save it
    assert read_jsonl(tmp_path / "bom.jsonl") == [{"a": 1}]
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"a": 1}, "", '{"a": 2'])
    with pytest.raises(RLHFDataError, match=r"broken\.jsonl:3: malformed JSON .*each line must be one complete JSON object"):
        read_jsonl(broken)
    listed = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(RLHFDataError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(listed)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"a": 1}\n{"a": "\xe9"}\n')
    with pytest.raises(RLHFDataError, match=r"latin1\.jsonl:2: not UTF-8 .*save the file as UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")
    with pytest.raises(RLHFDataError, match=r"missing\.jsonl does not exist; pass the path of a JSONL file"):
        read_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- SFT


def test_sft_sample_is_shifted_masked_and_padded(tok, tmp_path):
    record = {"system": "Be kind.", "prompt": "Say hi", "response": "Hi there!"}
    path = write_jsonl(tmp_path / "sft.jsonl", [record])
    ids, trainable = encode_chat(tok, conversation(record, "x"))
    seq_length = len(ids) + 5
    ds = SFTDataset(path, tok, seq_length)
    assert len(ds) == 1 and (ds.num_truncated, ds.num_dropped) == (0, 0)
    sample = ds[0]
    tokens, labels = sample["tokens"], sample["labels"]
    assert tokens.dtype == labels.dtype == np.int64 and tokens.shape == labels.shape == (seq_length,)
    n = len(ids) - 1
    assert tokens[:n].tolist() == ids[:-1] and (tokens[n:] == tok.pad_id).all()
    assert labels[:n].tolist() == [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trainable[1:])]
    assert (labels[n:] == IGNORE_INDEX).all()
    assert labelled_text(tok, labels) == "Hi there!" + EOD_TEXT
    # the first trained label is predicted from the assistant role token
    first = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
    assert tokens[first] == tok.role_id("assistant") and labels[n - 1] == tok.eod_id


def test_sft_multi_turn_trains_on_every_answer(tok, tmp_path):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"messages": messages}]), tok, 64)
    assert labelled_text(tok, ds[0]["labels"]) == "one" + EOD_TEXT + "two" + EOD_TEXT


def test_sft_truncation_dropping_and_sources(tok, tmp_path):
    seq_length = 12
    records = [
        {"prompt": "hi", "response": "a long answer that cannot fit in twelve tokens"},  # line 1: truncated
        "",
        {"prompt": "a prompt far too long to leave any room for the answer", "response": "ok"},  # line 3: dropped
        {"prompt": "x", "response": "y"},  # line 4: fits
    ]
    # a conversation of exactly seq_length + 1 ids fits without truncation
    exact = None
    for length in range(1, 20):
        candidate = {"prompt": "p", "response": "z" * length}
        if len(encode_chat(tok, conversation(candidate, "x"))[0]) == seq_length + 1:
            exact = candidate
            break
    assert exact is not None
    path = write_jsonl(tmp_path / "sft.jsonl", records + [exact])  # line 5
    ds = SFTDataset(path, tok, seq_length)
    assert (len(ds), ds.num_truncated, ds.num_dropped) == (3, 1, 1)
    assert ds.sources == [f"{path}:1", f"{path}:4", f"{path}:5"]

    ids, trainable = encode_chat(tok, conversation(records[0], "x"))
    cut = ds[0]
    assert cut["tokens"].tolist() == ids[:seq_length]
    assert cut["labels"].tolist() == [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:seq_length + 1], trainable[1:seq_length + 1])]
    assert tok.eod_id not in cut["labels"].tolist() and tok.pad_id not in cut["tokens"].tolist()

    ids, _ = encode_chat(tok, conversation(exact, "x"))
    full = ds[2]
    assert full["tokens"].tolist() == ids[:-1] and full["labels"][-1] == tok.eod_id


def test_sft_errors_name_the_file_and_the_fix(tok, tmp_path):
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "response": "y"}] * 2)
    with pytest.raises(RLHFDataError, match=r"long\.jsonl: all 2 of 2 records were dropped: with seq_length=8 .*"
                                            r"raise model\.seq_length or shorten the prompts"):
        SFTDataset(too_long, tok, 8)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(RLHFDataError, match=r"empty\.jsonl holds no records; write one JSON object per line"):
        SFTDataset(empty, tok, 8)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}, {"prompt": "x"}])
    with pytest.raises(RLHFDataError, match=r"bad\.jsonl:2: no key 'response'"):
        SFTDataset(bad, tok, 8)
    with pytest.raises(RLHFDataError, match=r"seq_length=0 must be an integer of at least 1; set model\.seq_length"):
        SFTDataset(bad, tok, 0)


# --------------------------------------------------------------------------- preference


def test_preference_pair_sample_labels_the_answers_and_points_at_their_eod(tok, tmp_path):
    record = {"prompt": "Name a colour", "chosen": "Blue.", "rejected": "Seven hundred."}
    ds = PreferenceDataset(write_jsonl(tmp_path / "pref.jsonl", [record]), tok, 48)
    assert len(ds) == 1 and (ds.num_truncated, ds.num_dropped) == (0, 0)
    item = ds[0]
    prompt = prompt_ids(tok, [{"role": "user", "content": "Name a colour"}])
    for side, text in (("chosen", "Blue."), ("rejected", "Seven hundred.")):
        tokens, labels, last = item[f"{side}_tokens"], item[f"{side}_labels"], item[f"{side}_last"]
        ids = prompt + tok.encode(text, allowed_special="none") + [tok.eod_id]
        assert tokens.dtype == labels.dtype == np.int64 and tokens.shape == labels.shape == (48,)
        assert isinstance(last, int) and last == len(ids) - 1
        assert tokens[: last + 1].tolist() == ids and tokens[last] == tok.eod_id
        assert (tokens[last + 1:] == tok.pad_id).all() and (labels[last:] == IGNORE_INDEX).all()
        assert labelled_text(tok, labels) == text + EOD_TEXT
        assert (labels[: len(prompt) - 1] == IGNORE_INDEX).all() and labels[last - 1] == tok.eod_id
    assert item["chosen_last"] != item["rejected_last"]


def test_preference_truncation_dropping_and_messages_form(tok, tmp_path):
    seq_length = 16
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    records = [
        {"prompt": "q", "chosen": "short", "rejected": "a rejected answer much longer than sixteen tokens"},
        {"prompt": "a prompt far too long to leave any room at all", "chosen": "c", "rejected": "r"},
        {"messages": history, "chosen": "yes", "rejected": "no"},
    ]
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    ds = PreferenceDataset(path, tok, seq_length)
    assert (len(ds), ds.num_truncated, ds.num_dropped) == (2, 1, 1)
    assert ds.sources == [f"{path}:1", f"{path}:3"]
    cut = ds[0]
    assert cut["chosen_last"] < seq_length - 1 and cut["chosen_tokens"][cut["chosen_last"]] == tok.eod_id
    assert cut["rejected_last"] == seq_length - 1 and tok.pad_id not in cut["rejected_tokens"].tolist()
    assert tok.eod_id not in cut["rejected_tokens"].tolist()
    assert labelled_text(tok, cut["rejected_labels"]).startswith("a rejected")
    # earlier assistant turns of the prompt are context, not trained on
    multi = ds[1]
    assert labelled_text(tok, multi["chosen_labels"]) == "yes" + EOD_TEXT
    assert labelled_text(tok, multi["rejected_labels"]) == "no" + EOD_TEXT


def test_preference_errors(tok, tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(RLHFDataError, match=r"same\.jsonl:2: 'chosen' and 'rejected' are the same text"):
        PreferenceDataset(same, tok, 32)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 40, "chosen": "a", "rejected": "b"}])
    with pytest.raises(RLHFDataError, match=r"long\.jsonl: all 1 of 1 records were dropped: with seq_length=8 .*"
                                            r"raise model\.seq_length or shorten the prompts"):
        PreferenceDataset(long, tok, 8)
    with pytest.raises(RLHFDataError, match=r"seq_length=1 must be an integer of at least 2; set model\.seq_length"):
        PreferenceDataset(long, tok, 1)


def test_prompt_dataset_reads_the_prompt_of_every_record_kind(tok, tmp_path):
    user = [{"role": "user", "content": "hi there"}]
    records = [
        {"prompt": "hi there"},  # prompt only
        {"prompt": "hi there", "response": "an answer"},  # sft: the answer is not read
        {"prompt": "hi there", "chosen": "yes", "rejected": "no"},  # preference
        {"messages": user + [{"role": "assistant", "content": "an answer"}]},  # the final answer dropped
        {"messages": user},
        {"prompt": "hi there " * 40},  # longer than the room left: dropped
    ]
    ds = PromptDataset(write_jsonl(tmp_path / "p.jsonl", records), tok, max_prompt_length=20)
    expected = prompt_ids(tok, user)
    assert len(ds) == 5 and ds.num_dropped == 1 and all(ds[i] == expected for i in range(5))
    assert ds.sources == [f"{tmp_path / 'p.jsonl'}:{line}" for line in range(1, 6)]
    assert prompt_messages({"prompt": "q", "system": "be brief"}, "f:1") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]


def test_prompt_dataset_errors(tok, tmp_path):
    only_answer = write_jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(RLHFDataError, match=r"a\.jsonl:1: 'messages' holds only the answer; give the user's turn before it"):
        PromptDataset(only_answer, tok, 20)
    with pytest.raises(RLHFDataError, match=r"b\.jsonl:1: no key 'prompt'"):
        PromptDataset(write_jsonl(tmp_path / "b.jsonl", [{"question": "q"}]), tok, 20)
    long = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi there " * 40}])
    with pytest.raises(RLHFDataError, match=r"all 1 prompts are longer than 20 tokens .* lower rlhf.ppo.max_new_tokens"):
        PromptDataset(long, tok, 20)
    with pytest.raises(RLHFDataError, match="no room for a prompt: model.seq_length minus rlhf.ppo.max_new_tokens is 0"):
        PromptDataset(long, tok, 0)


# --------------------------------------------------------------------------- split


@pytest.mark.parametrize("n, fraction, valid_size", [
    (100, 0.1, 10), (10, 0.25, 2), (10, 0.01, 1), (2, 0.5, 1), (3, 0.99, 2), (1, 0.5, 0), (7, 0.0, 0),
])
def test_split_indices_sizes(n, fraction, valid_size):
    train, valid = split_indices(n, fraction, seed=3)
    assert len(valid) == valid_size and len(train) == n - valid_size
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(n))
    assert train.dtype == valid.dtype == np.int64


def test_split_indices_is_seeded_and_checks_its_arguments():
    first, again, other = split_indices(50, 0.2, 1), split_indices(50, 0.2, 1), split_indices(50, 0.2, 2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])
    assert first[0].tolist() != sorted(first[0].tolist())  # shuffled, not a plain cut
    with pytest.raises(RLHFDataError, match=r"cannot split 0 samples: the data set is empty"):
        split_indices(0, 0.1, 0)
    with pytest.raises(RLHFDataError, match=r"valid_fraction=1\.0 must be in \[0, 1\)"):
        split_indices(10, 1.0, 0)
    with pytest.raises(RLHFDataError, match=r"valid_fraction=-0\.1 must be in \[0, 1\)"):
        split_indices(10, -0.1, 0)


# --------------------------------------------------------------------------- demo data


def test_demo_rlhf_data_is_well_formed_and_readable(tok, tmp_path):
    files = build_demo_rlhf_data(tmp_path / "demo", max_examples=50, seed=0)
    assert files == {"sft": tmp_path / "demo" / "sft.jsonl", "preference": tmp_path / "demo" / "preference.jsonl"}
    sft, pairs = read_jsonl(files["sft"]), read_jsonl(files["preference"])
    assert len(sft) == len(pairs) == 50
    answers = {record["response"] for record in sft}
    for record, pair in zip(sft, pairs):
        assert set(record) == {"prompt", "response"} and set(pair) == {"prompt", "chosen", "rejected"}
        assert re.fullmatch(r"What does [A-Za-z]\w*(\.[A-Za-z]\w*)+\(.*\) do\?", record["prompt"])
        assert 0 < len(record["response"]) <= 400 and "\n" not in record["response"]
        assert "  " not in record["response"]
        assert pair["prompt"] == record["prompt"] and pair["chosen"] == record["response"]
        assert pair["rejected"] != pair["chosen"]
        if len(pair["chosen"].split()) >= 4:  # the same words, shuffled
            assert sorted(pair["rejected"].split()) == sorted(pair["chosen"].split())
        else:
            assert pair["rejected"] in answers
    assert len({record["prompt"] for record in sft}) == 50
    # files in sorted order, so the stdlib's first public documented function comes first
    assert sft[0] == {"prompt": "What does abc.abstractmethod(funcobj) do?", "response": "A decorator indicating abstract methods."}

    sft_ds = SFTDataset(files["sft"], tok, 512)
    pref_ds = PreferenceDataset(files["preference"], tok, 512)
    assert (len(sft_ds), sft_ds.num_dropped, len(pref_ds), pref_ds.num_dropped) == (50, 0, 50, 0)
    assert labelled_text(tok, sft_ds[0]["labels"]) == sft[0]["response"] + EOD_TEXT
    assert labelled_text(tok, pref_ds[7]["rejected_labels"]) == pairs[7]["rejected"] + EOD_TEXT


def test_demo_rlhf_data_is_deterministic_and_built_once(tmp_path):
    files = build_demo_rlhf_data(tmp_path / "a", max_examples=20, seed=5)
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    assert build_demo_rlhf_data(tmp_path / "a", max_examples=20, seed=5) == files
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == stamps  # not rewritten
    twin = build_demo_rlhf_data(tmp_path / "b", max_examples=20, seed=5)
    assert all(files[name].read_bytes() == twin[name].read_bytes() for name in files)
    # other settings rebuild: same answers, other rejected picks
    reseeded = build_demo_rlhf_data(tmp_path / "a", max_examples=20, seed=6)
    assert reseeded["sft"].read_bytes() == twin["sft"].read_bytes()
    assert reseeded["preference"].read_bytes() != twin["preference"].read_bytes()
    (tmp_path / "a" / "rlhf_demo.json").write_text("{")  # a marker cut short is stale, not an error
    assert build_demo_rlhf_data(tmp_path / "a", max_examples=20, seed=6) == reseeded
    # a missing file is rebuilt even when the marker matches
    reseeded["sft"].unlink()
    assert build_demo_rlhf_data(tmp_path / "a", max_examples=20, seed=6)["sft"].read_bytes() == twin["sft"].read_bytes()
    with pytest.raises(RLHFDataError, match=r"max_examples=1 must be an integer of at least 2"):
        build_demo_rlhf_data(tmp_path / "c", max_examples=1)
