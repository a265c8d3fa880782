"""Rebuild a `tokenizers` tokenizer from the vocabulary a GGUF file stores as metadata.

A GGUF has no tokenizer.json: llama.cpp's converter writes the token list, token types, merges
(or scores), special token ids and flags under `tokenizer.ggml.*`, and names the kind of model in
`tokenizer.ggml.model` and the pre-tokenizer in `tokenizer.ggml.pre`. We rebuild the tokenizer the
model was trained with from those:

* "gpt2": byte-level BPE. Token strings are already spelled in the byte alphabet (Ġ for space) and
  kept as they are, so ids equal the original tokenizer.json's. `tokenizer.ggml.pre` picks how text
  is split before BPE; names we do not know fall back to GPT-2's own split (what transformers does
  too) with a warning, since a wrong split still encodes and decodes text, only less well.
* "llama": SentencePiece-style BPE with byte fallback (`<0x0A>` tokens) and "▁" for spaces. Merges
  come from the file, or, in files that have none, from the token scores: every split of a token
  into two tokens is a merge ranked by the merged token's score. Gemma files rank by position and
  spell runs of spaces as real spaces; Phi-3 adds the leading "▁" with a normalizer (as its own
  tokenizer.json does); the others use Metaspace, prefixing "▁" to the first piece only.

Tokens typed CONTROL (3) become special added tokens and USER_DEFINED (4) plain added tokens, so
both are matched whole in text instead of being cut into pieces.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE

from velotune.errors import LoadError

logger = logging.getLogger(__name__)

CONTROL, USER_DEFINED = 3, 4
SPECIAL_ID_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
                   "pad": "padding_token_id"}

# Pre-tokenizer split patterns (the models' published regexes), by `tokenizer.ggml.pre` name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PATTERNS = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT,
                  "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT,
                  "tekken": TEKKEN_SPLIT}
# Llama 3's tokenizer takes a whole piece that is itself a token without applying merges.
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}
# Qwen2's tokenizer.json normalizes to NFC before splitting.
NFC_NORMALIZED = {"qwen2", "deepseek-r1-qwen"}
# GPT-2's split after cutting every digit apart (SmolLM and StarCoder vocabularies have no
# multi-digit tokens).
DIGIT_SPLIT = {"smollm", "starcoder"}
GEMMA_ARCHITECTURES = {"gemma", "gemma2", "gemma3"}


@dataclass
class GGUFVocab:
    """The tokenizer as a GGUF file describes it."""

    path: str
    architecture: str
    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int] | None
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]            # "bos" / "eos" / "unk" / "pad" -> id, those the file sets
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool | None
    chat_template: str | dict[str, str] | None

    def token(self, kind: str) -> str | None:
        token_id = self.special_ids.get(kind)
        return None if token_id is None else self.tokens[token_id]


def read_gguf_vocab(reader: gguf.GGUFReader, path: str) -> GGUFVocab:
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    model = value("tokenizer.ggml.model")
    tokens = value("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        missing = "tokenizer.ggml.model" if model is None else "tokenizer.ggml.tokens"
        raise LoadError(f"{path}: missing metadata key {missing!r}, so there is no tokenizer to rebuild")
    token_types, scores = value("tokenizer.ggml.token_type"), value("tokenizer.ggml.scores")
    for key, array in (("tokenizer.ggml.token_type", token_types), ("tokenizer.ggml.scores", scores)):
        if array is not None and len(array) != len(tokens):
            raise LoadError(f"{path}: {key} has {len(array)} entries for {len(tokens)} tokens")
    special_ids = {}
    for kind, suffix in SPECIAL_ID_KEYS.items():
        token_id = value(f"tokenizer.ggml.{suffix}")
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise LoadError(f"{path}: tokenizer.ggml.{suffix} = {token_id} is outside the "
                            f"{len(tokens)} tokens")
        special_ids[kind] = int(token_id)
    templates = {key.removeprefix("tokenizer.chat_template."): fields[key].contents()
                 for key in fields if key.startswith("tokenizer.chat_template.")}
    chat_template = value("tokenizer.chat_template")
    if templates:
        chat_template = {"default": chat_template, **templates} if chat_template else templates
    return GGUFVocab(
        path=path, architecture=value("general.architecture", ""), model=model,
        pre=value("tokenizer.ggml.pre"), tokens=tokens, token_types=token_types, scores=scores,
        merges=value("tokenizer.ggml.merges"), special_ids=special_ids,
        # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
        add_bos_token=bool(value("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos_token=bool(value("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=value("tokenizer.ggml.add_space_prefix"), chat_template=chat_template)


def build_backend(vocab: GGUFVocab) -> Backend:
    if vocab.model == "gpt2":
        backend = _byte_level(vocab)
    elif vocab.model == "llama":
        backend = _sentencepiece(vocab)
    else:
        raise LoadError(f"{vocab.path}: tokenizer.ggml.model = {vocab.model!r} is not supported "
                        "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
    _add_typed_tokens(backend, vocab)
    return backend


def _byte_level(vocab: GGUFVocab) -> Backend:
    if not vocab.merges:
        raise LoadError(f"{vocab.path}: byte-level BPE (tokenizer.ggml.model 'gpt2') without "
                        "tokenizer.ggml.merges")
    merges = [_split_merge(merge, vocab.path) for merge in vocab.merges]
    backend = Backend(BPE({token: i for i, token in enumerate(vocab.tokens)}, merges,
                          ignore_merges=vocab.pre in IGNORE_MERGES))
    pre = vocab.pre
    if pre in SPLIT_PATTERNS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in DIGIT_SPLIT:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre not in (None, "default", "gpt2"):
            logger.warning("%s: unknown tokenizer.ggml.pre %r; splitting text the GPT-2 way",
                           vocab.path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in NFC_NORMALIZED:
        backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(vocab: GGUFVocab) -> Backend:
    gemma = vocab.architecture in GEMMA_ARCHITECTURES
    tokens = vocab.tokens
    if gemma:  # Gemma files spell tokens made of spaces with real spaces; the model uses "▁".
        tokens = ["▁" * len(token) if token and set(token) == {" "} else token for token in tokens]
    if vocab.merges:
        merges = [_split_merge(merge, vocab.path) for merge in vocab.merges]
    elif gemma:
        merges = merges_from_ranks(tokens, [-float(i) for i in range(len(tokens))])
    elif vocab.scores is not None:
        merges = merges_from_ranks(tokens, vocab.scores)
    else:
        raise LoadError(f"{vocab.path}: SentencePiece vocabulary with neither tokenizer.ggml.merges "
                        "nor tokenizer.ggml.scores")
    unk = vocab.token("unk")
    backend = Backend(BPE({token: i for i, token in enumerate(tokens)}, merges, unk_token=unk,
                          fuse_unk=True, byte_fallback=True))
    add_prefix = vocab.add_space_prefix if vocab.add_space_prefix is not None else not gemma
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "▁")
    elif vocab.architecture == "phi3":
        steps = [normalizers.Prepend("▁")] if add_prefix else []
        backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix and not gemma:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def merges_from_ranks(tokens: Sequence[str], ranks: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: each split of a token into two tokens, best-ranked first.

    Ties go to the longer left piece, then the longer right piece, then vocabulary order.
    """
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for index, token in enumerate(tokens):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-ranks[index], -len(left), -len(right), index, ids[left], ids[right],
                               left, right))
    ranked.sort()
    return [(entry[6], entry[7]) for entry in ranked]


def _split_merge(merge: str, path: str) -> tuple[str, str]:
    left, space, right = merge.partition(" ")
    if not space or not left or not right:
        raise LoadError(f"{path}: tokenizer.ggml.merges entry {merge!r} is not two tokens separated by a space")
    return left, right


def _add_typed_tokens(backend: Backend, vocab: GGUFVocab) -> None:
    """Only tokens already in the vocabulary: an added token must never get a new id."""
    types = vocab.token_types or [0] * len(vocab.tokens)
    named = {token for kind in SPECIAL_ID_KEYS if (token := vocab.token(kind)) is not None}
    specials, plain = [], []
    for token, kind in zip(vocab.tokens, types):
        if backend.token_to_id(token) is None:
            continue
        if kind == CONTROL or token in named:
            specials.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    backend.add_special_tokens(specials)
    backend.add_tokens(plain)
