"""Between layers that are not checkpointed, a layer's last residual add is left to the next
layer's input norm (`defer=True` / `pending=`): the same outputs and gradients as adding first,
for pre-norm and sandwich-norm layers; the model adds the stream only inside norms between such
layers, with the loss of the checkpointed (whole-layer) path."""
from __future__ import annotations

import pytest
import torch

from velotune import kernels
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

FAMILIES = {
    "llama": dict(model_type="llama"),
    "gemma2": dict(model_type="gemma2", sandwich_norms=True, norm_weight_offset=1.0),
}


def tiny(family: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=53, hidden_size=20, intermediate_size=44, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=6), **FAMILIES[family]})
    model = Transformer(cfg).double()
    with torch.no_grad():   # norms away from their neutral weights, so a misplaced add shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deferred_layer_equals_adding_first(family):
    model = tiny(family)
    layer = model.model.layers[1]
    g = torch.Generator().manual_seed(1)
    x, pending = (torch.randn(2, 7, 20, generator=g, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(7).expand(2, 7)
    cos, sin = model.model.rotary(positions, x.dtype)

    def run(deferred: bool):
        a, b = x.clone().requires_grad_(), pending.clone().requires_grad_()
        if deferred:
            residual, last = layer(a, cos, sin, None, pending=b, defer=True)
            out = residual + last
        else:
            out = layer(a + b, cos, sin, None)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        out.backward(upstream)
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return out.detach(), a.grad, b.grad, grads

    got, want = run(True), run(False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[3], want[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_adds_the_stream_in_norms_unless_checkpointed(monkeypatch, checkpointing):
    calls = {"rms_norm": 0, "add_rms_norm": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(kernels, name), **kw):
            calls[_name] += 1
            return _fn(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)
    model = tiny("llama").train()
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(3))
    loss = model(ids, labels=ids).loss
    if checkpointing:   # whole layers: each input norm and the final norm stand alone
        assert calls == {"rms_norm": 3 + 1, "add_rms_norm": 3}
    else:               # only the first layer's input has nothing to add
        assert calls == {"rms_norm": 1, "add_rms_norm": 3 + 2 + 1}
    monkeypatch.undo()
    reference = tiny("llama").train()
    reference.gradient_checkpointing = not checkpointing
    torch.testing.assert_close(loss, reference(ids, labels=ids).loss, rtol=1e-12, atol=1e-12)
