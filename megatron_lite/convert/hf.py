"""Hugging Face <-> megatron-lite: one adapter per flavour, and the two streaming conversions.

An adapter knows the name and layout of every tensor on both sides for one flavour
(GPT-2 <-> ``GPT2LMHeadModel``, Llama 2/3/3.1/3.2 <-> ``LlamaForCausalLM``, Mistral <->
``MistralForCausalLM``, Qwen2/2.5 <-> ``Qwen2ForCausalLM``, Qwen3 dense <-> ``Qwen3ForCausalLM``;
the last four differ from Llama only in declared tensors and config keys) and converts one *group* at
a time: the embeddings, one transformer layer, or the final norm and head. The conversions
walk the groups in order, reading source tensors lazily and writing each group out before
the next is read, so only about one layer is ever held in memory twice.

Layout facts the adapters encode:
- our fused qkv rows are grouped per kv head, ``[q heads of group g, k_g, v_g]`` for each g;
  Hugging Face keeps q, k and v apart (Llama) or concatenated whole (GPT-2 ``c_attn``);
- GPT-2's ``Conv1D`` weights are stored (in, out), the transpose of a Linear;
- our SwiGLU ``fc`` is ``[gate; up]``; Qwen2's q/k/v biases fuse into ``qkv.bias`` like the weights;
- RoPE scaling is Hugging Face's ``rope_parameters`` (or the older ``rope_scaling``) under the same
  parameter names; features we do not implement (sliding windows, experts, vision towers, other RoPE
  types) are refused naming the key;
- both sides rotate (i, i + hd/2) pairs for RoPE (rotate-half), so q/k rows need no permutation;
- our vocabulary rows are padded; Hugging Face holds exactly ``vocab_size`` rows.
"""

from __future__ import annotations

import json
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch

from megatron_lite.config import (
    ROPE_SCALING_KEYS,
    ROPE_SCALING_TYPES,
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    RopeScaling,
    build_dataclass,
)
from megatron_lite.convert.hf_tokenizer import export_tokenizer, import_tokenizer
from megatron_lite.convert.tensor_io import (
    ConversionError,
    HFWeights,
    SafetensorsShardWriter,
    parse_size,
)

Getter = Callable[[str], torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- fused layouts


def split_qkv(fused: torch.Tensor, num_kv_heads: int, q_per_kv: int, head_dim: int):
    """Our grouped qkv rows (weight or bias) -> q (nh*hd, ...), k (nkv*hd, ...), v (nkv*hd, ...)."""
    rest = fused.shape[1:]
    grouped = fused.reshape(num_kv_heads, q_per_kv + 2, head_dim, *rest)
    q = grouped[:, :q_per_kv].reshape(num_kv_heads * q_per_kv * head_dim, *rest)
    k = grouped[:, q_per_kv].reshape(num_kv_heads * head_dim, *rest)
    v = grouped[:, q_per_kv + 1].reshape(num_kv_heads * head_dim, *rest)
    return q, k, v


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int, q_per_kv: int, head_dim: int):
    """The inverse of ``split_qkv``."""
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(num_kv_heads, q_per_kv, head_dim, *rest),
            k.reshape(num_kv_heads, 1, head_dim, *rest),
            v.reshape(num_kv_heads, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *rest)


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.t()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


# ----------------------------------------------------------------------------- adapters


