"""An instruction set with no download, from the docstrings of this Python's standard library,
so every stage can be tried on a laptop: sft.jsonl ("What does json.dumps(obj, ...) do?" answered
with the first paragraph of its docstring) and preference.jsonl (that answer against the same
words shuffled).
"""

from __future__ import annotations

import ast
import json
import os
import platform
import random
from pathlib import Path
from typing import Iterator

from megatron_lite.data.corpus import python_files, read_source, stdlib_dir
from megatron_lite.rlhf.data import RLHFDataError

_DEMO_MARKER = "rlhf_demo.json"
_DEMO_VERSION = 2
_ANSWER_CHARS = 400


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _public_functions(tree: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of the public functions and methods under ``tree``, in source order.
    Function bodies are not entered: a nested function is an implementation detail."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not node.name.startswith("_"):
                yield f"{prefix}.{node.name}", node
        elif isinstance(node, ast.ClassDef):
            if not node.name.startswith("_"):
                yield from _public_functions(node, f"{prefix}.{node.name}")
        else:  # definitions inside `if`/`try` at module or class level
            yield from _public_functions(node, prefix)


def _first_paragraph(docstring: str) -> str:
    """The docstring up to its first blank line, on one line, at most ~400 characters."""
    paragraph = docstring.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    if len(text) <= _ANSWER_CHARS:
        return text
    return text[: _ANSWER_CHARS - 4].rsplit(" ", 1)[0] + " ..."


def _stdlib_examples(max_examples: int) -> list[dict]:
    """{"prompt", "response"} for public stdlib functions with a docstring, files in sorted order."""
    root = stdlib_dir()
    examples, seen = [], set()
    for path in python_files(root):
        module = _module_name(path, root)
        if not module or any(part.startswith("_") for part in module.split(".")):
            continue
        source = read_source(path)
        try:
            tree = ast.parse(source) if source else None
        except (SyntaxError, ValueError):
            tree = None
        if tree is None:
            continue
        for name, node in _public_functions(tree, module):
            docstring = ast.get_docstring(node)
            answer = _first_paragraph(docstring) if docstring else ""
            prompt = f"What does {name}({ast.unparse(node.args)}) do?"
            if not answer or prompt in seen:
                continue
            seen.add(prompt)
            examples.append({"prompt": prompt, "response": answer})
            if len(examples) == max_examples:
                return examples
    return examples


def _rejected(example: dict, examples: list[dict], rng: random.Random) -> str:
    """The answer's own words in a shuffled order (an incoherent answer, which a small model can
    learn to tell apart); for answers of fewer than four words, another function's answer."""
    words = example["response"].split()
    if len(words) >= 4:
        for _ in range(8):
            shuffled = rng.sample(words, len(words))
            if shuffled != words:
                return " ".join(shuffled)
    other = example
    while other["response"] == example["response"]:
        other = examples[rng.randrange(len(examples))]
    return other["response"]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    # a temporary name first, so an interrupted build leaves no half-written file under the final name
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def _marker_settings(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):  # absent or half-written: build again
        return None


def build_demo_rlhf_data(out_dir: str | Path, max_examples: int = 4000, seed: int = 0) -> dict[str, Path]:
    """sft.jsonl and preference.jsonl from the docstrings of this Python's standard library.

    SFT: "What does json.dumps(obj, *, skipkeys=False, ...) do?" -> the docstring's first
    paragraph. Preference: the same prompt, chosen = that paragraph, rejected = its words shuffled
    with random.Random(seed) (another function's paragraph when it has fewer than four words). Returns at once when both files exist with
    a marker recording the same settings.
    """
    if not isinstance(max_examples, int) or max_examples < 2:
        raise RLHFDataError(
            f"max_examples={max_examples!r} must be an integer of at least 2 (a rejected answer needs another example)"
        )
    out_dir = Path(out_dir)
    files = {"sft": out_dir / "sft.jsonl", "preference": out_dir / "preference.jsonl"}
    marker = out_dir / _DEMO_MARKER
    # the stdlib, and so the examples, change between Python versions
    settings = {"max_examples": max_examples, "seed": seed, "python": platform.python_version(), "version": _DEMO_VERSION}
    if _marker_settings(marker) == settings and all(path.is_file() for path in files.values()):
        return files
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    examples = _stdlib_examples(max_examples)
    if len({example["response"] for example in examples}) < 2:
        raise RLHFDataError(
            f"found {len(examples)} documented public functions in {stdlib_dir()}; need two with different docstrings"
        )
    rng = random.Random(seed)
    pairs = [{"prompt": example["prompt"], "chosen": example["response"], "rejected": _rejected(example, examples, rng)}
             for example in examples]
    _write_jsonl(files["sft"], examples)
    _write_jsonl(files["preference"], pairs)
    marker.write_text(json.dumps(settings))
    return files
