"""Sharded checkpoints that resume exactly and reshard to another (tp, pp) layout.

Layout of ``save_dir``::

    latest                          "iter_0000100", replaced atomically once a save is complete
    iter_0000100/
      manifest.json                 layout, per-parameter partition metadata and full shapes,
                                    step, training state (scheduler, loss scale, data position),
                                    and the resolved config
      model_tp00_pp000.pt           one file per (tp, pp) rank (written by dp rank 0): weights and
                                    optimizer state, both keyed by global parameter name
      rng/rank00000.pt              every rank's RNG streams (torch, cuda, numpy, python, tp tracker)
      tokenizer/                    a copy of the tokenizer directory

A save is written into ``iter_N.partial/`` and renamed into place only when every file is
on disk, then ``latest`` is rewritten through a temporary file, fsync and rename. A crash
at any point leaves the previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_lite.parallel.dims import padded_vocab_size
from megatron_lite.parallel.layers import full_shape, layout_of, merge_shards, shard_tensor
from megatron_lite.training.optim import load_optimizer_state_by_name, optimizer_state_by_name

FORMAT_VERSION = 1
# With tied embeddings and pp > 1 the last stage holds a copy of the word embedding under
# its own name; layouts without that copy read it from (or drop it for) the embedding.
TIED_COPIES = {"output.weight": "embedding.word.weight"}
_VOCAB_ROWS = set(TIED_COPIES) | set(TIED_COPIES.values())  # tensors whose dim 0 is the padded vocabulary
MANIFEST = "manifest.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model being loaded."""


# ----------------------------------------------------------------------------- naming


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:03d}.pt"


