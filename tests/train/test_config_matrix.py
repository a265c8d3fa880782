"""No silent settings: every TrainConfig key, set for every method, either passes the checks (it
applies) or is refused before any work with an error naming the key and the method.

The expectation below is written out here, key by key, from what each method does (not read from
train/config.py's table); a key added to TrainConfig without a row here fails the first test."""
from __future__ import annotations

import dataclasses

import pytest

from velotune.train.config import METHODS, TrainConfig, TrainConfigError, check_values
from velotune.train.run import train_from_config

ALL = set(METHODS)
SFT = {"lora", "qlora", "full"}
LORA = ALL - {"full"}
PREFERENCE = {"dpo", "orpo", "kto", "simpo"}
ALIGN = PREFERENCE | {"grpo"}
NO_REFERENCE_LORA = {"lora", "qlora", "orpo", "simpo"}   # trainable_modules would move a reference

# key -> (a value other than the default, the methods it applies to, settings it needs beside it)
EXPECTED: dict[str, tuple[object, set[str], dict[str, object]]] = {
    "model": ("some/model", ALL, {}), "dataset": ("data.jsonl", ALL, {}), "eval_dataset": ("eval.jsonl", ALL, {}),
    "eval_split": (0.2, ALL, {}), "output_dir": ("runs/x", ALL, {}), "max_steps": (5, ALL, {}),
    "num_epochs": (2, ALL, {}), "micro_batch_size": (16, ALL, {}), "gradient_accumulation_steps": (2, ALL, {}),
    "max_seq_length": (2048, ALL, {}), "optimizer": ("adamw8bit", ALL, {}), "learning_rate": (1e-3, ALL, {}),
    "lr_scheduler": ("linear", ALL, {}), "warmup_steps": (3, ALL, {}), "warmup_ratio": (0.1, ALL, {}),
    "weight_decay": (0.01, ALL, {}), "adam_beta1": (0.8, ALL, {}), "adam_beta2": (0.99, ALL, {}),
    "adam_epsilon": (1e-6, ALL, {}), "max_grad_norm": (0.5, ALL, {}),
    "gradient_checkpointing": (True, ALL, {}), "offload_checkpoints": (True, ALL, {"gradient_checkpointing": True}),
    "mlp_chunk_tokens": (4096, ALL, {}), "memory_budget_gib": (20.0, ALL, {"gradient_checkpointing": "auto"}),
    "dtype": ("float32", ALL, {}), "device": ("cpu", ALL, {}), "seed": (7, ALL, {}), "eval_steps": (10, ALL, {}),
    "logging_steps": (5, ALL, {}), "save_steps": (10, ALL, {}), "save_total_limit": (2, ALL, {"save_steps": 10}),
    "resume": (True, ALL, {}), "report": (False, ALL, {}),
    "report_to": (["tensorboard"], ALL, {}), "distributed": ("ddp", ALL, {}),
    "export": (["gguf"], ALL, {}),
    # runs that never lose work (train/run_folder.py, train/guard.py): every method goes through them
    "overwrite_output_dir": (True, ALL, {}), "resume_allow_changes": (["max_steps"], ALL, {}),
    "on_nonfinite": ("skip", ALL, {}), "divergence_ratio": (3.0, ALL, {}),
    # supervised data and steps
    "dataset_format": ("messages", SFT, {}), "packing": (True, SFT, {}), "sample_prompts": (2, SFT, {}),
    "cuda_graphs": (False, SFT, {}), "new_tokens": (["<tool>"], SFT, {"trainable_modules": ["embed_tokens"]}),
    "router_aux_loss_coef": (0.01, SFT, {}),
    # rows into conversations: preference and RL rows have their own columns
    "column_template": ("Q: {question}", SFT, {"output_column": "answer"}),
    "output_column": ("answer", SFT, {"column_template": "Q: {question}"}),
    "system_prompt": ("Be brief.", SFT, {}), "dialogue_extension": (3, SFT, {}),
    # every method reads rows, and every method's steps run in the one loop
    "transforms": (["my.cleaning:strip"], ALL, {}), "profile_steps": ([2, 3], ALL, {}),
    # adapters
    "lora_r": (8, LORA, {}), "lora_alpha": (8.0, LORA, {}), "lora_dropout": (0.1, LORA, {}),
    "target_modules": (["q_proj"], LORA, {}), "use_rslora": (True, LORA, {}), "use_dora": (True, LORA, {}),
    # vision-language adapters: on the projector (default on), on the vision tower (default off)
    "lora_projector": (False, LORA, {}), "lora_vision_tower": (True, LORA, {}),
    "offload_embeddings": (False, LORA, {}),
    "trainable_modules": (["lm_head"], NO_REFERENCE_LORA, {}),
    "trainable_modules_lr": (1e-5, NO_REFERENCE_LORA, {"trainable_modules": ["lm_head"]}),
    # 4-bit base
    "load_in_4bit": (True, ALIGN, {}),
    "lora_init": ("quant_error", {"qlora"} | ALIGN, {"load_in_4bit": True}),
    "keep_16bit": (["lm_head"], {"qlora"} | ALIGN, {"load_in_4bit": True}),
    "keep_16bit_dynamic": (4, {"qlora"} | ALIGN, {"load_in_4bit": True}),
    # full fine-tuning
    "galore_rank": (64, {"full"}, {"optimizer": "galore"}),
    "galore_update_proj_gap": (100, {"full"}, {"optimizer": "galore"}),
    "galore_scale": (0.5, {"full"}, {"optimizer": "galore"}),
    "fsdp_cpu_offload": (True, {"full"}, {}), "fsdp_mixed_precision": (False, {"full"}, {}),
    # preference methods
    "beta": (0.5, PREFERENCE, {}), "dpo_loss": ("ipo", {"dpo"}, {}), "simpo_gamma": (1.0, {"simpo"}, {}),
    "kto_desirable_weight": (1.5, {"kto"}, {}), "kto_undesirable_weight": (0.5, {"kto"}, {}),
    # GRPO
    "rewards": (["my.rewards:score"], {"grpo"}, {}), "num_generations": (4, {"grpo"}, {}),
    "max_completion_length": (64, {"grpo"}, {}), "temperature": (0.7, {"grpo"}, {}), "grpo_beta": (0.0, {"grpo"}, {}),
    "prompt_column": ("question", {"grpo"}, {}), "loss_type": ("dapo", {"grpo"}, {}),
    "importance_sampling": ("sequence", {"grpo"}, {}), "generation_batch_size": (2, {"grpo"}, {}),
}
BASE = {"grpo": {"rewards": ["m:f"], "micro_batch_size": 8}}   # what a valid grpo config needs anyway


