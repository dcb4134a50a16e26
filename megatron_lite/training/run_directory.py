"""Where a run writes, checked before its first step: ``checkpoint.save`` and ``log.dir`` must be
directories this process can create and write, and a fresh run must not replace another run's
checkpoints.

One command line serves the first submission of a cluster job and every requeue of it
(``checkpoint.save=X checkpoint.load=X``): a ``load`` that names the run's own, still empty save
directory means "start fresh", and a save directory that already holds checkpoints is only
written by the run that resumes them (or with ``checkpoint.overwrite=true``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from megatron_lite.config import CheckpointConfig, Config, ConfigError
from megatron_lite.training.checkpoint.format import LATEST, complete_iterations


def latest_checkpoint(save_dir: str | Path) -> str | None:
    """The name of the newest checkpoint in ``save_dir`` (what ``latest`` names, else the last complete
    ``iter_*`` directory), or None when it holds none."""
    save_dir = Path(save_dir)
    if (save_dir / LATEST).is_file():
        return (save_dir / LATEST).read_text().strip()
    complete = complete_iterations(save_dir)
    return complete[-1].name if complete else None


def _same_path(a: str | Path, b: str | Path) -> bool:
    """Both set and naming one directory (however spelled)."""
    return bool(str(a) and str(b)) and Path(a).resolve() == Path(b).resolve()


def _resumes_save_dir(checkpoint: CheckpointConfig) -> bool:
    """``checkpoint.load`` is the save directory or one of its ``iter_*`` directories."""
    if not checkpoint.load:
        return False
    load = Path(checkpoint.load)
    return _same_path(load, checkpoint.save) or _same_path(load.parent, checkpoint.save)


def resolved_load(checkpoint: CheckpointConfig, is_logging_rank: bool) -> str:
    """``checkpoint.load``, or "" when it names the run's own save directory and that holds no
    checkpoint yet (the first submission of a job whose requeues resume)."""
    if not _same_path(checkpoint.load, checkpoint.save) or latest_checkpoint(checkpoint.load) is not None:
        return checkpoint.load
    if is_logging_rank:
        print(f"checkpoint.load={checkpoint.load} holds no checkpoint yet: starting fresh "
              f"(it is also checkpoint.save, so a rerun of this command resumes)", flush=True)
    return ""


def check_run_directories(cfg: Config) -> None:
    """Refuse, before any work, a run whose checkpoints or logs could not be written or would
    replace another run's checkpoints. Every rank checks (every rank writes into ``checkpoint.save``)."""
    if cfg.checkpoint.save:
        _check_not_another_run(cfg.checkpoint)
        _check_writable_directory("checkpoint.save", cfg.checkpoint.save)
    _check_writable_directory("log.dir", cfg.log.dir)


def _check_not_another_run(checkpoint: CheckpointConfig) -> None:
    if checkpoint.overwrite or _resumes_save_dir(checkpoint) or not Path(checkpoint.save).is_dir():
        return
    latest = latest_checkpoint(checkpoint.save)
    if latest is not None:
        raise ConfigError(
            f"checkpoint.save={checkpoint.save} already holds another run's checkpoints (latest {latest}); "
            f"set checkpoint.load={checkpoint.save} to resume that run, or checkpoint.overwrite=true to "
            f"start afresh and replace them (or choose another checkpoint.save)"
        )


def _check_writable_directory(key: str, path: str) -> None:
    """Create ``path`` if missing and write a scratch file into it, so that a bad path fails now and
    not after hours of training at the first save."""
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; set {key} to a directory (created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}={path} cannot be created or written ({exc.strerror}); "
                          f"set {key} to a directory this user can write") from exc
