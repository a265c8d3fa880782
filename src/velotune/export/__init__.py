"""Export a trained model: merged Hugging Face folder, GGUF file, or GGUF + Ollama Modelfile.

    export("runs/chat", to="gguf", quant="q8_0")              # -> runs/chat/export-gguf/model-q8_0.gguf
    export("runs/chat", to="gguf", quant="q4_k_m")            # llama.cpp's Q4_K_M mix, calibrated rounding
    export(model, to="hf", out="merged", tokenizer=tokenizer)  # a live model (adapters merged on the fly)
    export("runs/chat", to="awq")                             # 4-bit AWQ folder for vLLM / transformers
    export("runs/chat", to="gptq", group_size=64, calibration=(ids, positions))

The source is a live `Transformer` (with `tokenizer=`), or a path: a training output folder
holding adapter/ or model/, an adapter folder (adapter_config.json), a model folder
(config.json) or a .gguf file, loaded on the CPU (float32, or bfloat16 for a bf16 export).
Every request is checked before anything is loaded or written: the target, the quant type for
that target, the path; then the architecture and the chat template (Ollama) before the first
file is written.

`calibrate` (GGUF and Ollama): round quantized weights to minimise each layer's output error on
generic calibration conversations instead of to the nearest grid point (`export/calibration.py`).
None, the default, turns it on for the 4-bit types (q4_k_m, q4_k_s, q4_1, q4_0), where
round-to-nearest measurably loses the fine-tune; False gives plain round-to-nearest.

`awq` / `gptq` (`export/serving.py`): W4A16 in the compressed-tensors layout, always calibrated:
on `calibration` = (ids [B, L], positions [B, L]) of the run's own training rows when given
(the CLI and the trainer pass them), else on generic chat text. `group_size` (theirs alone):
None picks 128, or 64 or 32 for models whose widths 128 does not divide (SmolLM2's 576).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from velotune.export.errors import ExportError
from velotune.export.gguf import GGUF_QUANTS, check_architecture, check_calibrate, save_gguf
from velotune.export.hf import DEFAULT_SHARD_BYTES, HF_DTYPES, save_hf
from velotune.export.ollama import save_ollama
from velotune.export.serving import DEFAULT_SCHEME, SCHEMES, save_w4a16
from velotune.export.weights import export_config
from velotune.models.transformer import Transformer

QUANTS = {"hf": tuple(HF_DTYPES), "gguf": tuple(GGUF_QUANTS), "ollama": tuple(GGUF_QUANTS),
          "awq": tuple(SCHEMES), "gptq": tuple(SCHEMES)}
DEFAULT_QUANT = {"gguf": "f16", "ollama": "q8_0", **DEFAULT_SCHEME}
CALIBRATED_TARGETS = tuple(DEFAULT_SCHEME)          # calibrated always
RUN_SUBFOLDERS = ("adapter", "model")

__all__ = ["ExportError", "QUANTS", "calibrates", "export", "resolve_source"]


def check_request(to: str, quant: str | None, calibrate: bool | None = None,
                  group_size: int | None = None) -> None:
    if to not in QUANTS:
        raise ExportError(f"unknown export target {to!r}; choose one of {', '.join(QUANTS)}")
    if quant is not None and quant not in QUANTS[to]:
        raise ExportError(f"quant type {quant!r} is not supported for --to {to}; choose one of "
                          f"{', '.join(QUANTS[to])}")
    if calibrate is not None and to == "hf":
        raise ExportError("calibration applies to quantized GGUF/Ollama exports, not --to hf")
    if calibrate is False and to in CALIBRATED_TARGETS:
        raise ExportError(f"--to {to} is calibrated by definition; --no-calibration applies to GGUF/Ollama")
    if group_size is not None and to not in CALIBRATED_TARGETS:
        raise ExportError(f"a group size applies to --to awq/gptq, not --to {to}")
    if group_size is not None and group_size <= 0:
        raise ExportError(f"group size must be a positive number of input columns, got {group_size}")
    if to not in ("hf", *CALIBRATED_TARGETS):
        check_calibrate(quant or DEFAULT_QUANT[to], calibrate)


def resolve_source(path: str | Path) -> Path:
    """The model or adapter a path names: a run folder's adapter/ or model/, or the path itself."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p}: no such run folder, model folder or .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ExportError(f"{p}: not a .gguf file or a folder")
        return p
    for sub in RUN_SUBFOLDERS:
        if (p / sub).is_dir():
            return p / sub
    if (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
        return p
    raise ExportError(f"{p}: not a run folder (no {' or '.join(s + '/' for s in RUN_SUBFOLDERS)} inside) and not "
                      "a model or adapter folder (no config.json or adapter_config.json)")


def load_source(path: Path, quant: str | None) -> tuple[Transformer, Any, dict[str, Any]]:
    from velotune.errors import ConfigError, LoadError
    from velotune.loaders import load_model

    dtype = torch.bfloat16 if quant == "bf16" else torch.float32
    try:
        model, tokenizer = load_model(path, dtype=dtype, device="cpu")
    except (LoadError, ConfigError) as exc:
        raise ExportError(str(exc)) from None
    return model, tokenizer, dict(getattr(model, "generation_config", None) or {})


def default_out(source: Path, to: str) -> Path:
    folder = source.parent if source.is_file() or source.name in RUN_SUBFOLDERS else source
    return folder / f"export-{to}"


def calibrates(to: str, quant: str | None, calibrate: bool | None = None) -> bool:
    """Whether an export to `to` rounds on calibration rows, so a caller holding training rows
    should pass them (awq/gptq always; GGUF and Ollama by the type's default or `calibrate`)."""
    if to in CALIBRATED_TARGETS:
        return True
    return to in ("gguf", "ollama") and check_calibrate(quant or DEFAULT_QUANT[to], calibrate)


def export(source: Transformer | str | Path, to: str = "hf", quant: str | None = None,
           out: str | Path | None = None, *, tokenizer: Any = None,
           generation_config: dict[str, Any] | None = None, max_shard_size: int = DEFAULT_SHARD_BYTES,
           calibrate: bool | None = None, group_size: int | None = None,
           calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Export and return what was written: the HF folder, the .gguf file, or the Modelfile."""
    check_request(to, quant, calibrate, group_size)
    if isinstance(source, Transformer):
        if out is None:
            raise ExportError("exporting a live model needs out= (a folder, or a .gguf path for --to gguf)")
        model = source
        generation = dict(generation_config if generation_config is not None else
                          getattr(model, "generation_config", None) or {})
        out_path = Path(out)
    else:
        path = resolve_source(source)
        out_path = Path(out) if out is not None else default_out(path, to)
        model, loaded_tokenizer, generation = load_source(path, quant)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if generation_config is not None:
            generation = dict(generation_config)
    was_training = model.training
    model.eval()  # adapter dropout off while merged weights are computed
    try:
        return write(model, tokenizer, to, quant, out_path, generation, max_shard_size, calibrate, group_size,
                     calibration)
    finally:
        model.train(was_training)


def write(model: Transformer, tokenizer: Any, to: str, quant: str | None, out: Path,
          generation: dict[str, Any], max_shard_size: int, calibrate: bool | None = None,
          group_size: int | None = None, calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    if to == "hf":
        dtype = HF_DTYPES[quant] if quant else model.model.embed_tokens.weight.dtype
        return save_hf(model, tokenizer, out, dtype, generation, max_shard_size)
    quant = quant or DEFAULT_QUANT[to]
    if to in CALIBRATED_TARGETS:
        return save_w4a16(model, tokenizer, out, to, quant, group_size, calibration,
                          generation, max_shard_size)
    check_architecture(export_config(model))
    if to == "gguf":
        target = out if out.suffix == ".gguf" else out / f"model-{quant}.gguf"
        return save_gguf(model, tokenizer, target, quant, calibrate=calibrate, calibration=calibration)
    return save_ollama(model, tokenizer, out, quant, generation, calibrate=calibrate, calibration=calibration)
