"""Grouped-query attention with tensor parallelism larger than the number of kv heads.

At tp = r x num_kv_heads each kv head is copied to the r consecutive tp ranks holding its
query heads. The runs below train a tiny Llama with the real ``Trainer`` pieces (one
``ParallelStep`` per step, gradients read between backward and the optimizer) and must match
one process: loss, full gradients and global gradient norm every step, weights afterwards,
with the copies bit-identical. Checkpoints move between tp=4 (replicated), tp=2 and tp=1 in
both directions, online and through ``tools/reshard.py``, and the Hugging Face adapter reads
the same tensors from either. One gloo launch on four ranks runs every parallel layout.
"""

from __future__ import annotations

import contextlib
import json
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig, load_config
from megatron_lite.convert.hf import adapter_for_model
from megatron_lite.model.generation import generate
from megatron_lite.parallel.data_parallel import GradShard
from megatron_lite.model.layout_check import validate_layout
from megatron_lite.parallel.dims import ParallelDims, group_ranks
from megatron_lite.parallel.grad_norm import global_grad_norm
from megatron_lite.parallel.grad_sync import sum_replicated_rows
from megatron_lite.parallel.layers import ColumnParallelLinear
from megatron_lite.parallel.layout import ParamLayout, attach_layout, layout_of
from megatron_lite.training.checkpoint import CheckpointError, ShardReader, iteration_dir_name, load_full_state_dict
from megatron_lite.training.checkpoint.format import file_check
from megatron_lite.training.setup import local_batch, split_micro_batches
from megatron_lite.training.trainer import Trainer
from megatron_lite.training.setup import setup_dims
from tests.distributed import run_distributed

VOCAB, SEQ, STEPS, SAVED_STEP, BATCH = 50, 8, 4, 3, 4
BASE = [
    "model.flavor=llama", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
    "model.ffn_hidden_size=64", f"model.seq_length={SEQ}", f"model.vocab_size={VOCAB}",
    "model.make_vocab_size_divisible_by=8", "train.micro_batch_size=2", f"train.global_batch_size={BATCH}",
    f"train.max_steps={STEPS}", "train.eval_interval=0", "train.device=cpu", "train.seed=5",
    "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.grad_clip=0.5", "log.tensorboard=false", "log.interval=1",
    # Adam moves a weight by about lr whatever its gradient's size, so a gradient that is ~1e-7 by
    # cancellation (and so differs by a few percent with the tp reduction order) would move the final
    # weights by ~1e-6 apart; an eps above such gradients keeps the weight comparison about the layout.
    "optim.eps=1e-5",
]
PROMPTS = [[3, 1, 4, 1, 5], [9, 2]]  # greedy decoding through the kv cache, one copy of a kv head per rank
VOCAB_ROWS = ("embedding.word.weight", "output.weight")  # padded differently per tp: compare the real rows
# name: (kv heads, overrides, the run whose step-SAVED_STEP checkpoint it resumes); the world of 4 gives dp
PARALLEL_RUNS = {
    "tp4": (2, ["parallel.tp=4"], None),
    "tp4 sequence-parallel": (2, ["parallel.tp=4", "parallel.sequence_parallel=true"], None),
    "tp2 dp2 one kv head zero1 sequence-parallel": (
        1, ["parallel.tp=2", "parallel.zero1=true", "parallel.sequence_parallel=true"], None),
    "tp2 dp2 one kv head": (1, ["parallel.tp=2"], None),
    "tp2 pp2 one kv head": (1, ["parallel.tp=2", "parallel.pp=2"], None),
    "tp2 dp2 resumes tp4": (2, ["parallel.tp=2"], "tp4"),
    "tp4 resumes tp1": (2, ["parallel.tp=4"], "reference kv2"),
}


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[2] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(root: str, name: str) -> Path:
    return Path(root) / name.replace(" ", "_")


def _saved(root: str, name: str) -> Path:
    return _run_dir(root, name) / "checkpoint" / iteration_dir_name(SAVED_STEP)


def _config(root: str, name: str, kv_heads: int, overrides: list[str], resumes: str | None = None):
    run = _run_dir(root, name)
    load = [f"checkpoint.load={_saved(root, resumes)}"] if resumes else []
    return load_config(None, BASE + [f"model.num_kv_heads={kv_heads}", f"log.dir={run}/log",
                                     f"checkpoint.save={run}/checkpoint"] + overrides + load)


