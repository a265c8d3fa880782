"""The trainer against transformers + peft: same tiny model, same initial adapter (ours copied
into PEFT's), same micro-batches, 20 optimizer steps; PEFT's side is a plain AdamW loop written
here. Every step's loss within 1e-4 relative, and the final adapters within 1e-4."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.train.train_helpers import load_tiny, make_examples, save_tiny

from velotune.lora.config import LoraConfig
from velotune.lora.model import apply_lora, lora_state_dict
from velotune.train.config import TrainConfig
from velotune.train.trainer import Trainer

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, ACCUMULATION = 20, 2


def peft_key(name: str) -> str:
    """Our adapter parameter name -> PEFT's (adapter name "default")."""
    for part in ("lora_A", "lora_B"):
        name = name.replace(f".{part}.", f".{part}.default.")
    return f"base_model.model.{name}"


def reference_loop(model, batches, config: TrainConfig) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    losses = []
    for step in range(STEPS):
        micro = batches[step * ACCUMULATION:(step + 1) * ACCUMULATION]
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        step_loss = 0.0
        for batch in micro:
            logits = model(input_ids=batch["input_ids"]).logits
            loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                       ignore_index=-100, reduction="sum")
            (loss_sum / total).backward()
            step_loss += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(step_loss / total)
    return losses


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_training_matches_peft(family, tmp_path):
    ref = save_tiny(family, tmp_path / "model")
    ours = load_tiny(tmp_path / "model")
    torch.manual_seed(1)
    # init=False: B starts random too, so every adapter tensor gets a gradient from step 1.
    apply_lora(ours, LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=False), dtype=torch.float32)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    peft_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, tensor in lora_state_dict(ours).items():
            peft_params[peft_key(name)].copy_(tensor)

    config = TrainConfig(method="lora", output_dir=str(tmp_path / "run"), max_steps=STEPS, micro_batch_size=2,
                         gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-2, lr_scheduler="constant",
                         weight_decay=0.01, max_grad_norm=1.0, seed=3)
    trainer = Trainer(ours, config, make_examples(24, seed=7), show_progress=False)
    stream = trainer.batches.iterate()
    batches = [next(stream)[2] for _ in range(STEPS * ACCUMULATION)]
    theirs = reference_loop(ref, batches, config)
    mine = trainer.train().losses

    assert len(mine) == STEPS
    assert mine[-1] < 0.9 * mine[0]                          # it did learn something
    for step, (a, b) in enumerate(zip(mine, theirs)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step + 1}: {a} vs {b}"
    adapters = lora_state_dict(ours)
    assert len(adapters) == 2 * len(TARGETS) * 2
    for name, tensor in adapters.items():
        expected = peft_params[peft_key(name)].detach()
        err = (tensor - expected).abs().max() / expected.abs().max()
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
