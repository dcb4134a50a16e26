"""Activation recomputation: bitwise-equal gradients with dropout, fewer saved bytes, refused misuse."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron_lite.config import ConfigError, load_config
from megatron_lite.model.gpt import GPT
from megatron_lite.model.recompute import RecomputePolicy, rebuilt_in_backward
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.random import TP_STREAM, model_parallel_rng_tracker
from megatron_lite.training.activation_memory import saved_activation_bytes, saved_tensor_bytes
from megatron_lite.training.setup import build_model_chunks
from tests.model.test_gpt import tiny

POLICIES = {
    "selective": RecomputePolicy("selective"),
    "full": RecomputePolicy("full"),
    "full, first layer only": RecomputePolicy("full", 1),
}


def loss_and_grads(model: GPT, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Two steps' worth of forward + backward, so the second runs on streams the first advanced."""
    losses = []
    for _ in range(2):
        loss = model(ids, labels=ids.roll(-1, dims=1))
        loss.mean().backward()
        losses.append(loss.detach())
    return torch.stack(losses), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("policy", POLICIES, ids=str)
@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_gradients_equal_no_recomputation_bitwise_with_dropout(flavor, policy):
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = tiny(flavor, dropout=0.2)
    torch.manual_seed(5)
    reference_losses, reference = loss_and_grads(GPT(cfg, seed=3), ids)
    reference_rng = torch.get_rng_state()
    torch.manual_seed(5)
    model = GPT(cfg, seed=3, recompute=POLICIES[policy])
    losses, grads = loss_and_grads(model, ids)
    assert torch.equal(losses, reference_losses)
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name
    # The streams go on as if nothing had been recomputed, and so does the default generator.
    assert torch.equal(torch.get_rng_state(), reference_rng)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_gradients_equal_no_recomputation_bitwise_under_bf16_autocast(flavor):
    """The recomputed forward runs under the autocast state of the original one."""
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("none", "selective", "full"):
        model = GPT(tiny(flavor, dropout=0.2), seed=3, recompute=RecomputePolicy(mode))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.mean().backward()
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            assert torch.equal(grads[mode][name], grad), f"{mode}: {name}"


def test_recomputed_dropout_needs_the_stream_replay():
    """torch's checkpoint alone restores the default generator, not the model's streams: the
    recomputed forward would draw another mask and backward would use the wrong one."""
    def dropped(x, tracker):
        with tracker.fork(TP_STREAM):
            return F.dropout(x, 0.5, training=True) * x

    x = torch.randn(64, requires_grad=True)
    grads = {}
    for name in ("plain", "replayed", "checkpoint alone"):
        tracker = model_parallel_rng_tracker(1, tp_rank=0, pp_rank=0)
        if name == "plain":
            y = dropped(x, tracker)
        else:
            context = tracker.recompute_contexts if name == "replayed" else None
            y = checkpoint(dropped, x, tracker, use_reentrant=False,
                           **({"context_fn": context} if context else {}))
        (grads[name],) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grads["replayed"], grads["plain"])
    assert not torch.equal(grads["checkpoint alone"], grads["plain"])


def test_replay_without_record_is_an_error():
    _, replay = model_parallel_rng_tracker(1, tp_rank=0, pp_rank=0).recompute_contexts()
    with pytest.raises(RuntimeError, match="never recorded: enter record"):
        with replay:
            pass


def test_rebuilt_activation_is_not_kept_and_gives_the_same_gradients():
    h = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    grads, saved = [], []
    for rebuild in (False, True):
        def forward():
            a = F.gelu(h)  # (3, 5, 8)
            if not rebuild:
                return F.linear(a, weight)
            with rebuilt_in_backward(a, lambda: F.gelu(h)):
                return F.linear(a, weight)

        nbytes, y = saved_tensor_bytes(forward, exclude=[weight])
        saved.append(nbytes)
        grads.append(torch.autograd.grad(y.square().sum(), (h, weight)))
    assert saved == [2 * h.numel() * 4, h.numel() * 4]  # h and gelu(h), then h alone
    for rebuilt, kept in zip(grads[1], grads[0]):
        assert torch.equal(rebuilt, kept)


