"""Reward functions the RL tests name in rlhf.reward_functions (imported by path, as users do)."""


def answer_tokens(prompts, completions, completion_ids, **fields):
    """The answer's length in tokens: a reward that differs between answers of one group."""
    return [float(len(ids)) for ids in completion_ids]


def repeats_the_word(prompts, completions, completion_ids, **fields):
    """1.0 when the answer names the prompt's last word; no opinion on prompts of other forms."""
    return [float(p.split()[-1] in c) if p.startswith("repeat") else None for p, c in zip(prompts, completions)]


def raises(prompts, completions, completion_ids, **fields):
    raise KeyError("answer")


def too_few(prompts, completions, completion_ids, **fields):
    return [1.0] * (len(completions) - 1)


def not_a_number(prompts, completions, completion_ids, **fields):
    return [float("nan")] * len(completions)


NOT_CALLABLE = 3


def distinct_tokens(prompts, completions, completion_ids, **fields):
    """How many different tokens the answer uses: differs between sampled answers of one group."""
    return [float(len(set(ids))) for ids in completion_ids]
