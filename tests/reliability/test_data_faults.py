"""Data-side faults and the one user-error path: each bad input is refused in one line that names
the file (and line or key) and the fix; commands and tools print it as ``error: ...`` and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.config import ConfigError, DataConfig, MixtureEntry
from megatron_lite.convert.tensor_io import ConversionError
from megatron_lite.data import build_datasets
from megatron_lite.data.blend import MixtureError, load_spec
from megatron_lite.data.bytelevel import ByteLevelBPETokenizer
from megatron_lite.data.cache import IndexCache
from megatron_lite.data.gpt_dataset import check_token_ids
from megatron_lite.data.indexed import IndexedDataset, IndexedDatasetError, write_indexed_dataset
from megatron_lite.data.preprocess import PreprocessError, preprocess
from megatron_lite.data.tokenizer import TokenizerError
from megatron_lite.data.tokenizer_dir import load_tokenizer
from megatron_lite.data.train_tokenizer import read_texts
from megatron_lite.errors import UserError
from megatron_lite.rlhf.data import RLHFDataError
from megatron_lite.training.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import mix_data  # noqa: E402
import preprocess_data  # noqa: E402
import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 20
    return ByteLevelBPETokenizer.train(texts, vocab_size=300).save(tmp_path_factory.mktemp("tok"))


def write_ids(prefix, top: int, num_docs: int = 20):
    """Documents whose ids rise to ``top - 1``."""
    docs = [np.arange(d, d + 30) % top for d in range(num_docs - 1)] + [np.arange(top - 30, top)]
    write_indexed_dataset(prefix, docs, np.uint16)


# ----------------------------------------------------------------------------- every user error is a UserError


@pytest.mark.parametrize("error, builtin", [
    (ConfigError, ValueError), (CheckpointError, RuntimeError), (ConversionError, ValueError),
    (RLHFDataError, ValueError), (TokenizerError, ValueError), (MixtureError, ValueError),
    (IndexedDatasetError, ValueError), (PreprocessError, ValueError),
])
def test_user_errors_share_one_base_and_keep_their_builtin(error, builtin):
    assert issubclass(error, UserError) and issubclass(error, builtin)


# ----------------------------------------------------------------------------- token ids beyond the vocabulary


def test_dataset_with_ids_beyond_the_vocabulary_is_refused_naming_file_and_sizes(tmp_path):
    write_ids(tmp_path / "wide", top=300)
    cfg = DataConfig(mixture=[MixtureEntry(str(tmp_path / "wide"))], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(IndexedDatasetError, match=r"wide\.bin holds token id 299 .* has 256 ids \(model.vocab_size\).*"
                                                  r"preprocess_data.py.*model.vocab_size >= 300"):
        build_datasets(cfg, 16, 0, (10, 0, 0), vocab_size=256)
    train, _, _ = build_datasets(cfg, 16, 0, (10, 0, 0), vocab_size=300)
    assert int(max(train[i].max() for i in range(len(train)))) <= 299


def test_max_token_id_is_cached_per_file_version(tmp_path):
    write_ids(tmp_path / "d", top=200)
    cache = IndexCache(tmp_path / "cache")
    check_token_ids(IndexedDataset(tmp_path / "d"), 200, cache)
    check_token_ids(IndexedDataset(tmp_path / "d"), 200, cache)
    assert (cache.builds, cache.hits) == (1, 2)
    write_ids(tmp_path / "d", top=260)  # rewritten: another size, so another key
    with pytest.raises(IndexedDatasetError, match="holds token id 259"):
        check_token_ids(IndexedDataset(tmp_path / "d"), 200, cache)
    assert cache.builds == 2


def test_pretrain_refuses_ids_beyond_the_vocabulary_with_exit_2(tmp_path, tokenizer_dir):
    vocab_size = load_tokenizer(tokenizer_dir).vocab_size
    write_ids(tmp_path / "wide", top=vocab_size + 40)
    overrides = [
        "data.demo=false", f"data.tokenizer={tokenizer_dir}", f"data.mixture=[{{prefix: {tmp_path}/wide}}]",
        "model.num_layers=1", "model.hidden_size=32", "model.num_heads=2", "model.seq_length=16",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=2", "train.eval_interval=0",
        "train.device=cpu", f"log.dir={tmp_path}/log", "log.tensorboard=false", f"checkpoint.save={tmp_path}/ck",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "megatron_lite", "pretrain", "--config", "configs/demo.yaml", *overrides],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert f"wide.bin holds token id {vocab_size + 39} but the model's vocabulary has {vocab_size} ids" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- bytes that are not UTF-8


def bad_utf8_inputs(tmp_path):
    jsonl = tmp_path / "web.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\r\n{"text": "also fine"}\n')
    text = tmp_path / "notes.txt"
    text.write_bytes(b"first line\nsecond \xff line\nthird line\n")
    return jsonl, text


def test_bad_utf8_is_an_error_naming_file_line_and_option_by_default(tmp_path, tokenizer_dir):
    jsonl, text = bad_utf8_inputs(tmp_path)
    with pytest.raises(PreprocessError, match=r"web.jsonl:2: byte 0xe9 at column 14 is not UTF-8.*--on-bad-utf8 replace"):
        preprocess([jsonl], tokenizer_dir, tmp_path / "out", progress=False)
    for unit in ("line", "file"):
        with pytest.raises(PreprocessError, match=r"notes.txt:2: byte 0xff at column 8"):
            preprocess([text], tokenizer_dir, tmp_path / "out", text_unit=unit, progress=False)
    assert not list(tmp_path.glob("out*"))
    with pytest.raises(PreprocessError, match="on_bad_utf8='ignore' is not one of error, replace, skip"):
        preprocess([jsonl], tokenizer_dir, tmp_path / "out", on_bad_utf8="ignore", progress=False)


def test_bad_utf8_replace_and_skip_are_counted(tmp_path, tokenizer_dir):
    jsonl, text = bad_utf8_inputs(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    replaced = preprocess([jsonl], tokenizer_dir, tmp_path / "r", append_eod=False, on_bad_utf8="replace", progress=False)
    assert (replaced.documents, replaced.bad_utf8_replaced, replaced.bad_utf8_skipped) == (3, 1, 0)
    assert tok.decode(list(IndexedDataset(tmp_path / "r")[1])) == "caf\ufffd"
    skipped = preprocess([jsonl], tokenizer_dir, tmp_path / "s", append_eod=False, on_bad_utf8="skip", progress=False)
    assert (skipped.documents, skipped.bad_utf8_skipped) == (2, 1)
    lines = preprocess([text], tokenizer_dir, tmp_path / "l", text_unit="line", on_bad_utf8="skip", progress=False)
    assert (lines.documents, lines.bad_utf8_skipped) == (2, 1)
    whole = preprocess([text], tokenizer_dir, tmp_path / "f", on_bad_utf8="skip", progress=False)
    assert (whole.documents, whole.bad_utf8_skipped) == (0, 1)


def test_preprocess_tool_reports_the_policy(tmp_path, tokenizer_dir, capsys):
    jsonl, _ = bad_utf8_inputs(tmp_path)
    args = ["--input", str(jsonl), "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "o"), "--quiet"]
    assert preprocess_data.main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: {jsonl}:2: byte 0xe9")
    assert preprocess_data.main(args + ["--on-bad-utf8", "replace"]) == 0
    assert "1 lines with non-UTF-8 bytes replaced (U+FFFD)" in capsys.readouterr().out
    assert preprocess_data.main(args + ["--on-bad-utf8", "skip"]) == 0
    assert "1 lines with non-UTF-8 bytes skipped" in capsys.readouterr().out


def test_tokenizer_training_names_the_line_with_bad_utf8(tmp_path):
    jsonl, text = bad_utf8_inputs(tmp_path)
    with pytest.raises(TokenizerError, match=r"web.jsonl:2: byte 0xe9 is not UTF-8; convert the file"):
        list(read_texts([jsonl]))
    with pytest.raises(TokenizerError, match=r"notes.txt:2: byte 0xff"):
        list(read_texts([text]))


# ----------------------------------------------------------------------------- one line per fault, exit 2 in every tool


def test_tools_print_one_error_line_and_exit_2(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "empty-tok").mkdir()
    cases = [
        (train_tokenizer.main, ["--input", str(tmp_path / "none.txt"), "--output", str(tmp_path / "t")],
         "none.txt does not exist"),
        (preprocess_data.main, ["--input", str(tmp_path / "none.jsonl"), "--tokenizer", str(tokenizer_dir),
                                "--output-prefix", str(tmp_path / "o")], "none.jsonl does not exist"),
        (preprocess_data.main, ["--inspect", str(tmp_path / "none")], "none.idx does not exist"),
        (preprocess_data.main, ["--inspect", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "empty-tok")],
         "holds no tokenizer"),
        (mix_data.main, [str(tmp_path / "none.yaml")], "none.yaml does not exist"),
    ]
    for main, argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and len(err.strip().splitlines()) == 1, err


def test_corrupt_and_truncated_datasets_name_the_file_and_the_fix(tmp_path):
    write_ids(tmp_path / "d", top=100)
    bin_path, idx_path = tmp_path / "d.bin", tmp_path / "d.idx"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(IndexedDatasetError, match=r"d.bin is \d+ bytes but .*d.idx describes \d+ bytes"):
        IndexedDataset(tmp_path / "d")
    bin_path.write_bytes(b"")
    with pytest.raises(IndexedDatasetError, match=r"d.bin is 0 bytes"):
        IndexedDataset(tmp_path / "d")
    idx_path.write_bytes(idx_path.read_bytes()[:-3])
    with pytest.raises(IndexedDatasetError, match=r"d.idx is \d+ bytes .* truncated or corrupt - rebuild it"):
        IndexedDataset(tmp_path / "d")
    idx_path.write_bytes(b"MMID")
    with pytest.raises(IndexedDatasetError, match=r"d.idx is 4 bytes, shorter than the .*truncated"):
        IndexedDataset(tmp_path / "d")


def test_empty_split_names_data_split(tmp_path):
    write_ids(tmp_path / "a", top=50, num_docs=10)
    cfg = DataConfig(mixture=[MixtureEntry(str(tmp_path / "a"))], split="1,0,0", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="the test split .* holds no tokens; give it a larger share in data.split"):
        build_datasets(cfg, 16, 0, (1, 0, 1))


@pytest.mark.parametrize("spec, words", [
    ("mixture:\n  - {prefix: P, weight: 0}\n", r"spec.yaml: mixture entry 0 \(P\) has weight=0; it must be a positive number"),
    ("mixture:\n  - {prefix: P, weight: -1}\n", r"mixture entry 0 \(P\) has weight=-1"),
    ("mixture:\n  - {prefix: P, tokens: lots}\n", r"mixture entry 0 \(P\) has tokens='lots'"),
    ("mixture:\n  - {prefix: P, weight: 1}\n  - {prefix: Q, tokens: 5}\n", r"spec.yaml: give every mixture entry either"),
    ("mixture:\n  - [P, 1]\n", r"spec.yaml: mixture entry 0 must be a mapping with a 'prefix'"),
    ("mixture: [\n", r"spec.yaml is not valid YAML \(.*line \d+.*\); fix the file"),
])
def test_mixture_spec_errors_name_file_entry_and_key(tmp_path, spec, words):
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    with pytest.raises(MixtureError, match=words):
        load_spec(path)


def test_tokenizer_dir_without_files_says_how_to_make_one(tmp_path):
    with pytest.raises(TokenizerError, match=r"holds no tokenizer: .*tools/train_tokenizer.py --output .*empty"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")


def test_unwritable_output_prefix_is_one_line(tmp_path, tokenizer_dir):
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "taken").write_text("a file where a directory should be")
    with pytest.raises(PreprocessError, match=r"cannot write .*taken/out.bin .*writable directory"):
        preprocess([tmp_path / "in.txt"], tokenizer_dir, tmp_path / "taken" / "out", progress=False)