def named_parameters(model_chunks: list[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter this rank holds, by global name, each name once (chunks use global layer indices)."""
    seen: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            seen.setdefault(name, param)
    return list(seen.items())


def _full_shape(param: torch.Tensor, tp: int) -> list[int]:
    return full_shape(param.shape, tp, **layout_of(param))


# ----------------------------------------------------------------------------- small I/O helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_durably(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
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


# ----------------------------------------------------------------------------- save


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


def _layout(dims, config: dict) -> dict:
    parallel = config.get("parallel", {})
    return {
        "tp": dims.tp,
        "pp": dims.pp,
        "dp": dims.dp,
        "virtual_pp": parallel.get("virtual_pp", 1),
        "zero1": parallel.get("zero1", False),
    }


def _param_meta(named: list[tuple[str, torch.nn.Parameter]], tp: int) -> dict:
    return {name: _meta_entry(p, tp) for name, p in named}


def _meta_entry(param: torch.Tensor, tp: int) -> dict:
    """Layout and full shape of one parameter; the grouped-row fields only where they are used,
    so manifests of other parameters keep the form readers before them expect."""
    layout = layout_of(param)
    entry = {"partition_dim": layout["partition_dim"], "partition_chunks": layout["partition_chunks"]}
    if layout["partition_groups"] > 1 or layout["replicated_rows"] > 0:
        entry.update(partition_groups=layout["partition_groups"], replicated_rows=layout["replicated_rows"])
    return {**entry, "shape": _full_shape(param, tp), "dtype": str(param.dtype).replace("torch.", "")}


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
    """Write a complete checkpoint for ``iteration`` (collective: every rank calls it).

    ``config`` is the resolved config as a dict; ``train_state`` holds JSON-able training
    progress (scheduler, loss scaler, consumed samples). Returns the iteration directory.
    """
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    partial = save_dir / (final.name + ".partial")
    if _is_rank0():
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "rng").mkdir(parents=True)
    _barrier()

    named = named_parameters(model_chunks)
    shard_name = shard_file_name(dims.tp_rank, dims.pp_rank)
    writes_shard = dims.dp_rank == 0
    optimizer_state = _optimizer_state(optimizer, named) if optimizer is not None else None  # collective under ZeRO
    if writes_shard:
        shard = {"model": {n: p.detach().cpu() for n, p in named}}
        if optimizer_state is not None:
            shard["optimizer"] = optimizer_state
        _save_durably(shard, partial / shard_name)
    _save_durably(capture_rng_state(rng_trackers), partial / "rng" / f"rank{_world_rank():05d}.pt")

    meta = (shard_name, _param_meta(named, dims.tp)) if writes_shard else None
    gathered = _gather_objects(meta)
    _barrier()
    if _is_rank0():
        files = {name: sorted(params) for name, params in (m for m in gathered if m is not None)}
        params: dict[str, dict] = {}
        for m in gathered:
            if m is not None:
                for name, info in m[1].items():
                    params.setdefault(name, info)
        manifest = _manifest(iteration, _layout(dims, config), padded_vocab_size, files, params, train_state,
                             optimizer is not None, config)
        _publish(save_dir, partial, final, manifest, tokenizer_dir)
    _barrier()
    return final


def _manifest(iteration, layout, padded_vocab, files, params, train_state, has_optimizer, config) -> dict:
    return {
        "format": FORMAT_VERSION,
        "iteration": iteration,
        "layout": layout,
        "padded_vocab_size": padded_vocab,
        "files": files,
        "params": params,
        "train_state": train_state or {},
        "has_optimizer": has_optimizer,
        "config": config,
    }


def _write_manifest(directory: Path, manifest: dict) -> None:
    _write_text_durably(directory / MANIFEST, json.dumps(manifest, indent=1, default=str))


def _publish(save_dir: Path, partial: Path, final: Path, manifest: dict, tokenizer_dir) -> None:
    """Finish the directory, move it into place, then point ``latest`` at it."""
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, partial / "tokenizer")
    _write_manifest(partial, manifest)
    _fsync_path(partial)
    if final.exists():
        stale = final.with_name(final.name + ".old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(partial, final)
    _fsync_path(save_dir)
    _write_text_durably(save_dir / LATEST, final.name + "\n")


# ----------------------------------------------------------------------------- locate and read


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``path`` may be a save directory (follows ``latest``) or one ``iter_*`` directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{latest} points at {target.name}, which has no {MANIFEST}; the checkpoint is incomplete")
        return target
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; check checkpoint.load / --load")
    raise CheckpointError(
        f"no checkpoint in {path}: expected a '{LATEST}' file or a '{MANIFEST}' "
        f"(point at the checkpoint.save directory of a finished run or at one of its iter_* directories)"
    )


def read_manifest(ckpt_dir: str | Path) -> dict:
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir} has checkpoint format {manifest.get('format')}, expected {FORMAT_VERSION}")
    return manifest


def _load_file(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class _ShardReader:
    """Reads saved shard files on demand and merges a parameter's tp shards to its full tensor."""

    def __init__(self, ckpt_dir: Path, manifest: dict):
        self.ckpt_dir = ckpt_dir
        self.manifest = manifest
        self.tp = manifest["layout"]["tp"]
        self.where = {}  # param name -> pp rank whose files hold it
        for file_name, names in sorted(manifest["files"].items()):
            pp_rank = int(file_name.rsplit("_pp", 1)[1].split(".")[0])
            for name in names:
                self.where.setdefault(name, pp_rank)
        self._cache: dict[int, list[dict]] = {}

    def _stage_files(self, pp_rank: int) -> list[dict]:
        if pp_rank not in self._cache:
            self._cache = {pp_rank: [_load_file(self.ckpt_dir / shard_file_name(t, pp_rank)) for t in range(self.tp)]}
        return self._cache[pp_rank]

    def _merge(self, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        try:
            return merge_shards(pieces, **layout_of(self.manifest["params"][name]))
        except ValueError as exc:
            raise CheckpointError(f"{self.ckpt_dir}: {name}: {exc}") from exc

    def saved_name(self, name: str) -> str:
        return name if name in self.where else TIED_COPIES.get(name, name)

    def full_weight(self, name: str) -> torch.Tensor:
        name = self.saved_name(name)
        return self._merge(name, [f["model"][name] for f in self._stage_files(self.where[name])])

    def full_optimizer_state(self, name: str) -> dict | None:
        name = self.saved_name(name)
        shards = [f.get("optimizer", {}).get("per_param", {}).get(name) for f in self._stage_files(self.where[name])]
        if shards[0] is None:
            return None
        return {
            key: self._merge(name, [s[key] for s in shards]) if torch.is_tensor(value) and value.ndim > 0 else value
            for key, value in shards[0].items()
        }

    def optimizer_groups(self) -> list[dict] | None:
        first = self._stage_files(0)[0].get("optimizer")
        return first["groups"] if first else None


def _fit_vocab_padding(tensor: torch.Tensor, saved_shape: list[int], want_shape: list[int], saved_pad: int, want_pad: int):
    """Trim or zero-extend the vocabulary padding rows when the tp degree changes the padded size."""
    diff = [d for d, (a, b) in enumerate(zip(saved_shape, want_shape)) if a != b]
    if len(saved_shape) != len(want_shape) or len(diff) != 1:
        return None
    dim = diff[0]
    if saved_shape[dim] != saved_pad or want_shape[dim] != want_pad:
        return None
    if want_pad < saved_pad:
        return tensor.narrow(dim, 0, want_pad).clone()
    pad_shape = list(tensor.shape)
    pad_shape[dim] = want_pad - saved_pad
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)


def load_full_state_dict(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """All weights merged to the tp=1 layout (vocabulary padding trimmed for tp=1), and the manifest."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    reader = _ShardReader(ckpt_dir, manifest)
    model_cfg = manifest["config"]["model"]
    saved_pad = manifest.get("padded_vocab_size")
    tp1_pad = padded_vocab_size(model_cfg["vocab_size"], model_cfg["make_vocab_size_divisible_by"], 1)
    state = {}
    tied = model_cfg.get("tie_embeddings")
    for name in sorted(reader.where, key=lambda n: reader.where[n]):
        if tied and TIED_COPIES.get(name) in reader.where:
            continue
        tensor = reader.full_weight(name)
        shape = list(tensor.shape)
        if saved_pad and saved_pad != tp1_pad and name in _VOCAB_ROWS:  # other dims may equal the padded size
            want = [tp1_pad, *shape[1:]]
            tensor = _fit_vocab_padding(tensor, shape, want, saved_pad, tp1_pad) if want != shape else tensor
        state[name] = tensor
    return state, manifest


def load_full_optimizer_state(ckpt_dir: str | Path) -> dict | None:
    """Every parameter's optimizer state merged to the tp=1 layout (vocabulary padding as saved),
    as ``{"per_param", "groups"}``; None when the checkpoint holds weights only."""
    ckpt_dir = resolve_checkpoint_dir(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if not manifest.get("has_optimizer"):
        return None
    reader = _ShardReader(ckpt_dir, manifest)
    per_param = {}
    for name in sorted(reader.where, key=lambda n: reader.where[n]):
        state = reader.full_optimizer_state(name)
        if state is not None:
            per_param[name] = state
    return {"per_param": per_param, "groups": reader.optimizer_groups()}


# ----------------------------------------------------------------------------- load into a model


VALUE_HEAD = "value_head."
LM_HEAD = "output."


def _head_swap(manifest: dict, named, weights_only: bool) -> set[str]:
    """Names to leave out of a weights-only load that moves a language model onto a value head
    (SFT -> reward model or critic): the model's new value head keeps its initialization, and
    the checkpoint's vocabulary head is not read."""
    saved = manifest["params"]
    model_value_head = {n for n, _ in named if n.startswith(VALUE_HEAD)}
    if not weights_only or not model_value_head or any(n.startswith(VALUE_HEAD) for n in saved):
        return set()
    return model_value_head | {n for n in saved if n.startswith(LM_HEAD)}


def _shape_problems(manifest: dict, named, dims, model_padded_vocab: int | None, skip: set[str] = frozenset()) -> list[str]:
    saved = {n: v for n, v in manifest["params"].items() if n not in skip}
    named = [(n, p) for n, p in named if n not in skip]
    saved_pad = manifest.get("padded_vocab_size")
    tied = manifest["config"]["model"].get("tie_embeddings")
    local = {n for n, _ in named}
    problems = []
    for name, param in named:
        want = _full_shape(param, dims.tp)
        if name not in saved and tied and TIED_COPIES.get(name) in saved:
            name = TIED_COPIES[name]
        if name not in saved:
            problems.append(f"{name}: missing from the checkpoint (model expects shape {want})")
        elif saved[name]["shape"] != want and not _padding_only(saved[name]["shape"], want, saved_pad, model_padded_vocab):
            problems.append(f"{name}: checkpoint shape {saved[name]['shape']} != model shape {want}")
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
    return _fit_vocab_padding(probe, saved_shape, want_shape, saved_pad, want_pad) is not None


def _same_layout(manifest: dict, named, dims) -> bool:
    layout = manifest["layout"]
    if (layout["tp"], layout["pp"]) != (dims.tp, dims.pp):
        return False
    saved_names = manifest["files"].get(shard_file_name(dims.tp_rank, dims.pp_rank))
    return saved_names is not None and set(saved_names) == {n for n, _ in named}


def _reshard(full: torch.Tensor, name: str, param: torch.Tensor, manifest: dict, dims, model_pad) -> torch.Tensor:
    want = _full_shape(param, dims.tp)
    if list(full.shape) != want:
        full = _fit_vocab_padding(full, list(full.shape), want, manifest.get("padded_vocab_size"), model_pad)
    return _shard(full, name, param, dims.tp_rank, dims.tp)


def _shard(full: torch.Tensor, name: str, layout_source, tp_rank: int, tp: int) -> torch.Tensor:
    """``tp_rank``'s piece of ``full`` cut like ``layout_source`` (a parameter or a probe with its attributes)."""
    try:
        return shard_tensor(full, tp_rank=tp_rank, tp=tp, **layout_of(layout_source))
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}; choose a tensor-parallel degree that splits it") from exc


def _local_state_from_reader(reader: _ShardReader, named, dims, model_pad, with_optimizer: bool):
    weights, per_param = {}, {}
    for name, param in tqdm(named, desc="resharding checkpoint", leave=False, disable=not _is_rank0() or len(named) < 100):
        weights[name] = _reshard(reader.full_weight(name), name, param, reader.manifest, dims, model_pad)
        if with_optimizer:
            state = reader.full_optimizer_state(name)
            if state is not None:
                per_param[name] = {
                    k: _reshard(v, name, param, reader.manifest, dims, model_pad) if torch.is_tensor(v) and v.ndim > 0 else v
                    for k, v in state.items()
                }
    optimizer_state = {"per_param": per_param, "groups": reader.optimizer_groups()} if with_optimizer else None
    return weights, optimizer_state


def load_checkpoint(
    load_dir: str | Path,
    model_chunks: list[torch.nn.Module],
    dims,
    optimizer: torch.optim.Optimizer | None = None,
    weights_only: bool = False,
    rng_trackers=(),
    padded_vocab_size: int | None = None,
) -> dict:
    """Load a checkpoint into this rank's model chunks (collective when resharding is not needed too).

    Resharding happens automatically when the saved (tp, pp) layout differs. With
    ``weights_only`` (fine-tuning) the optimizer, RNG and training state are ignored, and a
    model with a value head may start from a language model's checkpoint (the value head
    keeps its initialization; the vocabulary head is not read).
    Returns ``{"iteration", "train_state", "manifest", "resharded", "rng_restored"}``.
    """
    ckpt_dir = resolve_checkpoint_dir(load_dir)
    manifest = read_manifest(ckpt_dir)
    named = named_parameters(model_chunks)
    skip = _head_swap(manifest, named, weights_only)
    problems = _shape_problems(manifest, named, dims, padded_vocab_size, skip)
    if problems:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} does not match the model built from the config "
            f"({len(problems)} mismatched keys):\n  " + "\n  ".join(problems)
            + "\nuse the model section the checkpoint was trained with (see its manifest.json)"
        )
    with_optimizer = optimizer is not None and not weights_only and manifest.get("has_optimizer", False)
    named = [(n, p) for n, p in named if n not in skip]
    resharded = bool(skip) or not _same_layout(manifest, named, dims)
    if resharded:
        weights, optimizer_state = _local_state_from_reader(
            _ShardReader(ckpt_dir, manifest), named, dims, padded_vocab_size, with_optimizer
        )
    else:
        shard = _load_file(ckpt_dir / shard_file_name(dims.tp_rank, dims.pp_rank))
        weights, optimizer_state = shard["model"], shard.get("optimizer") if with_optimizer else None
    with torch.no_grad():
        for name, param in named:
            param.copy_(weights[name].to(dtype=param.dtype))
    if optimizer_state is not None:
        _load_optimizer_state(optimizer, named, optimizer_state)  # after the weights: ZeRO re-reads them
    rng_restored = False
    rng_file = ckpt_dir / "rng" / f"rank{_world_rank():05d}.pt"
    same_world = (manifest["layout"]["tp"], manifest["layout"]["pp"], manifest["layout"]["dp"]) == (dims.tp, dims.pp, dims.dp)
    if not weights_only and same_world and rng_file.is_file():
        restore_rng_state(_load_file(rng_file), rng_trackers)
        rng_restored = True
    _barrier()
    return {
        "iteration": 0 if weights_only else manifest["iteration"],
        "train_state": {} if weights_only else manifest["train_state"],
        "manifest": manifest,
        "resharded": resharded,
        "rng_restored": rng_restored,
    }