class Adapter(ABC):
    """Tensor names and layouts for one flavour. Groups: "embedding", layer indices, "final"."""

    flavor = ""
    architecture = ""
    model_type = ""
    # (our name, hf name, our -> hf transform); the transforms are their own inverses
    embedding_pairs: tuple[tuple[str, str, Callable], ...] = ()
    layer_pairs: tuple[tuple[str, str, Callable], ...] = ()
    final_pairs: tuple[tuple[str, str, Callable], ...] = ()
    hf_embedding = ""  # the word embedding, whose rows lose our vocabulary padding
    hf_output = ""
    hf_layer_prefix = ""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.q_per_kv = cfg.num_heads // cfg.num_kv_heads

    # ---- groups ----

    def groups(self) -> list:
        return ["embedding", *range(self.cfg.num_layers), "final"]

    @staticmethod
    def group_of(our_name: str):
        if our_name.startswith("layers."):
            return int(our_name.split(".")[1])
        return "embedding" if our_name.startswith("embedding.") else "final"

    def _pairs(self, group):
        if group == "embedding":
            return list(self.embedding_pairs)
        if group == "final":
            return list(self.final_pairs)
        ours_prefix, hf_prefix = f"layers.{group}.", f"{self.hf_layer_prefix}{group}."
        return [(ours_prefix + ours, hf_prefix + hf, fn) for ours, hf, fn in self.layer_pairs]

    # ---- both directions ----

    def to_hf(self, group, ours: Getter) -> dict[str, torch.Tensor]:
        out = {hf: fn(ours(name)) for name, hf, fn in self._pairs(group)}
        if group == "embedding":
            out = {k: v[: self.cfg.vocab_size] if k == self.hf_embedding else v for k, v in out.items()}
        if isinstance(group, int):
            out.update(self.fused_to_hf(group, ours))
        if group == "final" and not self.cfg.tie_embeddings:
            out[self.hf_output] = ours("output.weight")[: self.cfg.vocab_size]
        return out

    def from_hf(self, group, hf: Getter) -> dict[str, torch.Tensor]:
        out = {name: fn(hf(hf_name)) for name, hf_name, fn in self._pairs(group)}
        if isinstance(group, int):
            out.update(self.fused_from_hf(group, hf))
        if group == "final" and not self.cfg.tie_embeddings:
            out["output.weight"] = hf(self.hf_output)
        return out

    def hf_names(self) -> list[str]:
        """Every tensor name the Hugging Face side holds (used to check an input is complete)."""
        names = [hf for g in self.groups() for _, hf, _ in self._pairs(g)]
        names += [n for g in range(self.cfg.num_layers) for n in self.fused_hf_names(g)]
        return names + ([] if self.cfg.tie_embeddings else [self.hf_output])

    # ---- per flavour ----

    @abstractmethod
    def fused_to_hf(self, layer: int, ours: Getter) -> dict[str, torch.Tensor]:
        """Hugging Face tensors of the layer's fused weights (qkv; SwiGLU fc)."""

    @abstractmethod
    def fused_from_hf(self, layer: int, hf: Getter) -> dict[str, torch.Tensor]:
        """Our fused weights of the layer from the Hugging Face tensors."""

    @abstractmethod
    def fused_hf_names(self, layer: int) -> list[str]:
        """Hugging Face names of the tensors behind the layer's fused weights."""

    @abstractmethod
    def hf_config(self, eos_id: int, pad_id: int, dtype: str) -> dict:
        """The ``config.json`` contents for this model."""

    @classmethod
    @abstractmethod
    def model_config(cls, hf: dict, make_vocab_size_divisible_by: int) -> ModelConfig:
        """Our ``ModelConfig`` from a ``config.json``; a setting we cannot reproduce exactly is an error."""


