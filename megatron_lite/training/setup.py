"""What every run does before its first step: join the grid, resolve the config, seed, build
the model chunks, and cut global batches into this rank's micro-batches.

``resolve`` is the one place where a validated config gets the values it left open (the
process-group backend, the demo data's paths, the vocabulary size, a short demo run's warmup);
everything after it reads a finished ``Config`` and never writes to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import Config, ConfigError, config_from_dict
from megatron_lite.data.gpt_dataset import document_layout
from megatron_lite.model.layout_check import check_layout, kv_replicas_for
from megatron_lite.parallel.context_parallel import split_sequence
from megatron_lite.parallel.dims import ParallelDims
from megatron_lite.parallel.pipeline import my_layer_ranges, stage_layer_ranges
from megatron_lite.training.run_directory import resolved_load
from megatron_lite.training.step import PackedTarget

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the resolved config


def process_group_backend(cfg: Config) -> str:
    """``parallel.backend``, except that ``auto`` on ``train.device=cpu`` means gloo even where a
    GPU is visible (``auto`` otherwise picks nccl on CUDA when the group starts)."""
    if cfg.train.device == "cpu" and cfg.parallel.backend == "auto":
        return "gloo"
    return cfg.parallel.backend


def setup_dims(cfg: Config) -> ParallelDims:
    """Join the process group (torchrun env) and build the grid; ``train.device`` picks the backend."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    parallel = dataclasses.replace(cfg.parallel, backend=process_group_backend(cfg))
    dims = ParallelDims.initialize(parallel, kv_replicas=kv_replicas_for(cfg.model, parallel.tp))
    check_layout(cfg.model, dims)  # a model that does not fit the grid stops before any data is built
    return dims


def resolve(cfg: Config, is_logging_rank: bool = True, *, read_data: bool = True,
            short_run_warmup: bool = False) -> Config:
    """A new, re-validated ``Config`` with the values ``cfg`` leaves open filled in; ``cfg`` is untouched.

    - ``parallel.backend``: see ``process_group_backend``;
    - with ``data.demo`` and ``read_data``: the demo corpus is built if missing (by the logging rank
      while the others wait) and its tokenizer and mixture replace ``data.tokenizer`` and ``data.mixture``;
    - with ``read_data``: ``model.vocab_size`` 0 becomes the tokenizer's (a smaller one is an error);
    - ``checkpoint.load`` naming the run's own ``checkpoint.save`` directory while that holds no
      checkpoint yet becomes "" (a fresh start, logged): the first submission of a job whose
      requeues resume with the same command line;
    - ``short_run_warmup``: a warmup longer than half the run is cut to a tenth of it, so a short
      demo run still reaches its decay.

    ``read_data=False`` is for callers that bring their own token datasets (benchmarks). Resolving
    a resolved config gives the same config.
    """
    sections = cfg.to_dict()
    sections["parallel"]["backend"] = process_group_backend(cfg)
    sections["checkpoint"]["load"] = resolved_load(cfg.checkpoint, is_logging_rank)
    if read_data and cfg.data.demo:
        sections["data"].update(_demo_data_paths(cfg, is_logging_rank))
    if read_data and sections["data"]["tokenizer"]:
        sections["model"]["vocab_size"] = _vocab_size(cfg.model.vocab_size, sections["data"]["tokenizer"])
    if short_run_warmup and cfg.optim.warmup_steps > cfg.train.max_steps // 2:
        sections["optim"]["warmup_steps"] = cfg.train.max_steps // 10
    return config_from_dict(sections)


def _demo_data_paths(cfg: Config, is_logging_rank: bool) -> dict:
    """The demo build's tokenizer and mixture as ``data`` section values, building it once."""
    from megatron_lite.data.demo import build_demo_data

    if is_logging_rank:  # one rank builds; the others then find it finished (the build is idempotent)
        build_demo_data(cfg.data.demo_dir, vocab_size=cfg.data.demo_vocab_size, progress=True)
    if dist.is_initialized():
        dist.barrier()
    demo = build_demo_data(cfg.data.demo_dir, vocab_size=cfg.data.demo_vocab_size, progress=False)
    mixture = [{"prefix": str(prefix), "weight": float(weight)} for prefix, weight in demo.mixture]
    return {"tokenizer": str(demo.tokenizer_dir), "mixture": mixture}


def _vocab_size(configured: int, tokenizer_dir: str) -> int:
    from megatron_lite.data import load_tokenizer

    tokenizer_size = load_tokenizer(tokenizer_dir).vocab_size
    if configured == 0:
        return tokenizer_size
    if configured < tokenizer_size:
        raise ConfigError(
            f"model.vocab_size={configured} is smaller than the tokenizer's {tokenizer_size} tokens; "
            f"set model.vocab_size=0 to take it from the tokenizer"
        )
    return configured


def load_run_tokenizer(cfg: Config):
    """The tokenizer of a resolved config's ``data.tokenizer``."""
    from megatron_lite.data import load_tokenizer

    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty; set it to a tokenizer directory (or use data.demo=true)")
    return load_tokenizer(cfg.data.tokenizer)


# ----------------------------------------------------------------------------- model and schedule


