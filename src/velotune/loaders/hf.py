"""Hugging Face model folders: config.json, one or sharded *.safetensors (+ index), tokenizer
files and generation_config.json. Tensors are read one at a time through safetensors' lazy
`safe_open`, never through pickle."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from velotune.errors import LoadError, read_json
from velotune.loaders.checkpoint import Checkpoint
from velotune.models.config import ModelConfig
from velotune.models.vision_families import VISION_FAMILIES
from velotune.tokenizer.image_processor import ImageProcessor


def weight_files(folder: Path) -> dict[str, list[str] | None]:
    """Safetensors files of a folder, each with the tensor names the index assigns it (None when
    there is no index and the file's own header is the list)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index}: missing key 'weight_map'")
        files: dict[str, list[str] | None] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)  # type: ignore[union-attr]
        for file in files:
            if not (folder / file).exists():
                raise LoadError(f"{folder / file}: shard listed in {index.name} is missing")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return {single.name: None}
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if not found:
        names = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise LoadError(f"{folder}: no model.safetensors or model.safetensors.index.json (found {names}); "
                        "only safetensors weights are read (never pickle .bin files)")
    return {name: None for name in found}


def iter_safetensors(folder: Path, files: dict[str, list[str] | None]) -> Iterator[tuple[str, torch.Tensor]]:
    for file, names in files.items():
        path = folder / file
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names if names is not None else f.keys():
                    if name not in f.keys():
                        raise LoadError(f"{path}: tensor {name!r} listed in the index is not in the file")
                    yield name, f.get_tensor(name)
        except SafetensorError as exc:
            raise LoadError(f"{path}: unreadable safetensors file ({exc})") from None


def open_hf_folder(path: str | Path) -> Checkpoint:
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a folder")
    config_path = folder / "config.json"
    raw_config = read_json(config_path)
    config = ModelConfig.from_hf_config(raw_config, str(config_path))
    files = weight_files(folder)
    names: set[str] = set()
    for file in files:  # open every header now, so a damaged file fails before any work
        try:
            with safe_open(str(folder / file), framework="pt") as f:
                names.update(f.keys())
        except SafetensorError as exc:
            raise LoadError(f"{folder / file}: unreadable safetensors file ({exc})") from None
    prequantized = prequantized_weights(raw_config, names, config_path)
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        from velotune.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_folder(folder)
        if config.vision is not None:
            tokenizer.image_processor = image_processor(folder, config, tokenizer)
    gen_path = folder / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.exists() else {}
    return Checkpoint(config=config, tensors=lambda: iter_safetensors(folder, files), tokenizer=tokenizer,
                      source=str(folder), generation_config=generation_config, prequantized=prequantized)


def image_processor(folder: Path, config: ModelConfig, tokenizer) -> ImageProcessor:
    """A vision-language folder's image processor, with its family's prompt text of an image."""
    family = VISION_FAMILIES[config.multimodal_type]   # type: ignore[index]
    token = tokenizer.backend.id_to_token(config.image_token_id)
    if token is None:
        raise LoadError(f"{folder}: the image token id {config.image_token_id} is not in the tokenizer")
    return ImageProcessor.from_folder(folder, image_token=token, tokens_per_image=config.vision.image_tokens,
                                      placeholder=family.placeholder, expansion=family.expansion)


def prequantized_weights(raw_config: dict[str, Any], names: set[str], config_path: Path) -> dict[str, frozenset[str]]:
    """The 4-bit weights of a `*-bnb-4bit` folder (see velotune.quant.bnb_checkpoint); empty for a
    16-bit one. A quantization_config we cannot read fails here, naming its field."""
    if "quantization_config" not in raw_config:
        return {}
    from velotune.quant.bnb_checkpoint import check_quantization_config, group_4bit_tensors

    try:
        check_quantization_config(raw_config["quantization_config"], str(config_path))
    except ValueError as exc:
        raise LoadError(str(exc)) from None
    groups = group_4bit_tensors(names)
    if not groups:
        raise LoadError(f"{config_path}: quantization_config says load_in_4bit, but no tensor of the folder "
                        "carries a 4-bit quantization state (NAME.weight.quant_state.bitsandbytes__nf4)")
    return groups
