"""Chat templates: ours written as Jinja for Hugging Face, and Hugging Face's rendered for our data.

Export: ``native_chat_template`` is a Jinja template that renders a conversation exactly as
``rlhf.data.encode_chat`` encodes it (the role token, the content, the end-of-document token
after each assistant content; ``add_generation_prompt`` appends the assistant role token), so
``apply_chat_template`` on the exported tokenizer gives our ids.

Import: a Hugging Face tokenizer's template is kept in the tokenizer directory as
``chat_template.jinja`` (the file transformers itself writes), and ``render`` runs it the way
transformers does (a sandboxed environment with trim_blocks and lstrip_blocks, ``raise_exception``
and the special-token texts as variables), for ``rlhf.chat_template: hf``.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lite.data.tokenizer import CHAT_ROLES, CONFIG_FILE, Tokenizer
from megatron_lite.errors import UserError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplateError(UserError, ValueError):
    """A chat template that is missing or cannot render a conversation; the message says what to change."""


def native_chat_template(tokenizer: Tokenizer) -> str | None:
    """Our rendering as Jinja; None when the tokenizer has no chat-role tokens (nothing to render)."""
    if not all(role in tokenizer.special_ids for role in CHAT_ROLES):
        return None
    text = {token_id: token_text for token_text, token_id in tokenizer.added_tokens.items()}
    roles = {role: text[tokenizer.role_id(role)] for role in CHAT_ROLES}
    end = text[tokenizer.eod_id]
    return (
        "{%- set role_tokens = " + json.dumps(roles, ensure_ascii=False) + " -%}\n"
        "{%- for message in messages -%}\n"
        "{{ role_tokens[message['role']] }}{{ message['content'] }}"
        "{%- if message['role'] == 'assistant' %}" + _literal(end) + "{% endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt %}" + _literal(roles["assistant"]) + "{% endif -%}\n"
    )


def _literal(text: str) -> str:
    """A Jinja expression printing ``text`` as it is."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def read_chat_template(directory: Path) -> str | None:
    """The template a tokenizer directory carries: ``chat_template.jinja``, else the
    ``chat_template`` of its tokenizer_config.json (a string, or a list of named templates of
    which "default" is used); None when it has none."""
    path = Path(directory) / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text()
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        return None
    template = json.loads(config_path.read_text()).get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def render(compiled, messages: list[dict], add_generation_prompt: bool, special_texts: dict[str, str]) -> str:
    """A ``compile_template`` result's text for ``messages``; ``special_texts``: eos_token, pad_token and the like."""
    import jinja2

    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_texts)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template cannot render this conversation: {exc}") from exc


def compile_template(template: str):
    """The Jinja template object, in an environment like transformers' own."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc} (line {exc.lineno})") from exc
