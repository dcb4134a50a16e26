"""The new model fields train at tensor-parallel layouts exactly as in one process.

q/k/v biases shard by column with the qkv weight (their k and v rows copied when tp exceeds the
kv heads); the per-head q/k norm weights are whole on every tp rank and their gradients summed
over tp; a head_dim other than hidden / heads sizes q, k, v and the output projection. One gloo
launch (world 4) runs every layout; the single-process references run in this process, with the
same checks (losses, grad norms, validation loss, final weights) as tests/parallel/test_parity.py.
"""

from __future__ import annotations

import pytest

from megatron_lite.config import load_config
from tests.distributed import run_distributed
from tests.parallel.test_parity import BASE, _check_against_reference, _grad_norms, _run_dir, _train

YARN = "model.rope_scaling={type: yarn, factor: 2.0, original_max_position_embeddings: 16}"
MODELS = {  # name: overrides of the model, each trained once in one process as the reference
    "qwen2 yarn": ["model.flavor=qwen2", "model.num_kv_heads=2", YARN],
    "qwen3 head_dim 24": ["model.flavor=qwen3", "model.num_kv_heads=2", "model.head_dim=24"],
    "qwen3 head_dim 24 qkv_bias": ["model.flavor=qwen3", "model.num_kv_heads=2", "model.head_dim=24",
                                   "model.qkv_bias=true"],
}
LAYOUTS = {  # name: (model, parallel overrides); world 4, so dp = 4 / (tp pp)
    "qwen2 yarn tp2 dp2": ("qwen2 yarn", ["parallel.tp=2"]),
    "qwen3 head_dim 24 tp2 pp2": ("qwen3 head_dim 24", ["parallel.tp=2", "parallel.pp=2"]),
    "qwen3 head_dim 24 tp2 sequence-parallel zero1 dp2": (
        "qwen3 head_dim 24", ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero1=true"]),
    "qwen3 qkv_bias tp4 (kv heads copied)": ("qwen3 head_dim 24 qkv_bias", ["parallel.tp=4"]),
}


def _config(root: str, name: str, overrides: list[str]):
    run = _run_dir(root, name)
    return load_config(None, BASE + overrides + [f"log.dir={run}/log", f"checkpoint.save={run}/checkpoint"])


def _train_layouts(rank: int, world_size: int, root: str) -> dict:
    from megatron_lite.training.setup import setup_dims

    out = {}
    for name, (model, parallel) in LAYOUTS.items():
        cfg = _config(root, name, MODELS[model] + parallel)
        out[name] = _train(cfg, setup_dims(cfg))
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("reference"))
    out = {}
    for model, overrides in MODELS.items():
        out[model] = {**_train(_config(root, model, overrides), None), "grad_norms": _grad_norms(root, model)}
    return out


def test_new_fields_at_tensor_parallel_layouts_match_one_process(references, tmp_path):
    names = {n for model in MODELS for n in references[model]["params"]}
    assert {"layers.0.attention.q_norm.weight", "layers.0.attention.qkv.bias"} <= names
    results = run_distributed(_train_layouts, 4, str(tmp_path))
    for name, (model, _) in LAYOUTS.items():
        _check_against_reference(name, model, [r[name] for r in results], str(tmp_path), references)
