"""A small evaluator of Go's text/template, for the subset the Ollama exporter writes, plus Ollama's
handling of a chat request around it. Tests render the emitted TEMPLATE with it and compare the
text with the jinja template's.

Supported: text; `{{- ... -}}` whitespace trimming; `{{ .Field }}`, `{{ $.Field }}`, `{{ $var }}`;
`{{ $v := pipe }}` / `{{ $v = pipe }}`; `if` / `else if` / `else` / `end`; `range $i, $x := pipe`
and `range pipe`; calls of eq, ne, and, or, not, len, slice with parenthesised arguments; string
and integer literals. Anything else raises, so a template using more than this fails the test.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


@dataclass
class Node:
    kind: str                                   # text / output / assign / if / range
    text: str = ""
    branches: list[tuple[str | None, list[Node]]] = field(default_factory=list)  # if: (cond, body); else: None
    body: list[Node] = field(default_factory=list)


def lex(source: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = source[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return [p for p in parts if p != ("text", "")]


def parse(parts: list[tuple[str, str]], pos: int = 0, stop: tuple[str, ...] = ()) -> tuple[list[Node], int, str]:
    nodes: list[Node] = []
    while pos < len(parts):
        kind, value = parts[pos]
        pos += 1
        if kind == "text":
            nodes.append(Node("text", value))
            continue
        word = value.split(None, 1)[0]
        if word in stop or (word == "else" and "else" in stop):
            return nodes, pos, value
        if word == "if":
            node = Node("if")
            cond = value[2:].strip()
            while True:
                body, pos, closer = parse(parts, pos, ("else", "end"))
                node.branches.append((cond, body))
                if closer == "end":
                    break
                cond = closer[4:].strip()[2:].strip() if closer.startswith("else if") else None
                if cond is None:
                    body, pos, _ = parse(parts, pos, ("end",))
                    node.branches.append((None, body))
                    break
            nodes.append(node)
        elif word == "range":
            body, pos, _ = parse(parts, pos, ("end",))
            nodes.append(Node("range", value[5:].strip(), body=body))
        elif re.match(r"\$\w*\s*:?=", value):
            nodes.append(Node("assign", value))
        else:
            nodes.append(Node("output", value))
    if stop:
        raise ValueError(f"template ends before {{{{ {stop[-1]} }}}}")
    return nodes, pos, ""


class Scope:
    def __init__(self, root: dict[str, Any]) -> None:
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise NameError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise NameError(f"assignment to undeclared {name}")


FUNCS = {
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not truthy(a),
    "len": len, "slice": lambda x, i: x[i:],
}


def truthy(value: Any) -> bool:
    return bool(value)


def tokens_of(expr: str) -> list[str]:
    lexer = shlex.shlex(expr.replace("(", " ( ").replace(")", " ) "), posix=False)
    lexer.wordchars += "$.-"
    return list(lexer)


def evaluate(expr: str, dot: Any, scope: Scope) -> Any:
    value, rest = _pipeline(tokens_of(expr), dot, scope)
    if rest:
        raise ValueError(f"unparsed {rest} in {expr!r}")
    return value


def _operand(tok: list[str], dot: Any, scope: Scope) -> tuple[Any, list[str]]:
    head, rest = tok[0], tok[1:]
    if head == "(":
        value, rest = _pipeline(rest, dot, scope)
        if not rest or rest[0] != ")":
            raise ValueError("unbalanced parenthesis")
        return value, rest[1:]
    if head.startswith('"'):
        return head[1:-1].encode().decode("unicode_escape"), rest
    if re.fullmatch(r"-?\d+", head):
        return int(head), rest
    if head in ("true", "false"):
        return head == "true", rest
    if head.startswith("$"):
        name, _, path = head.partition(".")
        value = scope.lookup(name)
        return _fields(value, path), rest
    if head.startswith("."):
        return _fields(dot, head[1:]), rest
    raise ValueError(f"unsupported operand {head!r}")


def _fields(value: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        value = value[part]
    return value


def _pipeline(tok: list[str], dot: Any, scope: Scope) -> tuple[Any, list[str]]:
    head = tok[0]
    if head in FUNCS or head in ("and", "or"):
        args, rest = [], tok[1:]
        while rest and rest[0] != ")":
            arg, rest = _operand(rest, dot, scope)
            args.append(arg)
        if head == "and":
            return next((a for a in args if not truthy(a)), args[-1]), rest
        if head == "or":
            return next((a for a in args if truthy(a)), args[-1]), rest
        return FUNCS[head](*args), rest
    return _operand(tok, dot, scope)


def execute(nodes: list[Node], dot: Any, scope: Scope) -> str:
    out = []
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "output":
            out.append(str(evaluate(node.text, dot, scope)))
        elif node.kind == "assign":
            name, op, expr = re.match(r"(\$\w*)\s*(:?=)\s*(.*)", node.text, re.DOTALL).groups()
            value = evaluate(expr, dot, scope)
            if op == ":=":
                scope.frames[-1][name] = value
            else:
                scope.assign(name, value)
        elif node.kind == "if":
            for cond, body in node.branches:
                if cond is None or truthy(evaluate(cond, dot, scope)):
                    scope.frames.append({})
                    out.append(execute(body, dot, scope))
                    scope.frames.pop()
                    break
        elif node.kind == "range":
            m = re.fullmatch(r"(?:(\$\w*)\s*,\s*(\$\w*)\s*:=\s*)?(.*)", node.text, re.DOTALL)
            index_var, item_var, expr = m.groups()
            for index, item in enumerate(evaluate(expr, dot, scope)):
                scope.frames.append({index_var: index, item_var: item} if index_var else {})
                out.append(execute(node.body, item, scope))
                scope.frames.pop()
    return "".join(out)


def render_go(template: str, values: dict[str, Any]) -> str:
    nodes, _, _ = parse(lex(template))
    return execute(nodes, values, Scope(values))


def ollama_prompt(template: str, messages: list[dict[str, str]], modelfile_system: str | None) -> str:
    """What Ollama sends to the model for a chat request: the Modelfile's SYSTEM first when the
    conversation has no system message, consecutive same-role messages merged, every system
    message's text joined into .System, then the template executed."""
    msgs = [dict(m) for m in messages]
    if modelfile_system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": modelfile_system})
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["role"] == m["role"]:
            collated[-1]["content"] += "\n\n" + m["content"]
        else:
            collated.append(m)
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return render_go(template, {"System": system, "Messages": [
        {"Role": m["role"], "Content": m["content"]} for m in collated]})
