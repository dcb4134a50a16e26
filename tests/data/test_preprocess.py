import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import load_tokenizer
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.preprocess import PreprocessError, inspect_dataset, preprocess

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path, texts, bad_lines=()):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    for number, raw in bad_lines:
        lines.insert(number - 1, raw)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_to_bin_idx_matches_direct_encoding(tmp_path, trained_dir, corpus):
    texts = corpus["docstrings"][:150]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    stats = preprocess([src], trained_dir, tmp_path / "out", workers=1, append_eod=True, progress=False)
    tok = load_tokenizer(trained_dir)
    ds = IndexedDataset(tmp_path / "out")
    assert stats.documents == len(ds) == 150 and ds.dtype == np.uint16
    for index in (0, 77, 149):
        assert ds[index].tolist() == tok.encode(texts[index]) + [tok.eod_id]
    assert stats.tokens == ds.num_tokens
    assert not list(tmp_path.glob("*.tmp*"))


def test_two_workers_write_identical_files(tmp_path, trained_dir, corpus):
    src = write_jsonl(tmp_path / "in.jsonl", corpus["docstrings"][:300])
    preprocess([src], trained_dir, tmp_path / "one", workers=1, progress=False)
    preprocess([src], trained_dir, tmp_path / "two", workers=2, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_bad_line_is_reported_with_its_number_and_leaves_no_output(tmp_path, trained_dir):
    src = write_jsonl(tmp_path / "in.jsonl", ["alpha", "beta", "gamma", "delta"], bad_lines=[(3, '{"text": "unclosed')])
    with pytest.raises(PreprocessError, match=r"in.jsonl:3: malformed JSON .*--skip-bad-lines"):
        preprocess([src], trained_dir, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("out*"))
    stats = preprocess([src], trained_dir, tmp_path / "out", skip_bad_lines=True, progress=False)
    assert stats.bad_lines == 1 and stats.documents == 4
    missing_key = write_jsonl(tmp_path / "k.jsonl", ["x"], bad_lines=[(2, '{"body": "no text key"}')])
    with pytest.raises(PreprocessError, match=r"k.jsonl:2: no key 'text' \(keys: body\); set --json-keys"):
        preprocess([missing_key], trained_dir, tmp_path / "k", progress=False)
    with pytest.raises(PreprocessError, match="input file .*nope.jsonl does not exist"):
        preprocess([tmp_path / "nope.jsonl"], trained_dir, tmp_path / "n", progress=False)


def test_plain_text_files_and_several_json_keys(tmp_path, trained_dir):
    (tmp_path / "a.txt").write_text("first document\nstill first")
    (tmp_path / "b.txt").write_text("second document")
    stats = preprocess([tmp_path / "a.txt", tmp_path / "b.txt"], trained_dir, tmp_path / "txt", append_eod=False, progress=False)
    tok = load_tokenizer(trained_dir)
    assert stats.documents == 2
    assert tok.decode(IndexedDataset(tmp_path / "txt")[0]) == "first document\nstill first"
    src = tmp_path / "two.jsonl"
    src.write_text(json.dumps({"q": "question?", "a": "answer."}) + "\n")
    preprocess([src], trained_dir, tmp_path / "qa", json_keys=("q", "a"), append_eod=False, progress=False)
    assert tok.decode(IndexedDataset(tmp_path / "qa_q")[0]) == "question?"
    assert tok.decode(IndexedDataset(tmp_path / "qa_a")[0]) == "answer."


def test_inspect_report(tmp_path, trained_dir):
    src = write_jsonl(tmp_path / "in.jsonl", ["short", "a somewhat longer document here", "mid size one"])
    preprocess([src], trained_dir, tmp_path / "out", append_eod=True, progress=False)
    report = inspect_dataset(tmp_path / "out", load_tokenizer(trained_dir), num_samples=2)
    ds = IndexedDataset(tmp_path / "out")
    assert f"3 documents, {ds.num_tokens} tokens" in report
    assert "--- document 0" in report and "short<|endoftext|>" in report and "document 2" not in report


def test_command_line_end_to_end(tmp_path, trained_dir):
    src = write_jsonl(tmp_path / "in.jsonl", ["one", "two"], bad_lines=[(2, "not json")])
    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(src), "--tokenizer", str(trained_dir),
           "--output-prefix", str(tmp_path / "cli"), "--append-eod", "--quiet"]
    failed = subprocess.run(cmd, capture_output=True, text=True)
    assert failed.returncode == 2 and "in.jsonl:2: malformed JSON" in failed.stderr
    ok = subprocess.run(cmd + ["--skip-bad-lines"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2 documents" in ok.stdout and "1 bad lines skipped" in ok.stdout
    shown = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_data.py"), "--inspect", str(tmp_path / "cli"),
                            "--tokenizer", str(trained_dir)], capture_output=True, text=True)
    assert shown.returncode == 0 and "2 documents" in shown.stdout and "one<|endoftext|>" in shown.stdout


def test_special_token_strings_in_documents_stay_text_unless_allowed(tmp_path, trained_dir):
    texts = ["a page quoting <|endoftext|> mid-sentence", "<|user|>hi<|assistant|>hello"]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    tok = load_tokenizer(trained_dir)
    eod, user, assistant = tok.eod_id, tok.role_id("user"), tok.role_id("assistant")
    preprocess([src], trained_dir, tmp_path / "plain", progress=False)
    plain = IndexedDataset(tmp_path / "plain")
    assert plain[0].tolist() == tok.encode(texts[0], allowed_special="none") + [eod]
    assert plain[0].tolist().count(eod) == 1 and not {user, assistant} & set(plain[1].tolist())
    preprocess([src], trained_dir, tmp_path / "split", allowed_special="all", progress=False)
    split = IndexedDataset(tmp_path / "split")
    assert split[0].tolist().count(eod) == 2
    assert split[1].tolist() == [user] + tok.encode("hi") + [assistant] + tok.encode("hello") + [eod]
    with pytest.raises(PreprocessError, match="allowed_special='some' must be 'none' .* or 'all'"):
        preprocess([src], trained_dir, tmp_path / "bad", allowed_special="some", progress=False)

    cmd = [sys.executable, str(ROOT / "tools/preprocess_data.py"), "--input", str(src), "--tokenizer", str(trained_dir),
           "--output-prefix", str(tmp_path / "cli"), "--append-eod", "--quiet", "--allowed-special", "all"]
    ran = subprocess.run(cmd, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "cli.bin").read_bytes() == (tmp_path / "split.bin").read_bytes()
    refused = subprocess.run(cmd[:-1] + ["some"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--allowed-special: invalid choice: 'some'" in refused.stderr
