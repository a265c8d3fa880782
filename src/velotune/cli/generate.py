"""`velotune generate --prompt TEXT [--image FILE] [--adapter DIR | --model PATH]`: answer prompts and exit.

Each prompt is a user message rendered with the model's chat template (`--raw` feeds the text as
is). Several --prompt options are answered together as one batch. `--image` files (a
vision-language model) go in front of each prompt's text, as image parts of its user message. The
model options and `load_for_cli` are shared with `velotune chat`.
"""
from __future__ import annotations

import argparse
import sys

from velotune.infer.prompts import prompt_ids, with_system
from velotune.infer.sampling import SamplingParams
from velotune.tokenizer.chat_template import ChatTemplateError


def add_model_options(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder (its base model is loaded with it)")
    source.add_argument("--model", metavar="PATH", help="a model folder, .gguf file or Hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--system", metavar="TEXT", help="a system message (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default); e.g. 0.7 to sample")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold, e.g. 0.9")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="e.g. 1.1 (default 1.0: none)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="seed for sampling")
    p.add_argument("--device", default=None, metavar="DEVICE", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def load_for_cli(args: argparse.Namespace):
    """(model, tokenizer) named by --adapter / --model; raises LoadError with the path."""
    import velotune
    from velotune.errors import LoadError

    model, tokenizer = velotune.load_model(args.adapter or args.model, device=args.device)
    if tokenizer is None:
        raise LoadError(f"{args.adapter or args.model}: no tokenizer next to the model; cannot turn text into tokens")
    model.eval()
    return model, tokenizer


def load_or_report(args: argparse.Namespace, command: str):
    """(model, tokenizer, sampling params), or None after printing the error for `command`."""
    from velotune.errors import LoadError
    from velotune.errors import ConfigError

    try:
        params = sampling_params(args)
        model, tokenizer = load_for_cli(args)
    except (LoadError, ConfigError, ValueError) as exc:
        print(f"velotune {command}: error: {exc}", file=sys.stderr)
        return None
    return model, tokenizer, params


def image_prompts(tokenizer, args: argparse.Namespace):
    """(prompt ids, the image arguments of every prompt's images in order) for prompts shown
    `args.image`."""
    import torch

    processor = getattr(tokenizer, "image_processor", None)
    if processor is None:
        raise ValueError("--image needs a vision-language model (this one has no image processor)")
    if args.raw:
        raise ValueError("--image goes into the chat template's user message; it cannot be used with --raw")
    parts = [{"type": "image", "path": path} for path in args.image]
    opened = [processor.open(path, "--image") for path in args.image]   # each file decoded once
    images = processor.images_inputs(opened)
    counts = [processor.tokens_for(image) for image in opened]
    prompts = []
    for text in args.prompt:
        messages = with_system(args.system, [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if rendered.count(processor.marker) != len(args.image):
            raise ValueError(f"the chat template wrote {rendered.count(processor.marker)} image marker(s) "
                             f"{processor.marker!r} for {len(args.image)} image(s)")
        prompts.append(tokenizer.encode(processor.expand(rendered, counts), add_special_tokens=False))
    return prompts, {key: torch.cat([value] * len(args.prompt)) for key, value in images.items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="answer one or more prompts with a model or adapter",
        description="Answer each --prompt (as a user message in the model's chat template) and print the answers.")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for several")
    p.add_argument("--raw", action="store_true", help="feed the prompt text as is, without the chat template")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image shown with every prompt (vision-language models); repeat for several")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from velotune.infer.engine import generate

    loaded = load_or_report(args, "generate")
    if loaded is None:
        return 2
    model, tokenizer, params = loaded
    images: dict = {}
    try:
        if args.image:
            prompts, images = image_prompts(tokenizer, args)
        elif args.raw:
            prompts = [tokenizer.encode(text) for text in args.prompt]
        else:
            prompts = [prompt_ids(tokenizer, with_system(args.system, [{"role": "user", "content": text}]))
                       for text in args.prompt]
    except (ChatTemplateError, ValueError) as exc:   # a template that refuses or runs past its limits; a bad image
        print(f"velotune generate: error: {exc}", file=sys.stderr)
        return 2
    completions = generate(model, tokenizer, prompts, params, **images)
    for text, completion in zip(args.prompt, completions):
        if len(args.prompt) > 1:
            print(f"### {text}")
        print(completion.text.strip())
    return 0
