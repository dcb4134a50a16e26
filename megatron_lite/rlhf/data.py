"""The data side of the RLHF stages: chat records -> token ids with a mask of what to train on.

Records are JSONL, one object per line, in one of two shapes:

    SFT         {"prompt": str, "response": str, "system": str (optional)}
                {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preference  {"prompt": str, "chosen": str, "rejected": str, "system": str (optional)}
                {"messages": [... ending with a user message], "chosen": str, "rejected": str}
    ranked      {"prompt": str, "responses": [best, ..., worst]}
                {"prompt": str, "responses": [str, ...], "ranks": [int, ...]} (lower = better)
                ("messages" ending with the user may replace "prompt", as for pairs)
    prompts     {"prompt": str} or {"messages": [... ending with a user message]}, or any record
                above (PPO reads only its prompt)

The reward model and DPO read preference and ranked records alike (``RankedDataset``); a file may
mix them, a pair being a ranking of two answers.

A conversation is rendered as, per message, the role token then the content; every assistant
message is closed by the end-of-document token, which is what teaches a model to stop. Only the
assistant contents and their closing tokens are trained on: the model should learn to answer,
not to imitate the user. With ``rlhf.chat_template: hf`` the tokenizer's imported Hugging Face
template renders the conversation instead (``TemplateChat``); what is trained on is then what
the template adds after each assistant prompt.

The standard-library demo instruction set is built by ``rlhf.demo_data``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron_lite.data.tokenizer import CHAT_ROLES, Tokenizer
from megatron_lite.errors import UserError
from megatron_lite.rlhf.chat_template import ChatTemplateError, compile_template, read_chat_template, render

IGNORE_INDEX = -100  # label of a position that contributes no loss (torch's cross_entropy default)

_SFT_FORMS = '{"prompt": str, "response": str} or {"messages": [{"role": ..., "content": ...}, ...]}'
_PREFERENCE_FORMS = (
    '{"prompt": str, "chosen": str, "rejected": str} or '
    '{"messages": [... ending with a user message], "chosen": str, "rejected": str}'
)


_RANKED_FORMS = (
    '{"prompt": str, "responses": [best, ..., worst]} or '
    '{"prompt": str, "responses": [str, ...], "ranks": [int, ...]} (lower rank = better)'
)


class RLHFDataError(UserError, ValueError):
    """A data problem the user can fix; the message names the file and line and says how."""


# --------------------------------------------------------------------------- encoding


def encode_chat(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, trainable) of equal length; trainable is True exactly for the tokens of assistant
    contents and the end-of-document token closing each assistant message."""
    ids: list[int] = []
    trainable: list[bool] = []
    for number, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) if isinstance(message, dict) else (None, None)
        if role not in CHAT_ROLES or not isinstance(content, str):
            raise RLHFDataError(
                f"message {number} is {message!r}; each message needs a role from {', '.join(CHAT_ROLES)} "
                f"and a string content"
            )
        is_answer = role == "assistant"
        ids.append(tokenizer.role_id(role))
        trainable.append(False)
        # Contents are plain text: a user who writes "<|assistant|>" must not open a turn.
        content_ids = tokenizer.encode(content, allowed_special="none")
        if is_answer:
            content_ids.append(tokenizer.eod_id)
        ids.extend(content_ids)
        trainable.extend([is_answer] * len(content_ids))
    return ids, trainable


def prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The messages followed by the assistant role token: what a model continues with an answer."""
    ids, _ = encode_chat(tokenizer, messages)
    return ids + [tokenizer.role_id("assistant")]


# --------------------------------------------------------------------------- chat formats


class NativeChat:
    """Our own rendering (``encode_chat``): role tokens, contents as plain text, eod after answers."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        return encode_chat(self.tokenizer, messages)

    def prompt(self, messages: list[dict]) -> list[int]:
        return prompt_ids(self.tokenizer, messages)

    def answered(self, messages: list[dict], answer: str) -> tuple[list[int], list[bool]]:
        """The prompt then ``answer`` closed by eod; trainable exactly on the answer's ids."""
        prompt = self.prompt(messages)
        answer_ids = self.tokenizer.encode(answer, allowed_special="none") + [self.tokenizer.eod_id]
        return prompt + answer_ids, [False] * len(prompt) + [True] * len(answer_ids)


