"""Configuration: one dataclass per concern, YAML <-> dataclass, dotted CLI overrides.

A YAML file has one top-level section per dataclass (``model:``, ``parallel:``, ...).
Command-line overrides are ``section.key=value`` strings parsed as YAML scalars, so
``parallel.tp=2`` gives an int and ``model.flavor=llama`` a string. Each dataclass
validates itself in ``__post_init__``; cross-section checks live in ``Config``.
Unknown keys and wrong types are errors that name the key, the nearest valid key,
and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_lite.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-caused configuration problem; the message says what to change."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    _require(value in options, f"{name}={value!r} is not one of {', '.join(options)}")


# Structure fields a flavor preset fills when the user leaves them unset (None). A new model family is a
# new preset; a new structural choice (qkv bias, qk-norm, RoPE scaling) is a new field here and in gpt.py.
_LLAMA = dict(bias=False, norm="rmsnorm", activation="swiglu", position_embedding="rope", tie_embeddings=False)
FLAVOR_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(bias=True, norm="layernorm", activation="gelu", position_embedding="learned", tie_embeddings=True),
    "llama": _LLAMA,
    # The llama structure plus fields; a preset of their own names the family for the Hugging Face export.
    "mistral": _LLAMA,
    "qwen2": dict(_LLAMA, qkv_bias=True),
    "qwen3": dict(_LLAMA, qk_norm=True),
}
# Structure fields that are off unless a preset or the user turns them on.
STRUCTURE_DEFAULTS: dict[str, Any] = dict(qkv_bias=False, qk_norm=False)
ROPE_SCALING_TYPES = ("linear", "llama3", "yarn")
# The parameters each scaling type reads (Hugging Face's names); any other key given is refused.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor"),
}
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "swiglu")
POSITION_EMBEDDINGS = ("learned", "rope")
RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class RopeScaling:
    """RoPE scaling for contexts longer than pretraining, with Hugging Face's parameters (null = unset).

    linear: every inverse frequency / factor. llama3 (Llama 3.1): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are divided by factor, shorter than
    .. / high_freq_factor kept, those between interpolated. yarn: interpolation ramped between the
    beta_fast and beta_slow rotation counts, and cos/sin scaled by attention_factor (default from
    factor, mscale and mscale_all_dim)."""

    type: str = "linear"  # linear | llama3 | yarn
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        _choice("model.rope_scaling.type", self.type, ROPE_SCALING_TYPES)
        allowed = ROPE_SCALING_KEYS[self.type]
        for f in dataclasses.fields(self):
            if f.name != "type" and f.name not in allowed and getattr(self, f.name) != f.default:
                raise ConfigError(f"model.rope_scaling.{f.name} does not apply to type={self.type}; "
                                  f"{self.type} takes {', '.join(allowed)}")
        _require(self.factor >= 1, f"model.rope_scaling.factor must be >= 1, got {self.factor}")
        if self.type == "llama3":
            for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                _require(getattr(self, name) is not None, f"model.rope_scaling.{name} is required for type=llama3")
            _require(0 < self.low_freq_factor < self.high_freq_factor,
                     f"model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                     f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.type == "yarn":
            _require(self.original_max_position_embeddings is not None,
                     "model.rope_scaling.original_max_position_embeddings is required for type=yarn")
        _require(self.original_max_position_embeddings is None or self.original_max_position_embeddings > 0,
                 "model.rope_scaling.original_max_position_embeddings must be positive")


@dataclass
class ModelConfig:
    flavor: str = "gpt2"  # gpt2 | llama | mistral | qwen2 | qwen3: a preset for the structure fields left unset
    num_layers: int = 4
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: same as num_heads (no grouped-query attention)
    ffn_hidden_size: int | None = None  # None: 4h for gelu, SwiGLU's 8h/3 rounded to 64 for swiglu
    seq_length: int = 256
    vocab_size: int = 0  # 0: taken from the tokenizer
    make_vocab_size_divisible_by: int = 128
    dropout: float = 0.0
    # Structure; None takes the flavor's preset.
    bias: bool | None = None  # biases on the attention and MLP linears (layernorm always has one)
    norm: str | None = None  # layernorm | rmsnorm
    activation: str | None = None  # gelu (tanh approximation) | swiglu (fused gate and up projection)
    position_embedding: str | None = None  # learned (a table of seq_length rows) | rope
    tie_embeddings: bool | None = None  # the output head reuses the word embedding
    qkv_bias: bool | None = None  # biases on the q, k, v projections only (Qwen2); bias=true implies them
    qk_norm: bool | None = None  # RMSNorm over each q and k head (weights of head_dim) before RoPE (Qwen3)
    head_dim: int | None = None  # None: hidden_size / num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # {type: linear | llama3 | yarn, factor, ...}; None: plain RoPE
    init_std: float = 0.02
    attention_backend: str = "torch"  # torch | triton | flash_attn
    norm_backend: str = "torch"  # torch | triton | apex
    loss_backend: str = "torch"  # torch | triton (fused vocab-parallel cross-entropy, no fp32 logits copy)
    elementwise_backend: str = "torch"  # torch | triton (fused SwiGLU and rotary embedding)

    def __post_init__(self) -> None:
        _choice("model.flavor", self.flavor, tuple(FLAVOR_PRESETS))
        self._fill_from_preset()
        self._validate_structure()
        from megatron_lite.kernels import backends  # here, not at the top: importing the kernels imports torch

        for kind in backends.KINDS:
            _choice(f"model.{kind}_backend", getattr(self, f"{kind}_backend"), backends.choices(kind))
        for name in ("num_layers", "hidden_size", "num_heads", "seq_length", "make_vocab_size_divisible_by"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        _require(self.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = from tokenizer), got {self.vocab_size}")
        self._validate_heads()
        if self.ffn_hidden_size is None:
            if self.activation == "gelu":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 64 * ((8 * self.hidden_size // 3 + 63) // 64)
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")

    def _fill_from_preset(self) -> None:
        for name, value in {**STRUCTURE_DEFAULTS, **FLAVOR_PRESETS[self.flavor]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _validate_structure(self) -> None:
        _choice("model.norm", self.norm, NORMS)
        _choice("model.activation", self.activation, ACTIVATIONS)
        _choice("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        if isinstance(self.rope_scaling, dict):  # built in code rather than read from YAML
            self.rope_scaling = build_dataclass(RopeScaling, self.rope_scaling, "model.rope_scaling")
        _require(
            self.rope_scaling is None or self.position_embedding == "rope",
            "model.rope_scaling scales rotary embeddings, but model.position_embedding="
            f"{self.position_embedding!r}; set position_embedding=rope or rope_scaling=null",
        )

    def _validate_heads(self) -> None:
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_heads == 0,
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                f"choose a head count that divides the hidden size, or set model.head_dim",
            )
            self.head_dim = self.hidden_size // self.num_heads
            head_dim_source = f"hidden_size / num_heads = {self.hidden_size} / {self.num_heads}"
        else:
            _require(self.head_dim > 0, f"model.head_dim must be positive (or null), got {self.head_dim}")
            head_dim_source = f"model.head_dim = {self.head_dim}"
        _require(
            self.position_embedding != "rope" or self.head_dim % 2 == 0,
            f"model.position_embedding=rope rotates pairs of head dimensions, but the head dim "
            f"({head_dim_source}) is odd; choose an even head dim or position_embedding=learned",
        )
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        _require(self.num_kv_heads > 0, f"model.num_kv_heads must be positive, got {self.num_kv_heads}")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.num_kv_heads}; "
            f"grouped-query attention needs a whole number of query heads per kv head",
        )
        if self.flavor == "gpt2":
            _require(
                self.num_kv_heads == self.num_heads,
                "model.num_kv_heads must equal model.num_heads for the gpt2 flavor (no grouped-query attention)",
            )

    def differs_from_preset(self) -> list[str]:
        """Structure fields whose value is not the flavor preset's (tie_embeddings aside: every family allows
        either), for code that supports a family only as its preset defines it (the Hugging Face adapters)."""
        preset = {**STRUCTURE_DEFAULTS, **FLAVOR_PRESETS[self.flavor]}
        return [name for name, value in preset.items() if name != "tie_embeddings" and getattr(self, name) != value]


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1  # context parallel: each sample's sequence split over cp ranks (2 load-balanced chunks each)
    pp: int = 1
    virtual_pp: int = 1  # model chunks per pipeline stage (interleaved 1F1B when > 1)
    pipeline_schedule: str = "1f1b"  # 1f1b | afab (all-forward-all-backward, the reference)
    stage_layers: list[int] | None = None  # explicit layers per (virtual) stage; None = even split
    sequence_parallel: bool = False
    zero1: bool = False
    bucket_size_mb: float = 25.0
    timeout_s: float = 600.0
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "virtual_pp"):
            _require(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        _choice("parallel.pipeline_schedule", self.pipeline_schedule, ("1f1b", "afab"))
        _require(
            not (self.pipeline_schedule == "afab" and self.virtual_pp > 1),
            f"parallel.pipeline_schedule=afab runs one model chunk per stage, but parallel.virtual_pp="
            f"{self.virtual_pp}; use pipeline_schedule=1f1b (interleaved) or virtual_pp=1",
        )
        _choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        _require(self.timeout_s > 0, f"parallel.timeout_s must be positive, got {self.timeout_s}")
        _require(self.bucket_size_mb > 0, f"parallel.bucket_size_mb must be positive, got {self.bucket_size_mb}")


@dataclass
class MixtureEntry:
    prefix: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _require(self.weight > 0, f"data.mixture weight for {self.prefix!r} must be positive, got {self.weight}")


@dataclass
class DataConfig:
    tokenizer: str = ""  # tokenizer directory
    mixture: list[MixtureEntry] = field(default_factory=list)  # [{prefix, weight}, ...]
    split: str = "949,50,1"  # train, valid, test weights over documents
    cache_dir: str = ""  # index cache; "" = next to the first prefix
    demo: bool = False  # build the standard-library demo corpus when the data is missing
    demo_dir: str = "data/demo"
    demo_vocab_size: int = 2048
    # Packed samples attend only within each document (split at EOD tokens), positions restart per document.
    document_mask: bool = False

    def __post_init__(self) -> None:
        self.mixture = [m if isinstance(m, MixtureEntry) else MixtureEntry(**m) for m in self.mixture]
        parts = self.split.replace("/", ",").split(",")
        _require(
            len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
            f"data.split={self.split!r} must be three comma-separated weights such as '949,50,1'",
        )
        _require(sum(float(p) for p in parts) > 0, f"data.split={self.split!r} must not be all zeros")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: train.max_steps
    wsd_decay_fraction: float = 0.2  # the final fraction of steps that decays (wsd only)
    fused: str = "auto"  # auto | torch | apex | none

    def __post_init__(self) -> None:
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant", "wsd"))
        _choice("optim.fused", self.fused, ("auto", "torch", "apex", "none"))
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 < self.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction must be in (0, 1]")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        _require(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _require(
            self.decay_steps is None or self.decay_steps > 0,
            f"optim.decay_steps must be positive (or null for train.max_steps), got {self.decay_steps}",
        )


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    max_steps: int = 100
    max_tokens: int = 0  # 0: no token budget; otherwise stop once this many tokens were trained
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 1234
    eval_interval: int = 50  # 0 disables validation
    eval_steps: int = 4
    initial_loss_scale: float = 2.0**16
    loss_scale_window: int = 1000
    max_skipped_steps: int = 20  # fp16: stop the run after this many overflow-skipped steps in a row
    min_loss_scale: float = 1.0  # fp16: stop the run when the loss scale is halved below this
    loss_spike_factor: float = 0.0  # warn when a step's loss exceeds this x the recent mean; 0 = off
    device: str = "auto"  # auto | cpu | cuda
    recompute: str = "none"  # none | selective (attention core, MLP activation) | full (whole layers)
    recompute_layers: int | None = None  # full: recompute the first N layers of each pipeline chunk; None = all
    compile: bool = False  # torch.compile each transformer layer (regional compilation)

    def __post_init__(self) -> None:
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("train.recompute", self.recompute, RECOMPUTE_MODES)
        _require(self.recompute_layers is None or self.recompute == "full",
                 f"train.recompute_layers={self.recompute_layers} applies only to train.recompute=full "
                 f"(got train.recompute={self.recompute}); set train.recompute=full or drop train.recompute_layers")
        _require(self.recompute_layers is None or self.recompute_layers > 0,
                 f"train.recompute_layers must be a positive number of layers or null (all), got {self.recompute_layers}")
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        for name in ("micro_batch_size", "global_batch_size", "max_steps"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            f"train.global_batch_size={self.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={self.micro_batch_size}",
        )
        _require(self.max_tokens >= 0, f"train.max_tokens must be >= 0 (0 = no token budget), got {self.max_tokens}")
        _require(self.eval_interval >= 0, f"train.eval_interval must be >= 0 (0 = never), got {self.eval_interval}")
        _require(self.eval_steps > 0, f"train.eval_steps must be positive, got {self.eval_steps}")
        _require(self.initial_loss_scale > 0, f"train.initial_loss_scale must be positive, got {self.initial_loss_scale}")
        _require(self.loss_scale_window > 0, f"train.loss_scale_window must be positive, got {self.loss_scale_window}")
        _require(self.max_skipped_steps > 0, f"train.max_skipped_steps must be positive, got {self.max_skipped_steps}")
        _require(0 < self.min_loss_scale <= self.initial_loss_scale,
                 f"train.min_loss_scale must be in (0, train.initial_loss_scale={self.initial_loss_scale:g}], "
                 f"got {self.min_loss_scale}")
        _require(self.loss_spike_factor == 0 or self.loss_spike_factor > 1,
                 f"train.loss_spike_factor must be 0 (off) or above 1, got {self.loss_spike_factor}")


@dataclass
class CheckpointConfig:
    save: str = ""  # directory; "" = never save
    load: str = ""  # directory to resume from; "" = start fresh
    interval: int = 0  # steps between saves; 0 = only at the end
    finetune: bool = False  # load weights only, not optimizer/scheduler/step
    overwrite: bool = False  # a fresh run may save into a directory that holds another run's checkpoints
    resize_vocab: bool = False  # finetune onto another vocabulary: keep the shared rows, initialize new ones
    verify: bool = False  # check every file's checksum on load (sizes are always checked)
    exact_resume: bool = True  # a missing rng/ file is an error; false: warn and resume inexactly
    async_save: bool = False  # copy the state to host memory at the step, write it on a background thread

    def __post_init__(self) -> None:
        _require(self.interval >= 0, f"checkpoint.interval must be >= 0, got {self.interval}")
        _require(not self.resize_vocab or self.finetune,
                 "checkpoint.resize_vocab=true loads weights only onto a new vocabulary: set checkpoint.finetune=true")


@dataclass
class LogConfig:
    dir: str = "runs/default"
    interval: int = 10
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _require(self.interval > 0, f"log.interval must be positive, got {self.interval}")


@dataclass
class DPOConfig:
    """Direct preference optimization (``python -m megatron_lite dpo``)."""

    beta: float = 0.1  # strength of the pull towards the reference model
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # sigmoid: assumed rate of flipped preference labels (conservative DPO)
    nll_weight: float = 0.0  # + this x the chosen answers' mean next-token loss (RPO-style)

    def __post_init__(self) -> None:
        _choice("rlhf.dpo.loss", self.loss, ("sigmoid", "ipo"))
        _require(self.beta > 0, f"rlhf.dpo.beta must be positive, got {self.beta}")
        _require(0 <= self.label_smoothing < 0.5,
                 f"rlhf.dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        _require(
            self.label_smoothing == 0 or self.loss == "sigmoid",
            "rlhf.dpo.label_smoothing applies to rlhf.dpo.loss=sigmoid only; set it to 0 for ipo",
        )
        _require(self.nll_weight >= 0, f"rlhf.dpo.nll_weight must be >= 0, got {self.nll_weight}")


@dataclass
class PPOConfig:
    """PPO and PPO-ptx (``python -m megatron_lite ppo``). The actor starts from checkpoint.load
    (finetune); the first three fields name the other models."""

    reference: str = ""  # the frozen policy of the KL penalty (usually the SFT checkpoint)
    reward_model: str = ""  # a reward-model checkpoint (python -m megatron_lite rm); "" = rlhf.reward_functions only
    critic: str = ""  # the critic's starting weights; "" = the reward model's (else checkpoint.load, new value head)
    critic_lr: float | None = None  # None: optim.lr
    max_new_tokens: int = 64  # rollout length limit (the prompt plus this must fit model.seq_length)
    temperature: float = 1.0  # rollout sampling
    top_k: int = 0
    top_p: float = 1.0
    kl_coef: float = 0.05  # per-token penalty on log(pi / pi_ref) in the reward
    clip_ratio: float = 0.2  # the policy-ratio clip
    value_clip: float = 0.2  # the critic's clip around its rollout values
    gamma: float = 1.0
    gae_lambda: float = 0.95
    reward_clip: float = 5.0  # the reward model's score is clipped to +-reward_clip
    epochs: int = 1  # optimizer passes over each rollout batch
    mini_batch_size: int = 0  # answers per optimizer step (global); 0 = the whole rollout batch
    kl_target: float = 0.0  # > 0: adapt kl_coef towards this KL per answer (0 = fixed kl_coef)
    kl_horizon: int = 10000  # samples over which the adaptive coefficient closes its error
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss on data.mixture batches (0 = plain PPO)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "epochs", "kl_horizon"):
            _require(getattr(self, name) > 0, f"rlhf.ppo.{name} must be positive, got {getattr(self, name)}")
        for name in ("temperature", "kl_coef", "clip_ratio", "value_clip", "reward_clip", "ptx_coef", "top_k",
                     "mini_batch_size", "kl_target"):
            _require(getattr(self, name) >= 0, f"rlhf.ppo.{name} must be >= 0, got {getattr(self, name)}")
        _require(0 < self.top_p <= 1, f"rlhf.ppo.top_p must be in (0, 1], got {self.top_p}")
        for name in ("gamma", "gae_lambda"):
            _require(0 <= getattr(self, name) <= 1, f"rlhf.ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        _require(self.critic_lr is None or self.critic_lr > 0,
                 f"rlhf.ppo.critic_lr must be positive, got {self.critic_lr}")


GRPO_ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class GRPOConfig:
    """Critic-free RL on groups of answers (``python -m megatron_lite grpo``): GRPO, Dr. GRPO,
    RLOO and REINFORCE++. The policy starts from checkpoint.load (finetune); rewards come from
    ``rlhf.reward_functions`` and, when set, a reward model."""

    reference: str = ""  # the frozen policy of the KL term (usually the SFT checkpoint)
    reward_model: str = ""  # optional reward-model checkpoint, added to the reward functions
    samples_per_prompt: int = 4  # n answers per prompt, sampled together (a group)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp
    kl_coef: float = 0.04  # beta; the starting value when kl_target is set
    kl_estimator: str = "k3"  # k1 | k2 | k3, for the KL term in the loss
    kl_penalty: str = "loss"  # loss: beta * KL estimate per token in the loss; reward: subtracted from the reward
    kl_target: float = 0.0  # > 0: adapt kl_coef towards this KL per answer (0 = fixed kl_coef)
    kl_horizon: int = 10000  # samples over which the adaptive coefficient closes its error
    clip_low: float = 0.2  # the ratio is clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO's clip-higher: above clip_low
    loss_aggregation: str = "token_mean"  # token_mean | sequence_mean
    mini_batch_size: int = 0  # answers per optimizer step (global); 0 = the whole rollout batch
    epochs: int = 1  # passes over each rollout batch
    filter_zero_advantage: bool = False  # drop groups whose answers all scored the same (counted)
    reward_clip: float = 10.0  # the combined reward is clipped to +-reward_clip

    def __post_init__(self) -> None:
        _choice("rlhf.grpo.advantage", self.advantage, GRPO_ADVANTAGES)
        _choice("rlhf.grpo.kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _choice("rlhf.grpo.kl_penalty", self.kl_penalty, ("loss", "reward"))
        _choice("rlhf.grpo.loss_aggregation", self.loss_aggregation, ("token_mean", "sequence_mean"))
        for name in ("samples_per_prompt", "max_new_tokens", "epochs", "kl_horizon"):
            _require(getattr(self, name) > 0, f"rlhf.grpo.{name} must be positive, got {getattr(self, name)}")
        for name in ("temperature", "kl_coef", "kl_target", "clip_low", "clip_high", "top_k", "mini_batch_size",
                     "reward_clip"):
            _require(getattr(self, name) >= 0, f"rlhf.grpo.{name} must be >= 0, got {getattr(self, name)}")
        _require(0 < self.top_p <= 1, f"rlhf.grpo.top_p must be in (0, 1], got {self.top_p}")
        _require(self.clip_low < 1, f"rlhf.grpo.clip_low must be below 1 (the ratio stays positive), got {self.clip_low}")
        _require(self.samples_per_prompt >= 2 or self.advantage == "reinforce_pp",
                 f"rlhf.grpo.advantage={self.advantage} compares the answers of a prompt: set "
                 f"rlhf.grpo.samples_per_prompt >= 2 (got {self.samples_per_prompt}) or advantage=reinforce_pp")


@dataclass
class RLHFConfig:
    """The fine-tuning stages (sft, rm, dpo, ppo, grpo): the records they read, shared by every
    stage, the reward functions of the RL algorithms, and one nested section per algorithm with
    settings of its own (``rlhf.dpo``, ``rlhf.ppo``, ``rlhf.grpo``)."""

    data: str = ""  # JSONL: {"prompt", "response"} / {"messages"} for sft; {"prompt", "chosen", "rejected"} for rm and dpo
    valid_fraction: float = 0.05  # records held out for validation (seeded by train.seed)
    demo: bool = False  # build the standard-library instruction and arithmetic data into demo_dir
    demo_dir: str = "data/demo-rlhf"
    demo_examples: int = 4000
    chat_template: str = "native"  # native (role tokens, eod after answers) | hf (the tokenizer's imported template)
    pack: bool = False  # sft, rm, dpo: a micro-batch's records share rows as documents (rlhf.packing)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    # RL rewards computed by programs: "package.module:function" (see rlhf.rewards), each weighted
    reward_functions: list[str] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)  # one per function; [] = all 1.0

    def __post_init__(self) -> None:
        _require(0 <= self.valid_fraction < 1, f"rlhf.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        _require(self.demo_examples > 0, f"rlhf.demo_examples must be positive, got {self.demo_examples}")
        _choice("rlhf.chat_template", self.chat_template, ("native", "hf"))
        _require(not self.reward_weights or len(self.reward_weights) == len(self.reward_functions),
                 f"rlhf.reward_weights has {len(self.reward_weights)} entries for {len(self.reward_functions)} "
                 f"rlhf.reward_functions; give one weight per function (or none for all 1.0)")
        for number, path in enumerate(self.reward_functions):
            _require(path.count(":") == 1 and all(path.split(":")),
                     f"rlhf.reward_functions[{number}]={path!r} is not 'package.module:function'; "
                     f"write the module's import path, a colon, and the function's name")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}


_SECTIONS: dict[str, type] = typing.get_type_hints(Config)  # YAML section name -> its dataclass


def _nearest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:  # an optional section (X | None): its own message names the key
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping with keys {[f.name for f in dataclasses.fields(tp)]}")
        return build_dataclass(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected str, got {type(value).__name__} {value!r}")
    return value


def _key_options(cls: type) -> list[str]:
    """The keys of ``cls`` and, one level down, of its nested sections (``dpo.beta``), so a key
    given at the wrong depth is pointed to where it lives."""
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        options.append(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            options += [f"{f.name}.{inner.name}" for inner in dataclasses.fields(hints[f.name])]
    return options


def _nearest_key(key: str, cls: type) -> str:
    options = _key_options(cls)
    nested = [option for option in options if option.rsplit(".", 1)[-1] == key]
    return f"; did you mean '{nested[0]}'?" if nested else _nearest(key, options)


def build_dataclass(cls: type, values: dict[str, Any], path: str) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key '{path}.{key}'{_nearest_key(key, cls)}")
        kwargs[key] = _coerce(f"{path}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw or {})
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section '{unknown[0]}'{_nearest(unknown[0], list(_SECTIONS))}")
    for name, value in raw.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"section '{name}' must be a mapping, got {type(value).__name__}")
    return Config(**{name: build_dataclass(cls, raw.get(name) or {}, name) for name, cls in _SECTIONS.items()})


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["parallel.tp=2", "model.flavor=llama"]`` -> nested dict of YAML-parsed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (for example parallel.tp=2)")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r} must name a section and a key, such as train.max_steps=10")
        value = yaml.safe_load(text) if text.strip() else ""
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (optional), apply dotted overrides, validate, return a ``Config``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    raw = _merge(raw, parse_overrides(overrides or []))
    return config_from_dict(raw)


def save_config(config: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
