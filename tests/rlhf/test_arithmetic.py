"""The verifiable demo task: the safe evaluator, the generated records, and GRPO reading them."""

import json
from types import SimpleNamespace

import pytest

from megatron_lite.config import load_config
from megatron_lite.rlhf.arithmetic import UnsafeExpression, arithmetic_records, build_arithmetic_data, evaluate_expression
from megatron_lite.rlhf.rewards import numeric_answer
from megatron_lite.rlhf.stage import stage_data_path


@pytest.mark.parametrize("expression, value", [
    ("len('while') + 3", 8), ("len('for' + 'if')", 5), ("abs(2 - 9)", 7), ("max(4, 9, 1) - 1", 8),
    ("min(3, 5) * 2", 6), ("sum([1, 2, 3])", 6), ("7 * 3 - 4", 17), ("(7 + 4) // 2", 5), ("23 % 4", 3), ("-3 + 5", 2),
])
def test_the_evaluator_computes_what_python_would(expression, value):
    assert evaluate_expression(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "Call is not allowed"),
    ("'ab'.upper()", "Call is not allowed"),
    ("(1).real", "Attribute is not allowed"),
    ("open('x')", "Call is not allowed"),
    ("print(1)", "Call is not allowed"),
    ("x + 1", "Name is not allowed"),
    ("[c for c in 'ab']", "ListComp is not allowed"),
    ("2 ** 100000", "BinOp is not allowed"),
    ("1 / 2", "BinOp is not allowed"),
    ("3 % 0", "division by zero"),
    ("'ab' * 1000", "strings only join with +"),
    ("len(3)", "len: object of type 'int' has no len"),
    ("max(key=1)", "Call is not allowed"),
    ("1 +", "not an expression"),
])
def test_the_evaluator_refuses_everything_else(expression, message):
    with pytest.raises(UnsafeExpression, match=message):
        evaluate_expression(expression)


def test_records_carry_their_checked_answers():
    records = arithmetic_records(300, seed=1)
    assert len(records) == 300 and len({r["prompt"] for r in records}) == 300
    for record in records:
        expression = record["prompt"].split("`")[1]
        assert record["prompt"] == f"What does `{expression}` evaluate to?"
        assert record["answer"] == record["response"] == str(evaluate_expression(expression))
    answers = [r["answer"] for r in records]
    assert numeric_answer(None, answers, None, answer=answers) == [1.0] * 300
    assert arithmetic_records(300, seed=1) == records and arithmetic_records(300, seed=2) != records


def test_the_file_is_built_once_and_found_by_rlhf_demo(tmp_path):
    path = build_arithmetic_data(tmp_path / "demo", count=40, seed=0)
    stamp = path.stat().st_mtime_ns
    assert build_arithmetic_data(tmp_path / "demo", count=40, seed=0) == path and path.stat().st_mtime_ns == stamp
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == arithmetic_records(40, seed=0)
    assert len(build_arithmetic_data(tmp_path / "demo", count=50).read_text().splitlines()) == 50  # rebuilt
    cfg = load_config(None, ["rlhf.demo=true", f"rlhf.demo_dir={tmp_path}/found", "rlhf.demo_examples=30"])
    found = stage_data_path(cfg, SimpleNamespace(rank=0), "grpo", "arithmetic")  # one process: rank 0 builds
    assert found == tmp_path / "found" / "arithmetic.jsonl" and len(found.read_text().splitlines()) == 30



def test_easy_questions_are_one_step_with_short_answers():
    records = arithmetic_records(400, seed=3, level="easy")
    assert len(records) == 400 and len({r["prompt"] for r in records}) == 400
    for record in records:
        expression = record["prompt"].split("`")[1]
        assert record["answer"] == record["response"] == str(evaluate_expression(expression))
        assert 0 <= int(record["answer"]) <= 18  # a digit or a two-digit sum
        assert "*" not in expression and "%" not in expression and "//" not in expression
    assert arithmetic_records(400, seed=3, level="easy") == records
    assert records != arithmetic_records(400, seed=3)  # the mixed questions differ


def test_an_unknown_level_names_the_choices():
    with pytest.raises(ValueError, match=r"level 'hard' is not one of \['easy', 'mixed'\]"):
        arithmetic_records(10, level="hard")


def test_a_new_level_rebuilds_the_file(tmp_path):
    path = build_arithmetic_data(tmp_path, count=30, seed=0)
    assert [json.loads(line) for line in path.read_text().splitlines()] == arithmetic_records(30, seed=0)
    assert build_arithmetic_data(tmp_path, count=30, seed=0, level="easy") == path
    assert [json.loads(line) for line in path.read_text().splitlines()] == arithmetic_records(30, seed=0, level="easy")
