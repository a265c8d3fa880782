"""The estimator's per-layer activation terms against what autograd really keeps.

One decoder layer of `velotune.models.transformer` (bf16, the terms' dtype, so no scaling) runs
forward with `torch.autograd.graph.saved_tensors_hooks` recording every tensor saved for backward;
tensors that custom autograd Functions keep as ctx attributes (the fused LoRA MLP's h @ A_down)
are found by walking the graph. Unique storages are summed, the layer's parameters, frozen and
4-bit weights and the model-wide RoPE tables excluded. The sum must equal the estimator's terms
exactly, at two token counts, so both the per-token terms and the fixed ones (the bf16 copies of
the adapters) are pinned: a wrong term fails here.

The fused kernels save what they save on CUDA: without a GPU they run through Triton's
interpreter (`force_triton`), not the PyTorch references, whose autograd graphs save other
tensors. Attention: CUDA's flash kernel saves q, k, v, its output and a float32 log-sum-exp per
head and token, which is what the estimator counts. On CPU, torch's flash kernel saves the same
set; the test asserts that set (besides GPU kernels' one-element RNG seed and offset) before
comparing totals, so a torch whose CPU attention saves something else fails on that line rather
than on a wrong total. With a GPU the same test runs on CUDA with the compiled kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
from contextlib import contextmanager

import pytest
import torch

from velotune.estimate import Setup, checkpoint_terms, layer_terms
from velotune.estimate_experts import TILE_ROWS
from velotune.kernels.ops import moe as moe_ops
from velotune.lora import LoraConfig, apply_lora
from velotune.models import transformer
from velotune.models.checkpointing import recomputation, run_checkpointed
from velotune.models.config import ModelConfig
from velotune.quant import quantize_linears
from velotune.quant.experts4bit import quantize_experts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4
SHAPES = [(2, 16), (3, 40)]   # batch x seq: two token counts separate per-token from fixed bytes
LLAMA = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
QWEN3 = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, qk_norm=True)
QWEN3_MOE = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm=True,
                        num_experts=5, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)
GPT_OSS = ModelConfig.from_hf_config(dict(
    model_type="gpt_oss", vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=5, num_experts_per_tok=2,
    sliding_window=8))
CASES = [(LLAMA, "full"), (LLAMA, "lora"), (LLAMA, "qlora"), (QWEN3, "full"), (QWEN3, "lora"),
         (QWEN3_MOE, "full"), (QWEN3_MOE, "lora"), (QWEN3_MOE, "qlora"), (GPT_OSS, "lora")]


def build(config: ModelConfig, method: str, device: torch.device) -> transformer.Transformer:
    """A random bf16 model set up the way the trainer sets up `method` (train/methods.py: a
    4-bit base for qlora, float32 adapters with no dropout on the seven projections)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformer.Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    if method == "qlora":
        quantize_linears(model)
        quantize_experts(model)
    if method != "full":
        apply_lora(model, LoraConfig(r=RANK, alpha=2 * RANK, dropout=0.0, target_modules=TARGETS), dtype=torch.float32)
    return model.to(device).train()


