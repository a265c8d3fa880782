"""The registry of training methods: what each trains, which objective the one training loop runs
for it, what data it reads, and what it leaves behind.

- lora: the base weights are frozen; adapters are added to `target_modules` and trained.
- qlora: as lora, over a base whose adapted projections are stored in 4-bit NF4.
- full: every weight is trained.
- dpo (dpo_loss sigmoid or ipo), orpo, simpo: preference pairs; kto: desirable and undesirable
  completions; grpo: prompts, completions sampled and scored by reward functions. Each trains
  LoRA adapters (over a 4-bit base with load_in_4bit); a reference, where the method has one, is
  the same model with its adapters off.
With lora/qlora (and orpo/simpo, which have no reference to keep), `trainable_modules` are trained
in full beside the adapters, at their own learning rate; `new_tokens` are added to the tokenizer
and the embeddings first (models/vocab.py).

Precision: trainable tensors are float32 (they are the optimizer's master copy): adapters are
created in float32 over a base of any dtype, and a full fine-tune loads the model in float32. On a
GPU the math runs in bf16 under autocast.

Outputs: OUTPUT_DIR/adapter (PEFT format: adapter_config.json + adapter_model.safetensors) for
lora/qlora, or OUTPUT_DIR/model (Hugging Face layout through `velotune.export.hf.save_hf`: safetensors
(sharded when large), config.json, generation_config.json, tokenizer; Phi-3 re-fused) for full.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune.train.config import TrainConfig, TrainConfigError

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
# Training tokens the quant_error fit is measured on, packed into rows of CALIBRATION_ROW_TOKENS
# (`calibration_rows`); train/error_init.py's damping was measured at this size.
CALIBRATION_TOKENS = 4096
CALIBRATION_ROW_TOKENS = 512


@dataclass(frozen=True)
class Method:
    name: str
    objective: str       # sft | pairs | kto | grpo: the objective class the loop runs
    trains: str          # what the optimizer updates
    data: str            # what a dataset row holds


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("lora", "sft", "LoRA adapters", "conversations or text (dataset_format)"),
    Method("qlora", "sft", "LoRA adapters over a 4-bit base", "conversations or text (dataset_format)"),
    Method("full", "sft", "every weight", "conversations or text (dataset_format)"),
    Method("dpo", "pairs", "LoRA adapters", "prompt, chosen, rejected"),
    Method("orpo", "pairs", "LoRA adapters", "prompt, chosen, rejected"),
    Method("simpo", "pairs", "LoRA adapters", "prompt, chosen, rejected"),
    Method("kto", "kto", "LoRA adapters", "prompt, completion, label (or prompt, chosen, rejected)"),
    Method("grpo", "grpo", "LoRA adapters", "prompt (prompt_column) and the columns its rewards read"),
)}


def build_objective(config: TrainConfig, *, pad_id: int, tokenizer: Any = None, rewards: Sequence[Any] | None = None):
    """The objective the training loop runs for `config.method`. GRPO samples and scores
    completions: it needs the tokenizer, and reward callables (default: config.rewards imported)."""
    from velotune.train.sft import SFTObjective

    kind, mbs = REGISTRY[config.method].objective, config.micro_batch_size
    if kind == "sft":
        return SFTObjective(pad_id=pad_id, micro_batch_size=mbs)
    if kind == "pairs":
        from velotune.rl.preference import PairObjective

        return PairObjective(config.method, pad_id=pad_id, beta=config.beta, loss_type=config.dpo_loss,
                             gamma=config.simpo_gamma, micro_batch_size=mbs)
    if kind == "kto":
        from velotune.rl.kto import KTOObjective

        return KTOObjective(pad_id=pad_id, beta=config.beta, desirable_weight=config.kto_desirable_weight,
                            undesirable_weight=config.kto_undesirable_weight, micro_batch_size=mbs)
    from velotune.rl.grpo import GRPOObjective
    from velotune.rl.rewards import resolve

    if tokenizer is None:
        raise TrainConfigError("method grpo samples completions: build its objective with the tokenizer "
                               "(build_objective(config, pad_id=..., tokenizer=...))")
    return GRPOObjective(tokenizer, list(rewards) if rewards is not None else [resolve(r) for r in config.rewards],
                         prompt_column=config.prompt_column, num_generations=config.num_generations,
                         max_completion_length=config.max_completion_length, temperature=config.temperature,
                         beta=config.grpo_beta, loss_type=config.loss_type,
                         importance_sampling=config.importance_sampling, seed=config.seed, micro_batch_size=mbs,
                         pad_id=pad_id, generation_batch_size=config.generation_batch_size)


def read_data(config: TrainConfig) -> Any:
    """The run's rows, read and transformed but not tokenized: done before the model loads, so a
    missing file, a template's unknown column or a failing transform costs no model load."""
    if REGISTRY[config.method].objective == "sft":
        from velotune.train.sources import read_sources

        return read_sources(config)
    from velotune.train.method_data import read_split

    return read_split(config)


