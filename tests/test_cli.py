import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_lite.__main__ import main
from megatron_lite.data import load_tokenizer
from megatron_lite.model.generation import generate
from megatron_lite.training.trainer import Trainer
from tests.training.tiny import build_tiny_data, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def cli(*args, timeout=300, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "megatron_lite", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("cli-data"))


def test_generate_end_to_end(tiny_data, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(tiny_data, tmp_path, ["train.max_steps=30", f"checkpoint.save={tmp_path}/ck", "optim.lr=1e-2"])
    trainer = Trainer(cfg)
    trainer.train()
    tokenizer = load_tokenizer(tiny_data.tokenizer_dir)
    prompt = "def main("
    model = trainer.model.chunks[0].eval()
    with torch.no_grad():
        expected = generate(model, [tokenizer.encode(prompt)], 6, temperature=0.0)[0]
    out = cli("generate", "--load", f"{tmp_path}/ck", "--prompt", prompt, "--prompt", "import",
              "--max-new-tokens", "6", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == prompt + tokenizer.decode(list(expected))  # greedy: the trained model's own tokens
    assert lines[1] == "-" * 40 and lines[2].startswith("import")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["generate", "--load", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "error: checkpoint directory" in capsys.readouterr().err
    assert main(["generate", "--load", str(tmp_path), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be positive" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(REPO / "configs/demo.yaml"), "train.max_step=3"]) == 2
    assert "unknown key 'train.max_step'; did you mean 'max_steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])  # not a command: argparse lists the valid ones


def test_sigterm_saves_and_exits_zero(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path, ["train.max_steps=100000", "train.eval_interval=0",
                                                    f"checkpoint.save={tmp_path}/ck"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lite", "pretrain", "--config", str(REPO / "configs/demo.yaml"),
                             "data.demo=false", *overrides], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "log" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "SIGTERM received: saved step" in stdout and "; stopping" in stdout
    manifest = json.loads((tmp_path / "ck" / (tmp_path / "ck" / "latest").read_text().strip() / "manifest.json").read_text())
    steps_logged = len(metrics.read_text().splitlines())
    assert manifest["iteration"] == manifest["train_state"]["step"] == steps_logged >= 2
    assert manifest["train_state"]["consumed_samples"] == 4 * steps_logged


def test_pretrain_demo_builds_missing_data(tmp_path):
    demo_dir = tmp_path / "demo-data"
    out = cli("pretrain", "--config", "configs/demo.yaml", f"data.demo_dir={demo_dir}", "data.demo_vocab_size=300",
              "model.num_layers=2", "model.hidden_size=32", "model.seq_length=32", "train.max_steps=2", "optim.warmup_steps=1",
              "train.eval_interval=2", "train.eval_steps=1", "train.device=cpu", f"log.dir={tmp_path}/log",
              f"checkpoint.save={tmp_path}/ck", "log.interval=1", "log.tensorboard=false")
    assert out.returncode == 0, out.stderr
    assert (demo_dir / "tokenizer").is_dir() and (demo_dir / "code.bin").is_file()
    assert "demo data ready" in out.stdout and "validation loss" in out.stdout
    manifest = json.loads((tmp_path / "ck" / "iter_0000002" / "manifest.json").read_text())
    assert manifest["config"]["model"]["vocab_size"] == 300
    assert manifest["config"]["data"]["tokenizer"] == str(demo_dir / "tokenizer")
    assert (tmp_path / "ck" / "iter_0000002" / "tokenizer").is_dir()
