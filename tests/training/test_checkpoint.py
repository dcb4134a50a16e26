import json

import pytest
import torch

from megatron_lite.config import load_config
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training import checkpoint
from megatron_lite.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    load_checkpoint,
    load_full_state_dict,
    save_checkpoint,
)
from megatron_lite.training.optim import LossScaler, build_optimizer
from megatron_lite.training.schedule import LRScheduler
from megatron_lite.training.setup import setup_dims
from tests.distributed import run_distributed

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16",
        "model.vocab_size=100", "model.make_vocab_size_divisible_by=8"]


def tiny(overrides=()):
    cfg = load_config(None, TINY + list(overrides))
    return cfg, ParallelDims.single()


def trained_model(cfg, dims, steps=1, seed=1234):
    model = GPT(cfg.model, dims, seed=seed)
    named = checkpoint.named_parameters([model])
    optimizer, _ = build_optimizer(named, cfg.optim, dims.device)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(path, iteration, model, optimizer, cfg, dims, **kw):
    return save_checkpoint(path, iteration, [model], dims, cfg.to_dict(), optimizer=optimizer,
                           train_state={"step": iteration}, padded_vocab_size=model.padded_vocab_size, **kw)


def test_round_trip_restores_weights_optimizer_rng_and_state(tmp_path):
    cfg, dims = tiny()
    model, optimizer = trained_model(cfg, dims, steps=2)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text("{}")
    torch.manual_seed(77)
    path = save(tmp_path / "ck", 2, model, optimizer, cfg, dims, tokenizer_dir=tokenizer)
    expected_draw = torch.rand(3)
    assert path.name == "iter_0000002" and (tmp_path / "ck" / "latest").read_text().strip() == "iter_0000002"
    assert (path / "tokenizer" / "vocab.json").is_file() and (path / "model_tp00_pp000.pt").is_file()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["layout"] == {"tp": 1, "pp": 1, "dp": 1, "virtual_pp": 1, "zero1": False}
    assert manifest["params"]["layers.0.mlp.fc.weight"] == {
        "partition_dim": 0, "partition_chunks": 1, "shape": [128, 32], "dtype": "float32"}
    assert manifest["config"]["model"]["hidden_size"] == 32

    fresh = GPT(cfg.model, dims, seed=999)
    fresh_opt, _ = build_optimizer(checkpoint.named_parameters([fresh]), cfg.optim, dims.device)
    state = load_checkpoint(tmp_path / "ck", [fresh], dims, fresh_opt, padded_vocab_size=fresh.padded_vocab_size)
    assert state["iteration"] == 2 and state["train_state"] == {"step": 2} and state["rng_restored"]
    assert not state["resharded"]
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the save left it
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(optimizer.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"]), name
        assert float(optimizer.state[a]["step"]) == float(fresh_opt.state[b]["step"]) == 2.0


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg, dims = tiny()
    model, optimizer = trained_model(cfg, dims)
    save(tmp_path, 1, model, optimizer, cfg, dims)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model2, optimizer2 = trained_model(cfg, dims, steps=3)

    def crash(directory, manifest):
        (directory / "manifest.json").write_text("{ half a manif")  # a torn write, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.format, "write_manifest", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model2, optimizer2, cfg, dims)
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "iter_0000002").exists()
    fresh = GPT(cfg.model, dims, seed=5)
    state = load_checkpoint(tmp_path, [fresh], dims, padded_vocab_size=fresh.padded_vocab_size)
    assert state["iteration"] == 1
    for name, p in fresh.named_parameters():
        assert torch.equal(p, before[name]), name
    save(tmp_path, 2, model2, optimizer2, cfg, dims)  # the next save succeeds over the debris
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"


def test_mismatched_model_lists_keys(tmp_path):
    cfg, dims = tiny()
    model, optimizer = trained_model(cfg, dims)
    save(tmp_path, 1, model, optimizer, cfg, dims)
    wider, dims3 = tiny(["model.num_layers=3", "model.ffn_hidden_size=64"])
    other = GPT(wider.model, dims3)
    with pytest.raises(CheckpointError, match="does not match the model") as err:
        load_checkpoint(tmp_path, [other], dims3, padded_vocab_size=other.padded_vocab_size)
    message = str(err.value)
    assert "layers.0.mlp.fc.weight: checkpoint shape [128, 32] != model shape [64, 32]" in message
    assert "layers.2.attention.qkv.weight: missing from the checkpoint" in message
    assert "layers.0.attention.qkv.weight" not in message  # matching keys are not listed


def test_missing_or_incomplete_checkpoint_messages(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.resolve_checkpoint_dir(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="expected a 'latest' file or a 'manifest.json'"):
        checkpoint.resolve_checkpoint_dir(tmp_path)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="iter_0000009, which has no manifest.json"):
        checkpoint.resolve_checkpoint_dir(tmp_path)


def _reshard_body(rank, world, root):
    return {flavor: _reshard_one(f"{root}/{flavor}/tp1", f"{root}/{flavor}/tp2", flavor) for flavor in FLAVORS}