def _datasets() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    rows = (rng.integers(0, VOCAB, size=(STEPS * BATCH, 1)) + np.arange(SEQ + 1)) % VOCAB
    return rows, rows[:BATCH]


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    if group is None:
        return [t]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _full(trainer: Trainer, grads: bool) -> dict[str, torch.Tensor]:
    """Every parameter (or its dp-averaged gradient) merged to the tp=1 layout; merging checks
    that each kv head's copies are identical."""
    dims, out = trainer.dims, {}
    for name, param in trainer.model.named_params:
        t = param.grad.detach().clone() if grads else param.detach()
        if grads and trainer.model.parallel_step.zero1 and dims.dp > 1:  # ZeRO reduces later, onto slices
            dist.all_reduce(t, group=dims.dp_group)
            t /= dims.dp
        full = layout_of(param).merge_shards(_gather(t, dims.tp_group))
        out[name] = full[:VOCAB] if name in VOCAB_ROWS else full
    return out


def _copies_identical(trainer: Trainer) -> bool:
    dims = trainer.dims
    for _, param in trainer.model.named_params:
        if layout_of(param).tp_replicas(dims.tp) > 1:
            copies = _gather(layout_of(param).replicated_part(param.detach()), dims.kv_replica_group)
            if not all(torch.equal(c, copies[0]) for c in copies):
                return False
    return True


def _train(cfg, dims: ParallelDims | None) -> dict:
    """The trainer's step loop, reading the full gradients between backward and the optimizer."""
    trainer = Trainer(cfg, dims, datasets=_datasets())
    out = {"first_step": trainer.step + 1, "losses": [], "norms": [], "grads": []}
    while trainer.step < STEPS:
        batch = local_batch(trainer.train_ds, trainer.consumed_samples, BATCH, trainer.dims)
        micro = split_micro_batches(batch, cfg.train.micro_batch_size, trainer.dims.device)
        out["losses"].append(trainer.model.parallel_step.forward_backward(micro, contextlib.nullcontext(), 1.0))
        out["grads"].append(_full(trainer, grads=True))
        norm, skipped = trainer.model.parallel_step.optimizer_step(trainer.model.scaler, cfg.optim.grad_clip)
        assert not skipped
        trainer.model.scheduler.step()
        trainer.step += 1
        trainer.consumed_samples += BATCH
        out["norms"].append(norm)
        if trainer.step == SAVED_STEP:
            trainer.save()
    trainer.model.parallel_step.wait_for_params()  # ZeRO-1's last all-gathers are left for the next forward
    out["weights"] = _full(trainer, grads=False)
    if not trainer.dims.sequence_parallel and trainer.dims.pp == 1:  # decoding runs the whole model on one rank
        out["generated"] = generate(trainer.model.chunks[0], PROMPTS, 4, temperature=0)
    out["copies_identical"] = _copies_identical(trainer)
    out["kv_replicas"] = trainer.dims.kv_replicas
    trainer.metrics.close()
    return out


def _check_grad_norm_counts_copies_once(dims: ParallelDims) -> None:
    """ZeRO hands the norm flat slices of a parameter: the copied rows must be found in any slice."""
    # Two groups over tp=4: each rank holds 2 rows of its own and a copy of its group's 2 rows.
    layout = ParamLayout(partition_dim=0, partition_groups=2, replicated_rows=2)
    param = attach_layout(torch.nn.Parameter(torch.zeros(4, 3)), layout)
    tp_rank, replica_set = dims.tp_rank, dims.tp_rank // 2
    flat = torch.cat([torch.full((6,), float(tp_rank + 1)), torch.full((6,), float(10 * (replica_set + 1)))])
    shards = [GradShard(flat[:5], layout, param=param, offset=0), GradShard(flat[5:], layout, param=param, offset=5)]
    expected = 6 * (1 + 4 + 9 + 16) + 6 * (100 + 400)  # own rows on every rank, each copy once
    assert global_grad_norm(shards, dims.tp_group).item() == pytest.approx(expected**0.5, rel=1e-6)


def _parallel_runs(rank: int, world_size: int, root: str) -> dict:
    out = {}
    for name, (kv_heads, overrides, resumes) in PARALLEL_RUNS.items():
        cfg = _config(root, name, kv_heads, overrides, resumes)
        dims = setup_dims(cfg)
        if name == "tp4":
            _check_grad_norm_counts_copies_once(dims)
            with pytest.raises(ValueError, match="gather_output would repeat the replicated rows"):
                ColumnParallelLinear(8, 24, bias=True, group=dims.tp_group, gather_output=True, partition_groups=2,
                                     replicated_rows=4)
        result = _train(cfg, dims)
        if dims.tp_rank == 0 and dims.dp_rank == 0:  # one reporter per pipeline stage
            out[name] = result
    return out


