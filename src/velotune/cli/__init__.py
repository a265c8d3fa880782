"""The `velotune` command: one subcommand per module in this package.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the default; `main` only dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("train", "data", "chat", "generate", "eval", "export", "estimate", "doctor", "studio")


def version_text() -> str:
    """`velotune --version`: ours, and the Python and torch it runs on (what a bug report needs)."""
    import platform

    import torch

    import velotune

    return f"velotune {velotune.__version__} (Python {platform.python_version()}, torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="velotune",
        description="Fine-tune open LLMs fast and lean: LoRA, QLoRA, full; SFT, DPO, ORPO, GRPO; export.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"velotune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"velotune.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    config = getattr(args, "config", None)
    if getattr(args, "accepts_extra", False) and isinstance(config, str) and config.startswith("--"):
        # argparse takes an option holding a space ("--system_prompt=Be brief.") for a positional
        args.config, extra = None, [config, *extra]
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
