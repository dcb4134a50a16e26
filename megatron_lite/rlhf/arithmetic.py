"""A verifiable demo task with no download: "What does `len('while') + 3` evaluate to?".

Expressions over a few builtins (len, abs, min, max, sum) with small integers and the words of
Python's ``keyword`` module, each record carrying its answer::

    {"prompt": "What does `max(4, 9) - 2` evaluate to?", "response": "7", "answer": "7"}

so one file serves supervised fine-tuning (``response``) and RL with
``megatron_lite.rlhf.rewards:numeric_answer`` (``answer``). Answers are computed by
``evaluate_expression``, which walks the expression's syntax tree and allows only the node kinds
the generator writes: nothing is ever passed to ``eval``.
"""

from __future__ import annotations

import ast
import json
import keyword
import operator
import os
import random
from pathlib import Path

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod}
_VERSION = 1  # of the generator: a change rebuilds existing files
_FUNCTIONS = {"len": len, "abs": abs, "min": min, "max": max, "sum": sum}


class UnsafeExpression(ValueError):
    """An expression with a construct the evaluator does not allow."""


def evaluate_expression(text: str):
    """The value of ``text``: integer and string literals, lists and tuples of them, + - * // %
    (and + on strings), unary minus, and calls of len, abs, min, max and sum. Anything else (names,
    attributes, other calls, comprehensions) raises ``UnsafeExpression``."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise UnsafeExpression(f"not an expression: {text!r} ({exc.msg})") from None
    return _value(tree.body)


def _value(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, str):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(item) for item in node.elts]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
            raise UnsafeExpression("division by zero")
        if isinstance(left, str) or isinstance(right, str):
            if not (isinstance(node.op, ast.Add) and isinstance(left, str) and isinstance(right, str)):
                raise UnsafeExpression("strings only join with +")
        return _OPERATORS[type(node.op)](left, right)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
            and not node.keywords):
        args = [_value(arg) for arg in node.args]
        try:
            return _FUNCTIONS[node.func.id](*args)
        except TypeError as exc:
            raise UnsafeExpression(f"{node.func.id}: {exc}") from None
    raise UnsafeExpression(f"{type(node).__name__} is not allowed in a demo expression")


def _number(value):
    if not isinstance(value, int):
        raise UnsafeExpression("unary minus applies to integers only")
    return value


def _word(rng: random.Random) -> str:
    return rng.choice([w for w in keyword.kwlist if w.isalpha()])


def _mixed_expression(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    forms = [
        lambda: f"len('{_word(rng)}') + {a}",
        lambda: f"len('{_word(rng)}' + '{_word(rng)}')",
        lambda: f"abs({a} - {b + 5})",
        lambda: f"max({a}, {b}, {c}) - {min(a, b, c)}",
        lambda: f"min({a}, {b}) * {c % 3 + 1}",
        lambda: f"sum([{a}, {b}, {c}])",
        lambda: f"{a} * {b} - {c}",
        lambda: f"({a} + {b}) // 2",
        lambda: f"{a * b + c} % {b + 1}",
    ]
    return rng.choice(forms)()


def _easy_expression(rng: random.Random) -> str:
    # one step each, over digits and keywords: answers of one or two digits, within a tiny model's reach
    a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
    forms = [
        lambda: f"{a} + {b}",
        lambda: f"{max(a, b)} - {min(a, b)}",
        lambda: f"max({a}, {b}, {c})",
        lambda: f"min({a}, {b}, {c})",
        lambda: f"len('{_word(rng)}')",
        lambda: f"len('{_word(rng)}') + {a}",
    ]
    return rng.choice(forms)()


# question kinds: "mixed" has two-step forms (products, remainders, joined words); "easy" one step each
LEVELS = {"mixed": _mixed_expression, "easy": _easy_expression}


def arithmetic_records(count: int, seed: int = 0, level: str = "mixed") -> list[dict]:
    """``count`` distinct records of ``level`` (fewer when the forms run out), in a seeded order."""
    if level not in LEVELS:
        raise ValueError(f"arithmetic level {level!r} is not one of {sorted(LEVELS)}; pick one of those")
    expression_of = LEVELS[level]
    rng, records, seen = random.Random(seed), [], set()
    for _ in range(count * 20):
        expression = expression_of(rng)
        if expression in seen:
            continue
        seen.add(expression)
        answer = str(evaluate_expression(expression))
        records.append({"prompt": f"What does `{expression}` evaluate to?", "response": answer, "answer": answer})
        if len(records) == count:
            break
    return records


def build_arithmetic_data(out_dir: str | Path, count: int = 4000, seed: int = 0, level: str = "mixed") -> Path:
    """``out_dir``/arithmetic.jsonl with ``count`` records of ``level`` (written once per settings: a marker
    beside it records them; a temporary name first, so an interrupted build leaves no half file)."""
    out_dir = Path(out_dir)
    path, marker = out_dir / "arithmetic.jsonl", out_dir / "arithmetic.json"
    settings = {"count": count, "seed": seed, "level": level, "version": _VERSION}
    if path.is_file() and marker.is_file() and marker.read_text() == json.dumps(settings):
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in arithmetic_records(count, seed, level)))
    os.replace(partial, path)
    marker.write_text(json.dumps(settings))
    return path