class TemplateChat:
    """A Hugging Face chat template: the rendered text is encoded whole (special-token strings become
    their ids, as ``apply_chat_template`` does). The ids an assistant turn adds after the template's
    own prompt for it (``add_generation_prompt``) are what is trained on, so the template must
    render a conversation's beginning as a prefix of the whole; one that does not is an error."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer, self.compiled = tokenizer, compile_template(template)
        text = {token_id: token_text for token_text, token_id in tokenizer.added_tokens.items()}
        self.special_texts = {f"{role}_token": text[token_id] for role, token_id in
                              (("eos", tokenizer.eod_id), ("pad", tokenizer.pad_id)) if token_id in text}

    def _ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return self.tokenizer.encode(render(self.compiled, messages, add_generation_prompt, self.special_texts))

    def conversation(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        ids = self._ids(messages, add_generation_prompt=False)
        trainable = [False] * len(ids)
        for number, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self._prefix(self._ids(messages[:number], True), ids, number))
                end = len(self._prefix(self._ids(messages[: number + 1], False), ids, number))
                trainable[start:end] = [True] * (end - start)
        return ids, trainable

    def prompt(self, messages: list[dict]) -> list[int]:
        return self._ids(messages, add_generation_prompt=True)

    def answered(self, messages: list[dict], answer: str) -> tuple[list[int], list[bool]]:
        ids = self._ids(messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        prompt = self._prefix(self.prompt(messages), ids, len(messages))
        return ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt))

    @staticmethod
    def _prefix(part: list[int], whole: list[int], number: int) -> list[int]:
        if whole[: len(part)] != part:
            raise ChatTemplateError(
                f"the chat template renders the conversation up to message {number} as something other than the "
                f"beginning of the whole conversation, so the tokens to train on cannot be found; use "
                f"rlhf.chat_template=native, or a template that renders turns in order"
            )
        return part


def chat_format(kind: str, tokenizer: Tokenizer, tokenizer_dir: str | Path) -> NativeChat | TemplateChat:
    """``rlhf.chat_template``: "native", or "hf" (the template the tokenizer directory carries)."""
    if kind == "native":
        return NativeChat(tokenizer)
    template = read_chat_template(Path(tokenizer_dir))
    if template is None:
        raise ChatTemplateError(
            f"rlhf.chat_template=hf renders with the tokenizer's Hugging Face chat template, but {tokenizer_dir} "
            f"has none (no chat_template.jinja, no chat_template in tokenizer_config.json); use "
            f"rlhf.chat_template=native or a tokenizer imported from a model that has a template"
        )
    return TemplateChat(tokenizer, template)


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """A template that cannot render a record says which record."""
    try:
        yield
    except ChatTemplateError as exc:
        raise RLHFDataError(f"{where}: {exc}") from exc


# --------------------------------------------------------------------------- records


def _numbered_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("path:line", record) for every non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise RLHFDataError(f"{path} does not exist; pass the path of a JSONL file with one JSON object per line")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig")  # -sig: editors on Windows may start the file with a BOM
            except UnicodeDecodeError as exc:
                raise RLHFDataError(
                    f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RLHFDataError(
                    f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be one complete JSON object"
                ) from None
            if not isinstance(record, dict):
                raise RLHFDataError(
                    f"{where}: expected a JSON object, got {type(record).__name__}; write one object per line"
                )
            yield where, record


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line; bad JSON, a non-object or a missing file raise
    RLHFDataError naming path:line."""
    return [record for _, record in _numbered_records(path)]


