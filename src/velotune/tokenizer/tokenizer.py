"""`Tokenizer`: a `tokenizers` pipeline plus the model's special tokens and chat template.

The `tokenizers` library does the text <-> id work (it is what transformers' fast tokenizers run);
this class adds what a chat model needs around it, with transformers' behaviour as the contract:

* BOS/EOS are added by a TemplateProcessing post-processor built from add_bos_token/add_eos_token
  (the same one transformers installs), so `encode(text)` adds them and the saved tokenizer.json
  carries them. The backend passed in is owned from then on: its post-processor is replaced and
  the named special tokens are registered as special added tokens when they are not already.
* `apply_chat_template` renders the template (see chat_template.py) and tokenizes the result
  WITHOUT adding special tokens, as transformers does: templates that want BOS write it
  themselves, so it is never doubled.
* `stop_token_ids` is EOS plus the token the template writes right after an assistant's content,
  found by rendering a probe conversation (no list of known marker strings). Generation must stop
  at the end of a turn even when the file's EOS is another token.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import gguf
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from velotune.errors import LoadError
from velotune.tokenizer import chat_template as templating
from velotune.tokenizer.gguf_vocab import build_backend, read_gguf_vocab
from velotune.tokenizer.hf_files import read_hf_folder, write_hf_folder
from velotune.tokenizer.image_processor import ImageProcessor

logger = logging.getLogger(__name__)

STOP_PROBE_ANSWER = "velotune stop probe"


class Tokenizer:
    def __init__(self, backend: Backend, *, chat_template: str | Mapping[str, str] | None,
                 bos_token: str | None, eos_token: str | None, pad_token: str | None = None,
                 unk_token: str | None = None, add_bos_token: bool = False, add_eos_token: bool = False,
                 source: str = "in-memory tokenizer") -> None:
        self.backend = backend
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self._add_bos_token, self._add_eos_token = add_bos_token, add_eos_token
        self.source = source
        # A vision-language model's images -> pixels and prompt text (tokenizer/image_processor.py),
        # set by the loader; None for text models.
        self.image_processor: ImageProcessor | None = None
        named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
        for key, token in named.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{source}: {key} {token!r} is not in the vocabulary")
        if add_bos_token and bos_token is None:
            raise ValueError(f"{source}: add_bos_token is set but there is no bos_token")
        if add_eos_token and eos_token is None:
            raise ValueError(f"{source}: add_eos_token is set but there is no eos_token")
        registered = {token.content for token in backend.get_added_tokens_decoder().values()}
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                    for token in dict.fromkeys(named.values())
                                    if token is not None and token not in registered])
        backend.post_processor = self._post_processor()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        files = read_hf_folder(folder)
        try:
            return cls(files.backend, chat_template=files.chat_template, **files.special_tokens,
                       add_bos_token=files.add_bos_token, add_eos_token=files.add_eos_token,
                       source=str(folder))
        except ValueError as error:   # inconsistent special tokens: a file problem
            raise LoadError(str(error)) from None

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, path: str | Path) -> Tokenizer:
        vocab = read_gguf_vocab(reader, str(path))
        try:
            return cls(build_backend(vocab), chat_template=vocab.chat_template,
                       bos_token=vocab.token("bos"), eos_token=vocab.token("eos"), pad_token=vocab.token("pad"),
                       unk_token=vocab.token("unk"), add_bos_token=vocab.add_bos_token,
                       add_eos_token=vocab.add_eos_token, source=str(path))
        except ValueError as error:
            raise LoadError(str(error)) from None

    def save(self, directory: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json, loadable by transformers' AutoTokenizer (and the
        image processor's files, for a vision-language model)."""
        write_hf_folder(Path(directory), self.backend, self.special_tokens_map, self.add_bos_token,
                        self.add_eos_token, self.chat_template)
        if self.image_processor is not None:
            self.image_processor.save(Path(directory))

    def _post_processor(self) -> processors.TemplateProcessing:
        bos = [f"{self.bos_token}:0"] if self.add_bos_token else []
        eos = [f"{self.eos_token}:0"] if self.add_eos_token else []
        bos_b = [f"{self.bos_token}:1"] if self.add_bos_token else []
        eos_b = [f"{self.eos_token}:1"] if self.add_eos_token else []
        specials = [(token, self.backend.token_to_id(token)) for token, wanted in
                    ((self.bos_token, self.add_bos_token), (self.eos_token, self.add_eos_token)) if wanted]
        return processors.TemplateProcessing(single=[*bos, "$A:0", *eos],
                                             pair=[*bos, "$A:0", *eos, *bos_b, "$B:1", *eos_b],
                                             special_tokens=list(dict.fromkeys(specials)))

    @property
    def add_bos_token(self) -> bool:
        """Whether encode() puts BOS in front (fixed at construction: it is in the post-processor)."""
        return self._add_bos_token

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    # ---- vocabulary ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Every id this tokenizer can produce (added tokens included): what embeddings must cover."""
        return len(self)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add `tokens` as special tokens (never split, skipped when decoding with
        skip_special_tokens); returns their ids. A token already known keeps its id."""
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    @property
    def special_tokens_map(self) -> dict[str, str | None]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token,
                "unk_token": self.unk_token, "pad_token": self.pad_token}

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        """The pad token, or EOS when the model names none (padding is masked out anyway)."""
        return self._id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens and of every added token marked special."""
        ids = {token_id for token_id, token in self.backend.get_added_tokens_decoder().items() if token.special}
        ids.update(i for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
                   if i is not None)
        return sorted(ids)

    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...

    @overload
    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]: ...

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Unknown tokens map to the unk id (None without one), as in transformers."""
        if isinstance(tokens, str):
            token_id = self.backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character offsets into `text`."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, [tuple(offset) for offset in encoding.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, tools: Sequence[Mapping[str, Any]] | None = None,
                            documents: Sequence[Mapping[str, Any]] | None = None, **extra: Any
                            ) -> str | list[int]:
        """The conversation as the model's template writes it: ids, or the text if tokenize=False.

        `extra` keyword arguments reach the template as variables (e.g. `date_string`,
        `enable_thinking`); they override the special-token variables of the same name.
        """
        template = templating.select_template(self.chat_template, tools, self.source)
        variables = {key: token for key, token in self.special_tokens_map.items() if token is not None}
        variables.update(extra)
        text = templating.render(template, messages, add_generation_prompt=add_generation_prompt,
                                 tools=tools, documents=documents, variables=variables, where=self.source)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS, plus the special token the chat template writes right after an assistant's content."""
        stops = [self.eos_token_id] if self.eos_token_id is not None else []
        if self.chat_template is None:
            return stops
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": STOP_PROBE_ANSWER}]
        try:
            text = self.apply_chat_template(probe, tokenize=False)
        except templating.ChatTemplateError as error:
            logger.warning("%s: cannot find the end-of-turn token (%s); stopping at EOS only", self.source, error)
            return stops
        answer_end = text.rfind(STOP_PROBE_ANSWER) + len(STOP_PROBE_ANSWER)
        if answer_end < len(STOP_PROBE_ANSWER):   # the template dropped the content
            return stops
        ids, offsets = self.encode_with_offsets(text)
        special = set(self.all_special_ids)
        following = next((token_id for token_id, (start, _) in zip(ids, offsets) if start >= answer_end), None)
        if following is not None and following in special and following not in stops:
            stops.append(following)
        return stops
