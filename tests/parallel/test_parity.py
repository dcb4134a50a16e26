"""Every parallel layout trains like one process: the acceptance test of 3D parallelism.

The real ``Trainer`` runs a tiny model (fp32, dropout 0, fixed seed) on synthetic tokens at
each (tp, pp, dp) layout, with the pipeline schedules, sequence parallelism and ZeRO-1, and
must reproduce the single-process run: the loss and the global gradient norm of every step,
the validation loss (forward only through the pipeline), and the parameters afterwards,
merged to the tp=1 layout. Checkpoints saved at (2, 2, 2) resume at (1, 2, 4) and at
(1, 1, 1) and continue exactly like the uninterrupted run. One gloo launch per world size
runs several layouts in sequence; the single-process references run in this process.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.layout import layout_of
from megatron_lite.training.checkpoint import TIED_COPIES, iteration_dir_name
from megatron_lite.training.trainer import Trainer
from megatron_lite.training.setup import setup_dims
from tests.distributed import run_distributed

VOCAB, SEQ, STEPS, SAVED_STEP = 120, 32, 6, 3
RELATIVE_TOLERANCE = 1e-5
BASE = [
    "model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", f"model.seq_length={SEQ}",
    f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=16",
    "train.micro_batch_size=2", "train.global_batch_size=8", f"train.max_steps={STEPS}",
    f"train.eval_interval={STEPS}", "train.eval_steps=1", "train.device=cpu", "train.seed=7",
    "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1", "optim.grad_clip=0.5",
    "log.interval=1", "log.tensorboard=false",
    # The key bias's true gradient is exactly zero (softmax ignores a shift shared by all keys):
    # with Adam's default eps its rounding noise would become full-size, layout-dependent steps.
    "optim.eps=1e-5",
]
FLAVORS = {"gpt2": [], "llama": ["model.flavor=llama", "model.num_kv_heads=2"]}

# name: (flavor, overrides); the world size decides dp.
WORLD_2 = {
    "gpt2 tp2": ("gpt2", ["parallel.tp=2"]),
    "gpt2 tp2 sequence-parallel": ("gpt2", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "gpt2 pp2 1f1b": ("gpt2", ["parallel.pp=2"]),
    "gpt2 dp2": ("gpt2", []),
    "gpt2 dp2 zero1": ("gpt2", ["parallel.zero1=true"]),
    "llama tp2": ("llama", ["parallel.tp=2"]),
    "llama pp2 afab": ("llama", ["parallel.pp=2", "parallel.pipeline_schedule=afab"]),
    "llama dp2 zero1": ("llama", ["parallel.zero1=true"]),
}
WORLD_4 = {
    "gpt2 tp2 pp2": ("gpt2", ["parallel.tp=2", "parallel.pp=2"]),
    "gpt2 pp2x2 interleaved dp2": ("gpt2", ["parallel.pp=2", "parallel.virtual_pp=2"]),
    "llama tp2 pp2 sequence-parallel": ("llama", ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
    "llama pp2x2 interleaved dp2 zero1": ("llama", ["parallel.pp=2", "parallel.virtual_pp=2", "parallel.zero1=true"]),
}
# At (2, 2, 2) the runs also save at step SAVED_STEP; the resumed runs load that checkpoint.
WORLD_8 = {
    "gpt2 tp2 pp2 dp2 zero1 sequence-parallel": (
        "gpt2", ["parallel.tp=2", "parallel.pp=2", "parallel.zero1=true", "parallel.sequence_parallel=true",
                 f"checkpoint.interval={SAVED_STEP}"]),
    "llama tp2 pp2x2 dp2": (
        "llama", ["parallel.tp=2", "parallel.pp=2", "parallel.virtual_pp=2", f"checkpoint.interval={SAVED_STEP}"]),
}
RESUMED_8 = {  # name: (flavor, overrides, the run whose checkpoint it loads)
    "gpt2 resumed at pp2 dp4 without zero1": ("gpt2", ["parallel.pp=2"], "gpt2 tp2 pp2 dp2 zero1 sequence-parallel"),
    "llama resumed at pp2 dp4 with zero1": ("llama", ["parallel.pp=2", "parallel.zero1=true"], "llama tp2 pp2x2 dp2"),
}

# Worst relative differences seen, by layout (printed under pytest -s)
FIGURES: dict[str, float] = {}
WEIGHT_ERRORS: dict[str, float] = {}


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reshard = _load_tool("reshard")


def _run_dir(root: str, name: str) -> Path:
    return Path(root) / name.replace(" ", "_")


def _checkpoint_dir(root: str, name: str) -> Path:
    return _run_dir(root, name) / "checkpoint"


def _config(root: str, name: str, flavor: str, overrides: list[str]):
    run = _run_dir(root, name)
    return load_config(None, BASE + FLAVORS[flavor] + [f"log.dir={run}/log", f"checkpoint.save={run}/checkpoint"]
                       + overrides)


def _datasets() -> tuple[np.ndarray, np.ndarray]:
    """Token rows (T + 1 each) with structure to learn: each row counts up from a random start."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, VOCAB, size=(STEPS * 8 + 8, 1))
    rows = (starts + np.arange(SEQ + 1)) % VOCAB
    noise = rng.random(rows.shape) < 0.2
    rows = np.where(noise, rng.integers(0, VOCAB, size=rows.shape), rows)
    return rows[: STEPS * 8], rows[STEPS * 8 :]


