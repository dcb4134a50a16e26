"""What a checkpoint is on disk: its names, its ``Manifest``, and the one reader of its shard files.

Layout of a save directory::

    latest                          "iter_0000100", replaced atomically once a save is complete
    iter_0000100/
      manifest.json                 layout, per-parameter partition metadata and full shapes,
                                    step, training state (scheduler, loss scale, data position),
                                    and the resolved config
      model_tp00_pp000.pt           one file per (tp, pp) rank (written by dp rank 0): weights and
                                    optimizer state, both keyed by global parameter name
      rng/rank00000.pt              every rank's RNG streams (torch, cuda, numpy, python, tp tracker)
      tokenizer/                    a copy of the tokenizer directory

The manifest also says what the weights mean: the real vocabulary size, the tokenizer's identity
(a hash of its files), the head kind ("lm" or "value"), and each shard and rng file's size and
CRC-32, so a truncated or damaged file is named on load instead of failing inside torch.

A save is written into ``iter_N.partial/`` and renamed into place only when every file is
on disk, then ``latest`` is rewritten through a temporary file, fsync and rename. A crash
at any point leaves the previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import pickle
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_lite.config import ModelConfig, build_dataclass
from megatron_lite.errors import UserError
from megatron_lite.parallel.layout import ParamLayout, layout_of
from megatron_lite.training.checkpoint import durable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
TOKENIZER = "tokenizer"
# With tied embeddings and pp > 1 the last stage holds a copy of the word embedding under
# its own name; layouts without that copy read it from (or drop it for) the embedding.
TIED_COPIES = {"output.weight": "embedding.word.weight"}
VOCAB_ROWS = set(TIED_COPIES) | set(TIED_COPIES.values())  # tensors whose dim 0 is the padded vocabulary
VALUE_HEAD = "value_head."
CHUNK_BYTES = 1 << 22


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit the model being loaded."""


# ----------------------------------------------------------------------------- names


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def partial_dir(final: Path) -> Path:
    """Where a save is assembled before it is renamed to ``final``."""
    return final.with_name(final.name + ".partial")


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}_pp{pp_rank:03d}.pt"


def pp_rank_of(shard_file: str) -> int:
    return int(shard_file.rsplit("_pp", 1)[1].split(".")[0])


def rng_file(ckpt_dir: Path, world_rank: int) -> Path:
    return ckpt_dir / "rng" / f"rank{world_rank:05d}.pt"


