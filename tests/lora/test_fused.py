"""The fused LoRA blocks (`velotune.lora.fused`) against the unfused path (each `LoraLinear`'s own
forward, the reference GLU, autograd): outputs and every gradient on awkward shapes, with biases,
GQA widths, partial adapters, 4-bit bases and under autocast; the dispatch (taken / not taken);
whole-model training steps; and the activation memory the fused blocks keep for the backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.live_storages import LiveStorages
from velotune import kernels
from velotune.kernels.reference import glu_reference
from velotune.lora import LoraConfig, apply_lora, disable_adapters, lora_named_parameters
from velotune.lora import block_adapters, fused
from velotune.lora.layers import LoraLinear
from velotune.models.config import ModelConfig
from velotune.models.transformer import DecoderLayer, Transformer
from velotune.quant import Linear4bit

HIDDEN, INTER, RANK, SEQ = 37, 83, 3, 13
HEADS, KV_HEADS, HEAD_DIM = 6, 2, 5  # GQA: q is 30 wide, k and v 10
FP32_TOL = 1e-5
# bf16 autocast: both paths round every matmul to bf16 (8 bits of mantissa, ~4e-3), at different
# points (the fused path's base GEMM adds its product onto the adapter term and rounds the sum
# once), so errors of a few roundings.
BF16_TOL = 3e-2


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max abs value."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


def linear(n_in: int, n_out: int, *, bias: bool, lora: bool, quantized: bool = False, seed: int = 0,
           **config) -> nn.Module:
    """A frozen base (nn.Linear or 4-bit), wrapped in a LoraLinear with non-zero A and B when `lora`."""
    torch.manual_seed(seed)
    base = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        if bias:
            base.bias.normal_(0, 0.5)
    if quantized:
        base = Linear4bit.from_linear(base)
    base.requires_grad_(False)
    if not lora:
        return base
    layer = LoraLinear(base, LoraConfig(r=RANK, alpha=7.0, init=False, **config))
    return layer


def adapter_params(modules) -> list[tuple[str, torch.Tensor]]:
    return [(f"{i}.{n}", p) for i, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad]


def forward_backward(fn, x: torch.Tensor, modules, seed: int = 3):
    """Outputs of fn(x), then dX and every adapter gradient for random upstream gradients."""
    for _, p in adapter_params(modules):
        p.grad = None
    x = x.detach().clone().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, upstream)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in adapter_params(modules)})
    return [o.detach() for o in outs], grads


def assert_same(fused_run, plain_run, tol: float) -> None:
    (outs, grads), (ref_outs, ref_grads) = fused_run, plain_run
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert rel_err(o, r) <= tol, f"output {i}: relative error {rel_err(o, r):.2e}"
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        if ref is None:  # a disabled adapter gets no gradient on either path
            assert grads[name] is None, name
            continue
        assert grads[name] is not None and grads[name].dtype == ref.dtype, name
        assert rel_err(grads[name], ref) <= tol, f"{name}: relative gradient error {rel_err(grads[name], ref):.2e}"


def qkv(bias: bool, adapted=(True, True, True), **kw) -> list[nn.Module]:
    outs = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)
    return [linear(HIDDEN, n, bias=bias, lora=a, seed=i, **kw) for i, (n, a) in enumerate(zip(outs, adapted))]


def mlp_modules(bias: bool, adapted=(True, True, True), **kw) -> list[nn.Module]:
    shapes = ((HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN))
    return [linear(i, o, bias=bias, lora=a, seed=k, **kw) for k, ((i, o), a) in enumerate(zip(shapes, adapted))]


def plain_mlp(x, gate, up, down, act):
    return down(glu_reference(gate(x), up(x), act))


def fused_grad_fn(y: torch.Tensor) -> str:
    """Name of the node that produced y, seen through the reshape the dispatch adds."""
    node = y.grad_fn
    while node is not None and node.name().startswith("ViewBackward"):
        node = node.next_functions[0][0]
    return node.name() if node is not None else ""


# ---- blocks on float32: within 1e-5 ----------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("adapted", [(True, True, True), (True, False, True)], ids=["qkv", "q-v"])
def test_qkv_matches_unfused(batch, bias, adapted):
    modules = qkv(bias, adapted)
    x = torch.randn(batch, SEQ, HIDDEN)
    got = forward_backward(lambda t: fused.project(t, *modules), x, modules)
    ref = forward_backward(lambda t: tuple(m(t) for m in modules), x, modules)
    assert fused_grad_fn(fused.project(x.requires_grad_(), *modules)[0]) == "LoraProjectionsBackward"
    assert_same(got, ref, FP32_TOL)


def test_qkv_with_different_ranks_and_scales_matches_unfused():
    """Each projection's columns of the stacked X·A^T and of its gradient (written in place, each
    scaled by its own alpha / r) stay its own when ranks and scales differ within the group."""
    modules = []
    for i, (n_out, r, alpha) in enumerate(zip((HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM),
                                              (3, 5, 2), (7.0, 2.0, 11.0))):
        torch.manual_seed(i)
        base = nn.Linear(HIDDEN, n_out, bias=True).requires_grad_(False)
        modules.append(LoraLinear(base, LoraConfig(r=r, alpha=alpha, init=False)))
    assert len({m.scale for m in modules}) == 3
    x = torch.randn(2, SEQ, HIDDEN)
    got = forward_backward(lambda t: fused.project(t, *modules), x, modules)
    ref = forward_backward(lambda t: tuple(m(t) for m in modules), x, modules)
    assert_same(got, ref, FP32_TOL)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_o_projection_matches_unfused(batch, bias):
    o = linear(HEADS * HEAD_DIM, HIDDEN, bias=bias, lora=True)
    x = torch.randn(batch, SEQ, HEADS * HEAD_DIM)
    got = forward_backward(lambda t: fused.project(t, o), x, [o])
    ref = forward_backward(lambda t: (o(t),), x, [o])
    assert_same(got, ref, FP32_TOL)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("adapted", [(True, True, True), (False, True, False), (False, False, True)],
                         ids=["all", "up-only", "down-only"])
def test_mlp_matches_unfused(batch, bias, act, adapted):
    modules = mlp_modules(bias, adapted)
    x = torch.randn(batch, SEQ, HIDDEN)
    got = forward_backward(lambda t: fused.mlp(t, *modules, act), x, modules)
    ref = forward_backward(lambda t: plain_mlp(t, *modules, act), x, modules)
    assert_same(got, ref, FP32_TOL)


def test_mlp_and_qkv_on_a_4bit_base():
    """A 4-bit base is dequantized in the forward and again in the backward (reference dequant)."""
    x = torch.randn(3, SEQ, HIDDEN)
    modules = mlp_modules(True, quantized=True)
    assert all(isinstance(m.base_layer, Linear4bit) for m in modules)
    got = forward_backward(lambda t: fused.mlp(t, *modules, "silu"), x, modules)
    ref = forward_backward(lambda t: plain_mlp(t, *modules, "silu"), x, modules)
    assert_same(got, ref, FP32_TOL)
    modules = qkv(False, quantized=True)
    got = forward_backward(lambda t: fused.project(t, *modules), x, modules)
    ref = forward_backward(lambda t: tuple(m(t) for m in modules), x, modules)
    assert_same(got, ref, FP32_TOL)


def test_4bit_mlp_backward_dequantizes_one_weight_at_a_time():
    """Each dequantized 4-bit weight is a temporary of the layer's largest weight size (112 MiB for
    an 8B MLP); the backward frees one before it makes the next."""
    x = torch.randn(2, SEQ, HIDDEN)
    modules = mlp_modules(True, quantized=True)
    out = fused.mlp(x.requires_grad_(), *modules, "silu")
    with LiveStorages(lambda shape: tuple(shape) in ((INTER, HIDDEN), (HIDDEN, INTER))) as seen:
        out.square().sum().backward()
    assert seen.most == 1
    assert all(m.a.grad is not None for m in modules)


@pytest.mark.parametrize("quantized", [False, True])
def test_mlp_in_row_chunks_matches_unfused_and_holds_one_chunk(monkeypatch, quantized):
    """With chunks of 128 rows (300 rows: 128 + 128 + 44), h in the forward and dh in the backward
    exist one chunk at a time: beside g and u no [tokens, intermediate] tensor of more rows than a
    chunk is ever made, and outputs and gradients are those of the unfused path."""
    monkeypatch.setattr(fused, "_MLP_CHUNK_BYTES", 128 * INTER * 4)
    x = torch.randn(2, 150, HIDDEN)
    modules = mlp_modules(True, quantized=quantized)
    with LiveStorages(lambda shape: len(shape) == 2 and shape[1] == INTER and shape[0] > 128) as seen:
        got = forward_backward(lambda t: fused.mlp(t, *modules, "silu"), x, modules)
    assert seen.most == 2   # g and u
    ref = forward_backward(lambda t: plain_mlp(t, *modules, "silu"), x, modules)
    assert_same(got, ref, FP32_TOL)


def test_first_layer_input_without_grad():
    """Under frozen embeddings layer 0's input needs no gradient: only the adapters get one."""
    modules = mlp_modules(False)
    x = torch.randn(2, SEQ, HIDDEN)
    fused.mlp(x, *modules, "silu").square().sum().backward()
    got = {n: p.grad.clone() for n, p in adapter_params(modules)}
    for _, p in adapter_params(modules):
        p.grad = None
    plain_mlp(x, *modules, "silu").square().sum().backward()
    for n, p in adapter_params(modules):
        assert rel_err(got[n], p.grad) <= FP32_TOL, n


