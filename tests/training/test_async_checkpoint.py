"""checkpoint.async_save: the state is copied at the step and written by a background thread while
training continues; the files, the publish and the resume are those of a synchronous save."""

import threading

import pytest
import torch

from megatron_lite.training.checkpoint import CheckpointWriteError, durable, load_full_state_dict, read_manifest
from megatron_lite.training.setup import setup_dims
from megatron_lite.training.trainer import Trainer
from tests.distributed import run_distributed
from tests.training.test_trainer import _interrupt_at
from tests.training.tiny import tiny_config

ASYNC = "checkpoint.async_save=true"
RUN = ["train.eval_interval=0", "checkpoint.interval=2", "train.max_steps=4"]


def same_checkpoint(a, b) -> None:
    weights_a, manifest_a = load_full_state_dict(a, verify=True)
    weights_b, manifest_b = load_full_state_dict(b, verify=True)
    assert manifest_a.train_state == manifest_b.train_state and manifest_a.files == manifest_b.files
    assert sorted(weights_a) == sorted(weights_b)
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    optimizer_a = torch.load(a / "model_tp00_pp000.pt", weights_only=False)["optimizer"]["per_param"]
    optimizer_b = torch.load(b / "model_tp00_pp000.pt", weights_only=False)["optimizer"]["per_param"]
    for name, state in optimizer_a.items():
        assert all(torch.equal(value, optimizer_b[name][key]) for key, value in state.items()), name


def test_async_checkpoints_equal_synchronous_ones(tiny_data, tmp_path):
    for kind, extra in (("sync", []), ("async", [ASYNC])):
        Trainer(tiny_config(tiny_data, tmp_path / kind, RUN + [f"checkpoint.save={tmp_path / kind}/ck"] + extra)).train()
    for iteration in ("iter_0000002", "iter_0000004"):
        same_checkpoint(tmp_path / "sync" / "ck" / iteration, tmp_path / "async" / "ck" / iteration)
    assert (tmp_path / "async" / "ck" / "latest").read_text().strip() == "iter_0000004"
    assert not list((tmp_path / "async" / "ck").glob("*.partial"))


def test_async_save_resumes_bit_for_bit_after_sigterm(tiny_data, tmp_path):
    common = ["model.dropout=0.1", "checkpoint.interval=0", ASYNC]
    full = Trainer(tiny_config(tiny_data, tmp_path / "full", common)).train()
    first = Trainer(tiny_config(tiny_data, tmp_path / "a", common + [f"checkpoint.save={tmp_path}/ck"]))
    _interrupt_at(first, 3)
    part1 = first.train()
    assert part1.interrupted and part1.steps == 3
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000003"  # written before train() returned
    second = Trainer(tiny_config(tiny_data, tmp_path / "b", common + [f"checkpoint.load={tmp_path}/ck"]))
    assert second.step == 3
    assert part1.losses + second.train().losses == full.losses


def test_training_goes_on_while_the_checkpoint_is_written(tiny_data, tmp_path, monkeypatch):
    """The step-2 save's first file write waits until step 3 has trained: a save in the loop would never return."""
    trainer = Trainer(tiny_config(tiny_data, tmp_path, RUN + [f"checkpoint.save={tmp_path}/ck", ASYNC]))
    step_3_trained, writer_threads = threading.Event(), set()
    original_step, original_save = trainer.metrics.step, durable.save_torch

    def step(s, *args, **kwargs):
        if s == 3:
            step_3_trained.set()
        return original_step(s, *args, **kwargs)

    def save_torch(obj, path):
        writer_threads.add(threading.current_thread().name)
        if "iter_0000002" in str(path):
            assert step_3_trained.wait(timeout=60), "the writer blocked training"
        return original_save(obj, path)

    trainer.metrics.step = step
    monkeypatch.setattr(durable, "save_torch", save_torch)
    trainer.train()
    assert writer_threads == {"checkpoint-writer"}
    assert (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000004"


def test_a_failing_writer_raises_with_the_path_at_the_next_save(tiny_data, tmp_path, monkeypatch):
    save = tmp_path / "ck"
    trainer = Trainer(tiny_config(tiny_data, tmp_path, RUN + [f"checkpoint.save={save}", ASYNC]))
    original_save = durable.save_torch

    def full_disk(obj, path):
        if "iter_0000002" in str(path):
            raise OSError(28, "No space left on device")
        return original_save(obj, path)

    monkeypatch.setattr(durable, "save_torch", full_disk)
    with pytest.raises(CheckpointWriteError, match=rf"writing checkpoint {save}/iter_0000002 in the background "
                                                   rf"failed: OSError: .*No space left on device; the previous "
                                                   rf"checkpoint stays latest"):
        trainer.train()
    assert trainer.step == 4  # noticed at the step-4 save, which waits for the step-2 one
    assert not (save / "latest").exists() and not (save / "iter_0000002").exists()


def test_a_failure_of_the_last_write_raises_at_the_end_of_training(tiny_data, tmp_path, monkeypatch):
    save = tmp_path / "ck"
    trainer = Trainer(tiny_config(tiny_data, tmp_path, RUN + [f"checkpoint.save={save}", ASYNC]))
    original_save = durable.save_torch

    def full_disk(obj, path):
        if "iter_0000004" in str(path):
            raise OSError(28, "No space left on device")
        return original_save(obj, path)

    monkeypatch.setattr(durable, "save_torch", full_disk)
    with pytest.raises(CheckpointWriteError, match=rf"{save}/iter_0000004 in the background failed"):
        trainer.train()
    assert (save / "latest").read_text().strip() == "iter_0000002"


def _pipeline_ranks(rank, world, data, root):
    for kind, extra in (("sync", []), ("async", [ASYNC])):
        cfg = tiny_config(data, f"{root}/{kind}", RUN + ["parallel.pp=2", f"checkpoint.save={root}/{kind}/ck"] + extra)
        Trainer(cfg, setup_dims(cfg)).train()
    return rank


def test_each_rank_writes_its_shard_and_rank_0_publishes_after_all(tiny_data, tmp_path):
    run_distributed(_pipeline_ranks, 2, tiny_data, str(tmp_path))
    for iteration in ("iter_0000002", "iter_0000004"):
        same_checkpoint(tmp_path / "sync" / "ck" / iteration, tmp_path / "async" / "ck" / iteration)
        manifest = read_manifest(tmp_path / "async" / "ck" / iteration)
        assert sorted(manifest.file_checks) == ["model_tp00_pp000.pt", "model_tp00_pp001.pt",
                                                "rng/rank00000.pt", "rng/rank00001.pt"]
