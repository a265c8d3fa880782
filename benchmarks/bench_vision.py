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

`--vs-unsloth` (Qwen2.5-VL, Gemma 3): Unsloth's vision fine-tuning as its notebooks set it up, velotune and
transformers + PEFT, each in its own process (vision_peer.py, whose docstring gives each recipe) on
one model folder written here once (vision_inputs.py: random weights, offline tokenizer and
processor files) and the same batch (each process's digest checked against this one's). There all
three adapt the decoder's projections only, since Unsloth's recommended `finetune_vision_layers=
False` leaves the patch merger out. Rows give each system's tokens/s, peak, optimizer and adapter
count, and its speed and memory against Unsloth's and transformers':

    python benchmarks/bench_vision.py --model qwen2.5-vl-7b --batch 1 4 --seq 2048 --vs-unsloth
    python benchmarks/bench_vision.py --model gemma-3-4b --batch 1 4 --seq 2048 --vs-unsloth
    python benchmarks/bench_vision.py --smoke --model qwen2.5-vl-7b --vs-unsloth --systems velotune hf
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from common import append_row, choose_workdir, machine, run_peer, today, versions
from vision_inputs import SPECIALS, batch, digest, write_folder

WARMUP = 2
PEER = Path(__file__).with_name("vision_peer.py")
PEER_SYSTEMS = ("unsloth", "velotune", "hf")          # run in this order: Unsloth's row is the ratios' base
NAMES = {"unsloth": "Unsloth", "velotune": "velotune", "hf": "transformers+PEFT"}
PEER_COLUMNS = ["date", "device", "model", "batch x seq", "system", "optimizer", "tokens/s", "ms/step", "peak GiB",
                "adapter parameters", "speed vs Unsloth", "memory vs Unsloth", "speed vs transformers", "outcome",
                "versions"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

GEMMA3_4B = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "mm_tokens_per_image": 256,
    "image_token_index": 262144, "boi_token_index": 255999, "eoi_token_index": 256000,
    "text_config": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
                    "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "query_pre_attn_scalar": 256, "sliding_window": 1024, "max_position_embeddings": 131072,
                    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rms_norm_eps": 1e-6,
                    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
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
                    "query_pre_attn_scalar": 16, "sliding_window": 32, "max_position_embeddings": 512,
                    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2},
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


def velotune_lora(model, projector: bool):
    from velotune.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(r=16, alpha=16, target_modules=DECODER_TARGETS, projector=projector))
    model.gradient_checkpointing = True
    return model.train()


def velotune_model(config: dict, device: torch.device):
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
    return velotune_lora(model, projector=config["model_type"] in ("llava", "qwen2_5_vl"))


def hf_lora(model, projector: bool):
    """PEFT LoRA r16 on the decoder's projections (and the projector's linears), non-reentrant checkpointing."""
    import peft

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = r".*language_model.*\.(" + "|".join(DECODER_TARGETS) + ")"
    if projector:
        targets += r"|.*multi_modal_projector\.linear_[12]|.*visual\.merger\.mlp\.[02]"
    lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(model, lora).train()


def hf_model(config: dict, device: torch.device):
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16,
                                                                     attn_implementation="sdpa")
    return hf_lora(model, projector=True)


def loss_of(velotune: bool, model, inputs: dict, model_type: str) -> torch.Tensor:
    """The mean loss of one forward over `inputs`: velotune's call, or transformers' (Unsloth's
    patched model takes transformers' arguments) with the inputs its processor makes."""
    grid = {"image_grid_thw": inputs["image_grid_thw"]} if model_type == "qwen2_5_vl" else {}
    if velotune:
        out = model(inputs["input_ids"], labels=inputs["labels"], pixel_values=inputs["pixel_values"],
                    return_logits=False, **grid)
        return out.loss_sum / out.num_targets
    extra = {"token_type_ids": inputs["token_type_ids"]} if model_type == "gemma3" else {}
    if grid:
        extra = {**grid, "mm_token_type_ids": inputs["token_type_ids"].int()}
    return model(input_ids=inputs["input_ids"], labels=inputs["labels"],
                 pixel_values=inputs["pixel_values"].to(torch.bfloat16), **extra).loss


