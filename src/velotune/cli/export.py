"""`velotune export RUN_DIR --to hf|gguf|ollama [--quant TYPE] [--out PATH] [--[no-]calibration]`.

RUN_DIR is a training output folder (holding adapter/ or model/), an adapter or model folder,
or a .gguf file. Bad requests (target, quant type, path, architecture, chat template) end with
one line naming the problem and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
import sys

from velotune.export import QUANTS, ExportError, export


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a run to a merged HF folder, GGUF, or Ollama",
        description="Merge adapters and export RUN_DIR (a training output folder, an adapter or model folder, "
                    "or a .gguf file) as a Hugging Face folder, a GGUF file, or a GGUF with an Ollama Modelfile.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--to", choices=tuple(QUANTS), default="gguf", help="export format (default gguf)")
    p.add_argument("--quant", metavar="TYPE",
                   help=f"weight type: {', '.join(QUANTS['hf'])} for hf (default: the model's dtype); "
                        f"{', '.join(QUANTS['gguf'])} for gguf (default f16) and ollama (default q8_0)")
    p.add_argument("--out", help="output folder (or .gguf file for --to gguf); default RUN_DIR/export-FORMAT")
    p.add_argument("--calibration", dest="calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="round quantized GGUF weights to minimise each layer's output error on generic "
                        "calibration text (default: on for the 4-bit types q4_k_m, q4_k_s, q4_1, q4_0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        written = export(args.run_dir, to=args.to, quant=args.quant, out=args.out, calibrate=args.calibrate)
    except ExportError as exc:
        print(f"velotune export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