def named_parameters(model_chunks: list[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """Every parameter this rank holds, by global name, each name once (chunks use global layer indices)."""
    seen: dict[str, torch.nn.Parameter] = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            seen.setdefault(name, param)
    return list(seen.items())


# ----------------------------------------------------------------------------- a parameter's split


def full_shape_of(param: torch.Tensor, tp: int) -> list[int]:
    return layout_of(param).full_shape(param.shape, tp)


def shard_for_rank(full: torch.Tensor, name: str, layout: ParamLayout, tp_rank: int, tp: int) -> torch.Tensor:
    """``tp_rank``'s piece of ``full`` cut as ``layout`` says."""
    try:
        return layout.shard_tensor(full, tp_rank, tp)
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}; choose a tensor-parallel degree that splits it") from exc


def fit_vocab_padding(tensor: torch.Tensor, saved_shape: list[int], want_shape: list[int], saved_pad: int,
                      want_pad: int) -> torch.Tensor | None:
    """Trim or zero-extend the vocabulary padding rows when the tp degree changes the padded size;
    None when the shapes differ in more than that."""
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


# ----------------------------------------------------------------------------- the manifest


def _check_fields(cls: type, entry: dict, where: str) -> None:
    """Refuse unknown and missing fields of a dataclass's JSON form with a message that names them."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in entry:
        if key not in known:
            nearest = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{nearest[0]}'?)" if nearest else ""
            raise CheckpointError(f"{where}: unknown field '{key}'{hint}; the manifest was not written by this "
                                  f"version of megatron-lite")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in entry]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}; the manifest is damaged or "
                              f"not a megatron-lite checkpoint")


def _from_fields(cls: type, entry: dict, where: str):
    _check_fields(cls, entry, where)
    return cls(**entry)


def _manifest_object(text: str, where: str) -> dict:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}): the file is "
                              f"truncated or damaged") from exc
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} holds no manifest object: the file is damaged")
    return entry


@dataclass(frozen=True)
class ParamRecord:
    """One parameter in the manifest: its full (tp = 1) shape, dtype, and how it is split over tp."""

    shape: list[int]
    dtype: str
    partition_dim: int | None = None
    partition_chunks: int = 1
    partition_groups: int = 1
    replicated_rows: int = 0

    @classmethod
    def describe(cls, shape, dtype: torch.dtype, layout: ParamLayout) -> ParamRecord:
        """The record of a parameter of full ``shape`` split as ``layout`` says."""
        return cls(shape=list(shape), dtype=str(dtype).replace("torch.", ""), **layout.manifest_fields())

    def layout(self) -> ParamLayout:
        return ParamLayout(partition_dim=self.partition_dim, partition_chunks=self.partition_chunks,
                           partition_groups=self.partition_groups, replicated_rows=self.replicated_rows)

    def to_dict(self) -> dict:
        """The grouped-row fields only where they are used, so entries of other parameters keep the
        form readers before them expect."""
        entry = {"partition_dim": self.partition_dim, "partition_chunks": self.partition_chunks}
        if self.partition_groups > 1 or self.replicated_rows > 0:
            entry.update(partition_groups=self.partition_groups, replicated_rows=self.replicated_rows)
        return {**entry, "shape": self.shape, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, entry: dict, where: str) -> ParamRecord:
        return _from_fields(cls, entry, where)


@dataclass(frozen=True)
class SavedLayout:
    """The parallel layout the checkpoint was written at."""

    tp: int
    pp: int
    dp: int
    virtual_pp: int = 1
    zero1: bool = False

    @classmethod
    def of(cls, dims, config: dict) -> SavedLayout:
        parallel = config.get("parallel", {})
        return cls(tp=dims.tp, pp=dims.pp, dp=dims.dp, virtual_pp=parallel.get("virtual_pp", 1),
                   zero1=parallel.get("zero1", False))


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``: what every shard file holds and the run that wrote them. Fields are in the
    order of the file; the optional ones were absent from some early checkpoints."""

    format: int = FORMAT_VERSION
    iteration: int
    layout: SavedLayout
    padded_vocab_size: int | None = None
    files: dict[str, list[str]]  # shard file -> the parameter names it holds
    params: dict[str, ParamRecord]
    train_state: dict = field(default_factory=dict)  # step, consumed samples, scheduler, loss scaler
    has_optimizer: bool = False
    config: dict  # the resolved config of the run, as a dict
    vocab_size: int | None = None  # the real vocabulary (absent before it was recorded: read the config's)
    tokenizer: dict | None = None  # {"sha256": hash of the tokenizer directory's files}
    head: str | None = None  # "lm" or "value" (absent before it was recorded: derived from the parameters)
    file_checks: dict[str, dict] = field(default_factory=dict)  # file -> {"size", "crc32"}; {} in old checkpoints

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "iteration": self.iteration,
            "layout": dataclasses.asdict(self.layout),
            "padded_vocab_size": self.padded_vocab_size,
            "files": self.files,
            "params": {name: record.to_dict() for name, record in self.params.items()},
            "train_state": self.train_state,
            "has_optimizer": self.has_optimizer,
            "config": self.config,
            **self._recorded_since_format_1(),
        }

    def _recorded_since_format_1(self) -> dict:
        """The fields added to format 1, only where known, so an older manifest is rewritten unchanged."""
        added = {"vocab_size": self.vocab_size, "tokenizer": self.tokenizer, "head": self.head,
                 "file_checks": self.file_checks}
        return {key: value for key, value in added.items() if value}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    @classmethod
    def from_dict(cls, entry: dict, where: str = MANIFEST) -> Manifest:
        if entry.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{where} has checkpoint format {entry.get('format')}, expected {FORMAT_VERSION}")
        _check_fields(cls, entry, where)
        layout = _from_fields(SavedLayout, entry["layout"], f"{where}: layout")
        params = {name: ParamRecord.from_dict(record, f"{where}: params.{name}")
                  for name, record in entry["params"].items()}
        return cls(**{**entry, "layout": layout, "params": params})

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        return cls.from_dict(_manifest_object(text, where), where)

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config["model"].get("tie_embeddings"))

    @property
    def real_vocab_size(self) -> int:
        return self.vocab_size if self.vocab_size is not None else int(self.config["model"]["vocab_size"])

    @property
    def head_kind(self) -> str:
        if self.head is not None:
            return self.head
        return "value" if any(name.startswith(VALUE_HEAD) for name in self.params) else "lm"

    def model_config(self) -> ModelConfig:
        """The ``ModelConfig`` the checkpoint was trained with (vocab size already resolved)."""
        return build_dataclass(ModelConfig, self.config["model"], "model")

    def stage_of_params(self) -> dict[str, int]:
        """Parameter name -> the pipeline rank whose files hold it, in stage order."""
        stage_of: dict[str, int] = {}
        for file_name, names in sorted(self.files.items()):
            for name in names:
                stage_of.setdefault(name, pp_rank_of(file_name))
        return dict(sorted(stage_of.items(), key=lambda item: item[1]))


