"""`velotune chat [--adapter DIR | --model PATH]`: talk to a model in the terminal.

Tokens are printed as they are generated. The conversation is kept (each answer is added to the
history, so follow-up questions work) until it no longer fits the model's context, when the
oldest exchanges are dropped. Commands: /exit or /quit (or Ctrl-D) end the chat, /reset clears
the history.
"""
from __future__ import annotations

import argparse
import sys

from velotune.cli.generate import add_model_options, load_or_report
from velotune.infer.prompts import fitting_prompt
from velotune.tokenizer.chat_template import ChatTemplateError

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model or adapter in the terminal (streaming)",
        description="Interactive chat. Type a message and press Enter; /reset clears the history, "
                    "/exit or Ctrl-D ends the chat.")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from velotune.infer.engine import stream

    loaded = load_or_report(args, "chat")
    if loaded is None:
        return 2
    model, tokenizer, params = loaded
    context = getattr(model, "max_seq_length", model.config.max_position_embeddings)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.adapter or args.model or 'SmolLM2-135M-Instruct'}; /reset clears, /exit ends")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            history.clear()
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = fitting_prompt(tokenizer, args.system, history, context - params.max_new_tokens)
        except ChatTemplateError as exc:      # a template that refuses, is blocked, or runs past its limits
            print(f"velotune chat: error: {exc}", file=sys.stderr)
            return 2
        print("bot> " if interactive else "", end="", flush=True)
        pieces = []
        for piece in stream(model, tokenizer, ids, params):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
    return 0