def _train(cfg, dims: ParallelDims | None) -> dict:
    trainer = Trainer(cfg, dims, datasets=_datasets())
    result = trainer.train()
    d = trainer.dims
    params = {
        name: (p.detach().clone(), layout_of(p))
        for name, p in trainer.model.named_params
    }
    return {"coords": (d.tp_rank, d.pp_rank, d.dp_rank), "losses": result.losses,
            "val_losses": result.val_losses, "params": params}


def _train_layouts(rank: int, world_size: int, root: str, runs: dict) -> dict:
    out = {}
    for name, (flavor, overrides, *loads) in runs.items():
        if loads:
            overrides = overrides + [f"checkpoint.load={_checkpoint_dir(root, loads[0]) / iteration_dir_name(SAVED_STEP)}"]
        cfg = _config(root, name, flavor, overrides)
        out[name] = _train(cfg, setup_dims(cfg))
    return out


def _merged_params(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """The tp=1 model from every rank's parameters; dp replicas must hold identical copies."""
    by_coords = {r["coords"]: r["params"] for r in per_rank}
    tp = 1 + max(t for t, _, _ in by_coords)
    merged: dict[str, torch.Tensor] = {}
    for (tp_rank, pp_rank, dp_rank), params in sorted(by_coords.items()):
        for name, (tensor, _) in params.items():
            assert torch.equal(tensor, by_coords[(tp_rank, pp_rank, 0)][name][0]), f"dp replicas differ: {name}"
        if tp_rank != 0 or dp_rank != 0:
            continue
        for name, (_, layout) in params.items():
            merged[name] = layout.merge_shards([by_coords[(t, pp_rank, 0)][name][0] for t in range(tp)])
    return merged


def _grad_norms(root: str, name: str) -> dict[int, float]:
    lines = (_run_dir(root, name) / "log" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["grad_norm"] for r in map(json.loads, lines) if "grad_norm" in r}


def _assert_same_weights(tensor: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to fp32 rounding. Adam divides by the gradient's own magnitude, so an element
    whose gradient is ~0 can move by a fraction of a step on rounding noise alone: each element
    is held to a tenth of one learning-rate step, the tensor as a whole to 3e-5 relative (a
    missing reduction or a double-counted gradient moves whole tensors by percents)."""
    WEIGHT_ERRORS[what] = ((tensor - expected).norm() / expected.norm().clamp_min(1e-12)).item()
    assert WEIGHT_ERRORS[what] < 3e-5, f"{what}: relative difference {WEIGHT_ERRORS[what]:.2e}"
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-3, msg=lambda detail: f"{what}\n{detail}")


def _max_relative(values: list[float], reference: list[float]) -> float:
    assert len(values) == len(reference)
    return max(abs(v - r) / abs(r) for v, r in zip(values, reference))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """The single-process runs, one per flavour."""
    root = str(tmp_path_factory.mktemp("reference"))
    out = {}
    for flavor in FLAVORS:
        cfg = _config(root, flavor, flavor, [])
        out[flavor] = {**_train(cfg, None), "grad_norms": _grad_norms(root, flavor)}
        assert min(out[flavor]["grad_norms"].values()) > 0.5, "clipping (optim.grad_clip=0.5) must act every step"
    return out



def _check_against_reference(name: str, flavor: str, per_rank: list[dict], root: str, references: dict,
                             first_step: int = 1) -> None:
    ref = references[flavor]
    losses = per_rank[0]["losses"]
    assert all(r["losses"] == losses for r in per_rank), f"{name}: ranks report different losses"
    worst = _max_relative(losses, ref["losses"][first_step - 1 :])
    FIGURES[name] = worst
    assert worst < RELATIVE_TOLERANCE, f"{name}: losses {losses} vs single process {ref['losses']}"
    norms = _grad_norms(root, name)
    assert sorted(norms) == list(range(first_step, STEPS + 1))
    # From identical weights the norms agree to fp32 rounding; later, rounding-level weight
    # differences move gradients more than losses. A parameter counted twice or missed would
    # be off by far more than either bound.
    first = abs(norms[first_step] - ref["grad_norms"][first_step]) / ref["grad_norms"][first_step]
    assert first < RELATIVE_TOLERANCE, f"{name}: step {first_step} gradient norm {norms} vs {ref['grad_norms']}"
    norm_error = _max_relative([norms[s] for s in sorted(norms)], [ref["grad_norms"][s] for s in sorted(norms)])
    assert norm_error < 1e-3, f"{name}: gradient norms {norms} vs {ref['grad_norms']}"
    (step, val), (ref_step, ref_val) = per_rank[0]["val_losses"][-1], ref["val_losses"][-1]
    assert step == ref_step == STEPS and abs(val - ref_val) / ref_val < RELATIVE_TOLERANCE, name
    merged = _merged_params(per_rank)
    ref_params = {n: t for n, (t, _) in ref["params"].items()}
    tied_copies = {n for n, target in TIED_COPIES.items() if n in merged and n not in ref_params}
    assert set(merged) - tied_copies == set(ref_params), name
    for copy in tied_copies:  # the last stage's copy of the tied embedding stayed equal to the first's
        torch.testing.assert_close(merged[copy], merged[TIED_COPIES[copy]], rtol=1e-6, atol=1e-7)
    for param_name, tensor in merged.items():
        expected = ref_params[TIED_COPIES[param_name] if param_name in tied_copies else param_name]
        _assert_same_weights(tensor, expected, f"{name}: {param_name}")


@pytest.mark.parametrize("world_size, runs", [(2, WORLD_2), (4, WORLD_4)], ids=["world2", "world4"])
def test_layouts_match_single_process(world_size, runs, references, tmp_path):
    results = run_distributed(_train_layouts, world_size, str(tmp_path), runs)
    for name, (flavor, _) in runs.items():
        _check_against_reference(name, flavor, [r[name] for r in results], str(tmp_path), references)


def test_3d_layout_and_resharded_resume_match_single_process(references, tmp_path):
    root = str(tmp_path)
    results = run_distributed(_train_layouts, 8, root, {**WORLD_8, **RESUMED_8})
    for name, (flavor, _) in WORLD_8.items():
        _check_against_reference(name, flavor, [r[name] for r in results], root, references)
    for name, (flavor, _, _) in RESUMED_8.items():
        _check_against_reference(name, flavor, [r[name] for r in results], root, references, SAVED_STEP + 1)
    # The ZeRO-1, sequence-parallel (2, 2, 2) checkpoint also resumes in one process, with plain AdamW.
    source = "gpt2 tp2 pp2 dp2 zero1 sequence-parallel"
    name = "gpt2 resumed in one process"
    load = _checkpoint_dir(root, source) / iteration_dir_name(SAVED_STEP)
    single = _train(_config(root, name, "gpt2", [f"checkpoint.load={load}"]), None)
    _check_against_reference(name, "gpt2", [single], root, references, SAVED_STEP + 1)
    manifest = json.loads((load / "manifest.json").read_text())
    assert manifest["layout"] == {"tp": 2, "pp": 2, "dp": 2, "virtual_pp": 1, "zero1": True}
    # Offline resharding (tools/reshard.py) keeps the optimizer and training state: resuming
    # from the rewritten checkpoint is again the uninterrupted run.
    for source, flavor in ((source, "gpt2"), ("llama tp2 pp2x2 dp2", "llama")):
        name = f"{flavor} resharded offline to one process"
        output = _run_dir(root, name) / "resharded"
        load = _checkpoint_dir(root, source) / iteration_dir_name(SAVED_STEP)
        assert reshard.main(["--load", str(load), "--output", str(output), "--tp", "1", "--pp", "1"]) == 0
        single = _train(_config(root, name, flavor, [f"checkpoint.load={output}"]), None)
        _check_against_reference(name, flavor, [single], root, references, SAVED_STEP + 1)
    for figures, what in ((FIGURES, "loss"), (WEIGHT_ERRORS, "final weights")):
        worst = {}
        for key, value in figures.items():
            layout = key.split(": ")[0]
            worst[layout] = max(worst.get(layout, 0.0), value)
        print(f"max relative {what} difference per layout:", json.dumps(worst, indent=1))


def test_reshard_tool_rejects_layouts_that_cannot_hold_the_model(tmp_path, capsys):
    cfg = _config(str(tmp_path), "small", "llama", ["train.max_steps=1", "train.eval_interval=0"])
    _train(cfg, None)
    load = str(_checkpoint_dir(str(tmp_path), "small"))
    assert reshard.main(["--load", load, "--output", str(tmp_path / "tp8"), "--tp", "8", "--pp", "1"]) == 2
    assert "model.num_heads=4 is not divisible by parallel.tp=8" in capsys.readouterr().err
    assert reshard.main(["--load", load, "--output", str(tmp_path / "pp3"), "--tp", "1", "--pp", "3"]) == 2
    assert "model.num_layers=4 does not split evenly over 3 pipeline chunks" in capsys.readouterr().err
    assert reshard.main(["--load", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), "--tp", "1", "--pp", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "tp8").exists() and not (tmp_path / "pp3").exists()


def test_batch_layout_errors(tmp_path):
    cfg = _config(str(tmp_path), "bad", "gpt2", ["train.global_batch_size=6"])
    with pytest.raises(ConfigError, match=r"global_batch_size=6 is not divisible by .* 2 x 2 = 4"):
        Trainer(cfg, ParallelDims(dp=2), datasets=_datasets())
    interleaved = ParallelDims(pp=2, virtual_pp=2)
    with pytest.raises(ConfigError, match=r"micro-batches per step .* = 3\) to be a multiple of parallel.pp=2"):
        Trainer(cfg, interleaved, datasets=_datasets())
