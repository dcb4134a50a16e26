"""A diverging run stops, names the step and what to try, exits 2 and leaves the last good checkpoint latest."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.training.checkpoint import load_full_state_dict
from megatron_lite.training.divergence import TrainingDivergedError
from megatron_lite.training.optim import LossScaler
from megatron_lite.training.setup import setup_dims
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.training.tiny import build_tiny_data, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
# On the tiny model at lr=1000 the loss is 5.71 at step 1 and the grad norm NaN at step 2; at lr=30
# the loss jumps from 5.71 to ~1.7e4 at step 2 (a spike) and the grad norm is NaN at step 3.
DIVERGING = ["train.eval_interval=0", "optim.warmup_steps=0", "train.max_steps=30"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("divergence-data"))


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def latest(save_dir: Path) -> str:
    return (save_dir / "latest").read_text().strip()


def test_fp32_divergence_exits_2_through_the_cli_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    save = tmp_path / "ck"
    overrides = tiny_overrides(tiny_data, tmp_path, DIVERGING + ["optim.lr=1000", f"checkpoint.save={save}",
                                                                 "checkpoint.interval=1"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "megatron_lite", "pretrain", "--config", str(REPO / "configs/demo.yaml"),
                          "data.demo=false", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step 2: ") and "not finite in fp32" in error
    assert "last finite loss 5.7" in error and "at step 1" in error
    assert "optim.lr (now 1000)" in error and "optim.warmup_steps" in error and "optim.grad_clip" in error
    assert "Traceback" not in out.stderr
    assert latest(save) == "iter_0000001" and sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]


def test_fp32_stop_leaves_the_weights_of_the_last_checkpoint_and_reports_the_spike(tiny_data, tmp_path):
    save = tmp_path / "ck"
    cfg = tiny_config(tiny_data, tmp_path, DIVERGING + ["optim.lr=30", f"checkpoint.save={save}",
                                                        "checkpoint.interval=1", "train.loss_spike_factor=3"])
    trainer = Trainer(cfg)
    with pytest.raises(TrainingDivergedError, match=r"at step 3: .*last finite loss .* at step 2"):
        trainer.train()
    assert latest(save) == "iter_0000002"
    saved, _ = load_full_state_dict(save)
    for name, param in trainer.model.named_params:  # the failing step did not touch them
        assert torch.equal(saved[name], param.detach()), name
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_spike" in r] == [2]
    assert next(r for r in records if r["step"] == 2)["loss_spike"] > 3


def test_bf16_divergence_stops(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, DIVERGING + ["optim.lr=1000", "train.precision=bf16"])
    with pytest.raises(TrainingDivergedError, match=r"at step 2: .*not finite in bf16.*last finite loss"):
        Trainer(cfg).train()


@pytest.mark.parametrize("extra, reason", [
    (["train.max_skipped_steps=3"], r"at step 4: 3 fp16 steps in a row overflowed .*train.max_skipped_steps=3"),
    (["train.initial_loss_scale=4"], r"at step 4: after 3 overflowing fp16 steps in a row the loss scale fell to "
                                     r"0.5, below train.min_loss_scale=1"),
])
def test_fp16_skips_until_a_limit_then_stops(tiny_data, tmp_path, extra, reason):
    cfg = tiny_config(tiny_data, tmp_path, DIVERGING + ["optim.lr=1000", "train.precision=fp16"] + extra)
    with pytest.raises(TrainingDivergedError, match=reason + r".*last finite loss 5.7\d* at step 1"):
        Trainer(cfg).train()


def test_non_finite_weights_are_never_saved(tiny_data, tmp_path):
    save = tmp_path / "ck"
    trainer = Trainer(tiny_config(tiny_data, tmp_path, [f"checkpoint.save={save}", "train.max_steps=2",
                                                        "train.eval_interval=0"]))
    trainer.train()
    name, param = trainer.model.named_params[-1]
    with torch.no_grad():
        param.view(-1)[0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=f"refusing to save the checkpoint of step 2 .*{name} holds NaN or inf"):
        trainer.save()
    assert latest(save) == "iter_0000002"


def test_loss_scaler_below_its_floor_is_exhausted():
    scaler = LossScaler(initial_scale=2.0, min_scale=1.0)
    scaler.update(found_inf=True)
    assert scaler.scale == 1.0 and not scaler.exhausted
    scaler.update(found_inf=True)
    assert scaler.scale == 0.5 and scaler.exhausted
    assert not LossScaler(dynamic=False, min_scale=2.0).exhausted


@pytest.mark.parametrize("override, message", [
    ("train.max_skipped_steps=0", "train.max_skipped_steps must be positive"),
    ("train.min_loss_scale=0", "train.min_loss_scale must be in (0, train.initial_loss_scale=65536]"),
    ("train.loss_spike_factor=0.5", "train.loss_spike_factor must be 0 (off) or above 1"),
])
def test_divergence_settings_are_validated(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def _two_ranks_stop_together(rank: int, world_size: int, data, root: str) -> dict:
    cfg = tiny_config(data, f"{root}/tp2", DIVERGING + ["optim.lr=1000", "parallel.tp=2", f"checkpoint.save={root}/ck"])
    trainer = Trainer(cfg, setup_dims(cfg))
    try:
        trainer.train()
    except TrainingDivergedError as error:
        stopped = str(error)
    if rank == 1:  # a NaN on one rank only: every rank refuses the save
        with torch.no_grad():
            trainer.model.named_params[0][1].view(-1)[0] = float("nan")
    try:
        trainer.save()
    except TrainingDivergedError as error:
        refused = str(error)
    return {"stopped": stopped, "refused": refused, "step": trainer.step}


def test_every_rank_stops_at_the_same_step_and_refuses_the_same_save(tiny_data, tmp_path):
    stopped, stopped_1 = run_distributed(_two_ranks_stop_together, 2, tiny_data, str(tmp_path))
    assert stopped["stopped"] == stopped_1["stopped"] and "at step 2:" in stopped["stopped"]
    assert stopped["step"] == stopped_1["step"] == 1
    assert "(on another rank) holds NaN or inf" in stopped["refused"]
    assert "(on another rank)" not in stopped_1["refused"] and "holds NaN or inf" in stopped_1["refused"]
    # the start-up check created the (writable) directory; no checkpoint went into it
    assert not any((tmp_path / "ck").iterdir())


def test_a_divergence_between_logging_steps_is_noticed_at_the_next_one(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, DIVERGING + ["optim.lr=1000", "log.interval=4"])
    trainer = Trainer(cfg)
    with pytest.raises(TrainingDivergedError, match=r"at step 2 \(noticed at step 4, the next logging step: "
                                                    r"log.interval=4; steps 3-4 trained on\): .*not finite in fp32"
                                                    r".*last finite loss 5.7\d* at step 1"):
        trainer.train()
    assert trainer.step == 3  # stopped at step 4's read-back, before it counted
    for name, param in trainer.model.named_params:  # the non-finite steps were skipped on the device
        assert torch.isfinite(param).all(), name
    assert not (tmp_path / "log" / "metrics.jsonl").exists()  # nothing logged: step 4's read-back stopped at step 2