class GPT2Adapter(Adapter):
    flavor, architecture, model_type = "gpt2", "GPT2LMHeadModel", "gpt2"
    hf_embedding, hf_output, hf_layer_prefix = "transformer.wte.weight", "lm_head.weight", "transformer.h."
    embedding_pairs = (
        ("embedding.word.weight", "transformer.wte.weight", _same),
        ("embedding.position.weight", "transformer.wpe.weight", _same),
    )
    layer_pairs = (
        ("attention_norm.weight", "ln_1.weight", _same),
        ("attention_norm.bias", "ln_1.bias", _same),
        ("attention.proj.weight", "attn.c_proj.weight", _transpose),
        ("attention.proj.bias", "attn.c_proj.bias", _same),
        ("mlp_norm.weight", "ln_2.weight", _same),
        ("mlp_norm.bias", "ln_2.bias", _same),
        ("mlp.fc.weight", "mlp.c_fc.weight", _transpose),
        ("mlp.fc.bias", "mlp.c_fc.bias", _same),
        ("mlp.proj.weight", "mlp.c_proj.weight", _transpose),
        ("mlp.proj.bias", "mlp.c_proj.bias", _same),
    )
    final_pairs = (
        ("final_norm.weight", "transformer.ln_f.weight", _same),
        ("final_norm.bias", "transformer.ln_f.bias", _same),
    )

    def fused_hf_names(self, layer: int) -> list[str]:
        return [f"transformer.h.{layer}.attn.c_attn.weight", f"transformer.h.{layer}.attn.c_attn.bias"]

    def fused_to_hf(self, layer: int, ours: Getter) -> dict[str, torch.Tensor]:
        weight_name, bias_name = self.fused_hf_names(layer)
        heads = (self.cfg.num_kv_heads, self.q_per_kv, self.cfg.head_dim)
        weight = torch.cat(split_qkv(ours(f"layers.{layer}.attention.qkv.weight"), *heads))  # (3H, H): [Q; K; V]
        bias = torch.cat(split_qkv(ours(f"layers.{layer}.attention.qkv.bias"), *heads))
        return {weight_name: weight.t(), bias_name: bias}  # Conv1D: (in, out)

    def fused_from_hf(self, layer: int, hf: Getter) -> dict[str, torch.Tensor]:
        weight_name, bias_name = self.fused_hf_names(layer)
        heads = (self.cfg.num_kv_heads, self.q_per_kv, self.cfg.head_dim)
        weight = hf(weight_name).t()  # (3H, H)
        return {
            f"layers.{layer}.attention.qkv.weight": fuse_qkv(*weight.chunk(3), *heads),
            f"layers.{layer}.attention.qkv.bias": fuse_qkv(*hf(bias_name).chunk(3), *heads),
        }

    def hf_config(self, eos_id: int, pad_id: int, dtype: str) -> dict:
        c = self.cfg
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": c.vocab_size, "n_positions": c.seq_length, "n_embd": c.hidden_size,
            "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": c.ffn_hidden_size,
            "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "initializer_range": c.init_std, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": c.tie_embeddings, "use_cache": True,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "dtype": dtype,
        }

    @classmethod
    def model_config(cls, hf: dict, make_vocab_size_divisible_by: int) -> ModelConfig:
        activation = hf.get("activation_function", "gelu_new")
        _supported(activation in ("gelu_new", "gelu_pytorch_tanh"),
                   f"activation_function={activation!r} (the gpt2 flavour uses the tanh GELU, gelu_new)")
        _supported(not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true")
        _supported(hf.get("scale_attn_weights", True), "scale_attn_weights=false")
        hidden = _field(hf, "n_embd")
        return _model_config(
            flavor="gpt2", num_layers=_field(hf, "n_layer"), hidden_size=hidden, num_heads=_field(hf, "n_head"),
            ffn_hidden_size=hf.get("n_inner") or 4 * hidden, seq_length=_field(hf, "n_positions"),
            vocab_size=_field(hf, "vocab_size"), tie_embeddings=hf.get("tie_word_embeddings", True),
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), init_std=hf.get("initializer_range", 0.02),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        )


