"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), spelled the way llama.cpp's converter
spells it, from our `Tokenizer` (its `tokenizers` pipeline, read through its JSON form).

* Byte-level BPE becomes `tokenizer.ggml.model = "gpt2"`: the tokens as the BPE model spells
  them (Ġ for a space), the merges, and `tokenizer.ggml.pre`, the name under which llama.cpp
  knows the pre-tokenizer's split. The name is found from the pipeline itself: a split regex
  equal to one of `velotune.tokenizer.gguf_vocab.SPLIT_PATTERNS` takes that name (the reader and
  the writer share the table), digits cut one by one before GPT-2's split is "smollm", GPT-2's
  split alone is "gpt-2". Any other pipeline is refused: llama.cpp would split text differently
  from training.
* BPE with byte fallback (SentencePiece-converted: Llama 2, Mistral, Gemma, Phi-3) becomes
  `"llama"`: the ▁-spelled tokens, scores (minus the rank of the merge that makes a token, which
  is what llama.cpp's SentencePiece tokenizer ranks merges by), the merges too, and
  `add_space_prefix` when the pipeline prepends ▁.
* Token types: special added tokens CONTROL, other added tokens USER_DEFINED, `<0xNN>` BYTE,
  the unknown token of a SentencePiece vocabulary UNKNOWN, padding up to the model's vocabulary `[PAD{i}]` UNUSED.
* Special ids (bos, eos, unk, pad), the end-of-turn id (`eot`, the stop token after an
  assistant's turn when it is not EOS), add_bos/add_eos, and the chat template(s).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from gguf import GGUFWriter, TokenType

from velotune.export.errors import ExportError
from velotune.models.config import ModelConfig
from velotune.tokenizer.gguf_vocab import SPLIT_PATTERNS

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
PRE_NAMES = {pattern: name for name, pattern in reversed(list(SPLIT_PATTERNS.items()))}


@dataclass
class GGUFTokenizer:
    model: str                      # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]     # bos / eos / unk / pad / eot
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | dict[str, str] | None


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not node:
        return []
    key = "pretokenizers" if node.get("type") == "Sequence" and "pretokenizers" in node else "normalizers"
    return node[key] if node.get("type") == "Sequence" else [node]


def pre_tokenizer_name(spec: dict[str, Any], where: str) -> str:
    steps = _steps(spec.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in PRE_NAMES:
            return PRE_NAMES[pattern]
    raise ExportError(f"{where}: byte-level pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} has no "
                      f"llama.cpp name; supported: GPT-2's split, SmolLM's digit split, or the split regex of "
                      f"{', '.join(sorted(SPLIT_PATTERNS))}")


def _merges(model: dict[str, Any], where: str) -> list[str]:
    out = []
    for merge in model.get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in left or " " in right:
            raise ExportError(f"{where}: merge {merge!r} holds a space, which GGUF merges cannot express")
        out.append(f"{left} {right}")
    return out


def gguf_tokenizer(tokenizer: Any, config: ModelConfig) -> GGUFTokenizer:
    """Everything the GGUF needs, checked (raises ExportError before any file is written)."""
    where = getattr(tokenizer, "source", "tokenizer")
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{where}: a {model.get('type')} tokenizer cannot be written to GGUF (BPE only)")
    byte_fallback = bool(model.get("byte_fallback"))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, token in added.items():
        vocab.setdefault(token["content"], token_id)
    size = max(vocab.values()) + 1
    if size > config.vocab_size:
        raise ExportError(f"{where}: the tokenizer has ids up to {size - 1}, beyond the model's vocab_size "
                          f"{config.vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [int(TokenType.UNUSED)] * config.vocab_size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = int(TokenType.NORMAL)
    for token_id, token in added.items():
        types[token_id] = int(TokenType.CONTROL if token.get("special") else TokenType.USER_DEFINED)
    merges = _merges(model, where)
    scores = None
    if byte_fallback:
        for token_id, text in enumerate(tokens):
            if BYTE_TOKEN.fullmatch(text) and types[token_id] == TokenType.NORMAL:
                types[token_id] = int(TokenType.BYTE)
        rank = {"".join(m.split(" ")): -float(i) for i, m in reversed(list(enumerate(merges)))}
        scores = [rank.get(text, 0.0) if types[i] == TokenType.NORMAL else 0.0 for i, text in enumerate(tokens)]
    if byte_fallback and tokenizer.unk_token_id is not None:  # SentencePiece's <unk>
        types[tokenizer.unk_token_id] = int(TokenType.UNKNOWN)
    special_ids = {kind: token_id for kind, token_id in (
        ("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id), ("unk", tokenizer.unk_token_id),
        ("pad", None if tokenizer.pad_token is None else tokenizer.backend.token_to_id(tokenizer.pad_token)),
    ) if token_id is not None}
    end_of_turn = [i for i in tokenizer.stop_token_ids if i != tokenizer.eos_token_id]
    if end_of_turn:
        special_ids["eot"] = end_of_turn[0]
    normalizers = [s.get("type") for s in _steps(spec.get("normalizer"))]
    pre_steps = _steps(spec.get("pre_tokenizer"))
    prepends = "Prepend" in normalizers or any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in pre_steps)
    return GGUFTokenizer(
        model="llama" if byte_fallback else "gpt2",
        pre=None if byte_fallback else pre_tokenizer_name(spec, where),
        tokens=tokens, types=types, scores=scores, merges=merges, special_ids=special_ids,
        add_bos=bool(tokenizer.add_bos_token), add_eos=bool(tokenizer.add_eos_token),
        add_space_prefix=prepends if byte_fallback else None, chat_template=tokenizer.chat_template)


def add_tokenizer(writer: GGUFWriter, tok: GGUFTokenizer) -> None:
    writer.add_tokenizer_model(tok.model)
    if tok.pre:
        writer.add_tokenizer_pre(tok.pre)
    writer.add_token_list(tok.tokens)
    writer.add_token_types(tok.types)
    if tok.scores is not None:
        writer.add_token_scores(tok.scores)
    if tok.merges:
        writer.add_token_merges(tok.merges)
    for kind, token_id in tok.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(tok.add_eos)
    if tok.add_space_prefix is not None:
        writer.add_add_space_prefix(tok.add_space_prefix)
    if isinstance(tok.chat_template, dict):
        writer.add_chat_template([{"name": name, "template": text} for name, text in tok.chat_template.items()])
    elif tok.chat_template:
        writer.add_chat_template(tok.chat_template)
