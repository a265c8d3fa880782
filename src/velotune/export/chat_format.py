"""Recognise a jinja chat template by what it renders, and restate it as an Ollama Go template.

Recognition never reads the template's source. Probe conversations with marker contents are
rendered through the template (`velotune.tokenizer.chat_template.render`, the renderer training
uses) and compared with what each known family's turn markers produce:

    ChatML (Qwen, SmolLM2/3) <|im_start|>{role}\n ... <|im_end|>\n
    Llama 3                  <|start_header_id|>{role}<|end_header_id|>\n\n ... <|eot_id|>
    Phi-3                    <|{role}|>\n ... <|end|>\n
    Phi-4                    <|im_start|>{role}<|im_sep|> ... <|im_end|>
    Gemma (2, 3)             <start_of_turn>{user|model}\n ... <end_of_turn>\n
    Mistral                  [INST] ... [/INST] answer</s>   (with or without inner spaces)
    Mistral Small 3          [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT][INST] ... [/INST] answer</s>

What differs between templates of one family is learned from the renders, not assumed: where a
system message goes (its own turn, or prefixed to the first or the last user message, and with
which separator), text the template puts before and after it in its turn (Llama 3.1's and
SmolLM3's metadata preambles, fixed at the date of the export when the template reads the clock;
what closes the turn, which for SmolLM3 is a blank line and no marker), and the default system prompt it inserts when there is none
(Qwen's, SmolLM2's, SmolLM3's, Mistral Small 3's). A format is accepted only when it reproduces
every probe exactly; otherwise `ExportError` names the families tried.

`ChatFormat.render` is the Python statement of the Go template's meaning under Ollama's rules:
Ollama prepends the Modelfile's SYSTEM as a system message when a conversation has none, keeps
system messages in `.Messages` and joins their text into `.System`. The leading BOS token is
not part of a prompt template (llama.cpp adds it from the GGUF's add_bos flag), so it is
stripped from the jinja render before comparing. A template that refuses system messages
(Gemma 2's) gets them prefixed to the first user message, as Gemma's later templates do.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from velotune.export.errors import ExportError
from velotune.tokenizer.chat_template import ChatTemplateError, render

EOS = "{eos}"   # stands for the tokenizer's EOS text inside a family's markers


@dataclass(frozen=True)
class Family:
    name: str
    user: tuple[str, str]                    # prefix, suffix around a user message
    assistant: tuple[str, str]
    system: tuple[str, str] | None           # a system turn's markers; None: no system turn
    generation: str                          # what opens the assistant's answer after a user turn


FAMILIES = (
    Family("ChatML", ("<|im_start|>user\n", "<|im_end|>\n"), ("<|im_start|>assistant\n", "<|im_end|>\n"),
           ("<|im_start|>system\n", "<|im_end|>\n"), "<|im_start|>assistant\n"),
    Family("Llama 3", ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
           ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
           ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
           "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    Family("Phi-3", ("<|user|>\n", "<|end|>\n"), ("<|assistant|>\n", "<|end|>\n"), ("<|system|>\n", "<|end|>\n"),
           "<|assistant|>\n"),
    Family("Phi-4", ("<|im_start|>user<|im_sep|>", "<|im_end|>"), ("<|im_start|>assistant<|im_sep|>", "<|im_end|>"),
           ("<|im_start|>system<|im_sep|>", "<|im_end|>"), "<|im_start|>assistant<|im_sep|>"),
    Family("Gemma", ("<start_of_turn>user\n", "<end_of_turn>\n"), ("<start_of_turn>model\n", "<end_of_turn>\n"),
           None, "<start_of_turn>model\n"),
    Family("Mistral", ("[INST]", "[/INST]"), ("", EOS), None, ""),
    Family("Mistral (spaced)", ("[INST] ", " [/INST]"), ("", EOS), None, ""),
    Family("Mistral (system prompt)", ("[INST]", "[/INST]"), ("", EOS), ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), ""),
)

# Marker contents of the probe conversations.
SYSTEM, USER, ANSWER = "Sys7q marker", "Usr{} marker", "Ans{} marker"


def probes(with_system: bool) -> list[list[dict[str, str]]]:
    def talk(turns: int) -> list[dict[str, str]]:
        out = []
        for n in range(turns):
            out.append({"role": "user", "content": USER.format(n)})
            if n < turns - 1:
                out.append({"role": "assistant", "content": ANSWER.format(n)})
        return out
    convs = [talk(1), talk(2), talk(3)]
    return [[{"role": "system", "content": SYSTEM}, *c] for c in convs] if with_system else convs


@dataclass(frozen=True)
class ChatFormat:
    family: Family
    eos: str
    system_mode: str = "turn"                 # "turn", "first_user" or "last_user"
    system_prefix: str = ""                   # turn mode: the system turn's opening (with any preamble)
    system_suffix: str = ""                   # turn mode: what follows the system text (its closing marker)
    separator: str = "\n\n"                   # merged modes: between the system text and the user's
    default_system: str | None = None         # turn mode: the system turn when there is none (None: omitted)
    system_supported: bool = True             # False: the jinja template refuses system messages

    def marker(self, text: str) -> str:
        return text.replace(EOS, self.eos)

    @property
    def stop_words(self) -> list[str]:
        """The end-of-turn marker and the EOS token, once each."""
        end_of_turn = self.marker(self.family.assistant[1]).strip()
        return list(dict.fromkeys(w for w in (end_of_turn, self.eos) if w))

    # ---------------------------------------------------------------- the meaning, in Python
    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        msgs = list(messages)
        if self.default_system and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.default_system})
        system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
        out = ""
        if self.system_mode == "turn" and (system or self.default_system is not None):
            out += self.system_prefix + system + self.system_suffix
        turns = [m for m in msgs if m["role"] != "system"]
        users = [i for i, m in enumerate(turns) if m["role"] == "user"]
        for i, m in enumerate(turns):
            last = i == len(turns) - 1
            content = m["content"]
            if m["role"] == "user":
                merge_at = {"first_user": users[0], "last_user": users[-1]}.get(self.system_mode)
                if system and i == merge_at:
                    content = system + self.separator + content
                out += self.marker(self.family.user[0]) + content + self.marker(self.family.user[1])
                out += self.marker(self.family.generation) if last else ""
            elif m["role"] == "assistant":
                out += self.marker(self.family.assistant[0]) + content
                out += "" if last else self.marker(self.family.assistant[1])
        return out

    # ---------------------------------------------------------------- the Go template
    def go_template(self) -> str:
        f = self.family
        lit = self.marker
        for text in (self.system_prefix, self.system_suffix, self.separator, self.default_system or "", *f.user,
                     *f.assistant,
                     f.generation, *(f.system or ())):
            if "{{" in text or "}}" in text:
                raise ExportError(f"chat template: marker {text!r} contains Go template braces")
        # Literal text is always followed by an action without a trim marker: `{{-` would also eat
        # the newlines that end a turn marker. Newlines between actions are layout only.
        lines: list[str] = []
        loop = "range $i, $_ := .Messages }}"
        if self.system_mode != "turn":
            lines += ["{{- $system := $.System }}", "{{- " + loop]
        elif self.default_system is None:
            block = f"{self.system_prefix}{{{{ $.System }}}}{self.system_suffix}"
            lines += ["{{- if $.System }}" + block + "{{ end }}", "{{- " + loop]
        else:  # the template always opens with a system turn
            lines.append(f"{self.system_prefix}{{{{ $.System }}}}{self.system_suffix}{{{{ {loop}")
        lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
        if self.system_mode == "first_user":
            merged = f"{{{{ if $system }}}}{{{{ $system }}}}{self.separator}{{{{ $system = \"\" }}}}{{{{ end }}}}"
        elif self.system_mode == "last_user":
            merged = f"{{{{ if and $last $system }}}}{{{{ $system }}}}{self.separator}{{{{ end }}}}"
        else:
            merged = ""
        opening = f"{{{{ if $last }}}}{lit(f.generation)}{{{{ end }}}}" if f.generation else ""
        lines.append(f'{{{{- if eq .Role "user" }}}}{lit(f.user[0])}{merged}{{{{ .Content }}}}{lit(f.user[1])}{opening}')
        lines.append(f'{{{{- else if eq .Role "assistant" }}}}{lit(f.assistant[0])}{{{{ .Content }}}}'
                     f'{{{{ if not $last }}}}{lit(f.assistant[1])}{{{{ end }}}}')
        lines.append("{{- end }}")
        lines.append("{{- end }}")
        return "\n".join(lines)


def render_jinja(template: str, messages: list[dict[str, str]], bos: str, eos: str) -> str:
    """The template's text for a conversation, without the BOS token it may print first (a
    placeholder stands for `bos_token`, so a BOS string that is also a turn marker, as SmolLM2's
    <|im_start|> is, is told apart)."""
    placeholder = "\x00bos\x00"
    text = render(template, messages, add_generation_prompt=True, tools=None, documents=None,
                  variables={"bos_token": placeholder, "eos_token": eos}, where="chat template")
    return text.removeprefix(placeholder).replace(placeholder, bos)


def fit(family: Family, template: str, bos: str, eos: str) -> ChatFormat | None:
    """The family's format with its system handling learned from the template, if it reproduces
    every probe."""
    plain = ChatFormat(family, eos)
    jinja = {i: render_jinja(template, p, bos, eos) for i, p in enumerate(probes(False))}
    reference = jinja[1]
    body = plain.render(probes(False)[1])
    if not reference.endswith(body):
        return None
    head = reference[: len(reference) - len(body)]
    try:
        with_system = [render_jinja(template, p, bos, eos) for p in probes(True)]
    except ChatTemplateError:
        with_system = None
    candidates: list[ChatFormat] = []
    if with_system is None:
        if head == "":
            candidates.append(ChatFormat(family, eos, system_mode="first_user", system_supported=False))
    else:
        candidates += learn_system(family, eos, head, with_system[1], plain.render(probes(False)[1]))
    for fmt in candidates:
        if all(fmt.render(p) == jinja[i] for i, p in enumerate(probes(False))) and (
                with_system is None or all(fmt.render(p) == r for p, r in zip(probes(True), with_system))):
            return fmt
    return None


def learn_system(family: Family, eos: str, head: str, rendered: str, body: str) -> list[ChatFormat]:
    """Formats consistent with one render of [system, user, assistant, user]."""
    found: list[ChatFormat] = []
    at = rendered.find(SYSTEM)
    if at < 0:
        return found
    if family.system is not None and rendered.endswith(body):
        # the system turn opens with the family's marker; what follows the text is learned, since
        # not every template closes it with the family's marker (SmolLM3 leaves a blank line only)
        block = rendered[: len(rendered) - len(body)]
        if block.startswith(family.system[0]) and at + len(SYSTEM) <= len(block):
            prefix, suffix = block[:at], block[at + len(SYSTEM):]
            default = None
            if head:
                default = head[len(prefix): len(head) - len(suffix)] if (
                    head.startswith(prefix) and head.endswith(suffix) and len(head) >= len(prefix) + len(suffix)) else None
                if default is None:
                    return found
            found.append(ChatFormat(family, eos, system_prefix=prefix, system_suffix=suffix, default_system=default))
    if head == "":
        after = rendered[at + len(SYSTEM):]
        for mode, user in (("first_user", USER.format(0)), ("last_user", USER.format(1))):
            if user in after:
                found.append(ChatFormat(family, eos, system_mode=mode, separator=after[: after.index(user)]))
    return found


def detect_chat_format(template: str, bos: str, eos: str) -> ChatFormat:
    """The format a jinja chat template renders, or ExportError before any work."""
    for family in FAMILIES:
        try:
            fmt = fit(family, template, bos, eos)
        except ChatTemplateError:
            continue
        if fmt is not None:
            return fmt
    try:
        sample = render_jinja(template, probes(False)[1], bos, eos)
    except ChatTemplateError as exc:
        sample = f"(it fails: {exc})"
    raise ExportError("chat template not recognised: for a probe conversation it renders "
                      f"{sample[:300]!r}; Ollama templates are written for "
                      f"{', '.join(f.name for f in FAMILIES)}")