def _reshard_one(tp1_dir, tp2_dir, flavor):
    """Load a tp=1 checkpoint at tp=2 (loss must match), save at tp=2."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["parallel.tp=2", f"model.flavor={flavor}"] +
                      (["model.num_kv_heads=2"] if flavor == "llama" else []))
    dims = setup_dims(cfg)
    model = GPT(cfg.model, dims, seed=4321)  # a different init: everything must come from the checkpoint
    named = checkpoint.named_parameters([model])
    optimizer, _ = build_optimizer(named, cfg.optim, dims.device)
    state = load_checkpoint(tp1_dir, [model], dims, optimizer, padded_vocab_size=model.padded_vocab_size)
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
    fc = dict(named)["layers.0.mlp.fc.weight"]
    exp_avg_shard = optimizer.state[fc]["exp_avg"].clone()
    save_checkpoint(tp2_dir, 1, [model], dims, cfg.to_dict(), optimizer=optimizer,
                    padded_vocab_size=model.padded_vocab_size)
    return {"loss": loss.item(), "resharded": state["resharded"], "exp_avg_shard": exp_avg_shard,
            "padded_vocab": model.padded_vocab_size}


FLAVORS = ("gpt2", "llama")


def test_reshard_tp1_to_tp2_and_back(tmp_path):
    originals = {flavor: _save_tp1(tmp_path / flavor, flavor) for flavor in FLAVORS}
    results = run_distributed(_reshard_body, 2, str(tmp_path))  # one launch for both flavours
    for flavor in FLAVORS:
        _check_reshard(tmp_path / flavor, flavor, originals[flavor], [r[flavor] for r in results])


def _save_tp1(root, flavor):
    overrides = [f"model.flavor={flavor}"] + (["model.num_kv_heads=2"] if flavor == "llama" else [])
    cfg, dims = tiny(overrides)
    model, optimizer = trained_model(cfg, dims, seed=1234)
    save(root / "tp1", 1, model, optimizer, cfg, dims)
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean().item()
    return cfg, dims, model, optimizer, reference_loss


def _check_reshard(root, flavor, original, results):
    cfg, dims, model, optimizer, reference_loss = original
    assert model.padded_vocab_size == 104 and results[0]["padded_vocab"] == 112  # padding grows with tp
    for r in results:
        assert r["resharded"]
        assert r["loss"] == pytest.approx(reference_loss, rel=1e-5)
    fc_avg = optimizer.state[dict(model.named_parameters())["layers.0.mlp.fc.weight"]]["exp_avg"]
    if flavor == "gpt2":
        assert torch.equal(torch.cat([r["exp_avg_shard"] for r in results]), fc_avg)
    # back to tp=1: merged weights equal the original ones, padding trimmed to the tp=1 size
    merged, manifest = load_full_state_dict(root / "tp2")
    assert manifest.layout.tp == 2
    for name, p in model.named_parameters():
        assert torch.equal(merged[name], p.detach()), name
    back = GPT(cfg.model, dims, seed=7)
    back_opt, _ = build_optimizer(checkpoint.named_parameters([back]), cfg.optim, dims.device)
    load_checkpoint(root / "tp2", [back], dims, back_opt, padded_vocab_size=back.padded_vocab_size)
    for (name, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(optimizer.state[a]["exp_avg"], back_opt.state[b]["exp_avg"]), name


def _checkpointer(cfg, dims, steps, seed):
    model, optimizer = trained_model(cfg, dims, steps=steps, seed=seed)
    scheduler = LRScheduler(optimizer, cfg.optim, total_steps=10)
    for _ in range(steps):
        scheduler.step()
    scaler = LossScaler(initial_scale=1024.0, window=2, dynamic=True)
    scaler.update(found_inf=True)
    return Checkpointer([model], dims, optimizer, scheduler, scaler)


def test_checkpointer_saves_and_resumes_everything_in_one_call(tmp_path):
    cfg, dims = tiny()
    saved = _checkpointer(cfg, dims, steps=3, seed=1234)
    path = saved.save(tmp_path / "ck", step=3, consumed_samples=12, config=cfg.to_dict())
    manifest = checkpoint.read_manifest(path)
    assert manifest.iteration == 3 and manifest.has_optimizer and manifest.padded_vocab_size == 104
    assert manifest.train_state["consumed_samples"] == 12 and manifest.train_state["scaler"] == saved.scaler.state_dict()

    fresh = Checkpointer([GPT(cfg.model, dims, seed=5)], dims)
    fresh.optimizer, _ = build_optimizer(checkpoint.named_parameters(fresh.model_chunks), cfg.optim, dims.device)
    fresh.scheduler = LRScheduler(fresh.optimizer, cfg.optim, total_steps=10)
    fresh.scaler = LossScaler(initial_scale=1024.0, window=2, dynamic=True)
    assert fresh.load(tmp_path / "ck") == checkpoint.DataPosition(step=3, consumed_samples=12)
    assert fresh.scheduler.state_dict() == saved.scheduler.state_dict() and fresh.scheduler.lr == saved.scheduler.lr
    assert fresh.scaler.state_dict() == saved.scaler.state_dict()
    for (name, a), (_, b) in zip(saved.model_chunks[0].named_parameters(), fresh.model_chunks[0].named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(saved.optimizer.state[a]["exp_avg"], fresh.optimizer.state[b]["exp_avg"]), name


def test_checkpointer_weights_only_load_keeps_the_training_state(tmp_path):
    cfg, dims = tiny()
    _checkpointer(cfg, dims, steps=2, seed=1234).save(tmp_path / "ck", 2, 8, cfg.to_dict())
    fresh = _checkpointer(cfg, dims, steps=0, seed=5)
    scheduler_before = fresh.scheduler.state_dict()
    assert fresh.load(tmp_path / "ck", weights_only=True) is None
    assert fresh.scheduler.state_dict() == scheduler_before and not fresh.optimizer.state