# ----------------------------------------------------------------------------- locate, read, publish


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """``path`` may be a save directory (follows ``latest``) or one ``iter_*`` directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{latest} points at {target.name}, which has no {MANIFEST}; the checkpoint is "
                                  f"incomplete; {previous_iterations_hint(target)}")
        return target
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist; check checkpoint.load / --load")
    raise CheckpointError(
        f"no checkpoint in {path}: expected a '{LATEST}' file or a '{MANIFEST}' "
        f"(point at the checkpoint.save directory of a finished run or at one of its iter_* directories)"
    )


def read_manifest(path: str | Path) -> Manifest:
    ckpt_dir = resolve_checkpoint_dir(path)
    where = str(ckpt_dir / MANIFEST)
    try:
        entry = _manifest_object((ckpt_dir / MANIFEST).read_text(), where)
    except CheckpointError as exc:  # a torn file: another iteration may be whole
        raise CheckpointError(f"{exc}; {previous_iterations_hint(ckpt_dir)}") from exc
    return Manifest.from_dict(entry, where)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    durable.write_text(directory / MANIFEST, manifest.to_json())


def publish(save_dir: Path, final: Path, manifest: Manifest, tokenizer_dir: str | Path | None) -> None:
    """Finish the partial directory of ``final``, move it into place, then point ``latest`` at it.
    The manifest gets the head kind and the tokenizer's identity here, so every writer records them."""
    partial = partial_dir(final)
    manifest.head = manifest.head_kind
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, partial / TOKENIZER)
        manifest.tokenizer = {"sha256": tokenizer_hash(partial / TOKENIZER)}
    write_manifest(partial, manifest)
    durable.replace_directory(partial, final)
    durable.write_text(save_dir / LATEST, final.name + "\n")


# ----------------------------------------------------------------------------- integrity


def tokenizer_hash(directory: Path) -> str:
    """One hash over the tokenizer directory's file names and contents: equal hashes, same tokenizer."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def file_check(path: Path) -> dict:
    """What the manifest records of a written file: its size and CRC-32 (fast, and enough to catch
    truncation and flipped bytes; this is not a defence against tampering)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def file_problem(ckpt_dir: Path, manifest: Manifest, name: str, checksum: bool) -> str | None:
    """What is wrong with a recorded file (missing, wrong size, or with ``checksum`` altered), or None."""
    path = ckpt_dir / name
    if not path.is_file():
        return f"{path} is missing; the checkpoint is incomplete"
    recorded = manifest.file_checks.get(name)
    if recorded is None:  # written before files were recorded
        return None
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"{path} has {size} bytes, the manifest records {recorded['size']}: the file is truncated or damaged"
    if checksum and file_check(path)["crc32"] != recorded["crc32"]:
        return f"{path} fails its checksum (CRC-32 differs from the manifest's): the file is damaged"
    return None


def check_file(ckpt_dir: Path, manifest: Manifest, name: str, checksum: bool) -> None:
    """Refuse a recorded file that is missing, of the wrong size, or (with ``checksum``) altered."""
    problem = file_problem(ckpt_dir, manifest, name, checksum)
    if problem:
        raise CheckpointError(f"{problem}; {previous_iterations_hint(ckpt_dir)}")


def iteration_is_complete(ckpt_dir: Path) -> bool:
    """Its manifest reads and every file it records is there at its recorded size."""
    try:
        manifest = Manifest.from_json((ckpt_dir / MANIFEST).read_text(), str(ckpt_dir / MANIFEST))
    except (OSError, CheckpointError):
        return False
    return not any(file_problem(ckpt_dir, manifest, name, checksum=False)
                   for name in [*manifest.files, *manifest.file_checks])


