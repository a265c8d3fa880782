"""Quantizing a model's projections: the 4-bit model tracks the 16-bit one, LoRA trains on top."""
import torch

from velotune.lora import LoraConfig, apply_lora, lora_parameters
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer
from velotune.quant import Linear4bit, quantize_linears


def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Transformer(cfg).eval()


def test_quantized_model_tracks_the_original_and_trains_lora():
    model = tiny()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
    names = quantize_linears(model)
    assert len(names) == 2 * 7
    assert all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    with torch.no_grad():
        after = model(ids).logits
    rel = (after - before).norm() / before.norm()
    assert 0 < rel < 0.2  # 4-bit rounding moves logits a little, not a lot
    apply_lora(model, LoraConfig(r=4, alpha=8, init=False))
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
