"""Whole-model reads and writes in one process, for conversion and offline resharding: the full
(tp = 1) state dict out of a checkpoint of any layout, and full weights into a checkpoint at any layout."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig, build_dataclass
from megatron_lite.model.layout_check import validate_layout
from megatron_lite.parallel.dims import ParallelDims, padded_vocab_size
from megatron_lite.parallel.layout import layout_of
from megatron_lite.parallel.pipeline import chunk_layers
from megatron_lite.training.checkpoint import durable
from megatron_lite.training.checkpoint.format import (
    TIED_COPIES, VOCAB_ROWS, CheckpointError, Manifest, ParamRecord, SavedLayout, ShardReader,
    file_check, fit_vocab_padding, iteration_dir_name, named_parameters, partial_dir, publish, shard_file_name,
    shard_for_rank,
)

# ----------------------------------------------------------------------------- read


def load_full_state_dict(ckpt_dir: str | Path, verify: bool = False) -> tuple[dict[str, torch.Tensor], Manifest]:
    """All weights merged to the tp=1 layout (vocabulary padding trimmed for tp=1), and the manifest;
    ``verify`` checks every shard file's checksum first."""
    reader = ShardReader(ckpt_dir, verify=verify)
    manifest = reader.manifest
    model_cfg = manifest.config["model"]
    saved_pad = manifest.padded_vocab_size
    tp1_pad = padded_vocab_size(model_cfg["vocab_size"], model_cfg["make_vocab_size_divisible_by"], 1)
    state = {}
    for name in reader.stage_of:
        if manifest.tied_embeddings and TIED_COPIES.get(name) in reader:
            continue
        tensor = reader[name]
        shape = list(tensor.shape)
        if saved_pad and saved_pad != tp1_pad and name in VOCAB_ROWS:  # other dims may equal the padded size
            want = [tp1_pad, *shape[1:]]
            tensor = fit_vocab_padding(tensor, shape, want, saved_pad, tp1_pad) if want != shape else tensor
        state[name] = tensor
    return state, manifest


def load_full_optimizer_state(ckpt_dir: str | Path) -> dict | None:
    """Every parameter's optimizer state merged to the tp=1 layout (vocabulary padding as saved),
    as ``{"per_param", "groups"}``; None when the checkpoint holds weights only."""
    reader = ShardReader(ckpt_dir)  # sizes only: load_full_state_dict verified the same files
    if not reader.manifest.has_optimizer:
        return None
    per_param = {}
    for name in reader.stage_of:
        state = reader.optimizer_state(name)
        if state is not None:
            per_param[name] = state
    return {"per_param": per_param, "groups": reader.optimizer_groups()}


# ----------------------------------------------------------------------------- write


