"""Save and load a running model's shards; a checkpoint of another (tp, pp) layout is resharded on load.

Both are collective: every rank of the run calls them.
"""

from __future__ import annotations

import copy as copy_module
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_lite.parallel.layout import layout_of
from megatron_lite.training.checkpoint import durable
from megatron_lite.training.checkpoint.format import (
    TIED_COPIES, VALUE_HEAD, VOCAB_ROWS, CheckpointError, Manifest, ParamRecord, SavedLayout, ShardReader,
    check_file, file_check, fit_vocab_padding, full_shape_of, iteration_dir_name, load_torch_file,
    named_parameters, partial_dir, previous_iterations_hint, publish, rng_file, shard_file_name, shard_for_rank,
)
from megatron_lite.training.optim import load_optimizer_state_by_name, optimizer_state_by_name

# A weights-only load may move a language model onto a value head (SFT -> reward model or critic).
LM_HEAD = "output."
HEAD_KINDS = {"lm": "language model", "value": "value model (reward model or critic)"}


@dataclass(frozen=True)
class LoadPolicy:
    """How strictly a load checks what it reads (the ``checkpoint`` section's switches)."""

    verify: bool = False  # compare every file's checksum, not only its size
    exact_resume: bool = True  # a missing rng file is an error, not a warning
    resize_vocab: bool = False  # a weights-only load onto another vocabulary keeps the shared rows

    @classmethod
    def of(cls, checkpoint_cfg) -> LoadPolicy:
        return cls(verify=checkpoint_cfg.verify, exact_resume=checkpoint_cfg.exact_resume,
                   resize_vocab=checkpoint_cfg.resize_vocab)


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather_objects(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ----------------------------------------------------------------------------- RNG


def capture_rng_state(rng_trackers=()) -> dict:
    """This rank's generators, plus each model chunk's tensor-parallel dropout streams."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "trackers": [tracker.get_states() for tracker in rng_trackers],
    }


def restore_rng_state(state: dict, rng_trackers=()) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for tracker, saved in zip(rng_trackers, state.get("trackers", [])):
        tracker.set_states(saved)


# ----------------------------------------------------------------------------- optimizer state by name


def _optimizer_state(optimizer, named) -> dict:
    """Full per-parameter optimizer state by name; a ZeRO optimizer gathers its dp slices."""
    if hasattr(optimizer, "state_dict_by_param_name"):
        return optimizer.state_dict_by_param_name()
    return optimizer_state_by_name(optimizer, named)


def _load_optimizer_state(optimizer, named, state: dict) -> None:
    if hasattr(optimizer, "load_state_dict_by_param_name"):
        optimizer.load_state_dict_by_param_name(state)
    else:
        load_optimizer_state_by_name(optimizer, named, state)


# ----------------------------------------------------------------------------- save


@dataclass
class CheckpointSnapshot:
    """What one rank writes for one checkpoint, already taken from the live model: the files
    need nothing else, so a background thread can write them while training goes on."""

    save_dir: Path
    iteration: int
    world_rank: int
    shard_name: str
    shard: dict | None  # {"model", "optimizer"} when this rank writes its (tp, pp) shard (dp rank 0)
    rng: dict
    records: dict[str, ParamRecord]
    layout: SavedLayout
    train_state: dict
    config: dict
    has_optimizer: bool
    vocab_size: int
    padded_vocab_size: int | None
    tokenizer_dir: str | Path | None

    @property
    def final(self) -> Path:
        return self.save_dir / iteration_dir_name(self.iteration)


def capture_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model_chunks: list[torch.nn.Module],
    dims,
    config: dict,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    rng_trackers=(),
    padded_vocab_size: int | None = None,
    copy: bool = False,
) -> CheckpointSnapshot:
    """This rank's part of the checkpoint of ``iteration`` (collective under ZeRO, which gathers its
    optimizer state). With ``copy`` every tensor is a host copy that training cannot change, for
    a write that runs while training continues; without, the weights may be the live CPU tensors."""
    named = named_parameters(model_chunks)
    writes_shard = dims.dp_rank == 0 and dims.cp_rank == 0  # cp ranks hold the same parameters too
    optimizer_state = _optimizer_state(optimizer, named) if optimizer is not None else None
    shard = None
    if writes_shard:
        shard = {"model": {n: p.detach().cpu() for n, p in named}}
        if optimizer_state is not None:
            shard["optimizer"] = optimizer_state
    snapshot = CheckpointSnapshot(
        save_dir=Path(save_dir), iteration=iteration, world_rank=_world_rank(),
        shard_name=shard_file_name(dims.tp_rank, dims.pp_rank), shard=shard,
        rng=capture_rng_state(rng_trackers),
        records={n: ParamRecord.describe(full_shape_of(p, dims.tp), p.dtype, layout_of(p)) for n, p in named},
        layout=SavedLayout.of(dims, config), train_state=copy_module.deepcopy(train_state or {}),
        config=copy_module.deepcopy(config), has_optimizer=optimizer is not None,
        vocab_size=model_chunks[0].config.vocab_size, padded_vocab_size=padded_vocab_size,
        tokenizer_dir=tokenizer_dir,
    )
    if copy:
        snapshot.shard, snapshot.rng = _host_copy(snapshot.shard), _host_copy(snapshot.rng)
    return snapshot


def _host_copy(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a host copy of its own (containers rebuilt alike)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return copy_module.deepcopy(obj)


def write_checkpoint(snapshot: CheckpointSnapshot, group: dist.ProcessGroup | None = None) -> Path:
    """Write every rank's snapshot and publish the checkpoint (collective over ``group``, which
    holds every rank: the default group, or the one a background writer owns). Returns its directory."""
    final = snapshot.final
    partial = partial_dir(final)
    if _is_rank0():
        snapshot.save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "rng").mkdir(parents=True)
    _barrier(group)
    written = [rng_file(partial, snapshot.world_rank)]
    if snapshot.shard is not None:
        durable.save_torch(snapshot.shard, partial / snapshot.shard_name)
        written.append(partial / snapshot.shard_name)
    durable.save_torch(snapshot.rng, written[0])
    checks = {path.relative_to(partial).as_posix(): file_check(path) for path in written}
    held = (snapshot.shard_name, snapshot.records) if snapshot.shard is not None else None
    gathered = _gather_objects((held, checks), group)
    _barrier(group)
    if _is_rank0():
        files, params = _merge_records([held for held, _ in gathered if held is not None])
        manifest = Manifest(
            iteration=snapshot.iteration, layout=snapshot.layout, padded_vocab_size=snapshot.padded_vocab_size,
            files=files, params=params, train_state=snapshot.train_state, has_optimizer=snapshot.has_optimizer,
            config=snapshot.config, vocab_size=snapshot.vocab_size,
            file_checks={name: check for _, rank_checks in gathered for name, check in sorted(rank_checks.items())},
        )
        publish(snapshot.save_dir, final, manifest, snapshot.tokenizer_dir)
    _barrier(group)
    return final


def save_checkpoint(
    save_dir: str | Path,
    iteration: int,
    model_chunks: list[torch.nn.Module],
    dims,
    config: dict,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    rng_trackers=(),
    padded_vocab_size: int | None = None,
) -> Path:
    """Write a complete checkpoint for ``iteration``; returns the iteration directory.

    ``config`` is the resolved config as a dict; ``train_state`` holds JSON-able training
    progress (scheduler, loss scaler, consumed samples). ``Checkpointer.save`` fills these in.
    """
    snapshot = capture_checkpoint(save_dir, iteration, model_chunks, dims, config, optimizer, train_state,
                                  tokenizer_dir, rng_trackers, padded_vocab_size)
    return write_checkpoint(snapshot)


def _merge_records(held: list[tuple[str, dict[str, ParamRecord]]]) -> tuple[dict, dict]:
    """The manifest's ``files`` and ``params`` from each shard writer's (file name, records)."""
    params: dict[str, ParamRecord] = {}
    for _, records in held:
        for name, record in records.items():
            params.setdefault(name, record)
    return {file_name: sorted(records) for file_name, records in held}, params


# ----------------------------------------------------------------------------- check the model against the manifest


def _head_swap(manifest: Manifest, named, weights_only: bool) -> set[str]:
    """Names to leave out of a weights-only load that moves a language model onto a value head
    (SFT -> reward model or critic): the model's new value head keeps its initialization, and
    the checkpoint's vocabulary head is not read."""
    saved = manifest.params
    model_value_head = {n for n, _ in named if n.startswith(VALUE_HEAD)}
    if not weights_only or not model_value_head or any(n.startswith(VALUE_HEAD) for n in saved):
        return set()
    return model_value_head | {n for n in saved if n.startswith(LM_HEAD)}


