"""A checkpointed decoder layer as one autograd node (models/layer_checkpoint.py): the same loss
and the same gradient bits as torch's checkpoint, with LoRA (the fused blocks), dropout (the RNG
replayed), autocast, a tiled MLP, full fine-tuning, sandwich norms, q/k norms and soft-capped attention; a forward that records one
node per layer; and torch.autograd.grad, which reaches the inputs and touches no parameter's .grad."""
from __future__ import annotations

import pytest
import torch

from velotune.lora import LoraConfig, apply_lora
from velotune.models import layer_checkpoint
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

VOCAB = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(lora: bool = True, dropout: float = 0.0, **extra) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12, **extra)
    model = Transformer(cfg)
    if lora:
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS), dtype=torch.float32)
    model.gradient_checkpointing = True
    return model.train()


def step(model: Transformer, one_node: bool, monkeypatch, autocast: bool = False):
    monkeypatch.setattr(layer_checkpoint, "applies",
                        layer_checkpoint.applies if one_node else (lambda layer, x: False))
    torch.manual_seed(7)   # the same dropout draws for both
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


SETUPS = {
    "lora": dict(),
    "lora-dropout": dict(dropout=0.1),
    "lora-autocast": dict(autocast=True),
    "lora-tiled-mlp": dict(mlp_chunk=5),
    "full": dict(lora=False),
    "sandwich-norms": dict(sandwich_norms=True),
    "qk-norm-softcap": dict(qk_norm=True, attn_logit_softcapping=30.0),   # explicit attention (Gemma 2)
}


@pytest.mark.parametrize("setup", SETUPS, ids=list(SETUPS))
def test_same_bits_as_torch_checkpoint(setup, monkeypatch):
    kwargs = dict(SETUPS[setup])
    autocast = kwargs.pop("autocast", False)
    chunk = kwargs.pop("mlp_chunk", None)
    results = []
    for one_node in (True, False):
        model = build(**kwargs)
        if chunk:
            model.mlp_chunk_tokens = chunk
        results.append(step(model, one_node, monkeypatch, autocast))
    (loss, grads), (want_loss, want) = results
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want.keys() and len(grads) > 0
    for name, g in want.items():
        assert torch.equal(grads[name], g), name


def test_the_forward_records_one_node_per_layer():
    model = build()
    ids = torch.randint(0, VOCAB, (1, 9))
    out = model(ids, labels=ids)
    seen, stack, names = set(), [out.loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    assert names.count("_CheckpointedLayerBackward") == 3
    assert not [n for n in names if "Lora" in n or "Combine" in n]   # nothing inside a layer was recorded


def test_autograd_grad_reaches_the_inputs_and_leaves_the_parameters_alone(monkeypatch):
    """torch.autograd.grad of the loss by the input embeddings: the gradient torch's checkpoint
    gives, and no parameter's .grad written on the way; a parameter inside a layer is not in the
    forward's graph, which torch says."""
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    found = []
    for one_node in (True, False):
        monkeypatch.setattr(layer_checkpoint, "applies", (lambda layer, x: one_node))
        model = build()
        embeds = model.model.embed_tokens(ids).detach().requires_grad_()
        found.append(torch.autograd.grad(model(ids, inputs_embeds=embeds, labels=ids).loss, [embeds])[0])
        assert all(p.grad is None for p in model.parameters())
    assert torch.equal(found[0], found[1])
    monkeypatch.setattr(layer_checkpoint, "applies", (lambda layer, x: True))
    model = build()
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(model(ids, labels=ids).loss, [lora_a])


@pytest.mark.gpu
@pytest.mark.parametrize("qlora", [False, True], ids=["lora-bf16", "qlora"])
def test_same_bits_as_torch_checkpoint_on_the_gpu(qlora, monkeypatch):
    """The Triton kernels, a bf16 base (and an NF4 one), float32 adapters, as a user's loop runs them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from velotune.quant import quantize_linears

    results = []
    for one_node in (True, False):
        model = build(lora=False).to("cuda", torch.bfloat16)
        if qlora:
            quantize_linears(model)
        apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), dtype=torch.float32)
        model.cuda_graphs = False
        monkeypatch.setattr(layer_checkpoint, "applies",
                            (lambda layer, x: True) if one_node else (lambda layer, x: False))
        ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (want_loss, want) = results
    assert torch.equal(loss, want_loss)
    assert all(torch.equal(grads[n], g) for n, g in want.items())
