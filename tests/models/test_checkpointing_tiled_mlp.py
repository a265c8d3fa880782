"""The sequence-tiled MLP: same output and gradients as the whole MLP, only one chunk's
[tokens x intermediate] tensors alive at a time, dropout replayed exactly in the backward."""
from __future__ import annotations

import weakref

import pytest
import torch

from velotune.lora import LoraConfig, apply_lora
from velotune.models.config import ModelConfig
from velotune.models.tiled_mlp import AUTO_CHUNK_TOKENS, AUTO_MIN_TOKENS, mlp_chunk_size, tiled_mlp
from velotune.models.transformer import MLP, Transformer

HIDDEN, INTER = 24, 88


def config(**overrides) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=61, hidden_size=HIDDEN, intermediate_size=INTER,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=6)
    return ModelConfig(**{**base, **overrides})


def lora_mlp(dropout: float = 0.0) -> torch.nn.Module:
    """An MLP inside a model with LoRA on its three projections (B randomised so it matters)."""
    torch.manual_seed(0)
    model = Transformer(config())
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.model.layers[0].mlp.train()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Equal up to float32 summation order: max difference within 1e-6 of the largest entry
    (chunks add parameter gradients in a different order than one big matmul)."""
    scale = max(float(expected.abs().max()), 1.0)
    assert float((actual - expected).abs().max()) <= 1e-6 * scale, name


def grads_of(mlp, x, chunk, upstream):
    x = x.clone().requires_grad_(True)
    mlp.zero_grad(set_to_none=True)
    out = tiled_mlp(mlp, x, chunk)
    out.backward(upstream)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 7, 16, 38])
@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_tiled_mlp_matches_the_whole_mlp_forward_and_backward(chunk, kind):
    torch.manual_seed(1)
    mlp = MLP(config(mlp_bias=True)) if kind == "plain" else lora_mlp()
    x = torch.randn(3, 13, HIDDEN)           # 39 tokens: chunks never divide evenly
    upstream = torch.randn(3, 13, HIDDEN)
    whole = grads_of(mlp, x, 0, upstream)
    tiled = grads_of(mlp, x, chunk, upstream)
    torch.testing.assert_close(tiled[0], whole[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(tiled[1], whole[1], rtol=0, atol=1e-6)
    assert tiled[2].keys() == whole[2].keys() and whole[2]
    for name, grad in whole[2].items():
        assert_within(tiled[2][name], grad, name)


def test_frozen_input_gives_parameter_gradients_only():
    mlp = lora_mlp()
    x = torch.randn(1, 20, HIDDEN)           # no requires_grad: the first layer of a LoRA model
    out = tiled_mlp(mlp, x, 6)
    out.sum().backward()
    trained = [p for p in mlp.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_dropout_masks_are_replayed_in_the_backward():
    """With LoRA dropout, the backward's recomputation must draw the forward's masks: compare with
    running the same chunks by hand under autograd from the same RNG state."""
    mlp = lora_mlp(dropout=0.3)
    x = torch.randn(2, 9, HIDDEN)
    upstream = torch.randn(2, 9, HIDDEN)
    torch.manual_seed(5)
    tiled = grads_of(mlp, x, 4, upstream)
    torch.manual_seed(5)
    mlp.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    rows, grads_up = xr.reshape(1, -1, HIDDEN), upstream.reshape(1, -1, HIDDEN)
    pieces = [mlp(rows[:, s:s + 4]) for s in range(0, 18, 4)]
    torch.cat(pieces, dim=1).backward(grads_up)
    torch.testing.assert_close(tiled[0].reshape(1, -1, HIDDEN), torch.cat(pieces, 1).detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(tiled[1], xr.grad, rtol=0, atol=1e-6)
    for name, p in mlp.named_parameters():
        if p.grad is not None:
            assert_within(tiled[2][name], p.grad, name)


class SavedBytes:
    """Saved-tensor hooks that track, among saved activations (3-d, weights are 2-d) with an
    intermediate-size last dim, the largest one and the most bytes alive at once."""

    def __init__(self) -> None:
        self.alive = 0
        self.max_alive = 0
        self.largest = 0

    def pack(self, tensor):
        holder = _Holder(tensor)
        if tensor.dim() == 3 and tensor.shape[-1] == INTER:
            size = tensor.numel() * tensor.element_size()
            self.alive += size
            self.max_alive = max(self.max_alive, self.alive)
            self.largest = max(self.largest, tensor.numel())
            weakref.finalize(holder, self._freed, size)
        return holder

    def _freed(self, size):
        self.alive -= size

    @staticmethod
    def unpack(holder):
        return holder.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Holder:
    def __init__(self, tensor):
        self.tensor = tensor


@pytest.mark.parametrize("chunk", [0, 8])
def test_only_one_chunk_of_intermediate_tensors_exists_at_a_time(chunk):
    mlp = MLP(config())
    tokens = 64
    x = torch.randn(1, tokens, HIDDEN, requires_grad=True)
    counter = SavedBytes()
    with counter.hooks():       # around forward AND backward: the backward's recomputation saves too
        out = tiled_mlp(mlp, x, chunk)
        out.sum().backward()
    if chunk == 0:              # the whole MLP saves [64 x 88] tensors (gate, up, act)
        assert counter.largest == tokens * INTER
        assert counter.max_alive >= 2 * tokens * INTER * 4
    else:                       # tiled: nothing bigger than one chunk, and about one chunk's worth alive
        assert counter.largest == chunk * INTER
        assert counter.max_alive <= 3 * chunk * INTER * 4
    assert x.grad is not None


def test_chunk_size_rules():
    assert mlp_chunk_size(None, AUTO_MIN_TOKENS) == 0
    assert mlp_chunk_size(None, AUTO_MIN_TOKENS + 1) == AUTO_CHUNK_TOKENS
    assert mlp_chunk_size(0, 10**6) == 0
    assert mlp_chunk_size(100, 100) == 0 and mlp_chunk_size(100, 101) == 100
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        mlp_chunk_size(-1, 10)


@pytest.mark.parametrize("sandwich", [False, True])
def test_model_with_tiled_mlp_matches_and_composes_with_checkpoint_offload(sandwich):
    extra = dict(sandwich_norms=True, norm_weight_offset=1.0) if sandwich else {}
    torch.manual_seed(0)
    model = Transformer(config(**extra)).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 61, (2, 15), generator=g)

    def run(**settings):
        for key, value in settings.items():
            setattr(model, key, value)
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, return_logits=False)
        out.loss_sum.backward()
        return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    whole = run(mlp_chunk_tokens=0)
    tiled = run(mlp_chunk_tokens=7)
    everything = run(mlp_chunk_tokens=7, gradient_checkpointing=True, offload_checkpoints=True)
    assert_within(tiled[0], whole[0])
    for name, grad in whole[1].items():
        assert_within(tiled[1][name], grad, name)
        assert torch.equal(everything[1][name], tiled[1][name]), name   # checkpoint + offload: bitwise
    assert torch.equal(everything[0], tiled[0])


@pytest.mark.gpu
def test_tiled_mlp_under_bf16_autocast_on_gpu_matches_the_whole_mlp():
    """The Triton GLU and bf16 autocast replayed in the backward: tiled vs whole within bf16
    rounding (the tiled path adds chunk gradients in float32, so it is at least as accurate)."""
    torch.manual_seed(0)
    mlp = MLP(config(hidden_size=256, intermediate_size=704)).cuda()
    x = torch.randn(2, 1000, 256, device="cuda")
    upstream = torch.randn(2, 1000, 256, device="cuda")
    results = []
    for chunk in (0, 333):
        xr = x.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tiled_mlp(mlp, xr, chunk)
        out.float().backward(upstream)
        results.append((out.float(), xr.grad, [p.grad.clone() for p in mlp.parameters()]))
    (o0, g0, p0), (o1, g1, p1) = results
    torch.testing.assert_close(o1, o0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g1, g0, rtol=2e-2, atol=2e-2)
    for a, b in zip(p1, p0):
        assert float((a - b).norm() / b.norm()) < 1e-2