def _check_head(manifest: Manifest, model_head: str, weights_only: bool, value_head_from_lm: bool,
                source: str) -> None:
    """A checkpoint's head kind must be the model's, except that a fine-tuning start may put a
    language model under a new value head (SFT -> reward model, a critic's start)."""
    saved = manifest.head_kind
    if saved == model_head or (saved == "lm" and weights_only and value_head_from_lm):
        return
    raise CheckpointError(
        f"{source} holds a {HEAD_KINDS[saved]} (head '{saved}' in its manifest) but a {HEAD_KINDS[model_head]} "
        f"is needed here; point it at a checkpoint with a '{model_head}' head"
        + (" (a reward model from python -m megatron_lite rm)" if model_head == "value" else "")
    )


def _check_vocab(manifest: Manifest, model_vocab: int, weights_only: bool, policy: LoadPolicy, source: str) -> bool:
    """True when the vocabulary rows are to be resized; a mismatch without ``resize_vocab`` is refused,
    since trimming or padding them would silently re-map tokens."""
    saved = manifest.real_vocab_size
    if saved == model_vocab:
        return False
    if policy.resize_vocab and weights_only:
        return True
    raise CheckpointError(
        f"{source} was trained with a vocabulary of {saved} tokens, this run's model has {model_vocab}: use the "
        f"tokenizer the checkpoint was trained with (a copy is in its tokenizer/ directory), or to fine-tune onto "
        f"the new vocabulary set checkpoint.finetune=true checkpoint.resize_vocab=true"
    )