class LlamaAdapter(Adapter):
    """Llama 2 / 3 / 3.1 / 3.2 (``LlamaForCausalLM``), and the base of the llama-structured families:
    each subclass names its architecture and adds its tensors and config keys."""

    flavor, architecture, model_type = "llama", "LlamaForCausalLM", "llama"
    hf_embedding, hf_output, hf_layer_prefix = "model.embed_tokens.weight", "lm_head.weight", "model.layers."
    embedding_pairs = (("embedding.word.weight", "model.embed_tokens.weight", _same),)
    layer_pairs = (
        ("attention_norm.weight", "input_layernorm.weight", _same),
        ("attention.proj.weight", "self_attn.o_proj.weight", _same),
        ("mlp_norm.weight", "post_attention_layernorm.weight", _same),
        ("mlp.proj.weight", "mlp.down_proj.weight", _same),
    )
    final_pairs = (("final_norm.weight", "model.norm.weight", _same),)
    qkv_bias = False  # q_proj / k_proj / v_proj carry biases (fused into our qkv.bias)
    # Written into config.json besides the common keys; on import, keys whose values must be these.
    family_hf_config: dict = {"attention_bias": False, "mlp_bias": False}
    # What transformers assumes for those keys when a config.json leaves them out.
    hf_defaults: dict = {"attention_bias": False, "mlp_bias": False}
    config_has_head_dim = True  # the config class declares head_dim (Qwen2's reads it only when present)

    def _qkv_names(self, layer: int, kind: str) -> list[str]:
        return [f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]

    def fused_hf_names(self, layer: int) -> list[str]:
        qkv = [name for kind in self._qkv_kinds() for name in self._qkv_names(layer, kind)]
        return qkv + [f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up")]

    def _qkv_kinds(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.qkv_bias else ("weight",)

    def fused_to_hf(self, layer: int, ours: Getter) -> dict[str, torch.Tensor]:
        heads = (self.cfg.num_kv_heads, self.q_per_kv, self.cfg.head_dim)
        out = {}
        for kind in self._qkv_kinds():
            q, k, v = split_qkv(ours(f"layers.{layer}.attention.qkv.{kind}"), *heads)
            out.update(zip(self._qkv_names(layer, kind), (q, k, v)))
        gate, up = ours(f"layers.{layer}.mlp.fc.weight").chunk(2)
        mlp = f"model.layers.{layer}.mlp."
        return {**out, mlp + "gate_proj.weight": gate, mlp + "up_proj.weight": up}

    def fused_from_hf(self, layer: int, hf: Getter) -> dict[str, torch.Tensor]:
        heads = (self.cfg.num_kv_heads, self.q_per_kv, self.cfg.head_dim)
        mlp = f"model.layers.{layer}.mlp."
        out = {f"layers.{layer}.mlp.fc.weight": torch.cat([hf(mlp + "gate_proj.weight"), hf(mlp + "up_proj.weight")])}
        for kind in self._qkv_kinds():
            q, k, v = (hf(name) for name in self._qkv_names(layer, kind))
            out[f"layers.{layer}.attention.qkv.{kind}"] = fuse_qkv(q, k, v, *heads)
        return out

    def hf_config(self, eos_id: int, pad_id: int, dtype: str) -> dict:
        c = self.cfg
        rope = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_scaling is not None:
            rope = {"rope_type": c.rope_scaling.type, "rope_theta": c.rope_theta, **_scaling_parameters(c.rope_scaling)}
        head_dim = {"head_dim": c.head_dim}
        if not self.config_has_head_dim and c.head_dim * c.num_heads == c.hidden_size:
            head_dim = {}
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, **head_dim, "hidden_act": "silu",
            "max_position_embeddings": c.seq_length, "rms_norm_eps": c.norm_eps, "initializer_range": c.init_std,
            "rope_theta": c.rope_theta, "rope_parameters": rope, **self.family_hf_config,
            "attention_dropout": c.dropout, "tie_word_embeddings": c.tie_embeddings, "use_cache": True,
            "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "dtype": dtype,
        }

    @classmethod
    def model_config(cls, hf: dict, make_vocab_size_divisible_by: int) -> ModelConfig:
        activation = hf.get("hidden_act", "silu")
        _supported(activation == "silu", f"hidden_act={activation!r} (the {cls.flavor} flavour uses SwiGLU with silu)")
        _refuse_unimplemented_features(hf)
        for key, value in cls.family_hf_config.items():
            given = hf.get(key, cls.hf_defaults[key])
            _supported(given == value, f"{key}={given!r}{'' if key in hf else ' (left out: the default)'} "
                                       f"(the {cls.flavor} flavour has {key}={value!r})")
        theta, scaling = _rope_from_hf(hf)
        hidden, heads = _field(hf, "hidden_size"), _field(hf, "num_attention_heads")
        return _model_config(
            flavor=cls.flavor, num_layers=_field(hf, "num_hidden_layers"), hidden_size=hidden, num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hidden // heads,
            ffn_hidden_size=_field(hf, "intermediate_size"), seq_length=_field(hf, "max_position_embeddings"),
            vocab_size=_field(hf, "vocab_size"), tie_embeddings=hf.get("tie_word_embeddings", False),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            init_std=hf.get("initializer_range", 0.02),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        )


class MistralAdapter(LlamaAdapter):
    """Mistral v0.3-style (``MistralForCausalLM``): the llama structure, without a sliding window."""

    flavor, architecture, model_type = "mistral", "MistralForCausalLM", "mistral"
    # MistralConfig's own default window is 4096: null must be written to mean full attention.
    family_hf_config, hf_defaults = {"sliding_window": None}, {"sliding_window": 4096}


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): biases on q, k and v only."""

    flavor, architecture, model_type = "qwen2", "Qwen2ForCausalLM", "qwen2"
    qkv_bias = True
    family_hf_config = hf_defaults = {"use_sliding_window": False}
    config_has_head_dim = False


class Qwen3Adapter(LlamaAdapter):
    """Qwen3 dense (``Qwen3ForCausalLM``): RMSNorm over each q and k head, head_dim set on its own."""

    flavor, architecture, model_type = "qwen3", "Qwen3ForCausalLM", "qwen3"
    layer_pairs = LlamaAdapter.layer_pairs + (
        ("attention.q_norm.weight", "self_attn.q_norm.weight", _same),
        ("attention.k_norm.weight", "self_attn.k_norm.weight", _same),
    )
    family_hf_config = hf_defaults = {"attention_bias": False, "use_sliding_window": False}


ADAPTERS: dict[str, type[Adapter]] = {
    cls.flavor: cls for cls in (GPT2Adapter, LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter)
}
BY_ARCHITECTURE = {cls.architecture: cls for cls in ADAPTERS.values()}
# Hugging Face keys of features we do not implement: any of them set (not null, false, 0 or empty) is refused.
UNIMPLEMENTED_KEYS = {
    "sliding_window": "sliding-window attention",
    "num_experts": "mixture-of-experts layers", "num_local_experts": "mixture-of-experts layers",
    "n_routed_experts": "mixture-of-experts layers", "num_experts_per_tok": "mixture-of-experts layers",
    "moe_intermediate_size": "mixture-of-experts layers",
    "vision_config": "a vision tower", "vision_tower": "a vision tower", "text_config": "a multimodal wrapper",
    "partial_rotary_factor": "partial rotary embeddings",
}


def _refuse_unimplemented_features(hf: dict) -> None:
    for key, feature in UNIMPLEMENTED_KEYS.items():
        value = hf.get(key)
        if key == "sliding_window" and hf.get("use_sliding_window") is False:
            continue  # Qwen keeps a window size that only use_sliding_window=true switches on
        if key == "partial_rotary_factor" and value == 1.0:
            continue
        _supported(not value, f"{key}={value!r} ({feature} is not implemented)")
    _supported(not hf.get("use_sliding_window"),
               "use_sliding_window=true (sliding-window attention is not implemented)")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    _supported(kinds == {"full_attention"},
               f"layer_types with {sorted(kinds - {'full_attention'})} (only full attention is implemented)")


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and our scaling from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older files;
    it wins where both are present, as in transformers)."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    _supported(rope_type in ("default", *ROPE_SCALING_TYPES),
               f"rope_type={rope_type!r} (implemented: default, {', '.join(ROPE_SCALING_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) == 1.0:
        params.pop("partial_rotary_factor", None)
    if params.get("truncate", True) is True:  # transformers' yarn default; false is not implemented
        params.pop("truncate", None)
    if rope_type == "default":
        for key in params:
            _supported(False, f"rope_parameters.{key} with rope_type='default'")
        return theta, None
    for key in params:
        _supported(key in ROPE_SCALING_KEYS[rope_type], f"rope_parameters.{key}={params[key]!r} for rope_type="
                   f"{rope_type!r} (implemented: {', '.join(ROPE_SCALING_KEYS[rope_type])})")
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", _field(hf, "max_position_embeddings"))
    if rope_type == "yarn" and params.get("factor") is None:  # transformers infers it from the two lengths
        params["factor"] = _field(hf, "max_position_embeddings") / params["original_max_position_embeddings"]
    fields = {k: v for k, v in params.items() if v is not None}
    try:
        return theta, build_dataclass(RopeScaling, {"type": rope_type, **fields}, "model.rope_scaling")
    except ConfigError as exc:
        raise ConversionError(f"the Hugging Face RoPE parameters do not make a valid scaling: {exc}") from exc


def _scaling_parameters(scaling: RopeScaling) -> dict:
    """Our scaling's set parameters under Hugging Face's names (the same names)."""
    return {key: getattr(scaling, key) for key in ROPE_SCALING_KEYS[scaling.type] if getattr(scaling, key) is not None}


def _supported(condition: bool, what: str) -> None:
    if not condition:
        raise ConversionError(f"unsupported Hugging Face config: {what}; this model cannot be converted exactly")


def _field(hf: dict, key: str):
    if hf.get(key) is None:
        raise ConversionError(f"config.json has no {key!r}; is it a complete Hugging Face config?")
    return hf[key]


def _model_config(**fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ConversionError(f"the Hugging Face config does not make a valid model: {exc}") from exc


def adapter_for_model(cfg: ModelConfig) -> Adapter:
    """The adapter of the model's family; each converts its family only as the flavor preset defines it."""
    changed = cfg.differs_from_preset()
    if cfg.flavor == "gpt2" and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        changed.append("head_dim")  # GPT-2's config has no head size of its own
    if changed:
        fields = ", ".join(f"model.{name}={getattr(cfg, name)!r}" for name in changed)
        raise ConversionError(f"no Hugging Face adapter converts a {cfg.flavor} model with {fields}; the "
                              f"{', '.join(f for f in ADAPTERS if f != 'gpt2')} adapters take head_dim, "
                              f"rope_scaling and tied embeddings, and each family only as its preset defines it")
    return ADAPTERS[cfg.flavor](cfg)