def _merge_stages(name: str, per_rank: list[dict]) -> dict:
    """One run's results with every stage's parameters (each stage reports only its own)."""
    stages = [r[name] for r in per_rank if name in r]
    merged = dict(stages[0])
    for key in ("grads", "weights"):
        if key == "grads":
            merged[key] = [{k: v for s in stages for k, v in s[key][step].items()} for step in range(len(stages[0][key]))]
        else:
            merged[key] = {k: v for s in stages for k, v in s[key].items()}
    merged["copies_identical"] = all(s["copies_identical"] for s in stages)
    return merged


def _assert_matches(name: str, run: dict, reference: dict) -> None:
    first = run["first_step"]
    assert first == (SAVED_STEP + 1 if "resumes" in name else 1), name
    ref_losses, ref_norms = reference["losses"][first - 1 :], reference["norms"][first - 1 :]
    np.testing.assert_allclose(run["losses"], ref_losses, rtol=1e-5, err_msg=f"{name}: losses")
    np.testing.assert_allclose(run["norms"], ref_norms, rtol=2e-5, err_msg=f"{name}: gradient norms")
    for step, (grads, ref_grads) in enumerate(zip(run["grads"], reference["grads"][first - 1 :]), first):
        assert grads.keys() == ref_grads.keys()
        for param_name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[param_name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: step {step} gradient of {param_name}\n{m}")
    for param_name, weight in run["weights"].items():
        torch.testing.assert_close(weight, reference["weights"][param_name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: final {param_name}\n{m}")
    assert run["copies_identical"], f"{name}: the copies of a kv head drifted apart"
    if "generated" in run:
        assert run["generated"] == reference["generated"], name


def _hf_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """What the Hugging Face export writes, through the same adapter and lazy shard reader."""
    source = ShardReader(ckpt)
    cfg = ModelConfig(**source.manifest.config["model"])
    adapter = adapter_for_model(cfg)
    tensors = {}
    for group in adapter.groups():
        tensors.update(adapter.to_hf(group, source.__getitem__))
    return tensors


def test_kv_heads_replicated_over_tp_train_like_one_process(tmp_path):
    root = str(tmp_path)
    references = {kv: _train(_config(root, f"reference kv{kv}", kv, []), None) for kv in (1, 2)}
    for reference in references.values():
        assert min(reference["norms"]) > 0.5, "clipping (optim.grad_clip=0.5) must act every step"

    per_rank = run_distributed(_parallel_runs, 4, root)
    results = {name: _merge_stages(name, per_rank) for name in PARALLEL_RUNS}
    assert sum("tp2 pp2 one kv head" in r for r in per_rank) == 2  # both stages reported
    assert results["tp4"]["kv_replicas"] == 2 and results["tp2 dp2 one kv head"]["kv_replicas"] == 2
    assert results["tp2 dp2 resumes tp4"]["kv_replicas"] == 1
    for name, (kv_heads, _, _) in PARALLEL_RUNS.items():
        _assert_matches(name, results[name], references[kv_heads])

    # The replicated tp=4 checkpoint loads in one process, and tools/reshard.py rewrites it for tp=1
    # and tp=2 and the tp=1 checkpoint for tp=4: the same full tensors, then the same step.
    tp4 = _saved(root, "tp4")
    resumed = _train(_config(root, "tp1 resumes tp4", 2, [], "tp4"), None)
    _assert_matches("tp1 resumes tp4", resumed, references[2])
    reshard = _load_tool("reshard")
    original, _ = load_full_state_dict(tp4)
    for source, tp in ((tp4, 1), (tp4, 2), (_saved(root, "reference kv2"), 4)):
        output = tmp_path / f"resharded_tp{tp}"
        assert reshard.main(["--load", str(source), "--output", str(output), "--tp", str(tp), "--pp", "1"]) == 0
        rewritten, manifest = load_full_state_dict(output)
        assert manifest.layout.tp == tp
        expected = original if source == tp4 else load_full_state_dict(source)[0]
        assert rewritten.keys() == expected.keys()
        assert all(torch.equal(rewritten[n], expected[n]) for n in expected), f"reshard to tp={tp} changed weights"
    qkv = manifest.params["layers.0.attention.qkv.weight"]
    assert (qkv.partition_groups, qkv.replicated_rows, qkv.shape) == (2, 16, [64, 32])
    resumed = _train(_config(root, "tp1 resumes resharded tp4", 2, [f"checkpoint.load={tmp_path / 'resharded_tp1'}"]),
                     None)
    _assert_matches("tp1 resumes resharded tp4", resumed, references[2])

    from_tp4, from_tp1 = _hf_tensors(tp4), _hf_tensors(tmp_path / "resharded_tp1")
    assert from_tp4.keys() == from_tp1.keys() and "model.layers.0.self_attn.k_proj.weight" in from_tp4
    assert all(torch.equal(from_tp4[n], from_tp1[n]) for n in from_tp4)

    # Copies that differ on disk are a broken checkpoint, not something to pick from.
    broken = tmp_path / "broken"
    shutil.copytree(tp4, broken)
    shard_path = broken / "model_tp01_pp000.pt"
    shard = torch.load(shard_path, weights_only=False)
    shard["model"]["layers.1.attention.qkv.weight"][-1] += 1.0  # rank 1's copy of kv head 0's last v row
    torch.save(shard, shard_path)
    _record_rewritten_file(broken, shard_path.name)  # the copies differ, the file itself is whole
    with pytest.raises(CheckpointError, match="layers.1.attention.qkv.weight: the replicated rows of group 0 differ"):
        load_full_state_dict(broken)


def _record_rewritten_file(ckpt_dir, name):
    manifest_path = ckpt_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["file_checks"][name] = file_check(ckpt_dir / name)
    manifest_path.write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- without launches


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_grouped_rows_shard_and_merge_are_inverses(tp):
    kv_heads, q_per_kv, head_dim = 2, 4, 3
    layout = ParamLayout(partition_dim=0, partition_chunks=1, partition_groups=kv_heads, replicated_rows=2 * head_dim)
    full = torch.randn(kv_heads * (q_per_kv + 2) * head_dim, 5)
    shards = [layout.shard_tensor(full, r, tp) for r in range(tp)]
    assert torch.equal(layout.merge_shards(shards), full)
    assert all(layout.full_shape(s.shape, tp) == list(full.shape) for s in shards)
    groups = full.view(kv_heads, q_per_kv + 2, head_dim, 5)
    for r, s in enumerate(shards):
        if tp > kv_heads:  # one q head of group r // (tp / kv) per rank, then that group's k and v whole
            replicas = tp // kv_heads
            group, q_head = r // replicas, r % replicas
            heads = groups[group, q_head * q_per_kv // replicas : (q_head + 1) * q_per_kv // replicas]
            assert torch.equal(s, torch.cat([heads.reshape(-1, 5), groups[group, q_per_kv:].reshape(-1, 5)]))
        else:
            assert torch.equal(s, full.chunk(tp)[r])


def test_merging_copies_that_differ_is_an_error():
    layout = ParamLayout(partition_dim=0, partition_chunks=1, partition_groups=1, replicated_rows=2)
    full = torch.arange(12.0).view(6, 2)
    shards = [layout.shard_tensor(full, r, 2) for r in range(2)]
    shards[1][-1, 0] += 1
    with pytest.raises(ValueError, match="replicated rows of group 0 differ"):
        layout.merge_shards(shards)


def test_replicated_gradients_need_the_replica_group():
    param = attach_layout(torch.nn.Parameter(torch.zeros(6, 2)), ParamLayout(partition_dim=0, replicated_rows=2))
    param.grad = torch.ones(6, 2)
    with pytest.raises(ValueError, match="copies on 2 tensor-parallel ranks but the replica group has 1"):
        sum_replicated_rows([param], 2, None)


def _llama(**kw) -> ModelConfig:
    values = dict(flavor="llama", num_layers=2, hidden_size=96, num_heads=12, num_kv_heads=4, ffn_hidden_size=96,
                  vocab_size=100)
    return ModelConfig(**{**values, **kw})


@pytest.mark.parametrize(
    "tp, kv_heads, message",
    [
        (6, 4, r"parallel.tp=6 is larger than model.num_kv_heads=4 but not a multiple of it; "
               r".*multiple of num_kv_heads"),
        (4, 6, r"model.num_kv_heads=6 is not divisible by parallel.tp=4; .*divides num_kv_heads or a multiple of it"),
    ],
)
def test_kv_layouts_that_would_cut_a_head_say_what_to_change(tp, kv_heads, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(ParallelConfig(tp=tp), _llama(num_kv_heads=kv_heads), tp)


def test_replicated_layouts_are_accepted_and_grouped():
    assert validate_layout(ParallelConfig(tp=12), _llama(num_kv_heads=4), 24) == 2
    assert validate_layout(ParallelConfig(tp=4), _llama(num_kv_heads=1), 4) == 1
    kv = group_ranks(tp=4, dp=2, pp=1, kv_replicas=2)["kv_replica"]
    assert kv == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group_ranks(tp=2, dp=1, pp=2)["kv_replica"] == [[0], [1], [2], [3]]