class Kept:
    """Storages an autograd graph keeps for backward, by storage address: bytes, and what saved them."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.storages: dict[int, int] = {}
        self.attention: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        # empty tensors hold no memory (torch 2.11's checkpoint saves an empty placeholder input)
        if storage.nbytes() and storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def pack_attention(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() > 1:    # the GPU kernels' RNG seed and offset scalars (dropout is off): not activations
            self.add(t)
            self.attention.append(t)
        return t

    def add_ctx_attributes(self, output: torch.Tensor) -> None:
        """Tensors held as attributes of custom autograd Functions' ctx in the graph behind
        `output`, also inside dataclasses (the experts' route plan)."""
        seen, stack = set(), [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for value in getattr(node, "__dict__", {}).values():
                fields = [getattr(value, f.name) for f in dataclasses.fields(value)] \
                    if dataclasses.is_dataclass(value) else [value]
                for field in fields:
                    if isinstance(field, torch.Tensor):
                        self.add(field)
            stack.extend(next_node for next_node, _ in node.next_functions)


@contextmanager
def recording(kept: Kept, monkeypatch):
    """Saved tensors go to `kept`; those saved inside attention are also listed on their own."""
    attend = transformer.Attention.attend

    def attend_recorded(self, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(kept.pack_attention, lambda t: t):
            return attend(self, *args, **kwargs)

    with monkeypatch.context() as patch, torch.autograd.graph.saved_tensors_hooks(kept.pack, lambda t: t):
        patch.setattr(transformer.Attention, "attend", attend_recorded)
        yield


def layer_inputs(model: transformer.Transformer, batch: int, seq: int, device: torch.device):
    """A layer input requiring grad (as a previous layer's output does) and the model's cos/sin."""
    x = torch.randn(batch, seq, model.config.hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    cos, sin = model.model.rotary(positions, x.dtype)
    return x, cos, sin


def not_activations(model: transformer.Transformer, *tables: torch.Tensor) -> set[int]:
    """Storages that are not the layer's activations: parameters, buffers (4-bit weights) and the
    RoPE tables, which the estimator counts once for the model."""
    tensors = (*model.parameters(), *model.buffers(), *tables)
    return {t.untyped_storage().data_ptr() for t in tensors}


def expected(config: ModelConfig, method: str, batch: int, seq: int, **kwargs) -> int:
    setup = Setup(method=method, batch=batch, seq=seq, lora_r=RANK)
    return sum(t.bytes(batch * seq) for t in layer_terms(config, setup, moe=config.is_moe(0), **kwargs))


@pytest.fixture(autouse=True)
def gpu_row_tiles(monkeypatch):
    """The experts' route plan in the GPU's 64-row tiles (the interpreted kernels use 16)."""
    monkeypatch.setattr(moe_ops, "_block_m", lambda device: TILE_ROWS)


def flash_attention_saved(kept: Kept, config: ModelConfig, batch: int, seq: int) -> None:
    """Attention saved q, k, v, its output (bf16, [B, heads, T, head_dim]) and the float32
    log-sum-exp [B, heads, T], as CUDA's flash kernel does and the estimator counts."""
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # cuDNN's attention (which torch may pick on a GPU) keeps the same log-sum-exp as [B, heads, T, 1]
    found = sorted((tuple(t.shape[:3]) if t.dim() == 4 and t.shape[-1] == 1 else tuple(t.shape), t.dtype)
                   for t in kept.attention)
    wanted = sorted([((batch, heads, seq, d), torch.bfloat16)] * 2 + [((batch, kv_heads, seq, d), torch.bfloat16)] * 2
                    + [((batch, heads, seq), torch.float32)])
    assert found == wanted, f"attention saved {found}, not flash attention's q, k, v, output and log-sum-exp"


@pytest.mark.parametrize("recomputed", [False, True], ids=["forward", "recomputation"])
@pytest.mark.parametrize(("config", "method"), CASES, ids=[f"{c.model_type}-{m}" for c, m in CASES])
def test_one_layer_keeps_exactly_the_estimated_bytes(config, method, recomputed, device, monkeypatch):
    """The layer's forward; or a checkpoint's recomputation of it (its MLP asked for no output),
    which keeps the layer less h @ A_down."""
    model = build(config, method, device)
    layer = model.model.layers[0]
    for batch, seq in SHAPES:
        x, cos, sin = layer_inputs(model, batch, seq, device)
        kept = Kept(not_activations(model, cos, sin))
        with recording(kept, monkeypatch), recomputation() if recomputed else contextlib.nullcontext():
            out = layer(x, cos, sin, None)
        kept.add_ctx_attributes(out)
        want = expected(config, method, batch, seq, recomputation=recomputed)
        if not config.attention_sinks:
            flash_attention_saved(kept, config, batch, seq)
            assert kept.total == want, (batch, seq)
        elif device.type == "cpu":   # gpt-oss's sinks attention: padded, with a mask (velotune.estimate)
            assert kept.total == want, (batch, seq)
        else:   # CUDA's memory-efficient kernel pads its log-sum-exp to 32 rows and the mask to 16 columns
            assert want <= kept.total <= want + 4 * batch * config.num_attention_heads * 31 + 2 * seq * 15, (batch, seq)


CHECKPOINTED = [(LLAMA, "full"), (LLAMA, "lora"), (LLAMA, "qlora"), (QWEN3_MOE, "lora")]   # the plan is the same for every method


@pytest.mark.parametrize(("config", "method"), CHECKPOINTED, ids=[f"{c.model_type}-{m}" for c, m in CHECKPOINTED])
def test_a_checkpointed_layer_keeps_its_input_and_ctx_attributes(method, config, device):
    """Under torch's checkpoint only its inputs reach the saved-tensor hooks (what the layer saves
    goes to the checkpoint's own hooks, which drop it); the graph still holds the fused MLP's
    h @ A_down and the experts' route plan, ctx attributes."""
    model = build(config, method, device)
    layer = model.model.layers[0]
    for n, (batch, seq) in enumerate(SHAPES):
        x, cos, sin = layer_inputs(model, batch, seq, device)
        kept = Kept(not_activations(model, cos, sin))
        with torch.autograd.graph.saved_tensors_hooks(kept.pack, lambda t: t):
            out = run_checkpointed(layer, x, cos, sin, None)
        # torch saves the checkpoint's inputs (x; cos and sin are model-wide) for the recomputation
        assert list(kept.storages) == [x.untyped_storage().data_ptr()]
        kept.add_ctx_attributes(out)
        setup = Setup(method=method, batch=batch, seq=seq, lora_r=RANK)
        terms = checkpoint_terms(config, setup, moe=config.is_moe(0))
        assert kept.total == sum(t.bytes(batch * seq) for t in terms), (batch, seq)
        if n == 0:   # the recomputation and backward run with what was kept (once: interpreted experts are slow)
            out.float().sum().backward()
            # bf16 tl.dot is garbage in Triton's interpreter: the experts' values are checked on a GPU only
            assert x.grad is not None and (torch.isfinite(x.grad.float()).all() or config.num_experts and not x.is_cuda)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_experts_backward_peak_is_the_estimated_temporaries(method, device):
    """What the grouped experts' backward allocates at its peak (counted op by op), against the
    estimator's moments (velotune.estimate_experts). With LoRA exactly; a full fine-tune also
    makes the experts' weight gradients there (the estimate counts them as gradients), so its
    peak lies between the temporaries and the temporaries plus those gradients."""
    from tests.live_storages import LiveBytes
    from velotune.estimate_experts import backward_terms
    from velotune.kernels.moe_reference import ExpertAdapters, Experts
    from velotune.kernels.ops.moe import moe_experts_triton

    c = QWEN3_MOE
    e, h, i, k, tokens = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok, 120
    torch.manual_seed(0)
    bf16 = dict(dtype=torch.bfloat16, device=device)
    gate_up = torch.randn(e, 2 * i, h, **bf16, requires_grad=method == "full")
    down = torch.randn(e, h, i, **bf16, requires_grad=method == "full")
    adapters = [None, None]
    if method == "lora":
        adapters = [ExpertAdapters(torch.randn(e, RANK, h, device=device, requires_grad=True),
                                   torch.randn(e, 2 * i, RANK, device=device, requires_grad=True), 2.0),
                    ExpertAdapters(torch.randn(e, RANK, i, device=device, requires_grad=True),
                                   torch.randn(e, h, RANK, device=device, requires_grad=True), 2.0)]
    x = torch.randn(tokens, h, **bf16, requires_grad=True)
    ids = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, **bf16, requires_grad=True)
    y = moe_experts_triton(x, ids, weights, Experts(gate_up, down, None, None, *adapters, "silu"))
    grad = torch.randn_like(y)
    with LiveBytes() as allocated:
        y.backward(grad)
    estimated = sum(t.bytes(tokens) for t in backward_terms(c, method, RANK))
    weight_gradients = 2 * (gate_up.numel() + down.numel()) if method == "full" else 0
    if method == "lora":
        assert allocated.most == estimated
    else:   # (and the leaves' gradients, x's and the weights', copied once more at the end)
        assert estimated <= allocated.most <= estimated + weight_gradients + 2 * tokens * h + 4 * tokens * k
