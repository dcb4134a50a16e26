"""Reward functions: loading by path, the combination rule (weights, None = no opinion), the
built-ins, and every way a function can misbehave, each named in the error."""

import math

import pytest
import torch

from megatron_lite.config import ConfigError, load_config
from megatron_lite.rlhf.rewards import (
    RewardFunction,
    RewardFunctionError,
    answer_format,
    combine,
    fields_by_key,
    last_number,
    length_penalty_over,
    load_reward_functions,
    numeric_answer,
    regex_format,
    score_with_functions,
)

FNS = "tests.rlhf.reward_fns"


def test_functions_load_by_path_with_their_weights():
    functions = load_reward_functions([f"{FNS}:answer_tokens", "megatron_lite.rlhf.rewards:numeric_answer"], [0.5, 2])
    assert [f.name for f in functions] == [f"{FNS}:answer_tokens", "megatron_lite.rlhf.rewards:numeric_answer"]
    assert [f.weight for f in functions] == [0.5, 2.0] and functions[1].fn is numeric_answer
    assert functions[1].short_name == "numeric_answer"
    assert [f.weight for f in load_reward_functions([f"{FNS}:answer_tokens"])] == [1.0]


def test_a_function_that_does_not_import_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"rlhf.reward_functions\[1\]='nowhere.module:fn' does not import "
                                          r"\(ModuleNotFoundError: .*\); make nowhere.module importable"):
        load_reward_functions([f"{FNS}:answer_tokens", "nowhere.module:fn"])
    with pytest.raises(ConfigError, match=r"rlhf.reward_functions\[0\]='tests.rlhf.reward_fns:missing': "
                                          r"tests.rlhf.reward_fns has no function 'missing'"):
        load_reward_functions([f"{FNS}:missing"])
    with pytest.raises(ConfigError, match="has no function 'NOT_CALLABLE'"):
        load_reward_functions([f"{FNS}:NOT_CALLABLE"])


@pytest.mark.parametrize("overrides, message", [
    (["rlhf.reward_functions=[a.b:c]", "rlhf.reward_weights=[1, 2]"],
     r"rlhf.reward_weights has 2 entries for 1 rlhf.reward_functions; give one weight per function"),
    (["rlhf.reward_functions=[just_a_module]"],
     r"rlhf.reward_functions\[0\]='just_a_module' is not 'package.module:function'"),
    (["rlhf.reward_weights=[x]"], r"rlhf.reward_weights\[0\]: expected float"),
])
def test_bad_reward_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_none_is_no_opinion_in_the_weighted_sum():
    a, b = RewardFunction("m:a", lambda *args, **kw: None, 2.0), RewardFunction("m:b", lambda *args, **kw: None, -1.0)
    per_function = {"m:a": [1.0, None, 0.5, None], "m:b": [3.0, 4.0, None, None]}
    # 2*1 - 3; only b: -4; only a: 2*0.5; nobody: 0
    assert combine(per_function, [a, b], 4).tolist() == [-1.0, -4.0, 1.0, 0.0]
    assert combine({}, [], 3).tolist() == [0.0, 0.0, 0.0]  # no functions: the reward model's score alone


def test_fields_reach_the_function_as_lists_per_key():
    seen = {}

    def spy(prompts, completions, completion_ids, **fields):
        seen.update(prompts=prompts, completion_ids=completion_ids, **fields)
        return [0.0] * len(completions)

    records = [{"answer": 3, "topic": "len"}, {"answer": 5}]
    score_with_functions([RewardFunction("t:spy", spy)], ["p1", "p2"], ["a", "b"], [[1], [2, 3]], records,
                         ["f.jsonl:1", "f.jsonl:2"])
    assert seen == {"prompts": ["p1", "p2"], "completion_ids": [[1], [2, 3]], "answer": [3, 5], "topic": ["len", None]}
    assert fields_by_key([]) == {}


@pytest.mark.parametrize("name, message", [
    ("raises", r"reward function tests.rlhf.reward_fns:raises raised KeyError: 'answer' on the batch of records "
               r"r.jsonl:1, r.jsonl:2; fix the function"),
    ("too_few", r"reward function tests.rlhf.reward_fns:too_few returned 1 values for 2 completions \(records "
                r"r.jsonl:1, r.jsonl:2\); return a list with one float or None per completion"),
    ("not_a_number", r"reward function tests.rlhf.reward_fns:not_a_number returned nan for the record r.jsonl:1 "
                     r"\(completion 'four'\); return a finite float, or None for no opinion"),
])
def test_a_misbehaving_function_stops_the_run_naming_it_and_the_record(name, message):
    functions = load_reward_functions([f"{FNS}:{name}"])
    with pytest.raises(RewardFunctionError, match=message):
        score_with_functions(functions, ["p", "q"], ["four", "five"], [[1], [2]], [{}, {}], ["r.jsonl:1", "r.jsonl:2"])


def test_builtin_numeric_answer():
    completions = ["it is 12", "Answer: -3.5.", "12.0000001", "no number", "7"]
    answers = ["12", -3.5, 12, 4, None]
    assert numeric_answer(None, completions, None, answer=answers) == [1.0, 1.0, 1.0, 0.0, None]
    assert numeric_answer(None, ["1"], None) == [None]  # records without an answer: no opinion
    assert numeric_answer(None, ["1"], None, answer=["one"]) == [None]
    assert last_number("1,000 then 2e3") == 2000.0 and last_number("1,000") == 1000.0 and last_number("x") is None


def test_builtin_format_and_length_penalty():
    assert answer_format(None, ["Answer: 12", " 7. ", "the answer: 3", "12 apples"], None) == [1.0, 1.0, 1.0, 0.0]
    tagged = regex_format(r"<answer>.*</answer>")
    assert tagged(None, ["<answer>4</answer>", "4"], None) == [1.0, 0.0]
    penalty = length_penalty_over(4)
    assert penalty(None, ["", "", ""], [[1, 2], [1] * 4, [1] * 10]) == [0.0, 0.0, -1.5]


def test_combined_reward_is_float64_on_every_completion():
    functions = load_reward_functions([f"{FNS}:answer_tokens", f"{FNS}:repeats_the_word"], [0.1, 1.0])
    total, per_function = score_with_functions(
        functions, ["repeat alpha", "say beta twice"], ["alpha alpha", "gamma"], [[5, 5, 9], [7]], [{}, {}],
        ["s:1", "s:2"])
    assert total.dtype == torch.float64
    assert total.tolist() == pytest.approx([0.1 * 3 + 1.0, 0.1 * 1])
    assert per_function[f"{FNS}:repeats_the_word"] == [1.0, None]
    assert not math.isnan(total.sum().item())
