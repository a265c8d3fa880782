"""`velotune data CONFIG [--rows N] [--key=value ...]`: the first rows exactly as training will see
them (trained tokens highlighted), then statistics and warnings; nothing is trained.

It reads the config as `velotune train` does (same keys, same overrides, same errors) and the data
through the same functions, with the model's tokenizer alone (no weights are loaded), so it takes
seconds where a training run would first load the model.
"""
from __future__ import annotations

import argparse
import sys

from velotune.train.config import TrainConfigError, load_config

DEFAULT_ROWS = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="show the first rows as training sees them (trained tokens highlighted), with statistics",
        usage="velotune data [-h] [--rows N] [CONFIG.yaml] [--key=value ...]",
        description="Read the data of CONFIG.yaml as `velotune train` would and show the first rows rendered "
                    "with the model's chat template, the trained tokens highlighted, then statistics: rows "
                    "kept, dropped and truncated, target tokens, lengths, packing, warnings. Nothing is trained.")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="training config (default: every key's default)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, metavar="N",
                   help=f"rows to show (default {DEFAULT_ROWS}; 0 = statistics only)")
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from velotune.data import DataError
    from velotune.errors import LoadError
    from velotune.loaders import load_tokenizer
    from velotune.train import methods
    from velotune.train.data import TrainData
    from velotune.train.preview import show

    console = Console(soft_wrap=True)
    try:
        if args.rows < 0:
            raise TrainConfigError(f"command line: --rows must be 0 or more, got {args.rows}")
        config = load_config(args.config, args.extra)
        tokenizer = load_tokenizer(config.model)
        data = methods.load_data(config, tokenizer)
    except (TrainConfigError, DataError, LoadError) as exc:
        print(f"velotune data: error: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, TrainData):
        from velotune.data.mixing import describe

        console.print(f"velotune data: {data.summary(describe(config.dataset), config.method)} (showing rows is for "
                      "the supervised methods lora, qlora and full)", markup=False, highlight=False)
        return 0
    show(console, config, data, tokenizer, args.rows)
    return 0
