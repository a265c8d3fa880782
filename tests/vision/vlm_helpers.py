"""A tiny vision-language model folder for tests (a random LLaVA of a 2-layer Llama and a 2-layer
CLIP tower at 28 x 28 pixels, written by transformers), with the byte tokenizer of
tests/cli/cli_helpers.py plus an `<image>` token, a ChatML template that writes `<image>` per
image part, and the Pillow CLIP processor's preprocessor_config.json; and real photographs from
scikit-image's bundled samples, written as files the rows name."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tests.cli.cli_helpers import byte_tokenizer, train_losses, write_config

IMAGE = "<image>"
CHATML_IMAGES = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# scikit-image sample -> what the demo rows call it (grey `camera` exercises RGB conversion)
SAMPLES = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat", "camera": "a photographer",
           "rocket": "a rocket", "coins": "some coins"}


def write_samples(folder: Path) -> dict[str, Path]:
    """The scikit-image sample photographs as PNG files."""
    import PIL.Image
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in SAMPLES:
        path = folder / f"{name}.png"
        if not path.exists():
            PIL.Image.fromarray(getattr(skimage.data, name)()).save(path)
        files[name] = path
    return files


def make_vlm_model(folder: Path, seed: int = 0, image_size: int = 28, patch_size: int = 7,
                   select: str = "default", feature_layer: int = -2, gpt2_split: bool = False,
                   siglip: bool = False) -> Path:
    """`gpt2_split`: a tokenizer a GGUF can carry (tests/cli/cli_helpers.byte_tokenizer); `siglip`: a
    SigLIP tower (no class token) instead of CLIP's."""
    import transformers

    tokenizer = byte_tokenizer(gpt2_split)
    tokenizer.add_special_tokens([IMAGE])
    tokenizer.chat_template = CHATML_IMAGES
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=image_size, patch_size=patch_size)
    vision = (transformers.SiglipVisionConfig(**shape, vision_use_head=False) if siglip else
              transformers.CLIPVisionConfig(**shape, projection_dim=32, initializer_range=0.1))
    patches = (image_size // patch_size) ** 2 - int(siglip)   # `default` drops the first position
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                      image_seq_length=patches + (select == "full"),
                                      vision_feature_select_strategy=select, vision_feature_layer=feature_layer)
    torch.manual_seed(seed)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save(folder)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                   crop_size={"height": image_size, "width": image_size})
    processor.save_pretrained(folder)
    return folder


def image_rows(files: dict[str, Path], repeat: int = 1) -> list[dict]:
    """One row per photograph: "What is in the picture?" answered with its name."""
    rows = []
    for _ in range(repeat):
        for name, path in files.items():
            rows.append({"messages": [
                {"role": "user", "content": [{"type": "image", "path": path.name},
                                             {"type": "text", "text": "What is in the picture?"}]},
                {"role": "assistant", "content": SAMPLES[name] + "."}]})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"]
TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"


def gemma_byte_tokenizer(gpt2_split: bool = False):
    """Gemma 3's special tokens (image ones included) over 256 byte tokens, with its real chat template;
    `gpt2_split`: split GPT-2's way first, with one merge (a tokenizer a GGUF can carry)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from velotune.tokenizer import Tokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(GEMMA_SPECIALS + sorted(alphabet))}
    merges = []
    if gpt2_split:
        vocab["Ġt"], merges = len(vocab), [("Ġ", "t")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_split)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in GEMMA_SPECIALS])
    return Tokenizer(backend, chat_template=(TEMPLATES / "gemma3.jinja").read_text(), bos_token="<bos>",
                     eos_token="<eos>", pad_token="<pad>", add_bos_token=False)


def make_gemma3_vlm(folder: Path, seed: int = 0, image_size: int = 32, patch_size: int = 4,
                    tokens_per_image: int = 16, gpt2_split: bool = False) -> Path:
    """A random Gemma 3 (3 decoder layers, a sliding window of 8, so images cross it) with a 2-layer
    SigLIP tower, and the Pillow Gemma 3 processor's settings."""
    import transformers

    tokenizer = gemma_byte_tokenizer(gpt2_split)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GEMMA_SPECIALS}
    text = transformers.Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512, query_pre_attn_scalar=16,
        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"], initializer_range=0.1)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                                             vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                                       image_token_index=ids["<image_soft_token>"],
                                       boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"])
    torch.manual_seed(seed)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save(folder)
    transformers.Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL's chat template, as far as images and turns go (it writes QWEN_IMAGE per image part)
QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_qwen25_vlm(folder: Path, seed: int = 0, min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 12,
                    window_size: int = 56, gpt2_split: bool = False) -> Path:
    """A random Qwen2.5-VL (2 decoder layers with M-RoPE sections [2, 3, 3]; a 3-block tower at
    patch 14 with 2 x 2 merge-block windows and block 1 attending fully), the byte tokenizer with
    its vision tokens, and the Pillow Qwen 2 processor bounding images to 4..12 decoder tokens.
    `gpt2_split`: a tokenizer a GGUF can carry."""
    import transformers

    tokenizer = byte_tokenizer(gpt2_split)
    tokenizer.add_special_tokens(QWEN_SPECIALS)
    tokenizer.chat_template = QWEN_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=window_size, fullatt_block_indexes=[1])
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                initializer_range=0.1)
    config = transformers.Qwen2_5_VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save(folder)
    transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(folder)
    return folder


def train_on_photos(tmp_path: Path, model: Path) -> tuple[Path, dict[str, Path]]:
    """`velotune train` (LoRA r8 on decoder and projector, 12 steps) on the photographs, asserting
    the loss falls and the tower stays frozen; returns the run folder and the photographs."""
    import velotune
    from velotune.cli import main

    files = write_samples(tmp_path / "data")
    data = write_rows(tmp_path / "data" / "train.jsonl", image_rows(files, repeat=2))
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset=str(data), output_dir=str(run),
                          method="lora", lora_r=8, lora_alpha=16, max_steps=12, micro_batch_size=4,
                          learning_rate=1e-2, warmup_steps=0, max_seq_length=96, sample_prompts=0,
                          eval_split=0.0, save_steps=0, seed=0)
    assert main(["train", str(config), "--no-progress"]) == 0
    losses = train_losses(run)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    trained, _ = velotune.load_model(run / "adapter", dtype=torch.float32, device="cpu")
    base, _ = velotune.load_model(model, dtype=torch.float32, device="cpu")
    for name, value in base.vision_tower.state_dict().items():
        assert torch.equal(trained.vision_tower.state_dict()[name], value), name
    return run, files


def backward_after_equal_outputs(got, want, real: torch.Tensor) -> None:
    """Our forward's logits (on the `real` tokens) and loss within 1e-5 of transformers', then both
    losses backpropagated for the gradient comparison that follows."""
    assert (got.logits[real] - want.logits[real]).abs().max() <= 1e-5 * want.logits.abs().max()
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5 * want.loss.item()
    want.loss.backward()
    got.loss.backward()
