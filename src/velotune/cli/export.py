"""`velotune export RUN_DIR --to hf|gguf|ollama|awq|gptq [--quant TYPE] [--out PATH] [--group-size N]
[--[no-]calibration]`.

RUN_DIR is a training output folder (holding adapter/ or model/), an adapter or model folder,
or a .gguf file. Bad requests (target, quant type, group size, path, architecture, chat template)
end with one line naming the problem and exit status 2, before anything is written.

Calibrated exports (awq, gptq, and the calibrated GGUF/Ollama types) calibrate on the run's own
training rows, read from RUN_DIR/config.yaml the way `velotune train` read them; without them the
command says why and calibrates on generic chat text.
"""
from __future__ import annotations

import argparse
import sys

from velotune.export import QUANTS, ExportError, calibrates, check_request, export, resolve_source
from velotune.export.mmproj import mmproj_path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a run to a merged HF folder, GGUF, Ollama, or 4-bit AWQ/GPTQ for vLLM",
        description="Merge adapters and export RUN_DIR (a training output folder, an adapter or model folder, "
                    "or a .gguf file) as a Hugging Face folder, a GGUF file, a GGUF with an Ollama Modelfile, "
                    "or a 4-bit AWQ/GPTQ folder (compressed-tensors, loaded by vLLM and transformers).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", choices=tuple(QUANTS), default="gguf", help="export format (default gguf)")
    p.add_argument("--quant", metavar="TYPE",
                   help=f"weight type: {', '.join(QUANTS['hf'])} for hf (default: the model's dtype); "
                        f"{', '.join(QUANTS['gguf'])} for gguf (default f16) and ollama (default q8_0); "
                        f"{', '.join(QUANTS['awq'])} for awq and gptq (default w4a16_asym, zero points; "
                        "w4a16: symmetric)")
    p.add_argument("--out", help="output folder (or .gguf file for --to gguf); default RUN_DIR/export-FORMAT")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="awq/gptq: input columns per scale (default 128, or 64/32 where 128 does not divide "
                        "the model's widths)")
    p.add_argument("--calibration", dest="calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="round quantized GGUF weights to minimise each layer's output error on the run's "
                        "training rows, or generic text without them (default: on for the 4-bit types q4_k_m, "
                        "q4_k_s, q4_1, q4_0; awq and gptq always calibrate)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        check_request(args.to, args.quant, args.calibrate, args.group_size)
        calibration = None
        if calibrates(args.to, args.quant, args.calibrate):
            from velotune.errors import LoadError
            from velotune.loaders import load_tokenizer
            from velotune.train.export_calibration import calibration_tokens, run_calibration

            source = resolve_source(args.run_dir)
            try:
                tokenizer = load_tokenizer(source)
            except LoadError:
                tokenizer = None     # the export itself names what is wrong with the source
            calibration, note = run_calibration(source, tokenizer, calibration_tokens(args.to))
            print(note if calibration is not None else f"note: {note}; calibrating on generic chat text",
                  file=sys.stderr)
        written = export(args.run_dir, to=args.to, quant=args.quant, out=args.out, calibrate=args.calibrate,
                         group_size=args.group_size, calibration=calibration)
    except ExportError as exc:
        print(f"velotune export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    projector = mmproj_path(written)
    if args.to == "gguf" and projector.is_file():     # a vision-language model's tower and projector
        print(f"wrote {projector}")
    return 0
