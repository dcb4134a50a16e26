"""A real text corpus with no download: this Python's standard library.

Two sources: the source files themselves (code) and the docstrings of their modules, classes
and functions, found with ``ast`` (prose). Files are visited in sorted order so that the corpus,
and everything built from it, is the same on every run of the same Python version.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(root: Path | None = None) -> Iterator[Path]:
    root = root or stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            yield path


def read_source(path: Path) -> str | None:
    """A source file's text; None when it cannot be read or is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def docstrings_of(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return [text for text in found if text and text.strip()]


def stdlib_corpus(max_bytes: int = 4_000_000, root: Path | None = None) -> dict[str, list[str]]:
    """{"code": [file text, ...], "docstrings": [docstring, ...]}, each source capped at
    ``max_bytes`` of UTF-8 (whole documents only)."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    sources: dict[str, list[str]] = {"code": [], "docstrings": []}
    used = {"code": 0, "docstrings": 0}

    def take(name: str, text: str) -> None:
        size = len(text.encode("utf-8"))
        if used[name] + size <= max_bytes:
            sources[name].append(text)
            used[name] += size

    for path in python_files(root):
        if min(used.values()) >= max_bytes * 0.99:
            break
        source = read_source(path)
        if source is None or not source.strip():
            continue
        take("code", source)
        for doc in docstrings_of(source):
            take("docstrings", doc)
    return sources