def build_model_chunks(cfg: Config, dims: ParallelDims, head: str = "lm") -> list[torch.nn.Module]:
    """This rank's model chunks, chunk 0 first, on ``dims.device``; they share one dropout RNG tracker.
    ``head``: the last chunk's head, "lm" or "value" (see ``GPT``). The weights are initialized in
    fp32 and held in ``train.precision``'s type: 16-bit runs keep 16-bit weights for forward and
    backward (their fp32 masters belong to the optimizer), so nothing is cast per micro-batch."""
    from megatron_lite.model.gpt import GPT
    from megatron_lite.model.recompute import RecomputePolicy

    recompute = RecomputePolicy.from_config(cfg.train)
    # Every rank checks every chunk, so a bad setting stops all ranks alike.
    recompute.check_chunks([len(r) for r in stage_layer_ranges(cfg.model.num_layers, dims)])
    ranges = my_layer_ranges(cfg.model.num_layers, dims)
    chunks = []
    for index, layer_range in enumerate(ranges):
        pre_process = dims.is_first_stage and index == 0
        post_process = dims.is_last_stage and index == len(ranges) - 1
        chunk = GPT(cfg.model, dims=dims, layer_range=layer_range, pre_process=pre_process,
                    post_process=post_process, seed=cfg.train.seed,
                    rng_tracker=chunks[0].rng_tracker if chunks else None, head=head, recompute=recompute)
        chunks.append(_with_weight_dtype(chunk.to(dims.device), WEIGHT_DTYPES[cfg.train.precision]))
    if cfg.train.compile:
        compile_layers(chunks, cfg)
    return chunks


def _with_weight_dtype(chunk: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Only the parameters: float buffers (rotary tables, masks) keep their own type."""
    for param in chunk.parameters():
        param.data = param.data.to(dtype)
    return chunk


def compile_refusal(cfg: Config) -> str | None:
    """Why ``train.compile`` cannot apply to this configuration, or None."""
    from megatron_lite.kernels._common import interpreting

    model = cfg.model
    triton = [f"model.{kind}_backend" for kind in ("attention", "norm", "loss", "elementwise")
              if getattr(model, f"{kind}_backend") == "triton"]
    if triton and interpreting():
        return (f"{', '.join(triton)}=triton run in Triton's interpreter here (TRITON_INTERPRET=1), which "
                f"torch.compile cannot trace; use the torch backends or train.compile=false")
    return None


def check_compile(cfg: Config) -> None:
    """Refuse ``train.compile=true`` where it cannot apply, with the reason (training and the planner)."""
    refusal = compile_refusal(cfg) if cfg.train.compile else None
    if refusal is not None:
        raise ConfigError(f"train.compile=true cannot apply: {refusal}")


def compile_layers(chunks: list[torch.nn.Module], cfg: Config) -> None:
    """Regional compilation: each transformer layer is compiled on its own (``Module.compile``), so
    the layers share one compiled graph and the embedding, the head and the parallel step stay eager.
    It composes with ``train.recompute`` (a fully recomputed layer reruns its compiled forward) and
    with 16-bit weights (tests/training/test_compile.py)."""
    check_compile(cfg)
    for chunk in chunks:
        for block in chunk.layers.values():
            block.compile(options={"fallback_random": True})


def total_steps(cfg: Config) -> int:
    """``train.max_steps``, shortened by ``train.max_tokens`` when a token budget is set."""
    if cfg.train.max_tokens <= 0:
        return cfg.train.max_steps
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    return min(cfg.train.max_steps, math.ceil(cfg.train.max_tokens / tokens_per_step))


def autocast_context(precision: str, device: torch.device):
    """The context every forward runs under. No autocast at any precision: 16-bit runs hold their
    weights in the 16-bit type already (``build_model_chunks``), where autocast would re-cast every
    fp32 weight on every micro-batch."""
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- batches


def local_batch(dataset, first_sample: int, global_batch_size: int, dims: ParallelDims) -> torch.Tensor:
    """This dp rank's contiguous slice of the global batch starting at ``first_sample``; (B_dp, T+1).

    Every tp, cp (and pp) rank of a data-parallel replica reads the same samples.
    """
    per_rank = global_batch_size // dims.dp
    start = first_sample + dims.dp_rank * per_rank
    samples = np.stack([np.asarray(dataset[i], dtype=np.int64) for i in range(start, start + per_rank)])
    return torch.from_numpy(samples)


def split_micro_batches(batch: torch.Tensor, micro_batch_size: int, device: torch.device, eod_id: int | None = None,
                        *, cp_rank: int = 0, cp: int = 1):
    """(B_dp, T+1) -> list of (tokens, labels), each (micro_batch_size, T), or under context
    parallelism (cp > 1) this cp rank's two load-balanced chunks of them, (micro_batch_size, T/cp).
    With ``eod_id`` (document masking) the target is a ``PackedTarget``: labels with the tokens'
    document and position ids (``data.gpt_dataset.document_layout``), taken over the whole sample
    before the cp split."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return split_sequence(t, cp_rank, cp).to(device, non_blocking=True)

    micro_batches = []
    for mb in batch.split(micro_batch_size):
        tokens, labels = mb[:, :-1], mb[:, 1:]
        target = local(labels)
        if eod_id is not None:
            document_ids, position_ids = (local(torch.from_numpy(a)) for a in document_layout(tokens.numpy(), eod_id))
            target = PackedTarget(target, document_ids, position_ids)
        micro_batches.append((local(tokens), target))
    return micro_batches
