"""Render chat templates the way Hugging Face transformers does, so prompts match token for token.

Chat templates are Jinja code shipped with a model (tokenizer_config.json, chat_template.jinja, or
GGUF metadata); they are untrusted, so they run in jinja2's ImmutableSandboxedEnvironment. The
environment mirrors the one transformers documents for templates: trim_blocks and lstrip_blocks on,
the loop-control extension (`{% break %}`), `raise_exception(msg)`, `strftime_now(fmt)`, and a
`tojson` filter that keeps non-ASCII text and HTML characters as they are (Jinja's own filter
escapes `<`, `>`, `&` and `'`, which would change the prompt). `{% generation %}` blocks, used by
some templates to mark assistant text for transformers' assistant mask, render their body as is.

The template sees `messages` (message keys whose value is None dropped, as transformers does, since
templates test `'key' in message`), `tools`, `documents`, `add_generation_prompt`, the special
token strings (`bos_token`, `eos_token`, ...) and any extra keyword arguments.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """A chat template that is missing, malformed, or refuses the conversation; names its source."""


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per distinct template text (rendering is called for every training sample)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def select_template(templates: str | Mapping[str, str] | None, tools: Sequence[Any] | None,
                    where: str) -> str:
    """The template to use: the only one, or of named ones "tool_use" when tools are given, else "default"."""
    if templates is None:
        raise ChatTemplateError(f"{where}: this tokenizer has no chat template")
    if isinstance(templates, str):
        return templates
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(f"{where}: several chat templates ({sorted(templates)}) and none named 'default'")


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool,
           tools: Sequence[Mapping[str, Any]] | None, documents: Sequence[Mapping[str, Any]] | None,
           variables: Mapping[str, Any], where: str) -> str:
    """Render one conversation; `variables` are the special-token strings plus caller extras."""
    if not messages:
        raise ChatTemplateError(f"{where}: cannot render an empty conversation")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where}: message {index} is a {type(message).__name__}, not a dict")
        cleaned.append({key: value for key, value in message.items() if value is not None})
    for index, tool in enumerate(tools or ()):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(f"{where}: tool {index} must be a JSON schema dict, got {type(tool).__name__}")
    try:
        compiled = compile_template(template)
    except jinja2.TemplateSyntaxError as error:
        raise ChatTemplateError(f"{where}: chat template line {error.lineno}: {error.message}") from error
    try:
        return compiled.render(messages=cleaned, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except Exception as error:  # the template is code: raise_exception, undefined keys, str + None, ...
        raise ChatTemplateError(f"{where}: the chat template failed on this conversation: "
                                f"{type(error).__name__}: {error}") from error
