"""Chat templates: render the Jinja templates of Hugging Face tokenizers exactly as transformers does.

A chat template (tokenizer_config.json "chat_template", or chat_template.jinja) is a Jinja program that
turns a list of messages into the prompt string a chat model was trained on. transformers renders it in a
sandboxed, immutable Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter that keeps non-ASCII text as is, and two globals, `raise_exception` and
`strftime_now`. We do the same, so that a model sees byte-for-byte the prompts it saw in training.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.errors import TokenizerError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant text for loss masks.

    We render its body unchanged, so templates that contain the tag work here too."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name token
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    """Template global: a template calls raise_exception("...") to reject a conversation it cannot render."""
    raise TokenizerError(f"chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """JSON without HTML escaping (Jinja's own tojson escapes < > & ' which templates do not want)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Template global: today's date for templates that print it in the system prompt (Llama 3.x)."""
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Compile a template once; rendering the same template again reuses the compiled program."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template has a Jinja syntax error at line {err.lineno}: {err.message}") from err


def _plain_message(message: Any, index: int) -> dict:
    """A message as a plain dict (pydantic models are dumped), so the sandbox can index it."""
    if isinstance(message, Mapping):
        return dict(message)
    if callable(getattr(message, "model_dump", None)):
        return message.model_dump()
    raise TokenizerError(f"chat message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                         **variables: Any) -> str:
    """Render `messages` with a chat `template`; `variables` (bos_token, tools, ...) are visible to the template.

    `tools` and `documents` are defined (as None) even when not given, as in transformers, because templates
    test `tools is not none`. Any template failure becomes a TokenizerError carrying the template's message.
    """
    if not isinstance(template, str):
        raise TokenizerError(f"chat template must be a string, got {type(template).__name__}")
    if isinstance(messages, (str, Mapping)) or not hasattr(messages, "__iter__"):
        raise TokenizerError("chat messages must be a list of dicts with 'role' and 'content'")
    compiled = _compile(template)
    plain = [_plain_message(message, i) for i, message in enumerate(messages)]
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    try:
        return compiled.render(messages=plain, add_generation_prompt=add_generation_prompt, **variables)
    except TokenizerError:
        raise
    except jinja2.TemplateError as err:
        raise TokenizerError(f"chat template failed: {err}") from err
    except Exception as err:  # a template bug such as adding a string to a number is still bad input
        raise TokenizerError(f"chat template failed: {type(err).__name__}: {err}") from err