def measured(flavor: str, mode: str, dropout: float, *extra: str) -> int:
    overrides = [f"model.flavor={flavor}", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
                 "model.seq_length=32", "model.vocab_size=50", f"model.dropout={dropout}",
                 f"train.recompute={mode}", "train.micro_batch_size=2", *extra]
    if flavor == "llama":
        overrides.append("model.num_kv_heads=2")
    return saved_activation_bytes(load_config(None, overrides))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_saved_activation_bytes_fall_with_each_mode(flavor, dropout):
    none, selective = measured(flavor, "none", dropout), measured(flavor, "selective", dropout)
    full, full_first = measured(flavor, "full", dropout), measured(flavor, "full", dropout, "train.recompute_layers=1")
    assert none > selective > full
    assert none > full_first > full  # half the layers recomputed lands between
    # Full recomputation keeps each layer's input (B, T, H) fp32 and little else per layer.
    layer_input = 2 * 32 * 32 * 4
    assert full - measured(flavor, "full", dropout, "model.num_layers=1") == layer_input


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_pipeline_ranks_measured_in_one_process_add_up_to_the_whole_model(flavor, mode):
    overrides = [f"model.flavor={flavor}", "model.num_layers=4", "model.hidden_size=32", "model.num_heads=4",
                 "model.seq_length=32", "model.vocab_size=50", "model.dropout=0.1", f"train.recompute={mode}",
                 "train.micro_batch_size=2"] + (["model.num_kv_heads=2"] if flavor == "llama" else [])
    whole = saved_activation_bytes(load_config(None, overrides))
    cfg = load_config(None, overrides + ["parallel.pp=2", "parallel.virtual_pp=2"])
    stages = [saved_activation_bytes(cfg, ParallelDims.for_world(cfg.parallel, 2, rank)) for rank in range(2)]
    assert stages[0] < stages[1]  # the last stage also keeps the logits for the loss
    # A chunk's input is what the previous chunk's last layer would have kept for the next one; only
    # the rope tables (cos and sin, (B, T, 1, hd) fp32) are built once per chunk, four times here.
    rope_tables = 3 * 2 * (2 * 32 * 8 * 4) if flavor == "llama" else 0
    assert sum(stages) == whole + rope_tables


def test_saved_activation_bytes_scale_with_the_micro_batch():
    cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=4",
                             "model.seq_length=16", "model.vocab_size=50", "train.micro_batch_size=2"])
    # Everything grows with the batch but the position ids, one (T,) int64 row every sample views.
    position_ids = 16 * 8
    assert saved_activation_bytes(cfg, micro_batch_size=4) == 2 * saved_activation_bytes(cfg) - position_ids


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_selective_leaves_fused_attention_alone_and_rebuilds_the_mlp_activation(backend):
    """The Triton kernel, and SDPA without dropout on CPU (its flash kernel), keep only q, k, v, out
    and the log-sum-exp: that attention is selective already, so selective leaves it alone and
    rebuilds the MLP activation (B, T, ffn) alone."""
    cfg = tiny("gpt2", attention_backend=backend, num_layers=2, seq_length=16)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    saved, grads = {}, {}
    for mode in ("none", "selective"):
        model = GPT(cfg, seed=3, recompute=RecomputePolicy(mode))
        saved[mode], loss = saved_tensor_bytes(lambda: model(ids, labels=ids), list(model.parameters()))
        loss.sum().backward()
        grads[mode] = {name: p.grad for name, p in model.named_parameters()}
    blocks = list(model.layers.values())
    assert [b.attention.recompute_core for b in blocks] == [False, False]
    assert [b.mlp.recompute_activation for b in blocks] == [True, True]
    assert saved["none"] - saved["selective"] == cfg.num_layers * 2 * 16 * cfg.ffn_hidden_size * 4
    for name, grad in grads["none"].items():
        assert torch.equal(grads["selective"][name], grad), name


