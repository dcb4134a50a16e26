"""The memory planner against real allocations, measured saved tensors and published model sizes."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_lite.__main__ import main
from megatron_lite.config import ConfigError, load_config
from megatron_lite.model.gpt import GPT
from megatron_lite.model.layout_check import validate_layout
from megatron_lite.parallel.dims import ParallelDims, coords_of
from megatron_lite.training import planner
from megatron_lite.training.activation_memory import saved_activation_bytes
from megatron_lite.training.step import validate_batch_layout
from tests.distributed import run_distributed

TINY = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32",
        "model.vocab_size=300", "model.make_vocab_size_divisible_by=16", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.device=cpu"]
FLAVORS = {"gpt2": ["model.flavor=gpt2"], "llama": ["model.flavor=llama", "model.num_kv_heads=2"]}


def tiny(flavor: str, *extra: str):
    return load_config(None, TINY + FLAVORS[flavor] + list(extra))


# ----------------------------------------------------------------------------- measuring autograd's saved tensors


def saved_bytes(run, params) -> int:
    """Bytes of the distinct storages autograd keeps for backward of the forward ``run()``, parameters excluded
    (measured over the forward only: a recomputing backward saves its own tensors, freed layer by layer)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(kept.values())


def model_saved_bytes(model: GPT, cfg, inputs=None) -> int:
    b, t = cfg.train.micro_batch_size, cfg.model.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    x = ids if inputs is None else inputs
    return saved_bytes(lambda: model(x, labels=ids).mean(), list(model.parameters()))


# Each recompute mode as the model runs it, with dropout (the attention keeps its probabilities on the
# CPU, so selective reruns the core) and without, in fp32 and with 16-bit weights.
ACTIVATION_CASES = {
    "none": [],
    "selective": ["train.recompute=selective"],
    "full": ["train.recompute=full"],
    "full, first 2 layers": ["train.recompute=full", "train.recompute_layers=2"],
    "none, dropout": ["model.dropout=0.1"],
    "selective, dropout": ["train.recompute=selective", "model.dropout=0.1"],
    "full, dropout": ["train.recompute=full", "model.dropout=0.1"],
    "none, bf16": ["train.precision=bf16"],
    "selective, bf16": ["train.recompute=selective", "train.precision=bf16"],
    "full, bf16": ["train.recompute=full", "train.precision=bf16"],
}


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
@pytest.mark.parametrize("case", sorted(ACTIVATION_CASES))
def test_activations_match_saved_tensors(flavor, case):
    cfg = tiny(flavor, *ACTIVATION_CASES[case])
    measured = saved_activation_bytes(cfg)
    planned = planner.plan_memory(cfg, 1).ranks[0].activations_per_micro_batch
    assert planned == pytest.approx(measured, rel=0.15)


def test_selective_keeps_the_attention_core_where_the_attention_drops_its_probabilities():
    """Without dropout (or on a GPU) the attention keeps only its log-sum-exp: selective rebuilds the
    MLP activation alone; with dropout on the CPU it reruns the attention core too."""
    for extra in ([], ["model.dropout=0.1"], ["model.dropout=0.1", "train.device=auto"]):
        cfg = tiny("gpt2", *extra)
        shape = planner.activation_shape(cfg, ParallelDims())
        mlp_output = shape.tokens * cfg.model.ffn_hidden_size * 4
        rerun_core = extra == ["model.dropout=0.1"]
        core = planner._attention_core_bytes(cfg, shape) if rerun_core else 0
        assert planner.selective_savings(cfg, shape) == mlp_output + core, extra
        none, selective = (planner.layer_activation_bytes(cfg, shape, mode) for mode in ("none", "selective"))
        assert none - selective == mlp_output + core, extra
    on_gpu = tiny("gpt2", "model.dropout=0.1", "train.device=auto")
    shape = planner.activation_shape(on_gpu, ParallelDims())
    assert planner._attention_core_bytes(on_gpu, shape) == shape.tokens * on_gpu.model.num_heads * 4  # lse only


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_activations_match_saved_tensors_with_the_triton_kernels(flavor):
    """The fused norms, SwiGLU, attention and loss keep other tensors than torch's (interpreted on CPU)."""
    kernels = [f"model.{kind}_backend=triton" for kind in ("attention", "norm", "loss", "elementwise")]
    cfg = tiny(flavor, "model.num_layers=2", "train.global_batch_size=2", *kernels)
    measured = model_saved_bytes(GPT(cfg.model), cfg)
    torch_cfg = tiny(flavor, "model.num_layers=2", "train.global_batch_size=2")
    planned = planner.plan_memory(cfg, 1).ranks[0].activations_per_micro_batch
    assert planned == pytest.approx(measured, rel=0.15)
    assert planned != planner.plan_memory(torch_cfg, 1).ranks[0].activations_per_micro_batch