# ---- mixed precision -------------------------------------------------------------------------

@pytest.mark.parametrize("block", ["qkv", "mlp"])
def test_bf16_autocast_with_float32_adapters(block):
    """As the trainer runs on a GPU: bf16 autocast, float32 adapters. Outputs come out in bf16
    and adapter gradients in float32, as on the unfused path, within BF16_TOL."""
    x = torch.randn(3, SEQ, HIDDEN)
    if block == "qkv":
        modules = qkv(True)
        fused_fn, plain_fn = (lambda t: fused.project(t, *modules)), (lambda t: tuple(m(t) for m in modules))
    else:
        modules = mlp_modules(True)
        fused_fn, plain_fn = (lambda t: fused.mlp(t, *modules, "silu")), (lambda t: plain_mlp(t, *modules, "silu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward_backward(fused_fn, x, modules)
        ref = forward_backward(plain_fn, x, modules)
    assert all(o.dtype == torch.bfloat16 for o in got[0])
    assert all(g.dtype == torch.float32 for g in got[1].values())
    assert_same(got, ref, BF16_TOL)


def test_bf16_base_with_float32_adapters_without_autocast():
    """As the training benchmark runs: a bf16 model, float32 adapters, no autocast. The fused path
    computes the adapter products in bf16 (the unfused one in float32): equal within BF16_TOL."""
    modules = mlp_modules(False)
    for m in modules:
        m.base_layer.to(torch.bfloat16)
    x = torch.randn(2, SEQ, HIDDEN).to(torch.bfloat16)
    got = forward_backward(lambda t: fused.mlp(t, *modules, "silu"), x, modules)
    ref = forward_backward(lambda t: plain_mlp(t, *modules, "silu"), x, modules)
    assert got[0][0].dtype == torch.bfloat16
    assert_same(got, ref, BF16_TOL)


# ---- dispatch --------------------------------------------------------------------------------

def test_fused_path_is_taken_and_falls_back():
    x = torch.randn(2, SEQ, HIDDEN, requires_grad=True)
    modules = mlp_modules(False)
    assert fused_grad_fn(fused.mlp(x, *modules, "silu")) == "LoraMLPBackward"
    assert fused_grad_fn(fused.project(x, *qkv(False))[1]) == "LoraProjectionsBackward"
    kernels.set_kernels_enabled(False)  # the one flag turns it off
    try:
        assert fused_grad_fn(fused.mlp(x, *modules, "silu")) != "LoraMLPBackward"
    finally:
        kernels.set_kernels_enabled(True)
    with torch.no_grad():  # nothing to save: the plain forward
        torch.testing.assert_close(fused.mlp(x, *modules, "silu"), plain_mlp(x, *modules, "silu"))


@pytest.mark.parametrize("case", ["dropout", "dora", "disabled", "trainable-base", "hooked", "dtype-mismatch"])
def test_fused_path_not_taken(case):
    kw = {"dropout": 0.1} if case == "dropout" else {"use_dora": True} if case == "dora" else {}
    modules = mlp_modules(False, **kw)
    x = torch.randn(2, SEQ, HIDDEN, requires_grad=True)
    if case == "disabled":
        for m in modules:
            m.adapters_enabled = False
    elif case == "trainable-base":
        modules[1].base_layer.weight.requires_grad_(True)
    elif case == "hooked":
        modules[2].register_forward_hook(lambda *_: None)
    elif case == "dtype-mismatch":
        modules[0].base_layer.to(torch.float64)
    if case == "dtype-mismatch":
        with pytest.raises(RuntimeError):  # the unfused path's own error, not a silent cast
            fused.mlp(x, *modules, "silu")
        return
    assert fused_grad_fn(fused.mlp(x, *modules, "silu")) != "LoraMLPBackward"


def test_disabled_adapter_in_a_block_runs_as_its_base():
    """DPO's reference pass disables adapters; a block with some adapters off is still fused, with
    the off ones contributing their base only."""
    modules = qkv(True)
    modules[1].adapters_enabled = False
    x = torch.randn(2, SEQ, HIDDEN)
    got = forward_backward(lambda t: fused.project(t, *modules), x, modules)
    ref = forward_backward(lambda t: tuple(m(t) for m in modules), x, modules)
    assert_same(got, ref, FP32_TOL)


def test_backward_twice_is_refused():
    modules = mlp_modules(False)
    x = torch.randn(2, SEQ, HIDDEN, requires_grad=True)
    loss = fused.mlp(x, *modules, "silu").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()


# ---- whole model -----------------------------------------------------------------------------

TINY = dict(vocab_size=101, hidden_size=HIDDEN + 3, intermediate_size=INTER, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=10, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2)


def tiny_model(family: str, **lora) -> Transformer:
    torch.manual_seed(0)
    extra = {"model_type": family}
    model = Transformer(ModelConfig.from_hf_config({**TINY, **extra}, f"<{family}>"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.3)
    apply_lora(model, LoraConfig(r=RANK, alpha=6, **lora))
    return model.train()


def train_steps(model: Transformer, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    params = [p for _, p in lora_named_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, TINY["vocab_size"], (3, SEQ), generator=g)
    losses = []
    for _ in range(steps):
        out = model(ids, labels=ids, return_logits=False)
        (out.loss_sum / out.num_targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return losses, {n: p.detach().clone() for n, p in lora_named_parameters(model)}


def graph_node_names(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_steps_equal_to_unfused(family):
    """A tiny model with LoRA on all seven projections (Qwen2: q/k/v biases): four AdamW steps give
    the same losses and adapters fused and unfused, and with gradient checkpointing."""
    model = tiny_model(family)
    ids = torch.randint(3, TINY["vocab_size"], (2, SEQ))
    names = graph_node_names(model(ids, labels=ids, return_logits=False).loss_sum)
    layers = TINY["num_hidden_layers"]
    assert names.count("LoraMLPBackward") == layers
    assert names.count("LoraProjectionsBackward") == 2 * layers  # q/k/v and o

    losses, adapters = train_steps(model)
    kernels.set_kernels_enabled(False)
    try:
        ref_losses, ref_adapters = train_steps(tiny_model(family))
    finally:
        kernels.set_kernels_enabled(True)
    checkpointed = tiny_model(family)
    checkpointed.gradient_checkpointing = True
    ckpt_losses, ckpt_adapters = train_steps(checkpointed)
    assert losses[-1] < losses[0]
    for other_losses, other in ((ref_losses, ref_adapters), (ckpt_losses, ckpt_adapters)):
        for a, b in zip(losses, other_losses, strict=True):
            assert abs(a - b) <= FP32_TOL * abs(b), (losses, other_losses)
        # Per matrix, in norm: Adam's first steps are close to lr * sign(grad), so elements whose
        # gradient is ~0 (B starts at zero) turn float32 rounding into visible element differences.
        for n, w in other.items():
            rel = ((adapters[n] - w).norm() / w.norm()).item()
            assert rel <= 1e-4, f"{n}: relative difference {rel:.2e}"


def test_model_with_dropout_or_disabled_adapters_is_unfused():
    model = tiny_model("llama", dropout=0.1)
    ids = torch.randint(3, TINY["vocab_size"], (2, SEQ))
    names = graph_node_names(model(ids, labels=ids, return_logits=False).loss_sum)
    assert "LoraMLPBackward" not in names and "LoraProjectionsBackward" not in names
    model = tiny_model("llama")
    with disable_adapters(model):
        out = model(ids, labels=ids, return_logits=False)
    assert out.loss_sum.grad_fn is None or "LoraMLPBackward" not in graph_node_names(out.loss_sum)


# ---- memory kept for the backward ------------------------------------------------------------

def saved_bytes(layer: DecoderLayer, x: torch.Tensor, cos, sin) -> int:
    """Bytes of distinct activation storages autograd keeps for one decoder layer's backward
    (parameters excluded: saving them copies nothing)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin, None)
    return sum(storages.values())


# Fused / unfused activation bytes one tiny layer keeps. float32: the fused MLP drops act(g) and h
# (2 x tokens x intermediate x 4 B, 26 kB of the unfused 103 kB; attention's share is the same on
# both paths) and keeps each block's adapters as one concatenated copy (`lora.fused._run`; 8 kB
# with its padding at these widths, a rounding error at real ones; measured 0.825). bf16: the unfused path also
# keeps a cast copy of its input per adapter (measured 0.48 and 0.50).
MAX_SAVED_RATIO = {"float32": 0.83, "bf16-autocast": 0.55, "bf16-base-float32-adapters": 0.55}


@pytest.mark.parametrize("precision", sorted(MAX_SAVED_RATIO))
def test_fused_layer_saves_less_for_backward(precision):
    """One decoder layer with LoRA on all seven projections keeps clearly fewer activation bytes
    fused than unfused (unfused: an input copy per adapter, act(g) and h on top of g and u)."""
    model = tiny_model("llama")
    layer = model.model.layers[0]
    x = torch.randn(3, SEQ, TINY["hidden_size"], requires_grad=True)
    if precision == "bf16-base-float32-adapters":
        for name, module in layer.named_modules():
            if isinstance(module, LoraLinear):
                module.base_layer.to(torch.bfloat16)
        layer.input_layernorm.to(torch.bfloat16)
        layer.post_attention_layernorm.to(torch.bfloat16)
        x = x.detach().to(torch.bfloat16).requires_grad_()
    cos, sin = model.model.rotary(torch.arange(SEQ).expand(3, SEQ), x.dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    with autocast:
        fused_bytes = saved_bytes(layer, x, cos, sin)
        kernels.set_kernels_enabled(False)
        try:
            plain_bytes = saved_bytes(layer, x, cos, sin)
        finally:
            kernels.set_kernels_enabled(True)
    ratio = fused_bytes / plain_bytes
    assert ratio <= MAX_SAVED_RATIO[precision], f"fused {fused_bytes} B vs unfused {plain_bytes} B ({ratio:.2f})"
    if precision == "float32":
        tokens = 3 * SEQ
        # each block's adapters copy, every matrix padded to at most `ALIGN` more elements
        adapter_copies = sum(p.numel() + block_adapters.ALIGN for n, p in layer.named_parameters() if "lora_" in n) * 4
        assert plain_bytes - fused_bytes >= 2 * tokens * INTER * 4 - adapter_copies
