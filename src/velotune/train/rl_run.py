"""`velotune train` for the preference and RL methods: dpo, orpo (pairs) and grpo (prompts and
reward functions). Each trains a LoRA adapter; DPO's and GRPO's reference model is the same
model with the adapter switched off. Output: OUTPUT_DIR/adapter and OUTPUT_DIR/metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

import velotune
from velotune.data.files import DataError, read_rows
from velotune.lora import lora_parameters
from velotune.train import methods
from velotune.train.config import TrainConfig
from velotune.train.schedule import build_scheduler, warmup_steps_for


@dataclass
class RLResult:
    output: Path
    history: list[dict] = field(default_factory=list)


def run_rl(config: TrainConfig, console: Console, device: torch.device) -> RLResult:
    from velotune.rl.rewards import resolve

    reward_fns = [resolve(spec) for spec in config.rewards]  # fail on a bad name before loading
    model, tokenizer = velotune.load_model(config.model, dtype=methods.load_dtype(config, device), device=device,
                                           max_seq_length=config.max_seq_length)
    rows = read_rows(config.dataset)
    torch.manual_seed(config.seed)
    methods.prepare(model, config)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=config.learning_rate, weight_decay=config.weight_decay)
    if config.method == "grpo":
        for row in rows:
            if config.prompt_column not in row.data:
                raise DataError(f"{row.where}: missing field {config.prompt_column!r} (the GRPO prompt column)")
        units = [r.data for r in rows]
    else:
        from velotune.rl.preference import tokenize_preferences

        units = tokenize_preferences(rows, tokenizer, max_seq_length=config.max_seq_length)
    per_step = config.micro_batch_size * config.gradient_accumulation_steps
    total = config.max_steps or config.num_epochs * math.ceil(len(units) / per_step)
    scheduler = build_scheduler(optimizer, config.lr_scheduler,
                                warmup_steps_for(config.warmup_steps, config.warmup_ratio, total), total)
    order_rng = random.Random(config.seed)
    order: list[int] = []
    out = Path(config.output_dir)
    log = (out / "metrics.jsonl").open("a", encoding="utf-8")
    result = RLResult(output=out / methods.ADAPTER_DIR)
    started = time.perf_counter()
    try:
        for step in range(1, total + 1):
            if len(order) < per_step:
                order += order_rng.sample(range(len(units)), len(units))
            batch, order = [units[i] for i in order[:per_step]], order[per_step:]
            record = {"step": step, "lr": scheduler.get_last_lr()[0]}
            record.update(_step(model, tokenizer, optimizer, batch, reward_fns, config, step))
            scheduler.step()
            record["elapsed_s"] = round(time.perf_counter() - started, 2)
            log.write(json.dumps(record) + "\n")
            log.flush()
            result.history.append(record)
            if step % max(config.logging_steps, 1) == 0 or step == total:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k in ("loss", "mean_reward"))
                console.print(f"step {step}/{total}: {shown}")
    finally:
        log.close()
    methods.save_result(model, tokenizer, config)
    console.print(f"saved: {result.output}")
    return result


def _step(model, tokenizer, optimizer, batch, reward_fns, config: TrainConfig, step: int) -> dict:
    if config.method == "grpo":
        from velotune.rl.grpo import GRPOSettings, grpo_step

        settings = GRPOSettings(num_generations=config.num_generations,
                                max_completion_length=config.max_completion_length,
                                temperature=config.temperature, beta=config.grpo_beta,
                                micro_batch_size=config.micro_batch_size * config.num_generations,
                                max_grad_norm=config.max_grad_norm or float("inf"), seed=config.seed)
        r = grpo_step(model, tokenizer, batch, reward_fns, optimizer, settings, step=step,
                      prompt_key=config.prompt_column)
        return {"loss": r.loss, "mean_reward": r.mean_reward}
    from velotune.rl.preference_step import preference_step

    micro = [batch[i:i + config.micro_batch_size] for i in range(0, len(batch), config.micro_batch_size)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loss = preference_step(model, micro, pad, optimizer, config.method, beta=config.beta,
                           loss_type=config.dpo_loss, max_grad_norm=config.max_grad_norm or float("inf"))
    return {"loss": loss}
