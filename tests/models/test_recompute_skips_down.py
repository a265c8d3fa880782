"""A checkpoint's recomputation of a pre-norm decoder layer skips the MLP's down projection (its
output is thrown away), with gradients unchanged: the fused LoRA MLP, the tiled MLP, torch's
early stop on and off, and Gemma's sandwich norms (where the MLP output is needed and made).
With offloaded checkpoints each layer is checkpointed as two halves, and the output projection is
skipped too, unless the host lacks room for the second input."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import set_checkpoint_early_stop

from velotune.lora import LoraConfig, apply_lora
from velotune.models import offload
from velotune.models.checkpointing import recomputing
from velotune.models.config import ModelConfig
from velotune.models.transformer import Transformer

LAYERS = 3
MATMULS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.linear, torch.ops.aten.matmul,
           torch.ops.aten.bmm}


def lora_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(model_type="llama", vocab_size=61, hidden_size=24, intermediate_size=56,
                                num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=6),
                         **overrides})
    model = Transformer(cfg)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.train()


class WeightReads(TorchDispatchMode):
    """Counts the matmuls that read the base weight of one projection (`down_proj`, `o_proj`,
    `q_proj`...) in any layer (none for 4-bit bases, which have no weight tensor)."""

    def __init__(self, model: Transformer, projection: str):
        super().__init__()
        bases = [layer.get_submodule(projection).base_layer for layer in model.model.layers]
        self.weights = {base.weight.untyped_storage().data_ptr() for base in bases if hasattr(base, "weight")}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        if func.overloadpacket in MATMULS and any(
                isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.weights for a in flat):
            self.count += 1
        return func(*args, **(kwargs or {}))


def train_step(model: Transformer, ids: torch.Tensor, projection: str = "mlp.down_proj", **settings):
    """(loss, LoRA gradients, matmuls reading `projection`'s weight) of one forward and backward."""
    for key, value in settings.items():
        setattr(model, key, value)
    model.zero_grad(set_to_none=True)
    with WeightReads(model, projection) as reads:
        out = model(ids, labels=ids, return_logits=False)
        out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss_sum.detach(), grads, reads.count


def assert_same(actual, expected) -> None:
    assert torch.equal(actual[0], expected[0])
    assert actual[1].keys() == expected[1].keys() and len(expected[1]) == 7 * 2 * LAYERS   # every A and B
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("early_stop", [True, False])
def test_recomputation_does_not_run_the_down_projection(early_stop):
    model = lora_model()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = train_step(model, ids, gradient_checkpointing=False)
    assert plain[2] == 2 * LAYERS      # forward and backward of each layer's down projection
    with set_checkpoint_early_stop(early_stop):
        checkpointed = train_step(model, ids, gradient_checkpointing=True)
    assert checkpointed[2] == 2 * LAYERS   # was 3 per layer: the recomputation made it again
    assert_same(checkpointed, plain)


def test_tiled_mlp_skips_its_chunks_in_the_recomputation():
    model = lora_model()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    chunks = -(-22 // 5)
    tiled = train_step(model, ids, gradient_checkpointing=False, mlp_chunk_tokens=5)
    # the forward runs every chunk without a graph; the backward runs each again, then its backward
    assert tiled[2] == 3 * chunks * LAYERS
    checkpointed = train_step(model, ids, gradient_checkpointing=True, offload_checkpoints=True, mlp_chunk_tokens=5)
    assert checkpointed[2] == tiled[2]
    assert_same(checkpointed, tiled)


def test_offloaded_layers_are_checkpointed_in_pieces_skipping_the_attention_matmuls():
    """Host room allowing, three pieces per layer (q/k/v projections; attention through o_proj;
    MLP half): no recomputation runs a base matmul of q, k, v, o or down."""
    model = lora_model()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    # forward and backward per layer, except the input gradient of the first layer's q/k/v (the
    # frozen embedding needs none). (k's and v's input gradients add into q's in place, an addmm_
    # that MATMULS leaves out: q stands for the three.)
    for projection, plain_reads in (("self_attn.o_proj", 2 * LAYERS), ("self_attn.q_proj", 2 * LAYERS - 1)):
        plain = train_step(model, ids, projection, gradient_checkpointing=False, offload_checkpoints=False)
        assert plain[2] == plain_reads, projection
        whole = train_step(model, ids, projection, gradient_checkpointing=True)
        assert whole[2] == plain_reads + LAYERS, projection   # the next norm needs the attention's result
        pieces = train_step(model, ids, projection, gradient_checkpointing=True, offload_checkpoints=True)
        assert pieces[2] == plain_reads, projection
        # per layer: its input, q, k, v and the residual between attention and MLP
        assert model.offload_stats.offloaded == model.offload_stats.restored == 5 * LAYERS
        assert_same(pieces, plain)
    down = train_step(model, ids, "mlp.down_proj", gradient_checkpointing=True, offload_checkpoints=True)
    assert down[2] == 2 * LAYERS


def room_for(monkeypatch, layer_inputs: float) -> None:
    """MemAvailable past the reserve holds `layer_inputs` [2, 11, hidden] float32 tensors."""
    room = offload.HOST_RESERVE_BYTES + int(layer_inputs * 2 * 11 * 24 * 4)
    monkeypatch.setattr(offload, "host_memory_bytes", lambda: (10**12, room))


def test_halves_when_the_host_lacks_room_for_the_pieces(monkeypatch):
    """q, k and v take two more inputs' worth per layer here; with room for two inputs per layer
    the layers are checkpointed as two halves: o_proj is skipped, the q/k/v projections rerun."""
    model = lora_model()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = train_step(model, ids, "self_attn.q_proj", gradient_checkpointing=False)
    model.offload_pool.release_free()
    room_for(monkeypatch, 3 * LAYERS)
    halves = train_step(model, ids, "self_attn.q_proj", gradient_checkpointing=True, offload_checkpoints=True)
    assert halves[2] == plain[2] + LAYERS and model.offload_stats.offloaded == 2 * LAYERS
    assert_same(halves, plain)
    o_proj = train_step(model, ids, "self_attn.o_proj", gradient_checkpointing=True, offload_checkpoints=True)
    assert o_proj[2] == 2 * LAYERS


def test_whole_layers_when_the_host_lacks_room_for_the_halves(monkeypatch):
    model = lora_model()
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = train_step(model, ids, "self_attn.o_proj", gradient_checkpointing=False)
    model.offload_pool.release_free()
    room_for(monkeypatch, 1.5 * LAYERS)   # one input per layer, not two
    # (the spare half input per layer would keep an attention output: tests/models/test_offload.py)
    whole = train_step(model, ids, "self_attn.o_proj", gradient_checkpointing=True, offload_checkpoints=True,
                       keep_attention_outputs=False)
    assert whole[2] == 3 * LAYERS and model.offload_stats.offloaded == LAYERS
    assert_same(whole, plain)


def test_sandwich_norms_recompute_the_mlp_output_they_normalise():
    model = lora_model(sandwich_norms=True, norm_weight_offset=1.0)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = train_step(model, ids, gradient_checkpointing=False)
    checkpointed = train_step(model, ids, gradient_checkpointing=True)
    assert checkpointed[2] == 3 * LAYERS
    assert_same(checkpointed, plain)


def test_the_flag_is_set_only_inside_the_recomputation():
    model = lora_model()
    seen: list[bool] = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: seen.append(recomputing()))
    model.gradient_checkpointing = True
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids, return_logits=False).loss_sum.backward()
    assert seen == [False] * LAYERS + [True] * LAYERS and not recomputing()

