"""Ollama export: model.gguf plus a Modelfile next to it (`ollama create NAME -f Modelfile`).

The Modelfile holds FROM ./model.gguf, the chat template restated in Ollama's Go-template
language (`chat_format.py`, recognised by rendering, never by reading the jinja source), the
template's default system prompt as SYSTEM (Ollama then inserts it exactly where the jinja
template does), PARAMETER stop for the end-of-turn token and EOS (and any other stop token the
tokenizer names), and the sampling defaults of generation_config.json (temperature, top_p,
top_k). The template is recognised before the GGUF is written, so an unknown one fails at once.

A vision-language model's projector (llama.cpp's mmproj file, `mmproj.py`) is written beside
model.gguf and named by a second FROM line: Ollama's `create` takes a GGUF of architecture "clip"
as the model's projector (the way its own documentation and issue tracker describe importing a
LLaVA; ollama/ollama#9780). Whether Ollama's newer engine then runs a given family from the two
files is Ollama's to decide; the files are the ones llama.cpp runs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from velotune.export.chat_format import ChatFormat, detect_chat_format
from velotune.export.errors import ExportError
from velotune.export.gguf import save_gguf
from velotune.export.mmproj import mmproj_path
from velotune.models.transformer import Transformer

GGUF_NAME = "model.gguf"
SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def chat_format_of(tokenizer: Any) -> ChatFormat:
    if tokenizer is None or not tokenizer.chat_template:
        raise ExportError("an Ollama export needs the tokenizer's chat template, and this model has none")
    template = tokenizer.chat_template
    if isinstance(template, dict):
        if "default" not in template:
            raise ExportError(f"chat templates {sorted(template)}: none is named 'default'")
        template = template["default"]
    return detect_chat_format(template, tokenizer.bos_token or "", tokenizer.eos_token or "")


def quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f'{what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(fmt: ChatFormat, tokenizer: Any, generation_config: dict[str, Any], projector: bool = False) -> str:
    """`projector`: a vision-language model, whose mmproj file Ollama takes as a second FROM line."""
    stops = list(fmt.stop_words)
    for token_id in tokenizer.stop_token_ids:
        text = tokenizer.decode([token_id])
        if text and text not in stops:
            stops.append(text)
    lines = [f"FROM ./{GGUF_NAME}"] + ([f"FROM ./{mmproj_path(Path(GGUF_NAME))}"] if projector else [])
    lines += [f"TEMPLATE {quoted(fmt.go_template(), 'the chat template')}"]
    if fmt.default_system:
        lines.append(f"SYSTEM {quoted(fmt.default_system, 'the default system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    for key in SAMPLING_KEYS:
        if generation_config.get(key) is not None:
            lines.append(f"PARAMETER {key} {generation_config[key]}")
    return "\n".join(lines) + "\n"


def save_ollama(model: Transformer, tokenizer: Any, out: Path, quant: str = "q8_0",
                generation_config: dict[str, Any] | None = None, name: str | None = None,
                calibrate: bool | None = None, calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write out/model.gguf and out/Modelfile; returns the Modelfile's path."""
    fmt = chat_format_of(tokenizer)
    text = modelfile(fmt, tokenizer, generation_config or {}, projector=model.config.multimodal_type is not None)
    save_gguf(model, tokenizer, out / GGUF_NAME, quant, name=name, calibrate=calibrate, calibration=calibration)
    path = out / "Modelfile"
    path.write_text(text, encoding="utf-8")
    return path
