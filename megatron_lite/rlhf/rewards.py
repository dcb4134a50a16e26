"""Rewards computed by programs: a verifier, a format check, a length penalty, or any function of
the user's, beside (or instead of) a learned reward model.

A reward function has the signature TRL's users know::

    fn(prompts: list[str], completions: list[str], completion_ids: list[list[int]], **fields)
        -> list[float | None]

one value per completion. ``fields`` are the prompt records' other JSONL keys, each a list with
one entry per completion (``answer=[...]`` for records ``{"prompt": ..., "answer": ...}``; None
where a record lacks the key). ``None`` means "no opinion" on that completion.

``rlhf.reward_functions`` lists them as ``"package.module:function"`` with ``rlhf.reward_weights``
(default 1.0 each). A completion's reward is the weighted sum over the functions that have an
opinion on it (a function's None adds nothing, it is not read as 0 of a mean); a completion no
function has an opinion on gets 0. With a reward model the model's score is added to that sum.

A function that raises, returns the wrong number of values, or a value that is not a finite
number (or None) stops the run with a ``RewardFunctionError`` naming the function and the record.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_lite.config import ConfigError
from megatron_lite.errors import UserError

RewardFn = Callable[..., list]


class RewardFunctionError(UserError, RuntimeError):
    """A reward function misbehaved; the message names it and the record."""


@dataclass(frozen=True)
class RewardFunction:
    name: str  # as configured: "package.module:function"
    fn: RewardFn
    weight: float = 1.0

    @property
    def short_name(self) -> str:
        """The function's own name, for metric keys (``reward/numeric_answer``)."""
        return self.name.rsplit(":", 1)[-1]


def load_reward_functions(paths: Sequence[str], weights: Sequence[float] = ()) -> list[RewardFunction]:
    """Import every ``"package.module:function"`` of ``rlhf.reward_functions``; one that does not
    import, or is not callable, is refused naming the key and the fix."""
    weights = list(weights) or [1.0] * len(paths)
    loaded = []
    for number, (path, weight) in enumerate(zip(paths, weights)):
        key = f"rlhf.reward_functions[{number}]={path!r}"
        module_name, _, attribute = path.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any failure while importing the user's module is a config problem
            raise ConfigError(f"{key} does not import ({type(exc).__name__}: {exc}); make {module_name} importable "
                              f"(install it or add its directory to PYTHONPATH) or fix the path") from None
        fn = getattr(module, attribute, None)
        if not callable(fn):
            raise ConfigError(f"{key}: {module_name} has no function {attribute!r}; name a function of that module")
        loaded.append(RewardFunction(path, fn, float(weight)))
    return loaded


def fields_by_key(records: Sequence[dict]) -> dict[str, list]:
    """Per-record dicts -> one list per key over the records (None where a record lacks it)."""
    keys = sorted({key for record in records for key in record})
    return {key: [record.get(key) for record in records] for key in keys}


def call_reward_function(function: RewardFunction, prompts: list[str], completions: list[str],
                         completion_ids: list[list[int]], fields: dict[str, list],
                         sources: Sequence[str]) -> list[float | None]:
    """One function's values, checked: a float or None per completion. ``sources`` ("path:line")
    name the records in errors."""
    try:
        values = function.fn(prompts, completions, completion_ids, **fields)
    except Exception as exc:
        raise RewardFunctionError(
            f"reward function {function.name} raised {type(exc).__name__}: {exc} on the batch of records "
            f"{_listed(sources)}; fix the function (return None for a completion it cannot judge)") from exc
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        count = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardFunctionError(
            f"reward function {function.name} returned {count} values for {len(completions)} completions "
            f"(records {_listed(sources)}); return a list with one float or None per completion")
    checked = []
    for value, source, completion in zip(values, sources, completions):
        if value is not None and not _is_finite_number(value):
            raise RewardFunctionError(
                f"reward function {function.name} returned {value!r} for the record {source} "
                f"(completion {completion[:80]!r}); return a finite float, or None for no opinion")
        checked.append(None if value is None else float(value))
    return checked


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _listed(sources: Sequence[str], most: int = 4) -> str:
    shown = ", ".join(sources[:most])
    return shown + (f" and {len(sources) - most} more" if len(sources) > most else "")


def combine(per_function: dict[str, list[float | None]], functions: Sequence[RewardFunction],
            size: int) -> torch.Tensor:
    """(size,) float64: per completion, the weighted sum over the functions with an opinion on it
    (0 without functions)."""
    total = torch.zeros(size, dtype=torch.float64)
    for function in functions:
        for row, value in enumerate(per_function[function.name]):
            if value is not None:
                total[row] += function.weight * value
    return total


def score_with_functions(functions: Sequence[RewardFunction], prompts: list[str], completions: list[str],
                         completion_ids: list[list[int]], records: Sequence[dict],
                         sources: Sequence[str]) -> tuple[torch.Tensor, dict[str, list[float | None]]]:
    """(combined rewards (B,) float64, each function's values by name)."""
    fields = fields_by_key(records)
    per_function = {f.name: call_reward_function(f, prompts, completions, completion_ids, fields, sources)
                    for f in functions}
    return combine(per_function, functions, len(completions)), per_function


def score_answers(functions: Sequence[RewardFunction], records, rows: Sequence[int], answers: list[list[int]],
                  tokenizer) -> tuple[torch.Tensor, dict[str, list[float | None]]]:
    """The functions on sampled answers (token ids, the closing end-of-text dropped) to the prompts
    ``records[rows[i]]`` of a ``PromptDataset``: (combined (B,) float64, values by function)."""
    eod = tokenizer.eod_id
    completion_ids = [answer[:-1] if answer and answer[-1] == eod else answer for answer in answers]
    completions = [tokenizer.decode(ids) for ids in completion_ids]
    return score_with_functions(functions, [records.texts[i] for i in rows], completions, completion_ids,
                                [records.fields[i] for i in rows], [records.sources[i] for i in rows])


# ----------------------------------------------------------------------------- built-ins

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (e.g. "so it is 12." -> 12.0), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numeric_answer(prompts, completions, completion_ids, answer=None, **fields) -> list[float | None]:
    """1.0 when the last number of the completion equals the record's ``answer`` (to 1e-6
    relative), else 0.0; None for a record without a numeric ``answer``."""
    answers = answer if answer is not None else [None] * len(completions)
    values = []
    for completion, expected in zip(completions, answers):
        target = _as_number(expected)
        if target is None:
            values.append(None)
            continue
        got = last_number(completion)
        values.append(float(got is not None and math.isclose(got, target, rel_tol=1e-6, abs_tol=1e-9)))
    return values


def _as_number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def regex_format(pattern: str) -> RewardFn:
    """A reward function: 1.0 when the whole completion (stripped) matches ``pattern``, else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def format_reward(prompts, completions, completion_ids, **fields) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]

    format_reward.__name__ = "format_reward"
    return format_reward


# "... answer: 12" or "12": a number stated last, which numeric_answer can read
answer_format = regex_format(r"(?:.*\b[Aa]nswer:\s*)?[-+]?\d+(?:\.\d+)?\.?")


def length_penalty_over(max_tokens: int) -> RewardFn:
    """A reward function: -(tokens beyond ``max_tokens``) / ``max_tokens``, 0 for shorter answers."""
    def length_penalty(prompts, completions, completion_ids, **fields) -> list[float]:
        return [-max(0, len(ids) - max_tokens) / max_tokens for ids in completion_ids]

    return length_penalty


length_penalty = length_penalty_over(16)  # rlhf.reward_functions: ["megatron_lite.rlhf.rewards:length_penalty"]
