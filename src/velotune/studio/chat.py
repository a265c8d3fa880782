"""Chatting with a finished run's adapter (or fully trained model) from the studio.

The run's adapter/ or model/ folder is loaded with `load_model`, as `velotune chat --adapter`
does (an adapter loads its base), on the GPU when there is one. One model is kept loaded, the
last one asked for: a dashboard user talks to one run at a time, and two 8B models would not fit
beside a training run. Answers are greedy, at most `MAX_NEW_TOKENS`, and the oldest exchanges are
dropped when the history outgrows the model's context (`infer/prompts.py`). A lock
serialises loading and generation: the engine and the model are not shared between threads.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from velotune.studio.runs import StudioError, result_dir

MAX_NEW_TOKENS = 128
MAX_MESSAGES = 64
ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A non-empty list of {role, content} strings ending with the user's turn; 400 otherwise."""
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise StudioError(400, f"'messages' must be a list of 1 to {MAX_MESSAGES} {{role, content}} objects")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise StudioError(400, f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: text}}")
    if messages[-1]["role"] != "user":
        raise StudioError(400, "the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatModels:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: tuple[Path, Any, Any] | None = None      # (folder, model, tokenizer)

    def reply(self, run: Path, messages: list[dict[str, str]]) -> str:
        folder = result_dir(run)
        if folder is None:
            raise StudioError(409, f"run {run.name!r} has no trained adapter or model yet: chat once it has finished")
        with self.lock:
            model, tokenizer = self._load(folder)
            return self._generate(model, tokenizer, messages)

    def _load(self, folder: Path) -> tuple[Any, Any]:
        if self.loaded is None or self.loaded[0] != folder:
            import torch

            from velotune.loaders import load_model

            self.loaded = None                                  # free the previous model first
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = load_model(str(folder), device=device)
            if tokenizer is None:
                raise StudioError(409, f"{folder}: no tokenizer beside the model; cannot chat")
            model.eval()
            self.loaded = (folder, model, tokenizer)
        return self.loaded[1], self.loaded[2]

    @staticmethod
    def _generate(model: Any, tokenizer: Any, messages: list[dict[str, str]]) -> str:
        from velotune.infer.prompts import fitting_prompt
        from velotune.infer.engine import generate
        from velotune.infer.sampling import SamplingParams
        from velotune.tokenizer.chat_template import ChatTemplateError

        context = getattr(model, "max_seq_length", model.config.max_position_embeddings)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        history = [m for m in messages if m["role"] != "system"]
        try:
            ids = fitting_prompt(tokenizer, system, history, context - MAX_NEW_TOKENS)
        except ChatTemplateError as exc:
            raise StudioError(400, f"the chat template refused the conversation: {exc}") from None
        completion, = generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
        return completion.text.strip()