def save_full_state_dict(
    state_dict,
    config: dict,
    save_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    tokenizer_dir: str | Path | None = None,
    iteration: int = 0,
    optimizer_state: dict | None = None,
    train_state: dict | None = None,
) -> Path:
    """Write full (tp = 1) weights as a checkpoint at layout (tp, pp), from one process.

    ``state_dict`` maps global parameter names to full tensors, with any amount of vocabulary
    padding (or none). It is read one pipeline stage at a time, in layer order, so a lazy
    mapping keeps only that stage in memory. ``config`` is the resolved config as a dict, with
    ``model.vocab_size`` set. Without ``optimizer_state`` the checkpoint holds weights only (no
    optimizer, RNG or training state): resume from it with ``checkpoint.finetune=true``. Offline
    resharding passes ``optimizer_state`` (full per-parameter tensors, as
    ``load_full_optimizer_state`` returns) and ``train_state``, and the run resumes exactly.
    """
    model_cfg, dims, config = _target_layout(config, tp, pp)
    padded = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    partial = partial_dir(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files, params, checks = {}, {}, {}
    for pp_rank in range(pp):
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        optimizer_shards: list[dict[str, dict]] = [{} for _ in range(tp)]
        for name, layout_param in _stage_parameters(model_cfg, dims, pp_rank):
            layout = layout_of(layout_param)
            full = _full_weight_for(state_dict, name, layout_param, model_cfg.vocab_size, padded)
            for tp_rank in range(tp):
                # clone: a view would save its whole underlying storage
                shards[tp_rank][name] = shard_for_rank(full, name, layout, tp_rank, tp).clone()
            if optimizer_state is not None:
                for tp_rank, state in enumerate(_optimizer_shards(optimizer_state["per_param"], name, layout_param,
                                                                  model_cfg.vocab_size, padded, tp)):
                    optimizer_shards[tp_rank][name] = state
            params[name] = ParamRecord.describe(full.shape, full.dtype, layout)
        for tp_rank, shard in enumerate(shards):
            content = {"model": shard}
            if optimizer_state is not None:
                content["optimizer"] = {"per_param": optimizer_shards[tp_rank], "groups": optimizer_state["groups"]}
            file_name = shard_file_name(tp_rank, pp_rank)
            durable.save_torch(content, partial / file_name)
            files[file_name] = sorted(shard)
            checks[file_name] = file_check(partial / file_name)
    manifest = Manifest(
        iteration=iteration, layout=SavedLayout.of(dims, config), padded_vocab_size=padded, files=files,
        params=params, train_state=train_state or {}, has_optimizer=optimizer_state is not None, config=config,
        vocab_size=model_cfg.vocab_size, file_checks=checks,
    )
    publish(save_dir, final, manifest, tokenizer_dir)
    return final


def _target_layout(config: dict, tp: int, pp: int):
    """The model config, the (tp, pp) grid of one process per rank, and ``config`` with that grid."""
    model_cfg = build_dataclass(ModelConfig, config["model"], "model")
    if model_cfg.vocab_size <= 0:
        raise ConfigError("config model.vocab_size must be set (> 0) to save full weights")
    parallel = build_dataclass(ParallelConfig, {**config.get("parallel", {}), "tp": tp, "pp": pp}, "parallel")
    validate_layout(parallel, model_cfg, tp * pp)
    dims = ParallelDims(tp=tp, pp=pp, dp=1, virtual_pp=parallel.virtual_pp, stage_layers=parallel.stage_layers)
    return model_cfg, dims, {**config, "parallel": {**config.get("parallel", {}), "tp": tp, "pp": pp}}


def _stage_parameters(model_cfg, dims, pp_rank: int) -> list[tuple[str, torch.Tensor]]:
    """Names and partition metadata of every parameter stage ``pp_rank`` holds, from a model on
    the meta device (no memory; tp = 1 shapes)."""
    from megatron_lite.model.gpt import GPT

    meta_cfg = dataclasses.replace(model_cfg, attention_backend="torch", norm_backend="torch", loss_backend="torch",
                                   elementwise_backend="torch")
    meta_dims = ParallelDims(device=torch.device("meta"))
    chunks = []
    for chunk in range(dims.virtual_pp):
        layer_range = chunk_layers(model_cfg.num_layers, dims, pp_rank, chunk)
        chunks.append(GPT(meta_cfg, meta_dims, layer_range=layer_range,
                          pre_process=pp_rank == 0 and chunk == 0,
                          post_process=pp_rank == dims.pp - 1 and chunk == dims.virtual_pp - 1))
    return named_parameters(chunks)


def _optimizer_shards(per_param: dict, name: str, layout_param, vocab_size: int, padded: int, tp: int) -> list[dict]:
    """One parameter's full optimizer state cut into tp shards exactly like the parameter."""
    source = name if name in per_param else TIED_COPIES.get(name, name)
    if source not in per_param:
        raise CheckpointError(f"the optimizer state has no entry for {name}; every parameter of the model is needed")
    layout = layout_of(layout_param)
    shards: list[dict] = [{} for _ in range(tp)]
    for key, value in per_param[source].items():
        if not (torch.is_tensor(value) and value.ndim > 0):  # step counters are shared by every shard
            for shard in shards:
                shard[key] = value
            continue
        full = _full_weight_for({name: value}, name, layout_param, vocab_size, padded)
        for tp_rank, shard in enumerate(shards):
            shard[key] = shard_for_rank(full, name, layout, tp_rank, tp).clone()
    return shards


def _full_weight_for(state_dict, name: str, layout_param: torch.Tensor, vocab_size: int, padded: int) -> torch.Tensor:
    source = name if name in state_dict else TIED_COPIES.get(name, name)
    if source not in state_dict:
        raise CheckpointError(f"{name} is missing from the weights to save; every parameter of the model is needed")
    full = state_dict[source]
    want = list(layout_param.shape)
    if name in VOCAB_ROWS and full.shape[0] >= vocab_size:
        want[0] = padded
        if full.shape[0] > padded:
            full = full[:padded]
        elif full.shape[0] < padded:
            full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    if list(full.shape) != want:
        raise CheckpointError(f"{name}: the weights to save have shape {list(full.shape)}, the model expects {want}")
    return full
