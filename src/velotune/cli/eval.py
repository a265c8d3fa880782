"""`velotune eval CONFIG [--key=value ...]`: eval loss on the config's held-out split.

It evaluates the run's result when there is one (OUTPUT_DIR/adapter or OUTPUT_DIR/model), else
the base model; --adapter/--model name another, --base forces the base. The eval split is the
same one training held out (same dataset, eval_split and seed), so the numbers compare.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from velotune.train.config import TrainConfigError, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="eval loss of a model or adapter on a config's held-out split",
        description="Measure the mean token loss on the eval split of CONFIG (eval_split or eval_dataset). "
                    "Evaluates OUTPUT_DIR/adapter or OUTPUT_DIR/model when the run left one, else the base model.")
    p.add_argument("config", metavar="CONFIG.yaml")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--adapter", metavar="DIR", help="evaluate this LoRA adapter")
    source.add_argument("--model", metavar="PATH", help="evaluate this model folder or .gguf file")
    source.add_argument("--base", action="store_true", help="evaluate the config's base model")
    p.set_defaults(func=run, accepts_extra=True)


def pick_source(args: argparse.Namespace, config) -> str | None:
    if args.adapter or args.model:
        return args.adapter or args.model
    if not args.base:
        from velotune.train.methods import ADAPTER_DIR, MODEL_DIR

        for name in (ADAPTER_DIR, MODEL_DIR):
            if (Path(config.output_dir) / name).is_dir():
                return str(Path(config.output_dir) / name)
    return config.model


def run(args: argparse.Namespace) -> int:
    import velotune
    from velotune.data import DataError
    from velotune.errors import ConfigError, LoadError
    from velotune.train.data import load_train_data
    from velotune.train.methods import load_dtype
    from velotune.train.run import pad_id_of, pick_device
    from velotune.train.sft import evaluate_loss
    from velotune.train.trainer import autocast_dtype

    try:
        config = load_config(args.config, args.extra)
        source = pick_source(args, config)
        device = pick_device(config.device)
        model, tokenizer = velotune.load_model(source, dtype=load_dtype(config, device), device=device)
        if tokenizer is None:
            raise LoadError(f"{source}: no tokenizer next to the model")
        data = load_train_data(config, tokenizer)
        if not data.eval:
            raise TrainConfigError(f"{args.config}: no eval examples; set eval_split > 0 or eval_dataset")
        loss = evaluate_loss(model, data.eval, config.micro_batch_size, pad_id_of(tokenizer, model),
                             autocast_dtype(device, config.dtype))
    except (TrainConfigError, DataError, LoadError, ConfigError) as exc:
        print(f"velotune eval: error: {exc}", file=sys.stderr)
        return 2
    print(f"{source or 'SmolLM2-135M-Instruct'}: eval loss {loss:.4f} on {len(data.eval)} examples")
    return 0