def _resized_rows(saved_full: torch.Tensor, param: torch.Tensor, dims, shared_rows: int) -> torch.Tensor:
    """This rank's vocabulary rows: the checkpoint's where both vocabularies have the token, the
    model's fresh initialization elsewhere (the rows are split over tp in contiguous blocks)."""
    local = param.detach().cpu().clone()
    start = dims.tp_rank * local.shape[0]
    stop = min(start + local.shape[0], shared_rows)
    if stop > start:
        local[: stop - start] = saved_full[start:stop]
    return local


def _shape_problems(manifest: Manifest, named, dims, model_padded_vocab: int | None, skip: set[str]) -> list[str]:
    saved = {n: record.shape for n, record in manifest.params.items() if n not in skip}
    named = [(n, p) for n, p in named if n not in skip]
    tied = manifest.tied_embeddings
    local = {n for n, _ in named}
    problems = []
    for name, param in named:
        want = full_shape_of(param, dims.tp)
        if name not in saved and tied and TIED_COPIES.get(name) in saved:
            name = TIED_COPIES[name]
        if name not in saved:
            problems.append(f"{name}: missing from the checkpoint (model expects shape {want})")
        elif saved[name] != want and not _padding_only(saved[name], want, manifest.padded_vocab_size, model_padded_vocab):
            problems.append(f"{name}: checkpoint shape {saved[name]} != model shape {want}")
    if dims.pp == 1:
        dropped_copies = {n for n, target in TIED_COPIES.items() if tied and target in local}
        problems += [
            f"{n}: in the checkpoint but not in the model" for n in sorted(saved) if n not in local | dropped_copies
        ]
    return problems


