"""Parity with transformers, in float32 on the CPU, for every family on a tiny random config with
its quirks switched on: logits, loss, every parameter gradient, and 20 greedy tokens."""
from __future__ import annotations

import pytest
import torch

import velotune
from velotune.loaders.build import split_fused

transformers = pytest.importorskip("transformers")

VOCAB = 331  # odd on purpose
QK_GAIN = float(__import__("os").environ.get("QK_GAIN", "4"))
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    "llama3": ("LlamaConfig", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama2-linear-rope": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral": ("MistralConfig", dict(sliding_window=5, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=50.0, final_logit_softcapping=5.0,
                                    hidden_activation="gelu_pytorch_tanh")),
    "phi3": ("Phi3Config", dict(sliding_window=6, tie_word_embeddings=False)),
    # The families of issue 20, at their real configs' quirks.
    "llama3.2": ("LlamaConfig", dict(
        tie_word_embeddings=True, head_dim=16,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral-small": ("MistralConfig", dict(head_dim=24, sliding_window=None, rope_theta=1e8,
                                            tie_word_embeddings=False)),   # explicit head_dim != hidden / heads
    "phi4": ("Phi3Config", dict(sliding_window=None, rope_theta=250000.0, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=7, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=24, num_experts=7, num_experts_per_tok=3, moe_intermediate_size=40,
                                         norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=False)),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=5, num_experts_per_tok=2, intermediate_size=40,
                                     sliding_window=4, tie_word_embeddings=False)),
}


def ours_from_hf(name: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    """A transformers parameter (or its gradient) under our names and layout."""
    from velotune.loaders.expert_tensors import ExpertTensors

    experts = ExpertTensors(config, "test")
    out = []
    for part_name, part in split_fused(name, tensor, config):
        for piece in experts.pieces(part_name, part):
            assert piece.index is None
            out.append((piece.name, piece.tensor))
    return out


def make_pair(family: str, tmp_path):
    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random norms, so (1+w) vs w and norm placement matter
        for name, p in ref.named_parameters():
            if "norm" in name or (name.endswith("bias") and "qkv" not in name and "q_proj" not in name
                                  and "k_proj" not in name):
                p.normal_(0.0, 0.3)
            elif "experts" in name or "sinks" in name or "router" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)   # experts, routers and sinks start at zero or near it
            elif any(k in name for k in ("q_proj", "k_proj", "qkv_proj")):
                p.mul_(QK_GAIN)  # at the default init attention is near-uniform and the q/k
                # gradients are so small that float32 rounding alone moves them by 1e-5
    ref.save_pretrained(tmp_path)
    ours, _ = velotune.load_model(tmp_path, dtype=torch.float32, device="cpu")
    return ref, ours.eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    labels[2, 4] = -100  # the first real token of a left-padded row has no real predecessor
    return ids, mask, labels


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_loss_match(family, tmp_path):
    ref, ours = make_pair(family, tmp_path)
    ids, mask, labels = batch()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, labels=labels)
        o = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    real = mask.bool()
    scale = r.logits[real].abs().max()
    assert (o.logits[real] - r.logits[real]).abs().max() <= 1e-5 * scale
    assert torch.allclose(o.loss, r.loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_match(family, tmp_path):
    """Every parameter's gradient within 1e-5 relative norm, in float32.

    A few gradients are nearly zero by symmetry (a key bias barely moves a softmax whose weights
    sum to one), and both implementations round intermediates to float32 in different orders;
    for those the error is measured against 1e-3 of the model's largest gradient norm, i.e. at
    the 1e-8 level of the model's gradient scale. The batch is right-padded, as training pads."""
    ref, ours = make_pair(family, tmp_path)
    ids, mask, labels = batch()
    ids, mask, labels = ids[:2], mask[:2], labels[:2]
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    ours_grads = dict(ours.named_parameters())
    pairs = [(our_name, ours_grads[our_name].grad, ref_grad)
             for name, p in ref.named_parameters() for our_name, ref_grad in ours_from_hf(name, p.grad, ours.config)]
    floor = 1e-3 * max(ref_grad.norm() for _, _, ref_grad in pairs)
    for our_name, mine, ref_grad in pairs:
        rel = (mine - ref_grad).norm() / torch.maximum(ref_grad.norm(), floor)
        assert rel <= 1e-5, f"{our_name}: relative gradient error {rel:.2e}"
    assert len(pairs) >= 3 * 9


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_matches(family, tmp_path):
    ref, ours = make_pair(family, tmp_path)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2))
    ref.generation_config.eos_token_id = None
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                            min_new_tokens=20)
    got = ours.generate(ids, max_new_tokens=20, stop_token_ids=[])
    assert got.tolist() == expected.tolist()


def test_packed_rows_equal_separate_sequences(tmp_path):
    """Position ids that restart mark packed documents: attention never crosses them."""
    _, ours = make_pair("mistral", tmp_path)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, VOCAB, (1, 6), generator=g), torch.randint(3, VOCAB, (1, 9), generator=g)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    with torch.no_grad():
        lp = ours(packed, position_ids=positions).logits
        la, lb = ours(a).logits, ours(b).logits
    assert torch.allclose(lp[:, :6], la, atol=1e-5)
    assert torch.allclose(lp[:, 6:], lb, atol=1e-5)
