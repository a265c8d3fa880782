"""The decoder on the kernels against the decoder on the references: same loss, logits, every
parameter gradient and greedy tokens, for the families whose quirks reach the kernels (q/k norm on
4-D tensors, Gemma's 1+w norms, GeLU-tanh, final soft-cap, partial rotary, tied head)."""
import pytest
import torch

from velotune import kernels
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

TINY = dict(vocab_size=131, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen3": dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", head_dim=16, final_logit_softcapping=5.0, attn_logit_softcapping=50.0,
                   query_pre_attn_scalar=16, sliding_window=4),
    "llama-partial-rotary": dict(model_type="llama", partial_rotary_factor=0.5),
}


def _model(family: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf_config({**TINY, **FAMILIES[family]}, f"<{family}>"))
    with torch.no_grad():  # random norms, so (1 + w) vs w matters
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else 0.1)
    return model


def _run(model: Transformer, ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor):
    model.zero_grad()
    out = model(ids, position_ids=position_ids, labels=labels, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        tokens = model.generate(ids[:1, :5], max_new_tokens=4)
    return out.loss.detach(), out.logits.detach(), grads, tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_on_kernels_matches_references(device, family):
    model = _model(family).to(device)
    ids = torch.randint(3, TINY["vocab_size"], (2, 11), device=device)
    labels = ids.clone()
    labels[0, :3] = -100
    # The second row packs two documents; positions restart at its 7th token.
    position_ids = torch.tensor([list(range(11)), list(range(6)) + list(range(5))], device=device)
    loss, logits, grads, tokens = _run(model, ids, labels, position_ids)
    kernels.set_kernels_enabled(False)
    try:
        ref_loss, ref_logits, ref_grads, ref_tokens = _run(model, ids, labels, position_ids)
    finally:
        kernels.set_kernels_enabled(True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for name, grad in ref_grads.items():
        rel = ((grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)).item()
        assert rel < 1e-4, f"{name}: relative gradient error {rel:.2e}"
    assert torch.equal(tokens, ref_tokens)
