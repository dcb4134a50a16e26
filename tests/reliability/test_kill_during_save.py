"""A process killed (SIGKILL, nothing runs after it) at any stage of a save leaves the previous
checkpoint as ``latest``, complete and verifiable, and a resume from it continues exactly."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_lite.training.checkpoint import load_full_state_dict
from megatron_lite.training.trainer import Trainer
from tests.training.tiny import build_tiny_data, tiny_config, tiny_overrides

REPO = Path(__file__).resolve().parents[2]
RUN = ["train.max_steps=4", "checkpoint.interval=2", "train.eval_interval=0"]

# Each stage is a function of the save path, patched in the child to SIGKILL the process when the
# step-4 save calls it (step 2's save goes through; under checkpoint.async_save the call comes from
# the writer thread, so the step-4 save is told by the paths it writes): (module, function, name of the file it must be
# writing, or "" for any call).
STAGES = {
    "shard": ("megatron_lite.training.checkpoint.durable", "save_torch", ""),  # before the first shard
    "manifest": ("megatron_lite.training.checkpoint.format", "write_manifest", ""),  # shards written
    "rename": ("megatron_lite.training.checkpoint.durable", "replace_directory", ""),  # complete, not in place
    "latest": ("megatron_lite.training.checkpoint.durable", "write_text", "latest"),  # in place, latest not moved
}

CHILD = textwrap.dedent("""
    import importlib, os, signal, sys
    from megatron_lite.config import load_config
    from megatron_lite.training.trainer import Trainer

    from pathlib import Path

    module_name, function_name, target, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)
    trainer = Trainer(load_config(None, overrides))

    def killed_on_the_second_save(*args, **kwargs):
        step_4 = any("iter_0000004" in str(arg) for arg in args if isinstance(arg, (str, Path)))
        if step_4 and (not target or Path(args[0]).name == target):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, function_name, killed_on_the_second_save)
    # the save path looks these names up in their own modules' namespaces: patch the importers too
    for name, loaded in list(sys.modules.items()):
        if name.startswith("megatron_lite.training.checkpoint") and getattr(loaded, function_name, None) is original:
            setattr(loaded, function_name, killed_on_the_second_save)
    trainer.train()
""")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):  # the child runs on one thread too, so both sides round alike
    yield


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("kill-data"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Trainer(tiny_config(tiny_data, run_dir, RUN + [f"checkpoint.save={run_dir}/ck"])).train().losses
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_kill_during_save_keeps_the_previous_checkpoint_and_resumes_exactly(stage, async_save, tiny_data, tmp_path,
                                                                            uninterrupted):
    save = tmp_path / "ck"
    mode = [f"checkpoint.async_save={str(async_save).lower()}"]
    overrides = tiny_overrides(tiny_data, tmp_path, RUN + mode + [f"checkpoint.save={save}"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    child = subprocess.run([sys.executable, "-c", CHILD, *STAGES[stage], *overrides], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr

    assert (save / "latest").read_text().strip() == "iter_0000002", stage
    partial, final = save / "iter_0000004.partial", save / "iter_0000004"
    written = {
        "shard": partial.is_dir() and not list(partial.glob("model_*.pt")) and not final.exists(),
        "manifest": bool(list(partial.glob("model_*.pt"))) and not (partial / "manifest.json").exists(),
        "rename": (partial / "manifest.json").is_file() and not final.exists(),
        "latest": (final / "manifest.json").is_file() and not partial.exists(),
    }
    assert written[stage], f"the kill did not land at stage {stage}: {sorted(p.name for p in save.iterdir())}"
    load_full_state_dict(save, verify=True)  # complete: every file there, its size and checksum as recorded

    resumed = Trainer(tiny_config(tiny_data, tmp_path, RUN + mode + [f"checkpoint.save={save}", f"checkpoint.load={save}"]))
    assert resumed.step == 2
    assert resumed.train().losses == uninterrupted[2:]  # bit for bit
    assert (save / "latest").read_text().strip() == "iter_0000004"
