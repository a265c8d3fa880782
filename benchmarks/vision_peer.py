"""One system's vision-language LoRA steps in its own process, for `bench_vision.py --vs-unsloth`
(Unsloth patches transformers when imported, so it must come first and alone):

    python benchmarks/vision_peer.py --system unsloth --model DIR --batch 1 4 [--seq 2048 --steps 3]

prints one line `VISION {json}`: outcome "ok" (it loaded), the optimizer, the trainable count, and per
batch size the batch's digest, seconds per step, peak allocated GiB and the last loss (or the
outcome that ended that size, out of memory). DIR is the folder
vision_inputs.write_folder wrote (its velotune_bench.json is the config the batch is built from,
so every process builds the same tensors; bench_vision.py checks the digests against its own).
Every system runs bench_vision.py's plain loop (bf16 autocast, backward, optimizer step; 2 warm-up
steps, then the timed ones) on LoRA r16 alpha 16 over the decoder's seven projections only, the
vision tower and projector frozen (what Unsloth's `finetune_vision_layers=False` selects):
- unsloth: as its Qwen2.5-VL and Gemma 3 vision notebooks: `FastVisionModel.from_pretrained(DIR, load_in_4bit=
  False (16-bit LoRA, as the others), use_gradient_checkpointing="unsloth", dtype=bf16,
  max_seq_length)`, `FastVisionModel.get_peft_model(finetune_vision_layers=False,
  finetune_language_layers=True, finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
  lora_alpha=16, lora_dropout=0, bias="none", random_state=3407)`, `FastVisionModel.for_training`;
  optimizer bitsandbytes AdamW8bit (the notebooks' `optim="adamw_8bit"`); its defaults otherwise
  (embedding offload, compiled loss). Called with transformers' arguments, as its data collator's
  batches are (Qwen2.5-VL: image_grid_thw and mm_token_type_ids; Gemma 3: token_type_ids).
- velotune: `load_model(DIR, dtype=bf16)`, apply_lora (projector off), gradient checkpointing, its
  default optimizer (torch AdamW, fused on a GPU).
- hf: `AutoModelForImageTextToText.from_pretrained(DIR, bf16, sdpa)`, PEFT LoRA on the same modules,
  non-reentrant checkpointing, torch AdamW (fused on a GPU).
All at lr 1e-4. A batch size that runs out of memory gets its own outcome; the sizes before it stand.

Assumptions about Unsloth 2026.10.9, read from its wheel (it does not import without a GPU, so none
of this has run here): FastVisionModel is FastModel's subclass and its from_pretrained opens a local
folder offline (HF_HUB_OFFLINE=1) with AutoProcessor; get_peft_model takes the keywords above and
builds its regex from them (the language model's attention and MLP linears: not the tower, and not
the merger or Gemma 3's projector matrix); the patched forwards take the arguments above and return
`.loss`; `import unsloth` must precede transformers, peft and trl. The gpu-marked test in
tests/vision/test_vision_peer_bench.py checks these on the tiny folders before the 7B run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peer_report import emit, failure


def load_unsloth(folder: Path, seq: int, device):
    import torch
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(str(folder), max_seq_length=seq, dtype=torch.bfloat16,
                                               load_in_4bit=False, use_gradient_checkpointing="unsloth")
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
                                           lora_alpha=16, lora_dropout=0, bias="none", random_state=3407)
    return FastVisionModel.for_training(model)


def load_velotune(folder: Path, seq: int, device):
    import torch

    import velotune
    from bench_vision import velotune_lora

    model, _ = velotune.load_model(folder, dtype=torch.bfloat16, device=device, max_seq_length=seq)
    return velotune_lora(model, projector=False)


def load_hf(folder: Path, seq: int, device):
    import torch
    import transformers

    from bench_vision import hf_lora

    place = {"": 0 if device.type == "cuda" else "cpu"}
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16,
                                                                     attn_implementation="sdpa", device_map=place)
    return hf_lora(model, projector=False)


LOADERS = {"unsloth": load_unsloth, "velotune": load_velotune, "hf": load_hf}


def optimizer_for(system: str, model, device):
    """(optimizer, its name): Unsloth's notebooks' `optim="adamw_8bit"`, else torch AdamW (velotune's default)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if system == "unsloth":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-4), "AdamW8bit (bitsandbytes)"
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=1e-4, fused=fused), f"AdamW (torch{', fused' if fused else ''})"


def measure(system: str, folder: Path, batches: list[int], seq: int, steps: int, image_side: int,
            device_name: str) -> dict:
    import torch

    from bench_vision import loss_of, timed
    from vision_inputs import batch, digest

    device = torch.device(device_name)
    config = json.loads((folder / "velotune_bench.json").read_text())
    started = time.perf_counter()
    model = LOADERS[system](folder, seq, device)
    optimizer, optimizer_name = optimizer_for(system, model, device)
    result = {"system": system, "outcome": "ok", "optimizer": optimizer_name, "load_s": time.perf_counter() - started,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "runs": []}
    for rows in batches:
        inputs = batch(config, rows, seq, device, image_side)
        run = {"batch": rows, "digest": digest(inputs)}
        try:
            seconds, peak, loss = timed(lambda: loss_of(system == "velotune", model, inputs, config["model_type"]),
                                        optimizer, steps, device)
            run.update(seconds=seconds, peak_gib=peak, loss=loss, outcome="ok")
        except torch.OutOfMemoryError as exc:
            run["outcome"] = failure(exc)
            optimizer.zero_grad(set_to_none=True)
        result["runs"].append(run)
        del inputs
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=tuple(LOADERS), required=True)
    p.add_argument("--model", type=Path, required=True, help="a folder vision_inputs.write_folder wrote")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    if args.system == "unsloth":
        import unsloth  # noqa: F401  (before transformers, as it requires)
    if not (args.model / "velotune_bench.json").is_file():
        raise SystemExit(f"{args.model}: not a folder bench_vision.py wrote (no velotune_bench.json)")
    result = measure(args.system, args.model, args.batch, args.seq, args.steps, args.image_side, args.device)
    emit("VISION", result)


if __name__ == "__main__":
    main()
