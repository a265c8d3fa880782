"""Vision-language LoRA training throughput and memory: velotune vs transformers + PEFT, same loop.

Both systems run, in this one process, the same plain loop on the same random-weight model (a
real architecture: Gemma-3-4B with its SigLIP tower, LLaVA-1.5-7B with CLIP-L/336, or
Qwen2.5-VL-7B with its windowed dynamic-resolution tower and M-RoPE decoder, images of
--image-side pixels square: 448 gives a 32 x 32 patch grid, 256 decoder tokens) and the same
batch of image + text rows (one image per row, random pixels, the rest random tokens up to --seq):
forward with images, backward, AdamW step. LoRA r=16 on the decoder's seven projections and
LLaVA's projector linears (PEFT cannot adapt Gemma 3's bare projector matrix, so neither system
does there), the vision tower frozen, gradient checkpointing on for both; transformers
uses sdpa attention and passes Gemma 3's token_type_ids (images seen both ways, as its processor
makes them in training), velotune its defaults (kernels on). Rows in RESULTS.md give tokens/s
(every token of the rows, image tokens included), ms/step, peak allocated memory, and velotune's
ratios to transformers.

    python benchmarks/bench_vision.py --model gemma-3-4b --batch 1 4 --seq 2048
    python benchmarks/bench_vision.py --model qwen2.5-vl-7b --batch 1 4 --seq 2048
    python benchmarks/bench_vision.py --smoke [--model qwen2.5-vl-7b]   # CPU: a tiny config of the
                                                                        # family, 2 steps, nothing appended

LoRA also adapts Qwen2.5-VL's patch merger (its two linears; PEFT adapts them as
`visual.merger.mlp.0/2`), as velotune's default `lora_projector` does; transformers is given the
M-RoPE inputs its processor makes (`image_grid_thw`, `mm_token_type_ids`).

Not measured here: Unsloth's vision fine-tuning (the issue's target names it; it needs its own
process and a model folder it can open, see e2e_peer.py for how the text comparison does that).
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from common import append_row, machine, today

WARMUP = 2
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

GEMMA3_4B = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "mm_tokens_per_image": 256,
    "image_token_index": 262144, "boi_token_index": 255999, "eoi_token_index": 256000,
    "text_config": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "query_pre_attn_scalar": 256, "sliding_window": 1024, "max_position_embeddings": 131072,
                    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rms_norm_eps": 1e-6},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                      "layer_norm_eps": 1e-6, "vision_use_head": False},
}
LLAVA_7B = {
    "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "projector_hidden_act": "gelu",
    "image_seq_length": 576,
    "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "projection_dim": 768},
}
SMOKE = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "mm_tokens_per_image": 16,
    "image_token_index": 299, "boi_token_index": 297, "eoi_token_index": 298,
    "text_config": {"model_type": "gemma3_text", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                    "query_pre_attn_scalar": 16, "sliding_window": 32, "max_position_embeddings": 512},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 4,
                      "vision_use_head": False},
}
QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen2_5_vl_text", "vocab_size": 152064, "hidden_size": 3584,
                    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                    "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645},
    "vision_config": {"model_type": "qwen2_5_vl", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "hidden_act": "silu", "in_chans": 3, "tokens_per_second": 2},
}
SMOKE_QWEN = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 296,
    "video_token_id": 297, "vision_start_token_id": 298, "vision_end_token_id": 299, "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen2_5_vl_text", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 294,
                    "eos_token_id": 295,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    "vision_config": {"model_type": "qwen2_5_vl", "depth": 2, "hidden_size": 32, "intermediate_size": 48,
                      "num_heads": 4, "out_hidden_size": 64, "window_size": 56, "fullatt_block_indexes": [1]},
}
MODELS = {"gemma-3-4b": GEMMA3_4B, "llava-1.5-7b": LLAVA_7B, "qwen2.5-vl-7b": QWEN25_VL_7B, "smoke": SMOKE,
          "smoke-qwen2.5-vl": SMOKE_QWEN}


def batch(config: dict, rows: int, seq: int, device: torch.device, image_side: int) -> dict[str, torch.Tensor]:
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


def velotune_model(config: dict, device: torch.device):
    from velotune.lora import LoraConfig, apply_lora
    from velotune.models.config import ModelConfig
    from velotune.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf_config(config))
    model = model.to(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(0.0) if "norm" in name and p.dim() == 1 else p.normal_(0.0, 0.02)
    model.tie_weights()
    # PEFT cannot adapt Gemma 3's bare projector matrix, so neither system adapts it there
    apply_lora(model, LoraConfig(r=16, alpha=16, target_modules=DECODER_TARGETS,
                                 projector=config["model_type"] in ("llava", "qwen2_5_vl")))
    model.gradient_checkpointing = True
    return model.train()


def hf_model(config: dict, device: torch.device):
    import peft
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16,
                                                                     attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = (r".*language_model.*\.(" + "|".join(DECODER_TARGETS) + r")|.*multi_modal_projector\.linear_[12]"
               r"|.*visual\.merger\.mlp\.[02]")
    lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(model, lora).train()


def run(system: str, config: dict, inputs: dict, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak allocated GiB) of `steps` timed steps after the warm-up."""
    model = velotune_model(config, device) if system == "velotune" else hf_model(config, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gemma, qwen = config["model_type"] == "gemma3", config["model_type"] == "qwen2_5_vl"
    grid = {"image_grid_thw": inputs["image_grid_thw"]} if qwen else {}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if system == "velotune":
                out = model(inputs["input_ids"], labels=inputs["labels"], pixel_values=inputs["pixel_values"],
                            return_logits=False, **grid)
                loss = out.loss_sum / out.num_targets
            else:
                extra = {"token_type_ids": inputs["token_type_ids"]} if gemma else {}
                if qwen:
                    extra = {**grid, "mm_token_type_ids": inputs["token_type_ids"].int()}
                loss = model(input_ids=inputs["input_ids"], labels=inputs["labels"],
                             pixel_values=inputs["pixel_values"].to(torch.bfloat16), **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-4b", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-side", type=int, default=448,
                        help="pixels per side of Qwen2.5-VL's images (a multiple of 28)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, nothing appended to RESULTS.md")
    args = parser.parse_args()
    if args.smoke:
        smoke = "smoke-qwen2.5-vl" if args.model.startswith("qwen") else "smoke"
        args.model, args.batch, args.seq, args.steps, args.image_side = smoke, [2], 64, 2, 112
    device = torch.device("cpu" if args.smoke else "cuda")
    config = MODELS[args.model]
    for rows in args.batch:
        inputs = batch(config, rows, args.seq, device, args.image_side)
        results = {system: run(system, config, inputs, args.steps, device) for system in ("velotune", "transformers")}
        (ours, our_peak), (theirs, their_peak) = results["velotune"], results["transformers"]
        tokens = rows * args.seq
        label = f"{args.model} ({args.image_side} px images)" if "qwen" in args.model else args.model
        line = (f"{label} LoRA r16, batch {rows} x {args.seq}: velotune {tokens / ours:,.0f} tok/s "
                f"({ours * 1e3:.0f} ms, {our_peak:.2f} GiB), transformers+PEFT {tokens / theirs:,.0f} tok/s "
                f"({theirs * 1e3:.0f} ms, {their_peak:.2f} GiB): {theirs / ours:.2f}x speed, "
                f"{our_peak / their_peak:.2f}x memory")
        print(line)
        if not args.smoke:
            append_row("Vision-language LoRA (velotune vs transformers+PEFT, bench_vision.py)",
                       ["date", "machine", "model", "batch x seq", "velotune tok/s", "velotune GiB",
                        "transformers+PEFT tok/s", "transformers+PEFT GiB", "speed", "memory"],
                       [today(), machine(), label, f"{rows} x {args.seq}", f"{tokens / ours:,.0f}",
                        f"{our_peak:.2f}", f"{tokens / theirs:,.0f}", f"{their_peak:.2f}",
                        f"{theirs / ours:.2f}x", f"{our_peak / their_peak:.2f}x"])


if __name__ == "__main__":
    main()