def test_recompute_modes_order_and_recompute_layers():
    cfg = tiny("gpt2", "model.dropout=0.1")
    rank = planner.plan_memory(cfg, 1).ranks[0]
    none, selective, full = (rank.by_mode[f"{m}, sp off"] for m in ("none", "selective", "full"))
    assert full < selective < none
    shape = planner.activation_shape(cfg, ParallelDims())
    assert none - selective == cfg.model.num_layers * planner.selective_savings(cfg, shape)
    first_two = planner.plan_memory(tiny("gpt2", "train.recompute=full", "train.recompute_layers=2"), 1).ranks[0]
    every = planner.plan_memory(tiny("gpt2", "train.recompute=full"), 1).ranks[0]
    plain = tiny("gpt2")
    saved_per_layer = planner.layer_activation_bytes(plain, shape, "none") - planner.layer_activation_bytes(
        plain, shape, "full")
    assert first_two.activations_per_micro_batch - every.activations_per_micro_batch == 2 * saved_per_layer
    # backward rebuilds one layer at a time: the peak adds one layer's whole set
    assert every.activations == every.activations_per_micro_batch + planner.layer_activation_bytes(plain, shape, "none")


def test_sequence_parallel_shrinks_the_residual_stream():
    rank = planner.plan_memory(tiny("llama", "parallel.tp=2", "parallel.sequence_parallel=true"), 2).ranks[0]
    assert rank.by_mode["none, sp on"] < rank.by_mode["none, sp off"]
    cfg = tiny("llama", "parallel.tp=2", "parallel.sequence_parallel=true")
    dims = ParallelDims.for_world(cfg.parallel, 2, kv_replicas=1)
    on, off = (planner.activation_shape(cfg, dims, sp) for sp in (True, False))
    assert 2 * planner.layer_activation_bytes(cfg, on, "full") == planner.layer_activation_bytes(cfg, off, "full")


# ----------------------------------------------------------------------------- the pipeline in flight


def test_in_flight_follows_the_schedule():
    cfg = tiny("gpt2", "parallel.pp=2", "train.global_batch_size=8")
    plan_1f1b = planner.plan_memory(cfg, 2)
    assert [r.in_flight for r in plan_1f1b.ranks] == [2, 1]  # pp - pp_rank
    afab = planner.plan_memory(tiny("gpt2", "parallel.pp=2", "parallel.pipeline_schedule=afab",
                                    "train.global_batch_size=8"), 2)
    assert [r.in_flight for r in afab.ranks] == [4, 4]  # every micro-batch
    assert afab.ranks[0].activations == 4 * afab.ranks[0].activations_per_micro_batch


def test_interleaved_stage_zero_is_megatrons_formula():
    pp, vpp, micro_batches = 4, 2, 8
    cfg = tiny("gpt2", "model.num_layers=8", f"parallel.pp={pp}", f"parallel.virtual_pp={vpp}",
               "train.micro_batch_size=1", f"train.global_batch_size={micro_batches}")
    dims = ParallelDims.for_world(cfg.parallel, pp)
    per_chunk = 1000  # equal chunks: the stage holds act x (pp + (pp - 1) / vpp) chunk-sets of its layers
    peak, _ = planner.in_flight_peak(cfg, dims, 0, micro_batches, [per_chunk] * vpp)
    stage = per_chunk * vpp  # one micro-batch through all of the stage's layers
    assert peak == pytest.approx(stage * pp * (1 + (pp - 1) / (pp * vpp)))