def _padding_only(saved_shape, want_shape, saved_pad, want_pad) -> bool:
    if not saved_pad or not want_pad:
        return False
    probe = torch.empty(saved_shape, device="meta")
    return fit_vocab_padding(probe, saved_shape, want_shape, saved_pad, want_pad) is not None


def _same_layout(manifest: Manifest, named, dims) -> bool:
    if (manifest.layout.tp, manifest.layout.pp) != (dims.tp, dims.pp):
        return False
    saved_names = manifest.files.get(shard_file_name(dims.tp_rank, dims.pp_rank))
    return saved_names is not None and set(saved_names) == {n for n, _ in named}


# ----------------------------------------------------------------------------- load


def _reshard(full: torch.Tensor, name: str, param: torch.Tensor, manifest: Manifest, dims, model_pad) -> torch.Tensor:
    want = full_shape_of(param, dims.tp)
    if list(full.shape) != want:
        full = fit_vocab_padding(full, list(full.shape), want, manifest.padded_vocab_size, model_pad)
    # clone: the piece must own its memory, not borrow the memory-mapped file's
    return shard_for_rank(full, name, layout_of(param), dims.tp_rank, dims.tp).clone()


def _local_state_from_reader(reader: ShardReader, named, dims, model_pad, with_optimizer: bool,
                             resized: set[str] = frozenset(), shared_rows: int = 0):
    weights, per_param = {}, {}
    for name, param in tqdm(named, desc="resharding checkpoint", leave=False, disable=not _is_rank0() or len(named) < 100):
        saved = reader.saved_name(name)
        if name in resized:
            weights[name] = _resized_rows(reader[saved], param, dims, shared_rows)
            continue
        weights[name] = _reshard(reader[saved], name, param, reader.manifest, dims, model_pad)
        if with_optimizer:
            state = reader.optimizer_state(saved)
            if state is not None:
                per_param[name] = {
                    k: _reshard(v, name, param, reader.manifest, dims, model_pad)
                    if torch.is_tensor(v) and v.ndim > 0 else (v.clone() if torch.is_tensor(v) else v)
                    for k, v in state.items()
                }
    optimizer_state = {"per_param": per_param, "groups": reader.optimizer_groups()} if with_optimizer else None
    return weights, optimizer_state


def _check_fits(reader: ShardReader, named, dims, padded_vocab_size, skip: set[str]) -> None:
    problems = _shape_problems(reader.manifest, named, dims, padded_vocab_size, skip)
    if problems:
        raise CheckpointError(
            f"checkpoint {reader.directory} does not match the model built from the config "
            f"({len(problems)} mismatched keys):\n  " + "\n  ".join(problems)
            + "\nuse the model section the checkpoint was trained with (see its manifest.json)"
        )


