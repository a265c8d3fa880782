"""Per-token log-probabilities through the head a chunk at a time: equal to a full log-softmax,
values and gradients, and what `Transformer.forward(return_token_logps=True)` returns."""
import pytest
import torch

from velotune.models.config import ModelConfig
from velotune.models.token_logps import token_logps
from velotune.models.transformer import Transformer


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_token_logps_match_full_log_softmax(softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 101, (37,), generator=g)
    got = token_logps(hidden, weight, targets, softcap=softcap, chunk_size=8)
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-10)
    gh, gw = torch.autograd.grad(got.sum(), (hidden, weight))
    wh, ww = torch.autograd.grad(want.sum(), (hidden, weight))
    assert torch.allclose(gh, wh, atol=1e-10) and torch.allclose(gw, ww, atol=1e-10)


def test_forward_token_logps_are_the_log_softmax_of_the_logits_at_the_labels():
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = Transformer(cfg)
    ids = torch.randint(0, 53, (3, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 7:] = -100
    out = model(ids, labels=labels, return_logits=False, return_token_logps=True)
    assert out.loss_sum is None
    logps = torch.log_softmax(model(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = labels[:, 1:] != -100
    assert torch.allclose(out.token_logps[keep], logps[keep], atol=1e-5)
    assert torch.equal(out.token_logps[~keep], torch.zeros(int((~keep).sum())))