# ----------------------------------------------------------------------------- published sizes


def _total_parameters(cfg) -> int:
    plan = planner.plan_memory(cfg, cfg.parallel.tp)
    return sum(r.parameters for r in plan.ranks)


PUBLISHED = {
    # GPT-2 small and medium as released (vocab 50257, 1024 positions)
    "gpt2-124m": (["model.num_layers=12", "model.hidden_size=768", "model.num_heads=12", "model.seq_length=1024",
                   "model.vocab_size=50257"], 124_439_808),
    "gpt2-350m": (["model.num_layers=24", "model.hidden_size=1024", "model.num_heads=16", "model.seq_length=1024",
                   "model.vocab_size=50257"], 354_823_168),
    # GPT-3 XL sizing (configs/gpt2-1.3b.yaml): 12 L h^2 + 13 L h + V h + T h + 2 h
    "gpt2-1.3b": (["model.num_layers=24", "model.hidden_size=2048", "model.num_heads=16", "model.seq_length=2048",
                   "model.vocab_size=50257"], 12 * 24 * 2048**2 + 13 * 24 * 2048 + 50257 * 2048 + 2048 * 2048 + 2 * 2048),
    "llama-3.2-1b": (["model.flavor=llama", "model.num_layers=16", "model.hidden_size=2048", "model.num_heads=32",
                      "model.num_kv_heads=8", "model.ffn_hidden_size=8192", "model.vocab_size=128256",
                      "model.tie_embeddings=true"], 1_235_814_400),
    "llama-3-8b": (["model.flavor=llama", "model.num_layers=32", "model.hidden_size=4096", "model.num_heads=32",
                    "model.num_kv_heads=8", "model.ffn_hidden_size=14336", "model.vocab_size=128256",
                    "model.tie_embeddings=false"], 8_030_261_248),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    overrides, published = PUBLISHED[name]
    cfg = load_config(None, overrides + ["model.make_vocab_size_divisible_by=1", "train.micro_batch_size=1",
                                         "train.global_batch_size=1"])
    assert _total_parameters(cfg) == published


def test_tensor_parallel_shards_add_up():
    """Split over tp=4, the shards hold the model once, plus a copy of each replicated norm per extra rank."""
    overrides, published = PUBLISHED["llama-3.2-1b"]
    cfg = load_config(None, overrides + ["model.make_vocab_size_divisible_by=1", "parallel.tp=4",
                                         "train.micro_batch_size=1", "train.global_batch_size=1"])
    norms = (2 * 16 + 1) * 2048
    assert _total_parameters(cfg) == published + 3 * norms


# ----------------------------------------------------------------------------- refusals: the training run's own messages


def _message(fn) -> str:
    with pytest.raises(ConfigError) as caught:
        fn()
    return str(caught.value)


@pytest.mark.parametrize("extra, world", [
    (["parallel.tp=3"], 3),  # 4 heads over 3 ranks
    (["parallel.pp=3"], 3),  # 4 layers over 3 stages
    (["parallel.tp=2"], 3),  # the grid does not divide the world
    (["parallel.tp=8"], 8),  # 2 kv heads at tp 8 ... and 4 query heads
])
def test_impossible_layouts_give_the_training_message(extra, world):
    cfg = tiny("llama", *extra)
    expected = _message(lambda: validate_layout(cfg.parallel, cfg.model, world))
    assert _message(lambda: planner.plan_memory(cfg, world)) == expected


def test_batch_split_gives_the_training_message():
    cfg = tiny("gpt2", "train.global_batch_size=6")
    dims = ParallelDims.for_world(cfg.parallel, 4)
    expected = _message(lambda: validate_batch_layout(cfg, dims))
    assert _message(lambda: planner.plan_memory(cfg, 4)) == expected
    interleaved = tiny("gpt2", "parallel.pp=2", "parallel.virtual_pp=2", "train.global_batch_size=2")
    dims = ParallelDims.for_world(interleaved.parallel, 2)
    assert _message(lambda: planner.plan_memory(interleaved, 2)) == _message(
        lambda: validate_batch_layout(interleaved, dims))


def test_vocabulary_from_the_tokenizer_is_refused_with_the_fix():
    message = _message(lambda: planner.plan_memory(tiny("gpt2", "model.vocab_size=0"), 1))
    assert "model.vocab_size=N" in message and "50257" in message


@pytest.mark.parametrize("text", ["80", "eighty GB", "80XB", "0GB", "-4GB", ""])
def test_bad_gpu_memory_strings(text):
    message = _message(lambda: planner.parse_memory(text))
    assert repr(text) in message
    assert "80GB" in message or "positive" in message


def test_gpu_memory_units():
    assert planner.parse_memory("80GB") == planner.parse_memory("80GiB") == 80 * 2**30
    assert planner.parse_memory("141 GB") == 141 * 2**30
    assert planner.parse_memory("512MB") == 512 * 2**20
    assert planner.parse_memory("1.5TB") == int(1.5 * 2**40)


# ----------------------------------------------------------------------------- the command line


def _write_config(tmp_path, *overrides):
    path = tmp_path / "tiny.yaml"
    cfg = tiny("llama", *overrides)
    from megatron_lite.config import save_config

    save_config(cfg, path)
    return str(path)


def test_plan_json(tmp_path, capsys):
    path = _write_config(tmp_path)
    assert main(["plan", "--config", path, "parallel.tp=2", "parallel.pp=2", "--world-size", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["tp_rank"], r["pp_rank"]) for r in out["per_rank"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert [r["rank"] for r in out["per_rank"]] == [0, 1, 4, 5]  # tp fastest, then dp (2), then pp
    for entry in out["per_rank"]:
        b = entry["bytes"]
        assert set(b) >= {"weights", "gradients", "optimizer", "activations", "total"}
        assert b["total"] == b["weights"] + b["gradients"] + b["optimizer"] + b["activations"] + b["communication"]
        assert b["weights"] == 4 * entry["parameters"] and b["gradients"] == 4 * entry["parameters"]
    assert out["layout"]["dp"] == 2 and "weights" in out["formulas"]


def test_plan_text_and_layout_search(tmp_path, capsys):
    path = _write_config(tmp_path)
    assert main(["plan", "--config", path, "train.global_batch_size=8", "--world-size", "4", "--gpu-memory", "1GB",
                 "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "rank tp pp" in text and "formulas:" in text and "fastest first" in text and "cost model" in text
    cfg = tiny("llama", "train.global_batch_size=8")
    fits = planner.fitting_layouts(cfg, 4, 2**30, planner.CostModel())
    assert fits and all(c.peak_bytes <= 2**30 for c in fits)
    assert [c.step_seconds for c in fits] == sorted(c.step_seconds for c in fits)
    assert {c.tp * c.pp * c.dp for c in fits} == {4}
    assert {c.recompute for c in fits} == {"none", "selective", "full"}
    tight = min(c.peak_bytes for c in fits)
    assert all(c.peak_bytes <= tight for c in planner.fitting_layouts(cfg, 4, tight, planner.CostModel()))


def test_plan_refusals_on_the_command_line(tmp_path, capsys):
    path = _write_config(tmp_path)
    assert main(["plan", "--config", path, "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots' is not a memory size" in capsys.readouterr().err
    assert main(["plan", "--config", path, "parallel.tp=3", "--world-size", "3"]) == 2
    assert "not divisible by parallel.tp=3" in capsys.readouterr().err
    assert main(["plan", "--config", path, "--world-size", "0"]) == 2
    assert "--world-size must be positive" in capsys.readouterr().err
    assert main(["plan", "--config", path, "--top", "0"]) == 2
    assert "--top must be positive" in capsys.readouterr().err


def test_fp16_and_bf16_use_16_bit_weights_and_fp32_main_state():
    for precision in ("bf16", "fp16"):
        rank = planner.plan_memory(tiny("gpt2", f"train.precision={precision}"), 1).ranks[0]
        n = rank.parameters
        assert (rank.weights, rank.gradients) == (2 * n, 4 * n)
        tensors = 4 * 12 + 4  # 12 per layer; word and position embeddings, final norm weight and bias
        assert rank.optimizer == 12 * n + 4 * tensors  # main params + 2 moments; a step counter per tensor
    zero = planner.plan_memory(tiny("gpt2", "train.precision=bf16", "parallel.zero1=true",
                                    "train.global_batch_size=8"), 4).ranks[0]
    assert zero.optimizer == -(-zero.parameters // 4) * 16


# ----------------------------------------------------------------------------- what a real run allocates


REAL_LAYOUTS = {
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp2_sp_selective": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.recompute=selective",
                         "model.dropout=0.1"],
    "pp2": ["parallel.pp=2"],
    "pp2_full": ["parallel.pp=2", "train.recompute=full"],
    "dp2": [],
    "dp2_zero1": ["parallel.zero1=true"],
    # small buckets, some of odd size (gpt2's fc bias): each is padded to a multiple of dp
    "dp2_zero1_small_buckets": ["parallel.zero1=true", "parallel.bucket_size_mb=0.01", "model.ffn_hidden_size=171"],
    "tp2_zero1": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero1=true"],
    "pp2_zero1": ["parallel.pp=2", "parallel.zero1=true"],  # the tied embedding copies in buckets of their own
}
PRECISIONS = ("fp32", "bf16")


def _real_config(flavor, name, precision):
    return tiny(flavor, *REAL_LAYOUTS[name], f"train.precision={precision}")


def _storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _optimizer_bytes(optimizer) -> int:
    """fp32 main params (16-bit weights), AdamW's state; under ZeRO-1 the master slices, moments and the
    reduced-gradient slices (at dp = 1 the gradient buffer itself)."""
    if hasattr(optimizer, "_sharded"):  # ZeRO-1
        tensors = [t for sb in optimizer._sharded for t in (sb.master, sb.exp_avg, sb.exp_avg_sq)]
        reduced = [sb.bucket.grad_shard for sb in optimizer._sharded if sb.bucket.grad_shard is not sb.bucket.buffer]
        return _storage_bytes(tensors) + _storage_bytes(reduced)
    main = list(getattr(optimizer, "main_params", []))
    inner = getattr(optimizer, "inner", optimizer)
    state = [v for entry in inner.state.values() for v in entry.values() if torch.is_tensor(v)]
    return _storage_bytes(main) + _storage_bytes(state)


def _communication_bytes(optimizer) -> int:
    """ZeRO-1's 16-bit copies of the updated slices, in flight until the next forward waits for them."""
    if not hasattr(optimizer, "_sharded"):
        return 0
    return _storage_bytes([sb.gather_input for sb in optimizer._sharded
                           if sb.gather_input is not None and sb.gather_input is not sb.master])


def _real_allocations(rank, world):
    from megatron_lite.training.setup import setup_dims
    from megatron_lite.training.trained_model import build_trained_model

    torch.manual_seed(rank)
    results = {}
    for flavor in FLAVORS:
        for name in REAL_LAYOUTS:
            for precision in PRECISIONS:
                cfg = _real_config(flavor, name, precision)
                dims = setup_dims(cfg)
                model = build_trained_model(cfg, dims)
                params = [p for _, p in model.named_params]
                b, t = cfg.train.micro_batch_size, cfg.model.seq_length
                per_rank = cfg.train.global_batch_size // dims.dp
                ids = torch.randint(0, cfg.model.vocab_size, (per_rank // b, b, t))
                model.parallel_step.forward_backward([(x, x) for x in ids], model.autocast(), 1.0)
                gradients = _storage_bytes([p.main_grad for p in params])
                model.parallel_step.optimizer_step(model.scaler, 0.0, True)
                results[(flavor, name, precision)] = {
                    "weights": _storage_bytes(params), "gradients": gradients,
                    "optimizer": _optimizer_bytes(model.optimizer),
                    "communication": _communication_bytes(model.optimizer),
                    "activations": _activation_bytes(cfg, dims),
                }
    return results


def _activation_bytes(cfg, dims) -> int:
    from megatron_lite.training.setup import build_model_chunks

    if dims.pp == 1 or dims.is_first_stage:
        return saved_activation_bytes(cfg, dims)
    # a later stage receives the previous stage's hidden states in the weights' dtype
    chunk = build_model_chunks(cfg, dims)[0]
    b, t = cfg.train.micro_batch_size, cfg.model.seq_length
    dtype = next(chunk.parameters()).dtype
    inputs = torch.randn(b, t, cfg.model.hidden_size, dtype=dtype, requires_grad=True)
    return model_saved_bytes(chunk, cfg, inputs)


def test_state_bytes_equal_a_real_run_and_activations_the_saved_tensors():
    results = run_distributed(_real_allocations, 2)
    for flavor in FLAVORS:
        for name in REAL_LAYOUTS:
            for precision in PRECISIONS:
                plan = planner.plan_memory(_real_config(flavor, name, precision), 2)
                for rank, measured in enumerate(results):
                    tp_rank, _, pp_rank = coords_of(rank, plan.config.parallel.tp, plan.dp)
                    planned = next(r for r in plan.ranks if (r.tp_rank, r.pp_rank) == (tp_rank, pp_rank))
                    real = measured[(flavor, name, precision)]
                    where = f"{flavor} {name} {precision} rank {rank}"
                    assert (planned.weights, planned.gradients, planned.optimizer) == (
                        real["weights"], real["gradients"], real["optimizer"]), where
                    if plan.config.parallel.pp == 1:  # the pipeline's receive buffers are not measured
                        assert planned.communication == real["communication"], where
                    assert planned.activations_per_micro_batch == pytest.approx(real["activations"], rel=0.15), where
    padded = planner.plan_memory(_real_config("gpt2", "dp2_zero1_small_buckets", "fp32"), 2).ranks[0]
    assert padded.weights > 4 * padded.parameters  # the case above does pad


def test_compile_refusal_gives_the_training_message(monkeypatch):
    from megatron_lite.training.setup import check_compile

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = tiny("gpt2", "train.compile=true", "model.norm_backend=triton")
    expected = _message(lambda: check_compile(cfg))
    assert expected.startswith("train.compile=true cannot apply: model.norm_backend=triton")
    assert _message(lambda: planner.plan_memory(cfg, 1)) == expected
    planner.plan_memory(tiny("gpt2", "train.compile=true"), 1)  # the torch backends compile


# ----------------------------------------------------------------------------- context parallelism

CP_CASES = {  # name: overrides; each measured on both ranks of a cp=2 run
    f"{flavor} cp2 {mode}": FLAVORS[flavor] + ["parallel.cp=2", f"train.recompute={mode}"]
    for flavor in FLAVORS for mode in ("none", "selective", "full")
}
CP_CASES["llama cp2 none triton"] = FLAVORS["llama"] + ["parallel.cp=2", "model.attention_backend=triton"]


def _cp_saved_bytes(rank, world):
    from megatron_lite.training.activation_memory import saved_activation_bytes
    from megatron_lite.training.setup import setup_dims

    out = {}
    for name, overrides in CP_CASES.items():
        cfg = load_config(None, TINY + overrides)
        out[name] = saved_activation_bytes(cfg, setup_dims(cfg))
    return out


def test_context_parallel_activations_match_a_real_cp2_run():
    """Each cp rank holds 1 / cp of the tokens; without recompute each layer also keeps its K and V
    all-gathered over the whole sequence; parameters do not change with cp."""
    results = run_distributed(_cp_saved_bytes, 2)
    for name, overrides in CP_CASES.items():
        cfg = load_config(None, TINY + overrides)
        plan = planner.plan_memory(cfg, 2)
        single = planner.plan_memory(load_config(None, TINY + [o for o in overrides if "cp=" not in o]), 1)
        rank = plan.ranks[0]
        assert (rank.weights, rank.gradients, rank.optimizer) == (
            single.ranks[0].weights, single.ranks[0].gradients, single.ranks[0].optimizer), name
        assert rank.activations_per_micro_batch < single.ranks[0].activations_per_micro_batch, name
        for measured in results:
            assert rank.activations_per_micro_batch == pytest.approx(measured[name], rel=0.15), name