# ----------------------------------------------------------------------------- write full weights at a layout


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
    from megatron_lite.config import ConfigError, ModelConfig, ParallelConfig, build_dataclass
    from megatron_lite.model.layout_check import validate_layout
    from megatron_lite.parallel.dims import ParallelDims

    model_cfg = build_dataclass(ModelConfig, config["model"], "model")
    if model_cfg.vocab_size <= 0:
        raise ConfigError("config model.vocab_size must be set (> 0) to save full weights")
    parallel = build_dataclass(ParallelConfig, {**config.get("parallel", {}), "tp": tp, "pp": pp}, "parallel")
    validate_layout(parallel, model_cfg, tp * pp)
    config = {**config, "parallel": {**config.get("parallel", {}), "tp": tp, "pp": pp}}
    dims = ParallelDims(tp=tp, pp=pp, dp=1, virtual_pp=parallel.virtual_pp, stage_layers=parallel.stage_layers)
    padded = padded_vocab_size(model_cfg.vocab_size, model_cfg.make_vocab_size_divisible_by, tp)
    save_dir = Path(save_dir)
    final = save_dir / iteration_dir_name(iteration)
    partial = save_dir / (final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files, params = {}, {}
    for pp_rank in range(pp):
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
        optimizer_shards: list[dict[str, dict]] = [{} for _ in range(tp)]
        for name, layout_param in _stage_parameters(model_cfg, dims, pp_rank):
            full = _full_weight_for(state_dict, name, layout_param, model_cfg.vocab_size, padded)
            for tp_rank in range(tp):
                # clone: a view would save its whole underlying storage
                shards[tp_rank][name] = _shard(full, name, layout_param, tp_rank, tp).clone()
            if optimizer_state is not None:
                for tp_rank, state in enumerate(_optimizer_shards(optimizer_state["per_param"], name, layout_param,
                                                                  model_cfg.vocab_size, padded, tp)):
                    optimizer_shards[tp_rank][name] = state
            probe = torch.empty(shards[0][name].shape, dtype=full.dtype, device="meta")
            for key, value in layout_of(layout_param).items():
                setattr(probe, key, value)
            params[name] = _meta_entry(probe, tp)
        for tp_rank, shard in enumerate(shards):
            content = {"model": shard}
            if optimizer_state is not None:
                content["optimizer"] = {"per_param": optimizer_shards[tp_rank], "groups": optimizer_state["groups"]}
            _save_durably(content, partial / shard_file_name(tp_rank, pp_rank))
            files[shard_file_name(tp_rank, pp_rank)] = sorted(shard)
    manifest = _manifest(iteration, _layout(dims, config), padded, files, params, train_state,
                         optimizer_state is not None, config)
    _publish(save_dir, partial, final, manifest, tokenizer_dir)
    return final


def _stage_parameters(model_cfg, dims, pp_rank: int) -> list[tuple[str, torch.Tensor]]:
    """Names and partition metadata of every parameter stage ``pp_rank`` holds, from a model on
    the meta device (no memory; tp = 1 shapes)."""
    import dataclasses

    from megatron_lite.model.gpt import GPT
    from megatron_lite.parallel.dims import ParallelDims
    from megatron_lite.parallel.pipeline import chunk_layers

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
    shards: list[dict] = [{} for _ in range(tp)]
    for key, value in per_param[source].items():
        if not (torch.is_tensor(value) and value.ndim > 0):  # step counters are shared by every shard
            for shard in shards:
                shard[key] = value
            continue
        full = _full_weight_for({name: value}, name, layout_param, vocab_size, padded)
        for tp_rank, shard in enumerate(shards):
            shard[key] = _shard(full, name, layout_param, tp_rank, tp).clone()
    return shards


def _full_weight_for(state_dict, name: str, layout_param: torch.Tensor, vocab_size: int, padded: int) -> torch.Tensor:
    source = name if name in state_dict else TIED_COPIES.get(name, name)
    if source not in state_dict:
        raise CheckpointError(f"{name} is missing from the weights to save; every parameter of the model is needed")
    full = state_dict[source]
    want = list(layout_param.shape)
    if name in _VOCAB_ROWS and full.shape[0] >= vocab_size:
        want[0] = padded
        if full.shape[0] > padded:
            full = full[:padded]
        elif full.shape[0] < padded:
            full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    if list(full.shape) != want:
        raise CheckpointError(f"{name}: the weights to save have shape {list(full.shape)}, the model expects {want}")
    return full
