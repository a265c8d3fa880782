"""4-bit experts (quant/experts4bit.py) under per-expert LoRA: the grouped Triton path (interpreted
on the CPU) equals the reference on the same 4-bit weights, forward and adapter gradients, and the
4-bit model stays within NF4's rounding of the 16-bit one."""
from __future__ import annotations

import pytest
import torch

from velotune.kernels import force_triton
from velotune.lora import LoraConfig, apply_lora
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.quant.experts4bit import ExpertWeights4bit, quantize_experts

CONFIG = dict(model_type="qwen3_moe", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=5, num_experts_per_tok=2,
              moe_intermediate_size=32, norm_topk_prob=True)


def tiny(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf_config(CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.1)
    return model


def _without_attention_adapters(model, ids):
    from velotune.lora import disable_adapters

    with disable_adapters(model):
        return model(ids, labels=ids).loss


def loss_and_grads(model, ids):
    out = model(ids, labels=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreted kernels run on CPU tensors only")
def test_4bit_experts_with_lora():
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    full = tiny()
    with torch.no_grad():
        full_loss = full(ids, labels=ids).loss
    model = tiny()
    assert quantize_experts(model) == 2
    assert all(isinstance(layer.mlp.experts, ExpertWeights4bit) for layer in model.model.layers)
    torch.manual_seed(3)
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False))
    ref_loss, ref_grads = loss_and_grads(model, ids)
    with force_triton():
        got_loss, got_grads = loss_and_grads(model, ids)
    assert abs(float(got_loss - ref_loss)) <= 1e-5 * float(ref_loss)
    assert len(got_grads) == len(ref_grads) > 8
    for a, b in zip(got_grads, ref_grads):
        assert float((a - b).norm() / b.norm().clamp(min=1e-8)) <= 1e-4
    for layer in model.model.layers:
        layer.mlp.experts.adapters_enabled = False
    with torch.no_grad():
        base_loss = _without_attention_adapters(model, ids)
    assert abs(float(base_loss - full_loss)) <= 0.02 * float(full_loss)   # NF4's rounding of the experts
