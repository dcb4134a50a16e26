"""Where a run writes: a save directory holding another run's checkpoints is refused, a bad save or
log path fails at start-up, the SLURM recipe (``checkpoint.save=X checkpoint.load=X``) starts fresh
and then resumes, SIGTERM to one worker saves and exits 0, and commands leave their process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_lite.__main__ import main
from megatron_lite.config import load_config, save_config
from megatron_lite.parallel.session import SIGTERM_EXIT_CODE, process_group_session
from megatron_lite.training.setup import resolve
from tests.training.tiny import build_tiny_data, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("run-directory-data"))


@pytest.fixture
def one_thread_here(one_thread):
    yield


def _pretrain(data, run, *overrides) -> int:
    args = tiny_overrides(data, run, ["train.eval_interval=0", "train.max_steps=2", *overrides])
    return main(["pretrain", "--config", str(REPO / "configs/demo.yaml"), "data.demo=false", *args])


def _latest(save_dir: Path) -> str:
    return (save_dir / "latest").read_text().strip()


# ----------------------------------------------------------------------------- another run's checkpoints


def test_fresh_run_into_another_runs_checkpoints_is_refused(tiny_data, tmp_path, capsys, one_thread_here):
    ck = tmp_path / "ck"
    assert _pretrain(tiny_data, tmp_path / "a", f"checkpoint.save={ck}", "train.max_steps=3") == 0
    capsys.readouterr()

    assert _pretrain(tiny_data, tmp_path / "b", f"checkpoint.save={ck}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"checkpoint.save={ck} already holds another run's checkpoints (latest iter_0000003)" in err
    assert f"checkpoint.load={ck}" in err and "checkpoint.overwrite=true" in err
    assert _latest(ck) == "iter_0000003" and not (tmp_path / "b" / "log").exists()  # refused before any work

    assert _pretrain(tiny_data, tmp_path / "c", f"checkpoint.save={ck}", f"checkpoint.load={ck}/iter_0000003",
                     "train.max_steps=4") == 0  # resuming one of its iterations is the same run
    assert _latest(ck) == "iter_0000004"
    assert _pretrain(tiny_data, tmp_path / "d", f"checkpoint.save={ck}", "checkpoint.overwrite=true") == 0
    assert _latest(ck) == "iter_0000002"


def test_load_of_the_empty_save_directory_starts_fresh(tiny_data, tmp_path, capsys):
    missing = tmp_path / "ck"
    cfg = tiny_config(tiny_data, tmp_path, [f"checkpoint.save={missing}", f"checkpoint.load={missing}"])
    assert resolve(cfg).checkpoint.load == ""
    assert "holds no checkpoint yet: starting fresh" in capsys.readouterr().out
    assert resolve(cfg, is_logging_rank=False).checkpoint.load == "" and capsys.readouterr().out == ""
    elsewhere = tiny_config(tiny_data, tmp_path, [f"checkpoint.save={tmp_path}/new", f"checkpoint.load={missing}"])
    assert resolve(elsewhere).checkpoint.load == str(missing)  # loading another run stays an error when it is missing


# ----------------------------------------------------------------------------- paths checked at start-up


def test_unwritable_save_and_log_paths_fail_at_start_up(tiny_data, tmp_path, capsys, one_thread_here):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = {
        "checkpoint.save": (f"checkpoint.save={a_file}", f"checkpoint.save={a_file} is a file, not a directory"),
        "log.dir": (f"log.dir={a_file}", f"log.dir={a_file} is a file, not a directory"),  # with a good save below
        "under a file": (f"checkpoint.save={a_file}/ck",
                         f"checkpoint.save={a_file}/ck cannot be created or written (Not a directory)"),
    }
    for override, message in cases.values():
        assert _pretrain(tiny_data, tmp_path / "run", f"checkpoint.save={tmp_path}/ck", override) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run" / "log" / "metrics.jsonl").exists()  # not a single step was trained


# ----------------------------------------------------------------------------- leaving the process group


def _join_group_of_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))


def test_process_group_session_leaves_on_every_exit_path(monkeypatch):
    handler = signal.getsignal(signal.SIGTERM)
    barriers = []
    monkeypatch.setattr(dist, "barrier", lambda: barriers.append("barrier"))
    with process_group_session():
        _join_group_of_one()
    assert not dist.is_initialized() and barriers == ["barrier"]  # peers finish before connections close

    with pytest.raises(ValueError, match="bad input"), process_group_session():
        _join_group_of_one()
        raise ValueError("bad input")
    assert not dist.is_initialized() and barriers == ["barrier"]  # a failing rank waits for nobody

    with pytest.raises(SystemExit) as stopped, process_group_session():
        _join_group_of_one()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
    assert stopped.value.code == SIGTERM_EXIT_CODE == 143 and not dist.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is handler

    _join_group_of_one()
    try:
        with process_group_session():
            pass
        assert dist.is_initialized()  # a group opened by the caller stays the caller's
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the SLURM recipe under torchrun


def _workers_of(launcher_pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes the launcher started."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # exited meanwhile
        rank = [v for v in environ if v.startswith(b"RANK=")]
        if parent == launcher_pid and rank:
            workers[int(rank[0][5:])] = int(stat.parent.name)
    return workers


def _submission(config_file: Path, ck: Path, max_steps: int) -> list[str]:
    """The README's SLURM command line, on one node of two CPU ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "megatron_lite", "pretrain", "--config", str(config_file), "parallel.timeout_s=60",
            f"train.max_steps={max_steps}", f"checkpoint.save={ck}", f"checkpoint.load={ck}"]


def test_slurm_recipe_first_submission_preempted_then_requeued(tiny_data, tmp_path):
    config_file = tmp_path / "tiny.yaml"
    save_config(load_config(None, tiny_overrides(tiny_data, tmp_path, ["train.eval_interval=0"])), config_file)
    ck, metrics = tmp_path / "ck", tmp_path / "log" / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    # first submission: X does not exist yet; SIGTERM to a worker (not the launcher) = preemption
    first = subprocess.Popen(_submission(config_file, ck, 100_000), cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while first.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.kill(_workers_of(first.pid)[1], signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"checkpoint.load={ck} holds no checkpoint yet: starting fresh" in stdout
    assert "SIGTERM received: saved step" in stdout and "terminate called" not in stderr
    saved = json.loads((ck / _latest(ck) / "manifest.json").read_text())["iteration"]
    assert saved >= 2

    # the requeue: the same command line (a later max_steps) resumes from the saved step
    second = subprocess.run(_submission(config_file, ck, saved + 2), cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=180)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "starting fresh" not in second.stdout and f"steps {saved}->{saved + 2}" in second.stdout
    assert _latest(ck) == f"iter_{saved + 2:07d}" and "terminate called" not in second.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [saved + 1, saved + 2]
