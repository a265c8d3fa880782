"""What every process of the vision benchmarks builds alike: the batch of image + text rows (from a
seed, so bench_vision.py and each vision_peer.py process hold the same tensors, checked by their
digest) and the model folder the peers open offline.

The folder (written once per config, on the GPU where there is one) is a real architecture with
random bf16 weights, saved by transformers, beside:
- tokenizer files: a byte-level BPE whose ids run densely up to the config's highest special id,
  the family's special tokens at the ids its config names (the processor and velotune's loader look
  them up by string; Unsloth wants padding apart from the end of turn), the 256 bytes at the lowest
  free ids, unused fillers between. Nothing is downloaded: the device has no internet, and
  throughput does not depend on the vocabulary's strings.
- the processor's files with the published models' settings (Qwen2.5-VL-7B-Instruct's pixel bounds,
  patch and merge sizes and CLIP's mean and std; Gemma 3's 896-pixel SigLIP resize and 256 image
  tokens, taken from the config), so transformers' AutoProcessor opens the folder as the family's.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

# a family's special tokens by the config key holding each one's id (top level, else text_config)
SPECIALS = {
    "qwen2_5_vl": {"<|endoftext|>": "bos_token_id", "<|im_end|>": "eos_token_id",
                   "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id",
                   "<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id"},
    "gemma3": {"<pad>": "pad_token_id", "<eos>": "eos_token_id", "<bos>": "bos_token_id",
               "<start_of_image>": "boi_token_index", "<end_of_image>": "eoi_token_index",
               "<image_soft_token>": "image_token_index"}}
PAD_EOS = {"qwen2_5_vl": ("<|endoftext|>", "<|im_end|>"), "gemma3": ("<pad>", "<eos>")}
# tokenizer_config.json's named tokens the family's processor reads (Gemma3Processor: tokenizer.boi_token, ...)
NAMED_TOKENS = {"gemma3": {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                           "eoi_token": "<end_of_image>"}}


def processor_files(config: dict) -> dict[str, dict]:
    """The processor's settings files of the published model of `config`'s family, by file name."""
    if config["model_type"] == "qwen2_5_vl":
        return {"preprocessor_config.json": {
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}}
    side, tokens = config["vision_config"]["image_size"], config["mm_tokens_per_image"]
    return {"preprocessor_config.json": {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "do_pan_and_scan": None,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": tokens, "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": side, "width": side},
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor"},
        "processor_config.json": {"image_seq_length": tokens, "processor_class": "Gemma3Processor"}}


def batch(config: dict, rows: int, seq: int, device: torch.device | str, image_side: int) -> dict[str, torch.Tensor]:
    """Rows of one image each (its placeholder tokens after the first token), random text after it;
    a dynamic-resolution tower's image is `image_side` pixels square, as flat patches with its grid."""
    from velotune.models.config import ModelConfig

    ours = ModelConfig.from_hf_config(config)
    vision, image_id = ours.vision, ours.image_token_id
    generator = torch.Generator().manual_seed(0)
    if vision.rotary:
        side = image_side // vision.patch_size
        image_tokens = side * side // vision.spatial_merge_size ** 2
        pixels = torch.randn(rows * side * side, vision.patch_dim, generator=generator)
        extra = {"image_grid_thw": torch.tensor([[1, side, side]] * rows, device=device)}
    else:
        image_tokens, side = vision.image_tokens, vision.image_size
        pixels = torch.randn(rows, 3, side, side, generator=generator)
        extra = {}
    ids = torch.randint(1000 % ours.vocab_size, min(ours.vocab_size, 30000), (rows, seq), generator=generator)
    ids[ids == image_id] = 1
    ids[:, 1:1 + image_tokens] = image_id
    labels = ids.masked_fill(ids == image_id, -100)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "pixel_values": pixels.to(device),
            "token_type_ids": (ids == image_id).long().to(device), **extra}


def digest(inputs: dict[str, torch.Tensor]) -> str:
    """A short hash of the batch's tensors (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        t = inputs[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def write_tokenizer(config: dict, folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    from velotune.tokenizer import Tokenizer

    family = config["model_type"]
    given = {token: config.get(key, config["text_config"].get(key)) for token, key in SPECIALS[family].items()}
    ids = set(given.values())
    if None in ids or len(ids) < len(given) or max(ids) + 1 < 256 + len(ids):
        raise SystemExit(f"{family}: special token ids {given} (config keys {list(SPECIALS[family].values())}) must "
                         "all be given, distinct, and leave room below the highest for the 256 bytes")
    specials = {i: token for token, i in given.items()}
    free_bytes = iter(sorted(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {specials[i] if i in specials else next(free_bytes, f"<|unused_{i}|>"): i
             for i in range(max(specials) + 1)}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    pad, eos = PAD_EOS[family]
    Tokenizer(backend, chat_template=None, bos_token=None, eos_token=eos, pad_token=pad).save(folder)
    if family in NAMED_TOKENS:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "extra_special_tokens": NAMED_TOKENS[family]},
                                   indent=2))

def write_folder(config: dict, folder: Path, device: str) -> Path:
    """Random bf16 weights of `config` (seed 0), tokenizer and processor files; a complete folder of
    the same config is kept (a warm machine's second call). Written to `folder`.partial first."""
    import transformers

    marker = folder / "velotune_bench.json"     # the config it was written from, written last
    if marker.exists() and json.loads(marker.read_text()) == config:
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(hf_config, dtype=torch.bfloat16)
    model.save_pretrained(partial)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    write_tokenizer(config, partial)
    for name, settings in processor_files(config).items():
        (partial / name).write_text(json.dumps(settings, indent=2))
    (partial / marker.name).write_text(json.dumps(config))
    partial.rename(folder)
    return folder
