"""Read and write the Hugging Face tokenizer files of a model folder.

Read: tokenizer.json (the whole tokenization pipeline, in the `tokenizers` library's own format),
tokenizer_config.json (special token names, add_bos_token/add_eos_token, chat template), and when
present special_tokens_map.json (older folders keep the special token names there) and a separate
chat_template.jinja or chat_template.json (newer transformers versions write the template there; it
wins over the one in tokenizer_config.json). A special token may be written as a string or as an
AddedToken object ({"content": ...}). When tokenizer_config.json does not say whether BOS/EOS are
added, that is read off tokenizer.json's post-processor by encoding a probe text.

Write: tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer loads as a plain
fast tokenizer (PreTrainedTokenizerFast), so it tokenizes exactly like ours.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from velotune.errors import LoadError
from velotune.errors import read_json

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_JINJA_FILE = "chat_template.jinja"
TEMPLATE_JSON_FILE = "chat_template.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
PROBE_TEXT = "a"

ChatTemplates = str | dict[str, str] | None


@dataclass
class HFTokenizerFiles:
    backend: Backend
    special_tokens: dict[str, str | None]     # SPECIAL_TOKEN_KEYS -> token string
    add_bos_token: bool
    add_eos_token: bool
    chat_template: ChatTemplates


def read_hf_folder(folder: Path) -> HFTokenizerFiles:
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a folder (expected a Hugging Face tokenizer folder)")
    tokenizer_path = folder / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise LoadError(f"{tokenizer_path}: file not found (a tokenizer folder needs {TOKENIZER_FILE})")
    try:
        backend = Backend.from_file(str(tokenizer_path))
    except Exception as error:  # tokenizers raises a bare Exception carrying serde's line/column
        raise LoadError(f"{tokenizer_path}: not a valid tokenizers file ({error})") from None
    config_path = folder / CONFIG_FILE
    config = _read_object(config_path)
    special_map_path = folder / SPECIAL_TOKENS_FILE
    special_map = _read_object(special_map_path) if special_map_path.is_file() else {}

    special_tokens: dict[str, str | None] = {}
    for key in SPECIAL_TOKEN_KEYS:
        in_config = config.get(key) is not None
        where, raw = (config_path, config[key]) if in_config else (special_map_path, special_map.get(key))
        token = _token_content(raw, where, key)
        if token is not None and backend.token_to_id(token) is None:
            raise LoadError(f"{where}: {key} {token!r} is not in the vocabulary of {tokenizer_path}")
        special_tokens[key] = token

    add_bos, add_eos = _added_specials(backend, special_tokens)
    for key in ("add_bos_token", "add_eos_token"):
        if key in config and not isinstance(config[key], bool):
            raise LoadError(f"{config_path}: {key} must be true or false, got {config[key]!r}")
    return HFTokenizerFiles(backend=backend, special_tokens=special_tokens,
                            add_bos_token=config.get("add_bos_token", add_bos),
                            add_eos_token=config.get("add_eos_token", add_eos),
                            chat_template=_read_chat_template(folder, config))


def write_hf_folder(folder: Path, backend: Backend, special_tokens: dict[str, str | None],
                    add_bos_token: bool, add_eos_token: bool, chat_template: ChatTemplates) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / TOKENIZER_FILE))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "clean_up_tokenization_spaces": False,
                              "add_bos_token": add_bos_token, "add_eos_token": add_eos_token}
    config.update({key: token for key, token in special_tokens.items() if token is not None})
    if isinstance(chat_template, dict):
        config["chat_template"] = [{"name": name, "template": text} for name, text in chat_template.items()]
    elif chat_template is not None:
        config["chat_template"] = chat_template
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(raw: Any, where: Path, key: str) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("content"), str):
        return raw["content"]
    raise LoadError(f"{where}: {key} must be a string or an object with a 'content' string, got {raw!r}")


def _added_specials(backend: Backend, special_tokens: dict[str, str | None]) -> tuple[bool, bool]:
    """Whether tokenizer.json's post-processor puts BOS in front / EOS at the end."""
    plain = backend.encode(PROBE_TEXT, add_special_tokens=False).ids
    full = backend.encode(PROBE_TEXT, add_special_tokens=True).ids
    bos, eos = (None if token is None else backend.token_to_id(token)
                for token in (special_tokens["bos_token"], special_tokens["eos_token"]))
    added = len(full) > len(plain)
    return added and bos is not None and full[0] == bos, added and eos is not None and full[-1] == eos


def _read_chat_template(folder: Path, config: dict[str, Any]) -> ChatTemplates:
    jinja_path, json_path = folder / TEMPLATE_JINJA_FILE, folder / TEMPLATE_JSON_FILE
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise LoadError(f"{jinja_path}: not UTF-8 text ({error})") from None
    if json_path.is_file():
        return _template_value(_read_object(json_path).get("chat_template"), json_path)
    return _template_value(config.get("chat_template"), folder / CONFIG_FILE)


def _template_value(raw: Any, where: Path) -> ChatTemplates:
    """A template string, or transformers' list of named templates [{"name", "template"}]."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(entry, dict) and isinstance(entry.get("name"), str)
                                     and isinstance(entry.get("template"), str) for entry in raw):
        return {entry["name"]: entry["template"] for entry in raw}
    raise LoadError(f"{where}: chat_template must be a string or a list of {{'name', 'template'}} "
                    f"objects, got {type(raw).__name__}")
