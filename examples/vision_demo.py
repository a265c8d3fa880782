"""A CPU demo of vision-language fine-tuning: a tiny LLaVA-style model learns to name photographs.

The photographs are scikit-image's bundled samples (an astronaut, a cup of coffee, a cat, ...),
written as PNG files that the training rows name, as a user's rows would. The model is built
here from a config (a 2-layer CLIP-style tower at 56 x 56 pixels, a projector, a 2-layer Llama
decoder over byte tokens) with random weights, since nothing may be downloaded; `velotune train`
then fine-tunes it with LoRA on the decoder and the projector (the tower stays frozen), and the
answers before and after are printed. A random decoder knows no language, so what it learns is
the mapping from each picture to its words, which is the point of the demo: the images reach
the decoder through the projector and steer its answer.

    pip install 'velotune[vision]' scikit-image
    python examples/vision_demo.py [OUTPUT_DIR] [STEPS]   # 200 steps: 7 minutes on a busy 2-core CPU
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

import velotune
from velotune.cli import main
from velotune.export.hf import save_hf
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.tokenizer import Tokenizer
from velotune.tokenizer.image_processor import ImageProcessor

PHOTOS = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat",
          "camera": "a man with a camera", "rocket": "a rocket", "coins": "old coins"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
            "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTION = "What is in the picture?"


def byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(alphabet))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    return Tokenizer(backend, chat_template=TEMPLATE, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_model(folder: Path) -> None:
    """A random tiny LLaVA-style model folder that transformers would open too."""
    tokenizer = byte_tokenizer()
    config = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"), "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 16,
        "text_config": {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 96,
                        "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
                        "tie_word_embeddings": False, "eos_token_id": tokenizer.eos_token_id,
                        "pad_token_id": tokenizer.pad_token_id},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
    }
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf_config(config))
    with torch.no_grad():   # transformers' initialisation of the decoder's tables (std 0.02), not torch's N(0, 1)
        for table in (model.model.embed_tokens.weight, model.lm_head.weight):
            table.normal_(0.0, 0.02)
    tokenizer.image_processor = ImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        image_token="<image>", tokens_per_image=16)
    save_hf(model, tokenizer, folder, torch.float32)


def write_data(folder: Path) -> Path:
    import PIL.Image
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, answer in PHOTOS.items():
        PIL.Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "path": f"{name}.png"},
                                                               {"type": "text", "text": QUESTION}]},
                                  {"role": "assistant", "content": answer + "."}]})
    path = folder / "photos.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def answers(model_path: Path, photos: Path) -> dict[str, str]:
    model, tokenizer = velotune.load_model(model_path, dtype=torch.float32, device="cpu")
    processor = tokenizer.image_processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text.replace(processor.marker, processor.image_text()),
                                         add_special_tokens=False)])
    out = {}
    for name in PHOTOS:
        pixels = processor.pixel_values([str(photos / f"{name}.png")], name)
        generated = model.generate(ids, max_new_tokens=24, pixel_values=pixels, stop_token_ids=tokenizer.stop_token_ids)
        out[name] = tokenizer.decode(generated[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return out


def main_demo(root: Path, steps: int = 200) -> int:
    build_model(root / "model")
    data = write_data(root / "photos")
    config = {"model": str(root / "model"), "dataset": str(data), "output_dir": str(root / "run"),
              "method": "lora", "lora_r": 16, "lora_alpha": 32, "max_steps": steps, "micro_batch_size": 6,
              "learning_rate": 1e-2, "warmup_steps": 10, "max_seq_length": 96, "eval_split": 0.0,
              "sample_prompts": 0, "save_steps": 0, "seed": 0, "overwrite_output_dir": True}
    (root / "vision_demo.yaml").write_text(json.dumps(config, indent=2), encoding="utf-8")
    before = answers(root / "model", root / "photos")
    code = main(["train", str(root / "vision_demo.yaml"), "--no-progress"])
    if code:
        return code
    after = answers(root / "run" / "adapter", root / "photos")
    print(f"\n{'photograph':<12} {'wanted':<22} {'before':<26} after")
    for name, wanted in PHOTOS.items():
        print(f"{name:<12} {wanted + '.':<22} {before[name][:24]!r:<26} {after[name]!r}")
    right = sum(after[name].strip() == wanted + "." for name, wanted in PHOTOS.items())
    print(f"\n{right} of {len(PHOTOS)} photographs named exactly after training")
    return 0


if __name__ == "__main__":
    sys.exit(main_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/vision_demo"),
                       int(sys.argv[2]) if len(sys.argv) > 2 else 200))