def complete_iterations(save_dir: Path) -> list[Path]:
    """The ``iter_*`` directories of ``save_dir`` that are complete, oldest first (an unfinished
    ``.partial`` save or a replaced ``.old`` one is no checkpoint)."""
    candidates = sorted(p for p in Path(save_dir).glob("iter_*")
                        if p.is_dir() and not p.name.endswith((".partial", ".old")))
    return [p for p in candidates if iteration_is_complete(p)]


def previous_iterations_hint(ckpt_dir: Path) -> str:
    """What to load instead of the damaged ``ckpt_dir``: the complete iterations beside it."""
    complete = [p.name for p in complete_iterations(ckpt_dir.parent) if p != ckpt_dir]
    if not complete:
        return f"no other complete iteration in {ckpt_dir.parent}: start again or restore the file"
    return (f"load the previous iteration instead (checkpoint.load={ckpt_dir.parent / complete[-1]}); "
            f"complete iterations in {ckpt_dir.parent}: {', '.join(complete)}")


def load_torch_file(path: Path, ckpt_dir: Path, **kwargs) -> dict:
    """``torch.load`` whose failure on a damaged file names the file and what to load instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{path} cannot be read ({type(exc).__name__}: {first_line}): the file is "
                              f"truncated or damaged; {previous_iterations_hint(ckpt_dir)}") from exc


# ----------------------------------------------------------------------------- the shard reader


class ShardReader:
    """Full (tp = 1) tensors of a checkpoint by global name, merged from its tp shards on request.

    The shard files are memory-mapped: only the pages of the tensors actually read come into
    memory, so converting or resharding a model larger than memory works one tensor at a time.
    Every shard file's size is checked on opening, and its checksum too with ``verify``.
    """

    def __init__(self, path: str | Path, verify: bool = False):
        self.directory = resolve_checkpoint_dir(path)
        self.manifest = read_manifest(self.directory)
        for name in sorted(self.manifest.files):
            check_file(self.directory, self.manifest, name, checksum=verify)
        self.stage_of = self.manifest.stage_of_params()
        self._files: dict[tuple[int, int], dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.stage_of

    def saved_name(self, name: str) -> str:
        """The name ``name`` is stored under: a tied copy the checkpoint lacks is read from its original."""
        return name if name in self.stage_of else TIED_COPIES.get(name, name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._merge(name, [shard["model"][name] for shard in self._stage_shards(name)])

    def optimizer_state(self, name: str) -> dict | None:
        """The full optimizer state of ``name`` (step counters as saved), None without one."""
        shards = [shard.get("optimizer", {}).get("per_param", {}).get(name) for shard in self._stage_shards(name)]
        if shards[0] is None:
            return None
        return {
            key: self._merge(name, [s[key] for s in shards]) if torch.is_tensor(value) and value.ndim > 0 else value
            for key, value in shards[0].items()
        }

    def optimizer_groups(self) -> list[dict] | None:
        first = self._shard_file(0, 0).get("optimizer")
        return first["groups"] if first else None

    def local_shard(self, tp_rank: int, pp_rank: int) -> dict:
        """One rank's file read whole, not mapped: its tensors become a model's and an optimizer's."""
        return load_torch_file(self._path(tp_rank, pp_rank), self.directory)

    def _stage_shards(self, name: str) -> list[dict]:
        if name not in self.stage_of:
            raise CheckpointError(f"{self.directory} holds no parameter {name!r}; it does not match its manifest")
        return [self._shard_file(tp_rank, self.stage_of[name]) for tp_rank in range(self.manifest.layout.tp)]

    def _shard_file(self, tp_rank: int, pp_rank: int) -> dict:
        key = (tp_rank, pp_rank)
        if key not in self._files:
            self._files[key] = load_torch_file(self._path(tp_rank, pp_rank), self.directory, mmap=True)
        return self._files[key]

    def _path(self, tp_rank: int, pp_rank: int) -> Path:
        path = self.directory / shard_file_name(tp_rank, pp_rank)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete; "
                                  f"{previous_iterations_hint(self.directory)}")
        return path

    def _merge(self, name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
        try:
            return self.manifest.params[name].layout().merge_shards(pieces)
        except ValueError as exc:
            raise CheckpointError(f"{self.directory}: {name}: {exc}") from exc