def test_selective_recomputes_attention_only_where_it_keeps_probabilities():
    """SDPA's math path (dropout on CPU) keeps the (B, nh, T, T) probabilities; selective drops them."""
    policy = RecomputePolicy("selective")
    assert policy.recomputes_attention_core("torch", 0.1, "cpu")
    assert not policy.recomputes_attention_core("torch", 0.0, "cpu")
    assert not policy.recomputes_attention_core("torch", 0.1, "cuda")
    assert not RecomputePolicy("full").recomputes_attention_core("torch", 0.1, "cpu")
    model = GPT(tiny("llama", dropout=0.1), recompute=policy)
    assert all(b.attention.recompute_core for b in model.layers.values())
    # Attention probabilities of a layer (B=2, nh=4, T=32, T) fp32, and their dropout mask, at least.
    assert measured("llama", "none", 0.1) - measured("llama", "selective", 0.1) > 2 * 2 * 4 * 32 * 32 * 4


def test_forward_without_autograd_recomputes_nothing_and_generation_is_unchanged():
    from megatron_lite.model.generation import generate

    cfg = tiny("llama", dropout=0.1)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, outputs = [], []
    for mode in ("none", "full"):
        model = GPT(cfg, seed=3, recompute=RecomputePolicy(mode))
        with torch.no_grad():
            logits.append(model(ids))  # in training mode: dropout draws, nothing is kept
        outputs.append(generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=6, temperature=0.0))
    assert torch.equal(logits[0], logits[1])
    assert outputs[0] == outputs[1]


def test_recompute_settings_that_cannot_apply_are_refused():
    with pytest.raises(ConfigError, match="train.recompute='some' is not one of none, selective, full"):
        load_config(None, ["train.recompute=some"])
    with pytest.raises(ConfigError, match="train.recompute_layers=2 applies only to train.recompute=full "
                                          r"\(got train.recompute=selective\); set train.recompute=full"):
        load_config(None, ["train.recompute=selective", "train.recompute_layers=2"])
    with pytest.raises(ConfigError, match="train.recompute_layers must be a positive number of layers or null"):
        load_config(None, ["train.recompute=full", "train.recompute_layers=0"])
    with pytest.raises(ConfigError, match=r"train.recompute_layers=3 is more than the smallest pipeline chunk holds "
                                          r"\(2 layers; layers per chunk: \[2\]\); set it to at most 2"):
        GPT(tiny("gpt2"), recompute=RecomputePolicy("full", 3))
    RecomputePolicy("full", 2).check_chunks([2, 0, 3])  # a chunk without layers recomputes nothing
    # At start-up every pipeline rank refuses alike, even one whose own chunk is large enough.
    cfg = load_config(None, ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=4", "model.vocab_size=50",
                             "parallel.pp=2", "parallel.stage_layers=[3, 1]", "train.recompute=full",
                             "train.recompute_layers=2"])
    with pytest.raises(ConfigError, match=r"train.recompute_layers=2 is more than the smallest pipeline chunk holds "
                                          r"\(1 layer; layers per chunk: \[3, 1\]\); set it to at most 1, or null"):
        build_model_chunks(cfg, ParallelDims.for_world(cfg.parallel, 2, rank=0))
    with pytest.raises(ConfigError, match="train.recompute_layers=1 applies only to train.recompute=full"):
        RecomputePolicy("none", 1)


def test_bench_recompute_prints_every_mode(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_recompute", Path(__file__).resolve().parents[2] / "tools" / "bench_recompute.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_recompute.py", "--layers", "2", "--hidden", "32", "--heads", "4",
                                      "--seq", "16", "--micro-batch", "2", "--repeat", "1"])
    threads = torch.get_num_threads()
    bench.main()
    torch.set_num_threads(threads)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "MiB" not in line}
    assert list(rows) == ["none", "attention core only", "MLP activation only", "selective",
                          "full, first 1 of 2 layers", "full"]
    mib = {name: float(cells[1]) for name, cells in rows.items()}
    assert mib["none"] > mib["selective"] > mib["full"]