def _keys_of(record: dict) -> str:
    return ", ".join(map(repr, record)) or "none"


def _string_field(record: dict, key: str, where: str, forms: str) -> str:
    if key not in record:
        raise RLHFDataError(f"{where}: no key {key!r} (keys: {_keys_of(record)}); expected {forms}")
    value = record[key]
    if not isinstance(value, str):
        raise RLHFDataError(f"{where}: {key!r} holds {type(value).__name__}, not a string; write it as a JSON string")
    return value


def _checked_messages(record: dict, where: str, last_role: str) -> list[dict]:
    messages = record["messages"]
    if "system" in record:
        raise RLHFDataError(
            f"{where}: 'system' is only read with 'prompt'; with 'messages', make it the first message "
            f'({{"role": "system", "content": ...}})'
        )
    if not isinstance(messages, list) or not messages:
        raise RLHFDataError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects")
    checked = []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise RLHFDataError(f"{where}: message {number} is {message!r}; each message needs 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise RLHFDataError(f"{where}: message {number} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise RLHFDataError(f"{where}: message {number} content holds {type(content).__name__}, not a string")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != last_role:
        raise RLHFDataError(
            f"{where}: the last message is from the {checked[-1]['role']}, expected the {last_role}; "
            + ("end each conversation with the answer to train on"
               if last_role == "assistant" else "leave the answer out of 'messages' and give it as 'chosen'/'rejected'")
        )
    return checked


def _system_then(record: dict, where: str, messages: list[dict]) -> list[dict]:
    if "system" not in record:
        return messages
    system = _string_field(record, "system", where, "a string")
    return [{"role": "system", "content": system}] + messages


def conversation(record: dict, where: str) -> list[dict]:
    """An SFT record as messages: {"prompt", "response"} (optional "system") or {"messages"}
    ending with the assistant. Errors name ``where`` (e.g. "sft.jsonl:3")."""
    if "messages" in record:
        if "prompt" in record or "response" in record:
            raise RLHFDataError(f"{where}: holds both 'messages' and 'prompt'/'response'; use one form: {_SFT_FORMS}")
        return _checked_messages(record, where, last_role="assistant")
    if "prompt" not in record and "response" not in record:
        raise RLHFDataError(f"{where}: no 'prompt'/'response' or 'messages' (keys: {_keys_of(record)}); expected {_SFT_FORMS}")
    prompt = _string_field(record, "prompt", where, _SFT_FORMS)
    response = _string_field(record, "response", where, _SFT_FORMS)
    return _system_then(record, where, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


def preference_pair(record: dict, where: str) -> tuple[list[dict], str, str]:
    """A preference record as (prompt messages ending with the user, chosen text, rejected text)."""
    if "messages" in record:
        if "prompt" in record:
            raise RLHFDataError(f"{where}: holds both 'messages' and 'prompt'; use one form: {_PREFERENCE_FORMS}")
        messages = _checked_messages(record, where, last_role="user")
    else:
        if "prompt" not in record:
            raise RLHFDataError(
                f"{where}: no 'prompt' or 'messages' (keys: {_keys_of(record)}); expected {_PREFERENCE_FORMS}"
            )
        prompt = _string_field(record, "prompt", where, _PREFERENCE_FORMS)
        messages = _system_then(record, where, [{"role": "user", "content": prompt}])
    chosen = _string_field(record, "chosen", where, _PREFERENCE_FORMS)
    rejected = _string_field(record, "rejected", where, _PREFERENCE_FORMS)
    if chosen == rejected:
        raise RLHFDataError(
            f"{where}: 'chosen' and 'rejected' are the same text, which teaches no preference; "
            f"remove the record or give two different answers"
        )
    return messages, chosen, rejected


def _ranked_prompt(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        if "prompt" in record:
            raise RLHFDataError(f"{where}: holds both 'messages' and 'prompt'; use one form: {_RANKED_FORMS}")
        return _checked_messages(record, where, last_role="user")
    if "prompt" not in record:
        raise RLHFDataError(f"{where}: no 'prompt' or 'messages' (keys: {_keys_of(record)}); expected {_RANKED_FORMS}")
    prompt = _string_field(record, "prompt", where, _RANKED_FORMS)
    return _system_then(record, where, [{"role": "user", "content": prompt}])


def _checked_responses(record: dict, where: str) -> list[str]:
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        count = f"{len(responses)} answer(s)" if isinstance(responses, list) else f"a {type(responses).__name__}"
        raise RLHFDataError(
            f"{where}: 'responses' holds {count}; a ranked record needs a list of at least two answers, best first "
            f"(or with 'ranks')"
        )
    for number, response in enumerate(responses):
        if not isinstance(response, str):
            raise RLHFDataError(
                f"{where}: 'responses' item {number} holds {type(response).__name__}, not a string; "
                f"write every answer as a JSON string"
            )
    for number, response in enumerate(responses):
        if response in responses[:number]:
            raise RLHFDataError(
                f"{where}: 'responses' items {responses.index(response)} and {number} are the same text, which "
                f"teaches no preference; give each answer once"
            )
    return responses


def _checked_ranks(record: dict, where: str, count: int) -> list[int]:
    if "ranks" not in record:
        return list(range(count))
    ranks = record["ranks"]
    if not isinstance(ranks, list) or len(ranks) != count:
        length = f"{len(ranks)} entries" if isinstance(ranks, list) else f"a {type(ranks).__name__}"
        raise RLHFDataError(
            f"{where}: 'ranks' holds {length} but 'responses' holds {count} answers; give one integer rank per "
            f"answer (lower = better), or leave 'ranks' out and list the answers best first"
        )
    for number, rank in enumerate(ranks):
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise RLHFDataError(
                f"{where}: 'ranks' item {number} is {rank!r}, not an integer; write ranks as integers, lower = better"
            )
    if len(set(ranks)) == 1:
        raise RLHFDataError(
            f"{where}: every answer has rank {ranks[0]}, so no answer is preferred to another; rank at least two "
            f"answers differently or remove the record"
        )
    return ranks


def ranked_answers(record: dict, where: str) -> tuple[list[dict], list[str], list[int]]:
    """A preference or ranked record as (prompt messages ending with the user, answers, ranks), the
    answers ordered best first and ranks ascending (lower = better; equal ranks are ties, which
    make no pair). A pair {"chosen", "rejected"} is the ranking [chosen, rejected]."""
    if "responses" not in record:
        if "ranks" in record:
            raise RLHFDataError(f"{where}: 'ranks' without 'responses'; expected {_RANKED_FORMS}")
        messages, chosen, rejected = preference_pair(record, where)
        return messages, [chosen, rejected], [0, 1]
    if "chosen" in record or "rejected" in record:
        raise RLHFDataError(
            f"{where}: holds both 'responses' and 'chosen'/'rejected'; use one form: {_RANKED_FORMS} or "
            f"{_PREFERENCE_FORMS}"
        )
    messages = _ranked_prompt(record, where)
    responses = _checked_responses(record, where)
    ranks = _checked_ranks(record, where, len(responses))
    order = sorted(range(len(responses)), key=lambda i: ranks[i])  # stable: tied answers keep their order
    return messages, [responses[i] for i in order], [ranks[i] for i in order]


def prompt_messages(record: dict, where: str) -> list[dict]:
    """The prompt of any record, as messages ending with the user: a prompt-only record
    ({"prompt"} or {"messages"} ending with the user), or the prompt of an SFT or preference
    record (its answers are not read)."""
    if "messages" in record:
        if "prompt" in record:
            raise RLHFDataError(f"{where}: holds both 'messages' and 'prompt'; use one form")
        last = record["messages"][-1] if isinstance(record["messages"], list) and record["messages"] else {}
        if not (isinstance(last, dict) and last.get("role") == "assistant"):
            return _checked_messages(record, where, last_role="user")
        messages = _checked_messages(record, where, last_role="assistant")[:-1]
        if not messages:
            raise RLHFDataError(f"{where}: 'messages' holds only the answer; give the user's turn before it")
        return messages
    prompt = _string_field(record, "prompt", where, '{"prompt": str} or {"messages": [... ending with a user message]}')
    return _system_then(record, where, [{"role": "user", "content": prompt}])


# --------------------------------------------------------------------------- datasets


def _check_seq_length(seq_length: int, minimum: int) -> None:
    if not isinstance(seq_length, int) or seq_length < minimum:
        raise RLHFDataError(f"seq_length={seq_length!r} must be an integer of at least {minimum}; set model.seq_length")


def _has_label(trainable: list[bool]) -> bool:
    """Whether any predicted token (every position but the first) is trained on."""
    return any(trainable[1:])


def _tokens_and_labels(
    ids: list[int], trainable: list[bool], num_tokens: int, seq_length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """tokens[i] = ids[i] for the first num_tokens ids, labels[i] = ids[i + 1] where that id is
    trained on; the rest is padding. SFT passes num_tokens = len(ids) - 1, the usual shift."""
    ids_array = np.asarray(ids, dtype=np.int64)
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int64)
    tokens[:num_tokens] = ids_array[:num_tokens]
    predicted = ids_array[1 : num_tokens + 1]
    keep = np.asarray(trainable[1 : num_tokens + 1], dtype=bool)
    labels[: len(predicted)] = np.where(keep, predicted, IGNORE_INDEX)
    return tokens, labels


def _nothing_left(path: Path, records: int, dropped: int, seq_length: int, what: str) -> RLHFDataError:
    if records == 0:
        return RLHFDataError(f"{path} holds no records; write one JSON object per line")
    return RLHFDataError(
        f"{path}: all {dropped} of {records} records were dropped: with seq_length={seq_length} no token of the "
        f"{what} is left after truncation; raise model.seq_length or shorten the prompts"
    )


class SFTDataset:
    """Supervised fine-tuning samples: ds[i] -> {"tokens", "labels"}, np.int64 (seq_length,).

    tokens = ids[:-1], labels = ids[1:] with IGNORE_INDEX where the predicted token is not an
    assistant token, padded with the tokenizer's pad id (labels IGNORE_INDEX). Conversations of
    more than seq_length + 1 ids lose their end. ``num_truncated`` counts kept samples that were
    cut; ``num_dropped`` records with no trained token left; ``sources[i]`` is "path:line".
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_length: int,
                 chat: NativeChat | TemplateChat | None = None):
        _check_seq_length(seq_length, minimum=1)
        chat = chat or NativeChat(tokenizer)
        self.path, self.seq_length, self.pad_id = Path(path), seq_length, tokenizer.pad_id
        self.num_truncated = self.num_dropped = 0
        self.sources: list[str] = []
        self._samples: list[tuple[list[int], list[bool]]] = []
        records = 0
        for where, record in _numbered_records(self.path):
            records += 1
            with _naming(where):
                ids, trainable = chat.conversation(conversation(record, where))
            truncated = len(ids) > seq_length + 1
            ids, trainable = ids[: seq_length + 1], trainable[: seq_length + 1]
            if not _has_label(trainable):
                self.num_dropped += 1
                continue
            self.num_truncated += truncated
            self._samples.append((ids, trainable))
            self.sources.append(where)
        if not self._samples:
            raise _nothing_left(self.path, records, self.num_dropped, seq_length, "assistant answer")

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        ids, trainable = self._samples[index]
        tokens, labels = _tokens_and_labels(ids, trainable, len(ids) - 1, self.seq_length, self.pad_id)
        return {"tokens": tokens, "labels": labels}


class PreferenceDataset:
    """Pairs for the reward model and DPO: ds[i] -> chosen/rejected tokens and labels, each
    np.int64 (seq_length,), labels only on the answer and its closing end-of-document token.

    Unlike SFT, a sequence keeps its final token in ``tokens`` (its label is IGNORE_INDEX,
    nothing follows it), so that ``chosen_last``/``rejected_last``, the index of the last real
    token where a reward model reads its score, is the closing end-of-document token: the point
    at which the whole answer has been seen. A sequence therefore holds at most seq_length ids;
    longer ones lose their end (and ``*_last`` points at the last token kept).
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_length: int,
                 chat: NativeChat | TemplateChat | None = None):
        _check_seq_length(seq_length, minimum=2)
        chat = chat or NativeChat(tokenizer)
        self.path, self.seq_length, self.pad_id = Path(path), seq_length, tokenizer.pad_id
        self.num_truncated = self.num_dropped = 0
        self.sources: list[str] = []
        self._pairs: list[tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]] = []
        records = 0
        for where, record in _numbered_records(self.path):
            records += 1
            messages, chosen, rejected = preference_pair(record, where)
            with _naming(where):
                sides = [self._truncated(*chat.answered(messages, text)) for text in (chosen, rejected)]
            if not all(_has_label(trainable) for _, trainable, _ in sides):
                self.num_dropped += 1
                continue
            self.num_truncated += any(truncated for _, _, truncated in sides)
            self._pairs.append(tuple((ids, trainable) for ids, trainable, _ in sides))
            self.sources.append(where)
        if not self._pairs:
            raise _nothing_left(self.path, records, self.num_dropped, seq_length, "chosen or rejected answer")

    def _truncated(self, ids: list[int], trainable: list[bool]) -> tuple[list[int], list[bool], bool]:
        return ids[: self.seq_length], trainable[: self.seq_length], len(ids) > self.seq_length

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        item: dict = {}
        for side, (ids, trainable) in zip(("chosen", "rejected"), self._pairs[index]):
            tokens, labels = _tokens_and_labels(ids, trainable, len(ids), self.seq_length, self.pad_id)
            item[f"{side}_tokens"], item[f"{side}_labels"] = tokens, labels
            item[f"{side}_last"] = len(ids) - 1
        return item


class RankedDataset:
    """Ranked answers for the reward model and DPO: one item per prompt with all its answers,
    K = the most answers of any record in the file (a file of pairs: K = 2).

    ds[i] -> "tokens", "labels" np.int64 (K, seq_length), "last" np.int64 (K,) and "better" bool
    (K, K), better[j, k] True when answer j is ranked above answer k. Answers are ordered best
    first; a record with fewer than K answers is padded with empty rows (pad tokens, no labels,
    last 0) that are in no pair. Sequences are laid out as in ``PreferenceDataset`` (the final
    token kept, ``last`` its index). A record is dropped (``num_dropped``) when truncation leaves
    one of its answers without a token.
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_length: int,
                 chat: NativeChat | TemplateChat | None = None):
        _check_seq_length(seq_length, minimum=2)
        chat = chat or NativeChat(tokenizer)
        self.path, self.seq_length, self.pad_id = Path(path), seq_length, tokenizer.pad_id
        self.num_truncated = self.num_dropped = 0
        self.sources: list[str] = []
        self._rankings: list[tuple[list[tuple[list[int], list[bool]]], list[int]]] = []
        records = 0
        for where, record in _numbered_records(self.path):
            records += 1
            messages, answers, ranks = ranked_answers(record, where)
            with _naming(where):
                encoded = [chat.answered(messages, text) for text in answers]
            if not all(_has_label(trainable[: seq_length]) for _, trainable in encoded):
                self.num_dropped += 1
                continue
            self.num_truncated += any(len(ids) > seq_length for ids, _ in encoded)
            self._rankings.append(([(ids[:seq_length], trainable[:seq_length]) for ids, trainable in encoded], ranks))
            self.sources.append(where)
        if not self._rankings:
            raise _nothing_left(self.path, records, self.num_dropped, seq_length, "answers")
        self.num_answers = max(len(ranks) for _, ranks in self._rankings)

    def __len__(self) -> int:
        return len(self._rankings)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        answers, ranks = self._rankings[index]
        k, t = self.num_answers, self.seq_length
        tokens = np.full((k, t), self.pad_id, dtype=np.int64)
        labels = np.full((k, t), IGNORE_INDEX, dtype=np.int64)
        last = np.zeros(k, dtype=np.int64)
        for row, (ids, trainable) in enumerate(answers):
            tokens[row], labels[row] = _tokens_and_labels(ids, trainable, len(ids), t, self.pad_id)
            last[row] = len(ids) - 1
        rank = np.full(k, np.inf)
        rank[: len(ranks)] = ranks
        better = rank[:, None] < rank[None, :]  # padding rows (rank inf) are below nothing and above nothing
        better[:, len(ranks):] = False
        return {"tokens": tokens, "labels": labels, "last": last, "better": better}


_PROMPT_KEYS = ("prompt", "messages", "system")  # what a prompt record's rendering reads


class PromptDataset:
    """Prompts for PPO rollouts: ds[i] -> token ids (list) of the prompt followed by the assistant
    role token, ready for the model to answer. Prompts longer than ``max_prompt_length`` ids are
    dropped (``num_dropped``), since the rollout must fit the model's sequence length.
    ``fields[i]`` holds the record's other keys (e.g. "answer"), which reward functions read."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, max_prompt_length: int,
                 chat: NativeChat | TemplateChat | None = None, answer_key: str = "rlhf.ppo.max_new_tokens"):
        """``answer_key``: the setting that reserves room for the answer, for messages."""
        chat = chat or NativeChat(tokenizer)
        if max_prompt_length < 1:
            raise RLHFDataError(
                f"no room for a prompt: model.seq_length minus {answer_key} is {max_prompt_length}; "
                f"lower {answer_key}"
            )
        self.path, self.num_dropped = Path(path), 0
        self.sources: list[str] = []
        self._prompts: list[list[int]] = []
        self.fields: list[dict] = []
        self.texts: list[str] = []  # the last user message: the prompt reward functions read
        records = 0
        for where, record in _numbered_records(self.path):
            records += 1
            messages = prompt_messages(record, where)
            with _naming(where):
                ids = chat.prompt(messages)
            if len(ids) > max_prompt_length:
                self.num_dropped += 1
                continue
            self._prompts.append(ids)
            self.sources.append(where)
            self.fields.append({k: v for k, v in record.items() if k not in _PROMPT_KEYS})
            self.texts.append(messages[-1]["content"])
        if not self._prompts:
            if records == 0:
                raise RLHFDataError(f"{self.path} holds no records; write one JSON object per line")
            raise RLHFDataError(
                f"{self.path}: all {records} prompts are longer than {max_prompt_length} tokens (model.seq_length minus "
                f"{answer_key}); raise model.seq_length, lower {answer_key} or shorten the prompts"
            )

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index: int) -> list[int]:
        return self._prompts[index]


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (train, valid). valid holds round(n * valid_fraction)
    items, at least 1 when valid_fraction > 0 and n >= 2; train is never empty."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise RLHFDataError(f"cannot split {n} samples: the data set is empty; give a file with at least one record")
    if not 0.0 <= valid_fraction < 1.0:
        raise RLHFDataError(f"valid_fraction={valid_fraction} must be in [0, 1), e.g. 0.05 to hold out 5% for validation")
    num_valid = round(n * valid_fraction)
    if valid_fraction > 0 and n >= 2:
        num_valid = max(num_valid, 1)
    num_valid = min(num_valid, n - 1)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return order[num_valid:], order[:num_valid]
