"""Megatron mixed precision: 16-bit weights for forward and backward, fp32 main grads and main
params in the optimizer, fp32 checkpoints whichever precision wrote them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_lite.config import load_config
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import ShardReader
from megatron_lite.training.setup import setup_dims
from megatron_lite.training.trained_model import build_trained_model
from tests.distributed import run_distributed

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "model.vocab_size=100", "model.make_vocab_size_divisible_by=8", "train.device=cpu",
        "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=0", "optim.schedule=constant",
        "optim.grad_clip=1.0"]
STEPS = 4


def _config(overrides=()):
    return load_config(None, TINY + list(overrides))


def _global_batch(cfg, step: int) -> torch.Tensor:
    """(8, T + 1) tokens, the same on every rank."""
    return torch.randint(0, cfg.model.vocab_size, (8, cfg.model.seq_length + 1),
                         generator=torch.Generator().manual_seed(step))


def _micro_batches(cfg, step: int, dims, micro_batch_size: int = 2):
    rows = _global_batch(cfg, step).chunk(dims.dp)[dims.dp_rank]
    return [(mb[:, :-1], mb[:, 1:]) for mb in rows.split(micro_batch_size)]


def _train(cfg, dims, steps=range(STEPS), model=None):
    torch.manual_seed(0)
    model = model or build_trained_model(cfg, dims)
    history = [tuple(float(v) for v in model.train_on(_micro_batches(cfg, step, dims))[:2]) for step in steps]
    return model, history


def _masters(model) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master weight (as a checkpoint sees it)."""
    with model.parallel_step.full_precision_weights():
        return {name: p.detach().clone() for name, p in model.named_params}


# ----------------------------------------------------------------------------- what runs in 16 bits


class _WeightCasts(TorchDispatchMode):
    """Counts dtype conversions whose input is a parameter's storage (autocast's per-micro-batch
    weight casts are exactly these)."""

    def __init__(self, params):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(source):
            target = (kwargs or {}).get("dtype")
            if target is not None and target != source.dtype and source.untyped_storage().data_ptr() in self.storages:
                self.casts += 1
        return func(*args, **(kwargs or {}))


def _casts_in_forward_backward(model, cfg, autocast) -> int:
    params = [p for _, p in model.named_params]
    with _WeightCasts(params) as counter:
        model.parallel_step.forward_backward(_micro_batches(cfg, 0, ParallelDims.single()), autocast)
    model.parallel_step.zero_grad()
    return counter.casts


@pytest.mark.parametrize("zero1", [False, True])
def test_16_bit_weights_are_never_cast_in_the_micro_batch_loop(zero1):
    cfg = _config(["train.precision=bf16", f"parallel.zero1={str(zero1).lower()}"])
    model = build_trained_model(cfg, ParallelDims.single())
    assert {p.dtype for _, p in model.named_params} == {torch.bfloat16}
    autocast_seen = []
    model.chunks[0].register_forward_pre_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    assert _casts_in_forward_backward(model, cfg, model.autocast()) == 0
    assert autocast_seen and not any(autocast_seen)
    # The counter does see autocast's casts: fp32 weights under a bf16 autocast are cast every micro-batch.
    fp32 = build_trained_model(_config(), ParallelDims.single())
    assert _casts_in_forward_backward(fp32, cfg, torch.autocast("cpu", dtype=torch.bfloat16)) > 0