def load_checkpoint(
    load_dir: str | Path,
    model_chunks: list[torch.nn.Module],
    dims,
    optimizer: torch.optim.Optimizer | None = None,
    weights_only: bool = False,
    rng_trackers=(),
    padded_vocab_size: int | None = None,
    policy: LoadPolicy = LoadPolicy(),
    source_key: str = "checkpoint.load",
    value_head_from_lm: bool = True,
) -> dict:
    """Load a checkpoint into this rank's model chunks.

    Every shard file's size is checked first (its checksum too with ``policy.verify``), then the
    head kind and the vocabulary. Resharding happens automatically when the saved (tp, pp) layout
    differs. With ``weights_only`` (fine-tuning) the optimizer, RNG and training state are ignored;
    if ``value_head_from_lm``, a model with a value head may start from a language model's
    checkpoint (the value head keeps its initialization; the vocabulary head is not read); with
    ``policy.resize_vocab`` the vocabulary rows both sizes share are kept and the others keep the
    model's initialization. ``source_key`` is the config key that named ``load_dir``, for messages.
    Returns ``{"iteration", "train_state", "manifest", "resharded", "rng_restored"}``.
    """
    reader = ShardReader(load_dir, verify=policy.verify)
    manifest = reader.manifest
    source = f"{source_key}={reader.directory}"
    _check_head(manifest, model_chunks[0].head, weights_only, value_head_from_lm, source)
    model_vocab = model_chunks[0].config.vocab_size
    resize = _check_vocab(manifest, model_vocab, weights_only, policy, source)
    named = named_parameters(model_chunks)
    skip = _head_swap(manifest, named, weights_only)
    resized = {n for n, _ in named if n in VOCAB_ROWS and n not in skip} if resize else set()
    _check_fits(reader, named, dims, padded_vocab_size, skip | resized)
    with_optimizer = optimizer is not None and not weights_only and manifest.has_optimizer
    named = [(n, p) for n, p in named if n not in skip]
    resharded = bool(skip) or bool(resized) or not _same_layout(manifest, named, dims)
    if resharded:
        weights, optimizer_state = _local_state_from_reader(
            reader, named, dims, padded_vocab_size, with_optimizer, resized,
            min(manifest.real_vocab_size, model_vocab))
    else:
        shard = reader.local_shard(dims.tp_rank, dims.pp_rank)
        weights, optimizer_state = shard["model"], shard.get("optimizer") if with_optimizer else None
    with torch.no_grad():
        for name, param in named:
            param.copy_(weights[name].to(dtype=param.dtype))
    if optimizer_state is not None:
        _load_optimizer_state(optimizer, named, optimizer_state)  # after the weights: ZeRO re-reads them
    rng_restored = not weights_only and _restore_rng(reader, manifest, dims, rng_trackers, policy)
    _barrier()
    return {
        "iteration": 0 if weights_only else manifest.iteration,
        "train_state": {} if weights_only else manifest.train_state,
        "manifest": manifest,
        "resharded": resharded,
        "rng_restored": rng_restored,
    }


def _saved_rng(reader: ShardReader, manifest: Manifest) -> bool:
    """Whether the save wrote RNG streams: a live save does, an offline rewrite (reshard, conversion)
    has none to write. Manifests without file records tell by the rng/ directory."""
    if manifest.file_checks:
        return any(name.startswith("rng/") for name in manifest.file_checks)
    return (reader.directory / "rng").is_dir()


def _restore_rng(reader: ShardReader, manifest: Manifest, dims, rng_trackers, policy: LoadPolicy) -> bool:
    """RNG streams belong to ranks: they are restored only when the world is the one that saved them.
    Every rank checks every rank's file, so a missing one stops all ranks alike instead of one."""
    layout = manifest.layout
    if (layout.tp, layout.pp, layout.dp) != (dims.tp, dims.pp, dims.dp) or not _saved_rng(reader, manifest):
        return False
    saved_world = sum(name.startswith("rng/") for name in manifest.file_checks)
    if saved_world and saved_world != dims.world_size:  # another cp degree: same (tp, pp, dp), other ranks
        return False
    missing = [path for path in (rng_file(reader.directory, rank) for rank in range(dims.world_size))
               if not path.is_file()]
    if missing:
        if policy.exact_resume:
            raise CheckpointError(
                f"{missing[0]} is missing ({len(missing)} rng file(s) in all): the resume would not be exact "
                f"(dropout and sampling draws would differ); {previous_iterations_hint(reader.directory)}, "
                f"or set checkpoint.exact_resume=false to resume without them")
        if _is_rank0():
            print(f"warning: {missing[0]} is missing ({len(missing)} rng file(s)); resuming with fresh RNG streams "
                  f"(checkpoint.exact_resume=false): dropout and sampling draws differ from the saved run",
                  file=sys.stderr, flush=True)
        return False
    saved = rng_file(reader.directory, _world_rank())
    check_file(reader.directory, manifest, saved.relative_to(reader.directory).as_posix(), checksum=policy.verify)
    restore_rng_state(load_torch_file(saved, reader.directory), rng_trackers)
    return True