def load_data(config: TrainConfig, tokenizer: Any, read: Any = None):
    """The run's train and eval units: `TrainData` of examples (SFT) or `UnitData` (train/method_data.py);
    `read` is what `read_data` returned (read here when None)."""
    read = read_data(config) if read is None else read
    if REGISTRY[config.method].objective == "sft":
        from velotune.train.data import load_train_data

        return load_train_data(config, tokenizer, read)
    from velotune.train.method_data import load_units

    return load_units(config, tokenizer, read)


def lora_config(config: TrainConfig):
    from velotune.lora.config import ALL_LINEAR, LoraConfig, LoraConfigError

    targets = ALL_LINEAR if config.target_modules == [ALL_LINEAR] else list(config.target_modules)
    try:
        return LoraConfig(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          target_modules=targets, use_rslora=config.use_rslora, use_dora=config.use_dora,
                          projector=config.lora_projector, vision_tower=config.lora_vision_tower)
    except LoraConfigError as exc:
        raise TrainConfigError(f"LoRA settings (lora_r, lora_alpha, lora_dropout, target_modules, lora_projector, "
                               f"lora_vision_tower): {exc}") from None


def load_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the base model is loaded in (None = the loader's default for the device)."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if config.method == "full" or device.type == "cpu":
        return torch.float32
    return None


def load_options(config: TrainConfig) -> dict[str, Any]:
    """Extra `load_model` arguments of the method: qlora quantizes the base to 4-bit while it
    streams in, so the 16-bit model never sits in memory whole."""
    if not config.four_bit:
        return {}
    return {"load_in_4bit": True, "keep_16bit": list(config.keep_16bit),
            "keep_16bit_dynamic": config.keep_16bit_dynamic}


def prepare(model: nn.Module, config: TrainConfig, tokenizer: Any = None) -> nn.Module:
    """Freeze/adapt `model` for the method (in place): its load-balancing weight, new tokens, then
    LoRA or every weight trainable, then trainable_modules; returns it."""
    set_router_aux_loss(model, config)
    if config.new_tokens:
        if tokenizer is None:
            raise TrainConfigError("key 'new_tokens': adding tokens needs the tokenizer")
        from velotune.models.vocab import add_token_rows

        add_token_rows(model, tokenizer.add_special_tokens(config.new_tokens))
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from velotune.lora.config import LoraConfigError
    from velotune.lora.model import apply_lora
    from velotune.lora.modules_to_save import train_in_full

    if config.four_bit:
        from velotune.quant import Linear4bit

        if not any(isinstance(m, Linear4bit) for m in model.modules()):
            raise TrainConfigError(f"method {config.method} with a 4-bit base needs the model loaded in 4-bit: "
                                   "load_model(..., **load_options(config)), i.e. load_in_4bit=True")
    apply_lora(model, lora_config(config), dtype=torch.float32)
    try:
        train_in_full(model, config.trainable_modules)
    except LoraConfigError as exc:
        raise TrainConfigError(f"key 'trainable_modules': {str(exc).removeprefix('trainable_modules: ')}") from None
    if config.new_tokens and not model.lm_head.weight.requires_grad:
        raise TrainConfigError("key 'new_tokens': this model's lm_head is not tied to its embeddings; add lm_head "
                               "to trainable_modules so the new tokens' output rows train too")
    return model


def set_router_aux_loss(model: nn.Module, config: TrainConfig) -> None:
    """`router_aux_loss_coef` onto a mixture-of-experts model (null keeps the checkpoint's value)."""
    if config.router_aux_loss_coef is None:
        return
    if not model.config.num_experts:
        raise TrainConfigError(f"key 'router_aux_loss_coef' weights the router's load-balancing loss of a "
                               f"mixture-of-experts model; this {model.config.model_type} model has no experts "
                               "(leave the key out or null)")
    model.config.router_aux_loss_coef = config.router_aux_loss_coef


def calibration_rows(rows: Sequence[Sequence[int]], tokens: int = CALIBRATION_TOKENS,
                     row_tokens: int = CALIBRATION_ROW_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows spread evenly over the set (not its first rows, which a sorted or grouped
    file would make unrepresentative), `tokens` of them packed into a batch of rows of
    `row_tokens`: (ids [B, L], positions [B, L] restarting per training row, which the model reads
    as separate documents). A training row that crosses from one packed row into the next goes on
    there without its beginning. Rows of L tokens, not one row of all of them: attention over a
    packed row costs its length squared (4,096 tokens in one row: 27 of the demo fit's 67 s)."""
    rows = [row for row in rows if row]
    if not rows:
        raise ValueError("no training rows to calibrate on")
    mean = sum(map(len, rows)) / len(rows)
    wanted = min(len(rows), math.ceil(1.25 * tokens / mean))   # a margin over the mean: stop at `tokens`
    ids: list[int] = []
    positions: list[int] = []
    for k in range(wanted):
        row = rows[k * len(rows) // wanted]
        ids += row
        positions += range(len(row))
        if len(ids) >= tokens:
            break
    length = min(row_tokens, len(ids), tokens)
    count = min(len(ids), tokens) // length
    return (torch.tensor(ids[:count * length]).view(count, length),
            torch.tensor(positions[:count * length]).view(count, length))


def init_adapters(model: nn.Module, config: TrainConfig, calibration: Sequence[Sequence[int]], *,
                  fresh: bool = True) -> str | None:
    """`lora_init: quant_error`: start each adapter on a 4-bit layer as the part of that layer's
    rounding error it can hold (train/error_init.py), measured layer by layer on the training rows
    `calibration` (token ids; `calibration_rows` picks them; the inputs the adapters will see,
    rather than generic text), and record on the model that its adapters belong to this 4-bit base
    (`model.adapter_base`, written next to saved adapters). Returns what was done, for the log
    (None: nothing to say). A resumed run (`fresh=False`) reads its adapters from the checkpoint:
    only the record is made."""
    if config.lora_init != "quant_error":
        return None
    model.adapter_base = {"load_in_4bit": True, "quant_type": "nf4", "keep_16bit": list(config.keep_16bit),
                          "keep_16bit_dynamic": config.keep_16bit_dynamic}
    if not fresh:
        return None
    from velotune.train.error_init import compensate_quantization_error

    try:
        ids, positions = calibration_rows(calibration)
        done = compensate_quantization_error(model, ids, positions)
    except ValueError as exc:
        raise TrainConfigError(f"lora_init quant_error: {exc}") from None
    return (f"lora_init quant_error: {len(done)} adapters start as the rank-{config.lora_r} part of their "
            f"layer's 4-bit rounding error, measured on {ids.numel():,} training tokens")


def transformers_names(model: nn.Module):
    """Our parameter name -> the transformers model's, for a vision-language model (None: equal)."""
    if getattr(model.config, "multimodal_type", None) is None:
        return None
    from functools import partial

    from velotune.models.vision_families import VISION_FAMILIES, transformers_name

    return partial(transformers_name, family=VISION_FAMILIES[model.config.multimodal_type])


def save_result(model: nn.Module, tokenizer, config: TrainConfig, folder: Path | None = None) -> Path:
    """Write the run's result (adapter or full model) and return its folder."""
    out = Path(config.output_dir)
    if config.uses_lora:
        from velotune.lora.peft_format import save_adapter

        target = folder or out / ADAPTER_DIR
        save_adapter(model, target, config.model, names=transformers_names(model))
        if config.new_tokens:      # the base's tokenizer lacks them: loaders/adapter.py reads this one
            tokenizer.save(target)
        return target
    from velotune.export.hf import save_hf

    target = folder or out / MODEL_DIR
    return save_hf(model, tokenizer, target, save_dtype(model), getattr(model, "generation_config", None))


def save_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a full fine-tune is written in: the source checkpoint's (config.json
    `torch_dtype`/`dtype`), else float32, the dtype it was trained in."""
    source = getattr(model.config, "source", {}) or {}
    name = source.get("torch_dtype") or source.get("dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)