def adapter_class_for_hf(hf_config: dict) -> type[Adapter]:
    """The adapter for a Hugging Face ``config.json``; an unsupported architecture says which are supported."""
    architectures = hf_config.get("architectures") or []
    supported = ", ".join(BY_ARCHITECTURE)
    if architectures:
        if len(architectures) != 1 or architectures[0] not in BY_ARCHITECTURE:
            raise ConversionError(
                f"unsupported Hugging Face architecture {architectures}; supported: {supported} "
                f"(a base model without a language-model head cannot be converted either)"
            )
        return BY_ARCHITECTURE[architectures[0]]
    model_type = hf_config.get("model_type")
    if model_type not in ADAPTERS:
        raise ConversionError(f"unsupported Hugging Face model_type {model_type!r}; supported: {supported}")
    return ADAPTERS[model_type]


# ----------------------------------------------------------------------------- megatron-lite -> HF


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    # clone: a view would drag its whole source storage along; contiguous: safetensors needs it
    return {k: (v.to(dtype) if dtype is not None else v).contiguous().clone() for k, v in tensors.items()}


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _prepare_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConversionError(f"output {output} already exists and is not empty; choose a new or empty directory")
    output.mkdir(parents=True, exist_ok=True)


def convert_to_hf(load: str | Path, output: str | Path, max_shard_size: str | int = "5GB",
                  dtype: str = "auto") -> Path:
    """Write a megatron-lite checkpoint (any tp/pp/dp layout) as a Hugging Face model directory."""
    from megatron_lite.training.checkpoint import ShardReader

    source = ShardReader(load)
    if any(name.startswith("value_head.") for name in source.manifest.params):
        raise ConversionError(
            f"{source.directory} holds a value head (a reward model or PPO critic), not a language model; the "
            f"Hugging Face export writes causal language models (GPT-2, Llama): convert an SFT, DPO, PPO or "
            f"pretraining checkpoint"
        )
    cfg = source.manifest.model_config()
    target_dtype, max_bytes = _dtype(dtype), parse_size(max_shard_size)
    output = Path(output)
    _prepare_output(output)
    special = export_tokenizer(source.directory / "tokenizer", output, cfg.vocab_size)
    adapter = adapter_for_model(cfg)
    writer = SafetensorsShardWriter(output, max_bytes)
    saved_dtype = None
    for group in adapter.groups():
        tensors = _cast(adapter.to_hf(group, source.__getitem__), target_dtype)
        saved_dtype = saved_dtype or next(iter(tensors.values())).dtype
        writer.add(tensors)
    writer.close()
    dtype_name = str(saved_dtype).replace("torch.", "")
    _write_json(output / "config.json", adapter.hf_config(special["eos"], special["pad"], dtype_name))
    _write_json(output / "generation_config.json",
                {"bos_token_id": special["eos"], "eos_token_id": special["eos"], "pad_token_id": special["pad"]})
    return output


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- HF -> megatron-lite