def make(method: str, key: str) -> TrainConfig:
    value, applies, companions = EXPECTED[key]
    settings = {**BASE.get(method, {}), **{k: v for k, v in companions.items() if method in EXPECTED[k][1]}}
    return TrainConfig(method=method, **{**settings, key: value})


def test_every_key_has_an_expectation():
    assert set(EXPECTED) | {"method"} == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_key_applies_or_is_refused_naming_key_and_method(method, key):
    config = make(method, key)
    if method in EXPECTED[key][1]:
        check_values(config, "run.yaml")
    else:
        with pytest.raises(TrainConfigError, match=rf"run\.yaml: key '{key}' does not apply to method {method} "):
            check_values(config, "run.yaml")


def test_defaults_never_fail_for_any_method():
    for method in METHODS:
        check_values(TrainConfig(method=method, **BASE.get(method, {})), "defaults")


def test_refused_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainConfigError, match="key 'packing' does not apply to method dpo"):
        train_from_config(TrainConfig(method="dpo", packing=True, model=str(tmp_path / "missing"),
                                      dataset=str(tmp_path / "missing.jsonl"), output_dir=str(out)))
    assert not out.exists()       # nothing written, nothing loaded (the model path does not exist)


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "adamw", "galore_rank": 64, "method": "full"}, "key 'galore_rank' applies to optimizer galore only"),
    ({"warmup_steps": 5, "warmup_ratio": 0.1}, "key 'warmup_ratio' is used only when warmup_steps is 0"),
    ({"max_steps": 5, "num_epochs": 3}, "key 'num_epochs' is used only when max_steps is 0"),
    ({"memory_budget_gib": 20.0}, "key 'memory_budget_gib' is the budget of gradient_checkpointing: auto"),
    ({"save_total_limit": 2}, "key 'save_total_limit' limits the checkpoints of save_steps"),
    ({"eval_steps": 10, "eval_split": 0.0}, "key 'eval_steps' needs eval data"),
    ({"trainable_modules_lr": 1e-5}, "key 'trainable_modules_lr' is the learning rate of trainable_modules"),
    ({"new_tokens": ["<x>"]}, "key 'new_tokens' adds embedding rows that only training embed_tokens can move"),
    ({"method": "dpo", "keep_16bit": ["lm_head"]}, "key 'keep_16bit' needs a 4-bit base"),
    ({"method": "grpo", "rewards": ["m:f"], "micro_batch_size": 3}, "whole groups of num_generations = 8"),
    ({"method": "grpo", "rewards": ["m:f"], "micro_batch_size": 8, "max_completion_length": 1024},
     "key 'max_completion_length' must leave room for the prompt"),
    ({"method": "grpo", "rewards": ["m:f"], "micro_batch_size": 8, "temperature": 0.0}, "key 'temperature' must be positive"),
])
def test_settings_that_another_setting_makes_meaningless_are_refused(settings, message):
    with pytest.raises(TrainConfigError, match=message):
        check_values(TrainConfig(**settings), "run.yaml")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["paged_adamw8bit", "paged_adamw"])
def test_paged_optimizers_are_refused_naming_the_replacement(method, name):
    """bitsandbytes' paged optimizers are not offered (train/optim.py says why), for any method."""
    with pytest.raises(TrainConfigError, match=rf"run\.yaml: key 'optimizer' names bitsandbytes' paged optimizer"
                                               rf".*use optimizer: adamw8bit.*got '{name}'"):
        check_values(TrainConfig(method=method, optimizer=name, **BASE.get(method, {})), "run.yaml")