@pytest.mark.parametrize("zero1", [False, True])
def test_main_grads_accumulate_in_fp32_and_main_params_are_fp32(zero1):
    cfg = _config(["train.precision=bf16", f"parallel.zero1={str(zero1).lower()}"])
    model = build_trained_model(cfg, ParallelDims.single())
    step = model.parallel_step
    step.forward_backward(_micro_batches(cfg, 0, ParallelDims.single()), model.autocast())
    params = [p for _, p in model.named_params]
    assert all(p.grad is None and p.main_grad.dtype == torch.float32 for p in params)
    assert all(g.grad.dtype == torch.float32 for g in step.grad_sync.grads_for_optimizer())
    # One contiguous fp32 buffer per bucket: every main grad is a view into one.
    buffers = {b.buffer.data_ptr(): b.buffer for r in step.grad_sync.reducers for b in r.buckets}
    assert all(p.main_grad.untyped_storage().data_ptr() in buffers for p in params)
    assert all(t.dtype == torch.float32 for t in _masters(model).values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("zero1", [False, True])
def test_16_bit_training_follows_fp32_within_its_precision(precision, zero1):
    dims = ParallelDims.single()
    flags = [f"parallel.zero1={str(zero1).lower()}"]
    reference, fp32_history = _train(_config(flags), dims)
    model, history = _train(_config(flags + [f"train.precision={precision}"]), dims)
    tolerance = 2e-2 if precision == "bf16" else 4e-3
    for (loss, norm), (loss32, norm32) in zip(history, fp32_history):
        assert loss == pytest.approx(loss32, rel=tolerance) and norm == pytest.approx(norm32, rel=5 * tolerance)
    expected = dict(reference.named_params)
    for name, master in _masters(model).items():
        torch.testing.assert_close(master, expected[name], rtol=0, atol=tolerance * 2)


@pytest.mark.parametrize("zero1", [False, True])
def test_checkpoints_hold_fp32_masters_and_move_between_precisions(zero1, tmp_path):
    dims, flags = ParallelDims.single(), [f"parallel.zero1={str(zero1).lower()}"]
    bf16_cfg = _config(flags + ["train.precision=bf16"])
    model, _ = _train(bf16_cfg, dims, range(2))
    masters = _masters(model)
    saved = model.save(tmp_path, 2, 16, bf16_cfg.to_dict(), None)
    on_disk = ShardReader(saved).local_shard(0, 0)["model"]
    assert all(on_disk[name].dtype == torch.float32 and torch.equal(on_disk[name], t) for name, t in masters.items())

    # Loaded in fp32: the same fp32 weights, bit for bit.
    fp32 = build_trained_model(_config(flags), dims)
    fp32.load(saved, weights_only=False)
    assert all(torch.equal(p, masters[name]) for name, p in fp32.named_params)

    # Resumed in bf16: the masters come back exactly, and the continuation is the uninterrupted one.
    resumed = build_trained_model(bf16_cfg, dims)
    resumed.load(saved, weights_only=False)
    assert all(torch.equal(t, masters[name]) for name, t in _masters(resumed).items())
    assert all(torch.equal(p, masters[name].bfloat16()) for name, p in resumed.named_params)
    _, uninterrupted = _train(bf16_cfg, dims, range(2, STEPS), model)
    _, continued = _train(bf16_cfg, dims, range(2, STEPS), resumed)
    assert continued == uninterrupted

    # And an fp32 checkpoint starts a bf16 run from its fp32 weights.
    saved32 = fp32.save(tmp_path / "fp32", 2, 16, _config(flags).to_dict(), None)
    again = build_trained_model(bf16_cfg, dims)
    again.load(saved32, weights_only=False)
    assert all(torch.equal(t, masters[name]) for name, t in _masters(again).items())


# ----------------------------------------------------------------------------- parallel layouts


PARALLEL_BF16 = {  # name: (layout flags, model flags shared with the fp32 single-process reference)
    "tp2 dp2 zero1 sequence-parallel": (["parallel.tp=2", "parallel.zero1=true", "parallel.sequence_parallel=true"], []),
    "pp2 dp2": (["parallel.pp=2"], []),
    "pp2x2 interleaved dp2 zero1": (["parallel.pp=2", "parallel.virtual_pp=2", "parallel.zero1=true"],
                                    ["model.num_layers=4"]),
}


def _parallel_bf16_body(rank: int, world_size: int, tmp: str) -> dict:
    """tp=2 (sequence parallel) x dp=2 with overlapped ZeRO-1; pp=2 x dp=2 with plain AdamW and the
    tied embedding's two copies; the interleaved pipeline with ZeRO-1 over its two chunks: the bf16
    losses and grad norms on every rank."""
    out = {}
    for name, (layout, model_flags) in PARALLEL_BF16.items():
        cfg = _config(layout + model_flags + ["train.precision=bf16", f"log.dir={tmp}/{name}"])
        dims = setup_dims(cfg)
        model, history = _train(cfg, dims)
        assert {p.dtype for _, p in model.named_params} == {torch.bfloat16}
        model.parallel_step.wait_for_params()
        # Data-parallel copies of a weight stay identical (each was cast from the same gathered master).
        for _, p in model.named_params:
            copies = [torch.empty_like(p) for _ in range(dims.dp)]
            dist.all_gather(copies, p.detach(), group=dims.dp_group)
            assert all(torch.equal(c, copies[0]) for c in copies)
        out[name] = history
        dist.barrier()
    return out


def test_bf16_under_tensor_pipeline_and_zero1_data_parallel_follows_fp32(tmp_path):
    references = {}
    for name, (_, model_flags) in PARALLEL_BF16.items():
        key = tuple(model_flags)
        if key not in references:
            references[key] = _train(_config(model_flags), ParallelDims.single())[1]
    for per_rank in run_distributed(_parallel_bf16_body, 4, str(tmp_path)):
        for name, history in per_rank.items():
            fp32_history = references[tuple(PARALLEL_BF16[name][1])]
            for (loss, norm), (loss32, norm32) in zip(history, fp32_history):
                assert loss == pytest.approx(loss32, rel=2e-2), name
                assert norm == pytest.approx(norm32, rel=1e-1), name


def test_precision_benchmark_runs_on_tiny_sizes(capsys):
    """The benchmark end to end on tiny shapes, every contender reported (no timing checked)."""
    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_precision.py"
    spec = importlib.util.spec_from_file_location("bench_precision", tool)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = ["--layers", "1", "--hidden", "32", "--heads", "4", "--seq", "16", "--vocab", "64", "--steps", "1",
            "--repeat", "1", "--micro-batch", "2"]
    for extra in ([], ["--zero1"]):
        assert bench.main(tiny + extra) == 0
        out = capsys.readouterr().out
        for name in ("| fp32 |", "| fp32 + bf16 autocast |", "| bf16 |", "| fp16 |"):
            assert name in out
