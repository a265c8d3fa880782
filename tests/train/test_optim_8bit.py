"""8-bit and paged AdamW through bitsandbytes: numerics against float32 AdamW on the CPU, state
memory equal to the estimator's count, clear errors for what cannot run."""
from __future__ import annotations

import sys

import pytest
import torch

from velotune.estimate import Setup, estimate
from velotune.lora import LoraConfig, apply_lora
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.train.config import TrainConfig, TrainConfigError, load_config
from velotune.train.optim import build_optimizer

pytest.importorskip("bitsandbytes")

CFG = ModelConfig(model_type="llama", vocab_size=97, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def lora_model(r: int = 16) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CFG)
    apply_lora(model, LoraConfig(r=r, alpha=r, init=False), dtype=torch.float32)  # B random: every grad non-zero
    return model


def train(model: Transformer, optimizer: str, steps: int = 6) -> tuple[torch.optim.Optimizer, list[float]]:
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, learning_rate=1e-3))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=g).to(model.lm_head.weight.device)
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return opt, losses


def assert_tracks_float32_adamw(name: str, device: str) -> torch.optim.Optimizer:
    """`name` moves every adapter as float32 AdamW does, to a few percent of the distance moved,
    and ends at the same loss within 2%. (Each step sees fresh random tokens, so the loss itself
    need not fall in a few steps: the comparison with AdamW is what can fail.)"""
    ref_model, ours_model = lora_model().to(device), lora_model().to(device)
    _, ref_losses = train(ref_model, "adamw")
    opt, losses = train(ours_model, name)
    start = {n: p.to(device) for n, p in lora_model().named_parameters()}
    for (pname, a), (_, b) in zip(ref_model.named_parameters(), ours_model.named_parameters()):
        if not a.requires_grad:
            continue
        moved = (a - start[pname]).norm()
        assert moved > 0
        assert (a - b).norm() < 0.1 * moved, pname   # 8-bit moments: updates agree to a few percent
    assert abs(losses[-1] - ref_losses[-1]) < 0.02 * ref_losses[-1]
    return opt


def test_adamw8bit_tracks_float32_adamw_on_the_cpu():
    opt = assert_tracks_float32_adamw("adamw8bit", "cpu")
    assert type(opt).__name__ == "AdamW8bit"
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())


def test_adamw8bit_state_bytes_equal_the_estimate():
    model = lora_model()
    opt, _ = train(model, "adamw8bit", steps=1)
    measured = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.numel() > 1)
    small = [p for p in model.parameters() if p.requires_grad and p.numel() < 4096]
    assert small and any(p.numel() >= 4096 for p in model.parameters() if p.requires_grad)  # both kinds occur
    predicted = estimate(CFG, Setup(method="lora", lora_r=16, optim="adamw8bit", batch=2, seq=16)).optimizer
    assert measured == predicted


def test_missing_bitsandbytes_names_the_key_and_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # import fails as if not installed
    with pytest.raises(TrainConfigError, match=r"key 'optimizer': adamw8bit needs bitsandbytes.*pip install bitsandbytes"):
        build_optimizer(lora_model(), TrainConfig(optimizer="adamw8bit"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_paged_optimizers_need_a_gpu():
    for name in ("paged_adamw8bit", "paged_adamw"):
        with pytest.raises(TrainConfigError, match=f"key 'optimizer': {name} pages .* needs a CUDA GPU"):
            build_optimizer(lora_model(), TrainConfig(optimizer=name))


def test_config_accepts_the_optimizers_and_names_a_bad_one():
    for name in ("adamw8bit", "paged_adamw8bit", "paged_adamw"):
        assert load_config(None, [f"--optimizer={name}"]).optimizer == name
    with pytest.raises(TrainConfigError, match="key 'optimizer' must be one of adamw, adamw8bit"):
        load_config(None, ["--optimizer=adam8bit"])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit", "paged_adamw"])
def test_bitsandbytes_optimizers_train_on_the_gpu(name):
    opt = assert_tracks_float32_adamw(name, "cuda")
    assert type(opt).__name__ in ("AdamW8bit", "PagedAdamW8bit", "PagedAdamW")
