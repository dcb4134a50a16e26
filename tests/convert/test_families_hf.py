"""Today's families in and out of Hugging Face: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3.

Like test_hf.py: tiny random models built by transformers (no downloads). Ours at (tp, pp) =
(2, 2) give transformers' logits; transformers' models converted to ours give their logits and
greedy tokens, and come back bit-identical with the same config; what we do not implement is
refused naming the key.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from megatron_lite.config import ModelConfig
from megatron_lite.convert import ConversionError, adapter_for_model, convert_from_hf, convert_to_hf
from megatron_lite.convert.hf import Adapter, adapter_class_for_hf
from megatron_lite.model.generation import generate
from megatron_lite.model.gpt import GPT
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.training.checkpoint import load_checkpoint, read_manifest
from tests.convert.conftest import randomize_
from tests.convert.workers import FAMILY_VARIANTS

HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
PROMPTS = [[5, 17, 3, 40, 8], [99, 12]]


def _tokens(vocab_size: int, length: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(3))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _safetensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def _hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    model.generation_config.eos_token_id = None  # ours runs without a stop token too
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- ours at (tp, pp) = (2, 2) -> HF


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_tp2_pp2_family_checkpoint_gives_transformers_logits_and_tokens(variant, tp2_pp2_checkpoints, tmp_path):
    manifest = read_manifest(tp2_pp2_checkpoints / variant)
    assert (manifest.layout.tp, manifest.layout.pp) == (2, 2)
    cfg = manifest.model_config()
    reference = GPT(cfg).eval()  # the same full weights at tp = pp = 1
    randomize_([reference], 1, 0, cfg.vocab_size, cfg.tie_embeddings)

    out = convert_to_hf(tp2_pp2_checkpoints / variant, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == HF_CLASS[cfg.flavor]
    assert model.config.tie_word_embeddings == cfg.tie_embeddings
    assert getattr(model.config, "head_dim", None) or cfg.hidden_size // cfg.num_heads == cfg.head_dim
    tokens = _tokens(cfg.vocab_size)
    with torch.no_grad():
        expected = reference(tokens)[..., : cfg.vocab_size]
        logits = model(tokens).logits
    assert logits.shape == (2, 16, cfg.vocab_size) and expected.std() > 0.1
    assert _max_diff(logits, expected) < 1e-4
    ours = generate(reference, PROMPTS, max_new_tokens=8, temperature=0)
    assert ours == [_hf_greedy(model, p, 8) for p in PROMPTS]


# ----------------------------------------------------------------------------- HF -> ours -> HF


def _hf_family(family: str, vocab_size: int):
    """A tiny random transformers model of the family, and whether it ties its embeddings."""
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    builders = {
        "llama2": lambda: LlamaForCausalLM(LlamaConfig(**common)),
        "llama3.1": lambda: LlamaForCausalLM(LlamaConfig(**common, rope_parameters=llama3)),
        "llama3.2-tied": lambda: LlamaForCausalLM(LlamaConfig(**common, rope_parameters=llama3,
                                                              tie_word_embeddings=True)),
        "llama-linear": lambda: LlamaForCausalLM(LlamaConfig(
            **common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
        "mistral-v0.3": lambda: MistralForCausalLM(MistralConfig(**common, sliding_window=None)),
        "qwen2.5-tied": lambda: Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)),
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common, head_dim=12)),
        "qwen3-yarn": lambda: Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8})),
    }
    torch.manual_seed(11)
    model = builders[family]()
    with torch.no_grad():  # norms off their ones, biases off their zeros
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


FAMILIES = ["llama2", "llama3.1", "llama3.2-tied", "llama-linear", "mistral-v0.3", "qwen2.5-tied", "qwen3",
            "qwen3-yarn"]
# Not the model: the token ids come from the tokenizer, the rest is bookkeeping.
CONFIG_BOOKKEEPING = {"bos_token_id", "eos_token_id", "pad_token_id", "dtype", "transformers_version", "_name_or_path"}


def _model_config_dict(directory) -> dict:
    return {k: v for k, v in AutoConfig.from_pretrained(directory).to_dict().items() if k not in CONFIG_BOOKKEEPING}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_family_to_ours_and_back(family, tmp_path, sentencepiece_dir):
    model = _hf_family(family, vocab_size=420)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    shutil.copy(sentencepiece_dir / "tokenizer.model", hf_dir / "tokenizer.model")
    originals = _safetensors(hf_dir)
    tokens = _tokens(420)
    with torch.no_grad():
        expected = model(tokens).logits

    ckpt = convert_from_hf(hf_dir, tmp_path / "ckpt", tp=2, pp=2)
    cfg = read_manifest(ckpt).model_config()
    assert cfg.flavor == type(model).__name__.removesuffix("ForCausalLM").lower()
    head_dim = getattr(model.config, "head_dim", None) or 32 // 4
    assert (cfg.head_dim, cfg.tie_embeddings) == (head_dim, model.config.tie_word_embeddings)
    assert (cfg.rope_scaling is None) == (model.config.rope_parameters["rope_type"] == "default")
    ours = GPT(cfg, seed=99).eval()
    load_checkpoint(ckpt, [ours], ParallelDims.single(), weights_only=True, padded_vocab_size=ours.padded_vocab_size)
    with torch.no_grad():
        logits = ours(tokens)[..., :420]
    assert _max_diff(logits, expected) < 1e-4 and expected.std() > 0.1
    assert generate(ours, PROMPTS, max_new_tokens=8, temperature=0) == [_hf_greedy(model, p, 8) for p in PROMPTS]

    back = convert_to_hf(ckpt, tmp_path / "back")
    round_trip = _safetensors(back)
    assert set(round_trip) == set(originals)
    for name, tensor in originals.items():
        assert round_trip[name].dtype == tensor.dtype and torch.equal(round_trip[name], tensor), name
    assert _model_config_dict(back) == _model_config_dict(hf_dir)


# ----------------------------------------------------------------------------- bad input


def _llama_like(**changes) -> dict:
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return {**hf, **changes}


MISTRAL = dict(architectures=["MistralForCausalLM"], model_type="mistral")
QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(MISTRAL, sliding_window=4096), r"sliding_window=4096 \(sliding-window attention is not implemented\)"),
        (MISTRAL, r"sliding_window=4096 \(left out: the default\) \(the mistral flavour has sliding_window=None\)"),
        (dict(QWEN2, use_sliding_window=True, sliding_window=64), r"sliding_window=64 \(sliding-window attention"),
        (dict(QWEN2, use_sliding_window=True), r"use_sliding_window=true \(sliding-window attention"),
        (dict(layer_types=["full_attention", "sliding_attention"]),
         r"layer_types with \['sliding_attention'\] \(only full attention is implemented\)"),
        (dict(num_local_experts=8), r"num_local_experts=8 \(mixture-of-experts layers is not implemented\)"),
        (dict(QWEN3, num_experts=4), r"num_experts=4 \(mixture-of-experts layers"),
        (dict(vision_config={"hidden_size": 8}), r"vision_config=\{'hidden_size': 8\} \(a vision tower"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 \(partial rotary embeddings"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
         r"rope_type='dynamic' \(implemented: default, linear, llama3, yarn\)"),
        (dict(rope_parameters={"rope_type": "longrope", "factor": 2.0}), r"rope_type='longrope'"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0, "finetuned": True}),
         r"rope_parameters.finetuned=True for rope_type='linear' \(implemented: factor\)"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "truncate": False}),
         r"rope_parameters.truncate=False for rope_type='yarn'"),
        (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
         r"model.rope_scaling.low_freq_factor is required for type=llama3"),
        (dict(QWEN3, attention_bias=True), r"attention_bias=True \(the qwen3 flavour has attention_bias=False\)"),
        (dict(attention_bias=True), r"attention_bias=True \(the llama flavour has attention_bias=False\)"),
    ],
)
def test_unimplemented_hugging_face_features_are_refused_naming_the_key(changes, message):
    hf = _llama_like(**changes)
    with pytest.raises(ConversionError, match=message):
        adapter_class_for_hf(hf).model_config(hf, 16)


def test_older_rope_scaling_files_read_like_rope_parameters():
    """Hub files written before transformers 5 keep rope_theta at the top and a rope_scaling mapping."""
    older = _llama_like(rope_theta=500000.0, rope_parameters=None, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})
    cfg = adapter_class_for_hf(older).model_config(older, 16)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 8.0
    qwen = _llama_like(**QWEN2, use_sliding_window=False, sliding_window=131072, max_window_layers=28)
    assert adapter_class_for_hf(qwen).model_config(qwen, 16).flavor == "qwen2"  # a window switched off is fine


def test_a_refused_config_stops_the_conversion_before_writing(tmp_path, sentencepiece_dir):
    hf_dir = tmp_path / "hf"
    _hf_family("mistral-v0.3", 420).save_pretrained(hf_dir)
    shutil.copy(sentencepiece_dir / "tokenizer.model", hf_dir / "tokenizer.model")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(ConversionError, match=r"unsupported Hugging Face config: sliding_window=16"):
        convert_from_hf(hf_dir, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_fields_outside_a_family_have_no_adapter():
    tiny = dict(num_layers=2, hidden_size=32, num_heads=4, vocab_size=64)
    refused = r"no Hugging Face adapter converts a {} model with model.{}"
    with pytest.raises(ConversionError, match=refused.format("llama", "qkv_bias=True")):
        adapter_for_model(ModelConfig(flavor="llama", qkv_bias=True, **tiny))
    with pytest.raises(ConversionError, match=refused.format("qwen2", "qk_norm=True")):
        adapter_for_model(ModelConfig(flavor="qwen2", qk_norm=True, **tiny))
    with pytest.raises(ConversionError, match=refused.format("gpt2", "head_dim=16")):
        adapter_for_model(ModelConfig(flavor="gpt2", head_dim=16, **tiny))
    adapters = {flavor: type(adapter_for_model(ModelConfig(flavor=flavor, **tiny))) for flavor in HF_CLASS}
    assert all(issubclass(cls, Adapter) and cls.architecture == HF_CLASS[f] for f, cls in adapters.items())