def timed(loss_fn, optimizer, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(seconds per step, peak allocated GiB, last loss) of `steps` steps after WARMUP: forward under
    bf16 autocast (as a trainer's bf16 mode), backward, optimizer step."""
    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(WARMUP):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak, losses[-1]


def run(system: str, config: dict, inputs: dict, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak allocated GiB) of `steps` timed steps after the warm-up."""
    model = velotune_model(config, device) if system == "velotune" else hf_model(config, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds, peak, _ = timed(lambda: loss_of(system == "velotune", model, inputs, config["model_type"]),
                             optimizer, steps, device)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def label(args: argparse.Namespace) -> str:
    return f"{args.model} ({args.image_side} px images)" if "qwen" in args.model else args.model


def peer_command(system: str, folder: Path, args: argparse.Namespace, device: str) -> list[str]:
    """vision_peer.py's command line for `system` on `folder` with this run's batch sizes and shapes."""
    return [sys.executable, str(PEER), f"--system={system}", f"--model={folder}", "--batch", *map(str, args.batch),
            f"--seq={args.seq}", f"--steps={args.steps}", f"--image-side={args.image_side}", f"--device={device}"]


def batch_run(result: dict, rows: int, want: str) -> tuple[dict | None, str]:
    """A system's run at `rows` rows if it ran, on the batch whose digest is `want`; else None and why."""
    run = next((r for r in result.get("runs", []) if r["batch"] == rows), None)
    if run is None:
        why = result.get("outcome", "not run")
        return None, "not run" if why == "ok" else why
    if run["digest"] != want:
        return None, f"ran on another batch (digest {run['digest']}, this process's {want})"
    return (run, "ok") if run["outcome"] == "ok" else (None, run["outcome"])


def peer_rows(results: dict[str, dict], rows: int, want: str, model: str, seq: int, day: str, where: str,
              packages: str) -> list[list[str]]:
    """One row per system at `rows` rows; speed (tokens/s over the other's) and memory (peak over the
    other's) against Unsloth and transformers where both ran."""
    runs = {system: batch_run(r, rows, want) for system, r in results.items()}
    table = []
    for system, (run, why) in runs.items():
        def vs(other: str, key: str) -> str:
            theirs = runs.get(other, (None, ""))[0]
            if run is None or theirs is None or other == system:
                return "-"
            return f"{theirs[key] / run[key]:.2f}x" if key == "seconds" else f"{run[key] / theirs[key]:.2f}x"

        trainable = results[system].get("trainable")
        table.append([day, where, model, f"{rows} x {seq}", NAMES[system], results[system].get("optimizer", "-"),
                      f"{rows * seq / run['seconds']:,.0f}" if run else "-",
                      f"{run['seconds'] * 1e3:.0f}" if run else "-", f"{run['peak_gib']:.2f}" if run else "-",
                      f"{trainable:,}" if trainable else "-", vs("unsloth", "seconds"),
                      vs("unsloth", "peak_gib"), vs("hf", "seconds"), why, packages])
    return table


def vs_unsloth(args: argparse.Namespace, device: torch.device) -> None:
    """Each of `args.systems` in its own process on one folder and batch; rows to RESULTS.md."""
    from velotune.models.config import ModelConfig

    started = time.monotonic()
    config = MODELS[args.model]
    need = 2 * ModelConfig.from_hf_config(config).num_parameters()
    folder = write_folder(config, choose_workdir(args.workdir, need, "velotune-vision") / args.model, device.type)
    print(f"{args.model}: folder {folder} ({need / 1e9:.1f} GB) after {time.monotonic() - started:.0f} s")
    want = {rows: digest(batch(config, rows, args.seq, "cpu", args.image_side)) for rows in args.batch}
    results = {}
    for system in [s for s in PEER_SYSTEMS if s in args.systems]:
        left = args.budget_s - (time.monotonic() - started)
        r = results[system] = run_peer(peer_command(system, folder, args, device.type), "VISION", system, left)
        print(f"  {NAMES[system]}: {r['outcome']}, load {r.get('load_s', 0):.0f} s, "
              f"{time.monotonic() - started:.0f} s in", flush=True)
    where, day = machine(), today()
    packages = versions("unsloth", "unsloth_zoo", "peft", "bitsandbytes")
    for rows in args.batch:
        for row in peer_rows(results, rows, want[rows], label(args), args.seq, day, where, packages):
            print("  " + " | ".join(row[2:-1]))
            if not args.smoke:
                append_row("Vision-language LoRA vs Unsloth (each system in its own process, bench_vision.py "
                           "--vs-unsloth)", PEER_COLUMNS, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-4b", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-side", type=int, default=448,
                        help="pixels per side of Qwen2.5-VL's images (a multiple of 28)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, nothing appended to RESULTS.md")
    parser.add_argument("--vs-unsloth", action="store_true",
                        help="each system in its own process on a model folder, Unsloth's row the base")
    parser.add_argument("--systems", nargs="+", choices=PEER_SYSTEMS, default=list(PEER_SYSTEMS),
                        help="--vs-unsloth: the systems to run")
    parser.add_argument("--workdir", default="auto", help="--vs-unsloth: where the model folder goes "
                        "(auto: /dev/shm if it has room, else /tmp)")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="--vs-unsloth: seconds for the whole; a system not started by then is skipped")
    args = parser.parse_args()
    if args.smoke:
        smoke = "smoke-qwen2.5-vl" if args.model.startswith("qwen") else "smoke"
        args.model, args.batch, args.seq, args.steps, args.image_side = smoke, [2], 64, 2, 112
    device = torch.device("cpu" if args.smoke else "cuda")
    config = MODELS[args.model]
    if args.vs_unsloth:
        if config["model_type"] not in SPECIALS:
            parser.error(f"--vs-unsloth: {args.model} has no offline tokenizer and processor files here yet "
                         f"(model types {', '.join(SPECIALS)})")
        vs_unsloth(args, device)
        return
    for rows in args.batch:
        inputs = batch(config, rows, args.seq, device, args.image_side)
        results = {system: run(system, config, inputs, args.steps, device) for system in ("velotune", "transformers")}
        (ours, our_peak), (theirs, their_peak) = results["velotune"], results["transformers"]
        tokens = rows * args.seq
        line = (f"{label(args)} LoRA r16, batch {rows} x {args.seq}: velotune {tokens / ours:,.0f} tok/s "
                f"({ours * 1e3:.0f} ms, {our_peak:.2f} GiB), transformers+PEFT {tokens / theirs:,.0f} tok/s "
                f"({theirs * 1e3:.0f} ms, {their_peak:.2f} GiB): {theirs / ours:.2f}x speed, "
                f"{our_peak / their_peak:.2f}x memory")
        print(line)
        if not args.smoke:
            append_row("Vision-language LoRA (velotune vs transformers+PEFT, bench_vision.py)",
                       ["date", "machine", "model", "batch x seq", "velotune tok/s", "velotune GiB",
                        "transformers+PEFT tok/s", "transformers+PEFT GiB", "speed", "memory"],
                       [today(), machine(), label(args), f"{rows} x {args.seq}", f"{tokens / ours:,.0f}",
                        f"{our_peak:.2f}", f"{tokens / theirs:,.0f}", f"{their_peak:.2f}",
                        f"{theirs / ours:.2f}x", f"{our_peak / their_peak:.2f}x"])


if __name__ == "__main__":
    main()
