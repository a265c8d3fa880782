"""An out-of-memory in training (forced here on the CPU: the forward raises torch's own
OutOfMemoryError) ends in a message with the estimator's breakdown and the changes that fit,
each of which the estimator confirms."""
from __future__ import annotations

import re

import pytest
import torch
from tests.train.train_helpers import load_tiny, make_examples

from velotune.estimate import GIB, RESERVED_GIB, Setup, checkpoint_term, estimate
from velotune.train.config import TrainConfig
from velotune.train.oom import TrainingOutOfMemory, breakdown, setup_of
from velotune.train.trainer import Trainer


def failing_trainer(folder, tmp_path, memory_budget_gib: float = 2.0, **overrides) -> Trainer:
    settings = dict(method="full", output_dir=str(tmp_path / "run"), max_steps=3, micro_batch_size=8,
                    max_seq_length=65536, gradient_checkpointing=False, seed=0)
    trainer = Trainer(load_tiny(folder), TrainConfig(**{**settings, **overrides}), make_examples(16),
                      show_progress=False)
    # A GPU of this many GiB, on the CPU: the advice reads memory_budget_gib as the device's size
    # (a config refuses the key without gradient_checkpointing: auto, where it sets the budget)
    trainer.config.memory_budget_gib = memory_budget_gib

    def forward_sum(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
    trainer.forward_sum = forward_sum
    return trainer


def estimated(model_config, options: str, base: Setup) -> float:
    """The estimate of `base` changed as the --key=value options say, in GiB."""
    values = dict(re.findall(r"--(\w+)=(\S+)", options))
    setup = Setup(method=values.get("method", base.method), batch=int(values.get("micro_batch_size", base.batch)),
                  seq=int(values.get("max_seq_length", base.seq)), optim=values.get("optimizer", base.optim),
                  checkpointing=base.checkpointing or "gradient_checkpointing" in values, lora_r=base.lora_r)
    total = estimate(model_config, setup).total
    if "offload_checkpoints" in values:
        total -= checkpoint_term(model_config, setup).bytes(setup.batch * setup.seq)
    return total / GIB


def test_out_of_memory_shows_the_estimate_and_changes_that_fit(tiny_model_dir, tmp_path):
    trainer = failing_trainer(tiny_model_dir("qwen2"), tmp_path)
    with pytest.raises(TrainingOutOfMemory) as info:
        trainer.train()
    lines = str(info.value).splitlines()
    assert lines[0] == ("out of memory at step 1 (cpu, memory_budget_gib 2): micro_batch_size 8 x "
                        "max_seq_length 65536, method full")
    model, setup = trainer.model.config, setup_of(trainer.config)
    current = estimate(model, setup)
    usable = 2.0 - RESERVED_GIB
    assert current.total / GIB > usable                      # the run as configured does not fit
    assert lines[1] == f"  {breakdown(current)} (velotune estimate)"
    assert lines[2] == f"  each of these fits in {usable:.2f} GiB usable ({RESERVED_GIB:g} GiB kept for the CUDA context):"
    offered = {line.strip().split(" --")[0].split("=")[0]: line.strip() for line in lines[3:]}
    assert sorted(offered) == ["--max_seq_length", "--micro_batch_size"]
    for line in offered.values():
        options, shown = line.rsplit(": ", 1)
        gib = estimated(model, options, setup)
        assert gib <= usable and shown == f"{gib:.2f} GiB", line
    # What is not offered does not fit; what is offered is the largest that fits.
    assert estimated(model, "--gradient_checkpointing=auto", setup) > usable
    assert estimated(model, "--optimizer=adamw8bit", setup) > usable
    batch = int(re.search(r"--micro_batch_size=(\d+) --gradient_accumulation_steps=(\d+)", offered["--micro_batch_size"]).group(1))
    assert f"--gradient_accumulation_steps={8 // batch}" in offered["--micro_batch_size"]   # the same rows per step
    assert estimated(model, f"--micro_batch_size={batch + 1}", setup) > usable
    seq = int(offered["--max_seq_length"].split("=")[1].split(":")[0])
    assert seq % 64 == 0 and estimated(model, f"--max_seq_length={seq + 64}", setup) > usable


def test_when_no_single_change_fits_they_are_combined(tiny_model_dir, tmp_path):
    trainer = failing_trainer(tiny_model_dir("qwen2"), tmp_path, memory_budget_gib=1.53, micro_batch_size=512)
    with pytest.raises(TrainingOutOfMemory) as info:
        trainer.train()
    lines = str(info.value).splitlines()
    assert lines[2] == "  no single change fits in 0.03 GiB usable (1.5 GiB kept for the CUDA context); together these do:"
    options, shown = lines[3].strip().rsplit(": ", 1)
    assert options.startswith("--gradient_checkpointing=auto --offload_checkpoints=true "
                              "--micro_batch_size=1 --gradient_accumulation_steps=512 --max_seq_length=")
    gib = estimated(trainer.model.config, options, setup_of(trainer.config))
    assert gib <= 1.53 - RESERVED_GIB and shown == f"{gib:.2f} GiB"
