"""Tiny transformers models and their velotune twins for the LoRA tests, plus the name mapping
between our adapter parameters and PEFT's (adapter name "default")."""
from __future__ import annotations

import re

import torch

import velotune

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Llama with a tied head and biases everywhere; Qwen2 untied with q/k/v biases.
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
}


def make_reference(family: str, folder):
    """A random transformers model saved to `folder`; returned in float32 eval mode."""
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    ref.save_pretrained(folder)
    return ref


def load_ours(folder):
    model, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    return model.eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 11), generator=g)
    return ids, ids.clone()


def scatter_magnitudes(named_params, seed: int = 5) -> None:
    """Multiply DoRA magnitudes by factors in [0.5, 1.5] so m != ||W + sBA|| and DoRA matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def our_name(peft_name: str) -> str:
    """PEFT's parameter name -> ours."""
    name = peft_name.removeprefix("base_model.model.")
    name = name.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector")
    return re.sub(r"\.default(?=\.|$)", "", name)


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= tol, f"max logit error {err:.2e} (relative to max |logit|)"