class HFStateView:
    """Our full (tp = 1) state dict, converted from Hugging Face tensors one group at a time
    on first use; only the latest group stays cached (the checkpoint writer asks in layer order)."""

    def __init__(self, adapter: Adapter, source: HFWeights, dtype: torch.dtype | None):
        self.adapter, self.source, self.dtype = adapter, source, dtype
        self._group, self._tensors = None, {}

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        group = self.adapter.group_of(name)
        if group != self._group:
            self._tensors = self.adapter.from_hf(group, self.source.__getitem__)
            if self.dtype is not None:
                self._tensors = {k: v.to(self.dtype) for k, v in self._tensors.items()}
            self._group = group
        return self._tensors

    def __contains__(self, name: str) -> bool:
        return name in self._load(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._load(name)[name]


def convert_from_hf(hf_dir: str | Path, output: str | Path, tp: int = 1, pp: int = 1, dtype: str = "auto",
                    make_vocab_size_divisible_by: int = 128, iteration: int = 0) -> Path:
    """Write a Hugging Face model directory as a megatron-lite checkpoint at layout (tp, pp);
    returns the iteration directory. The tokenizer is carried into the checkpoint."""
    from megatron_lite.model.layout_check import validate_layout
    from megatron_lite.training.checkpoint import save_full_state_dict

    source = HFWeights(hf_dir)
    adapter_class = adapter_class_for_hf(source.config)
    model_cfg = adapter_class.model_config(source.config, make_vocab_size_divisible_by)
    adapter = adapter_class(model_cfg)
    target_dtype = _dtype(dtype)
    parallel = ParallelConfig(tp=tp, pp=pp)
    validate_layout(parallel, model_cfg, tp * pp)
    source.check_complete(adapter.hf_names())
    config = Config(model=model_cfg, parallel=parallel).to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = import_tokenizer(Path(hf_dir), Path(tmp) / "tokenizer", model_cfg.vocab_size)
        state = HFStateView(adapter, source, target_dtype)
        return save_full_state_dict(state, config, output, tp, pp, tokenizer_dir=tokenizer_dir, iteration=iteration)


__all__ = [
    "ADAPTERS", "Adapter", "ConversionError", "GPT2Adapter", "HFStateView", "LlamaAdapter", "MistralAdapter",
    "Qwen2Adapter", "Qwen3Adapter", "adapter_class_for_hf",
    "adapter_for_model", "convert_from_hf", "convert_to_hf", "fuse_qkv", "split_qkv",
]
