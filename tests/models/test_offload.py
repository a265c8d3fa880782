"""Checkpointed layer inputs offloaded to host memory: same losses and gradients, bit for bit,
and the bytes really move (layer inputs only, each brought back once, one layer ahead)."""
from __future__ import annotations

import pytest
import torch

from velotune.lora import LoraConfig, apply_lora
from velotune.models import offload
from velotune.models.config import ModelConfig
from velotune.models.offload import LayerInputOffloader, OffloadError
from velotune.models.transformer import Transformer

LAYERS, HIDDEN = 3, 32


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=61, hidden_size=HIDDEN, intermediate_size=48,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      **overrides)
    return Transformer(cfg).train()


def loss_and_grads(model: Transformer, ids: torch.Tensor, labels: torch.Tensor, **settings):
    for key, value in settings.items():
        setattr(model, key, value)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, return_logits=False)
    (out.loss_sum / out.num_targets).backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch(b: int = 2, t: int = 11):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


@pytest.mark.parametrize("lora", [False, True])
def test_offload_is_bitwise_equal_to_checkpointing_and_to_no_checkpointing(lora):
    model = tiny_model()
    if lora:
        apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():   # B starts at zero: make the adapters matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ids, labels = batch()
    plain = loss_and_grads(model, ids, labels)
    checkpointed = loss_and_grads(model, ids, labels, gradient_checkpointing=True)
    offloaded = loss_and_grads(model, ids, labels, gradient_checkpointing=True, offload_checkpoints=True)
    assert plain[1], "no gradients"
    for other in (checkpointed, offloaded):
        assert torch.equal(other[0], plain[0])
        assert other[1].keys() == plain[1].keys()
        for name, grad in plain[1].items():
            assert torch.equal(other[1][name], grad), name


def test_offload_moves_exactly_the_layer_inputs_and_brings_each_back_once():
    model = tiny_model()
    ids, labels = batch(b=2, t=11)
    loss_and_grads(model, ids, labels, gradient_checkpointing=True, offload_checkpoints=True)
    stats = model.offload_stats
    # one [2, 11, HIDDEN] float32 input per layer; cos/sin (also checkpoint inputs) stay put
    assert stats.offloaded == LAYERS
    assert stats.offloaded_bytes == LAYERS * 2 * 11 * HIDDEN * 4
    assert stats.restored == LAYERS
    assert stats.prefetched == LAYERS      # each once: the last by its own backward, the others ahead


def test_offload_keeps_the_last_checkpoints_on_the_device_when_asked():
    model = tiny_model()
    ids, labels = batch()
    reference = loss_and_grads(model, ids, labels, gradient_checkpointing=True)
    kept = loss_and_grads(model, ids, labels, gradient_checkpointing=True, offload_checkpoints=True,
                          checkpoints_kept_on_gpu=1)
    assert model.offload_stats.offloaded == LAYERS - 1
    assert torch.equal(kept[0], reference[0])
    assert all(torch.equal(kept[1][n], g) for n, g in reference[1].items())


def test_every_forward_counts_afresh_and_eval_offloads_nothing():
    model = tiny_model()
    ids, labels = batch()
    loss_and_grads(model, ids, labels, gradient_checkpointing=True, offload_checkpoints=True)
    first = model.offload_stats
    loss_and_grads(model, ids, labels)
    assert model.offload_stats is not first and model.offload_stats.offloaded == LAYERS
    model.eval()
    with torch.no_grad():
        model(ids)
    assert model.offload_stats.offloaded == LAYERS   # unchanged: no training forward, no offloader


def test_offloader_prefetches_the_previous_layer_while_restoring_one():
    """Driven directly: restoring layer i fetches layer i-1, so its own restore finds it ready."""
    offloader = LayerInputOffloader(torch.device("cpu"))
    inputs = [torch.full((2, 3), float(i)) for i in range(3)]
    parked = [offloader._offload(x) for x in inputs]
    assert offloader.stats.prefetched == 0
    assert torch.equal(offloader._restore(parked[2]), inputs[2])
    assert parked[1].device_copy is not None and parked[0].device_copy is None
    assert torch.equal(offloader._restore(parked[1]), inputs[1])
    assert parked[0].device_copy is not None
    assert torch.equal(offloader._restore(parked[0]), inputs[0])
    assert offloader.stats.prefetched == 3 and offloader.stats.restored == 3


def test_host_memory_failure_names_the_layer_sizes_and_the_remedy(monkeypatch):
    model = tiny_model()
    ids, labels = batch()
    calls = {"n": 0}

    def fail_on_second(shape, dtype, pin):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: out of memory (pinned)")
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(offload, "_host_empty", fail_on_second)
    model.gradient_checkpointing, model.offload_checkpoints = True, True
    with pytest.raises(OffloadError) as err:
        model(ids, labels=labels, return_logits=False)
    text = str(err.value)
    assert "decoder layer 1" in text and "[2, 11, 32]" in text and "GiB available" in text
    assert "offload_checkpoints" in text


@pytest.mark.gpu
def test_offload_on_gpu_matches_and_frees_device_memory():
    """CUDA: pinned host copies on the side stream, equal gradients, and the checkpoints gone
    from the device between the forward and the backward (where long contexts run out). The
    peak, set by one layer's recomputation here, must not rise."""
    torch.manual_seed(0)
    layers = 8
    cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    model = Transformer(cfg).cuda().train()
    ids = torch.randint(0, 256, (1, 8192), device="cuda")
    peaks, held, results = {}, {}, {}
    for offloaded in (False, True):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing, model.offload_checkpoints = True, offloaded
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = model(ids, labels=ids, return_logits=False)
        torch.cuda.synchronize()     # the side stream's copies are done: their sources are free
        held[offloaded] = torch.cuda.memory_allocated() - base
        (out.loss_sum / out.num_targets).backward()
        peaks[offloaded] = torch.cuda.max_memory_allocated() - base
        results[offloaded] = (out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        del out
    assert model.offload_stats.offloaded == layers
    assert torch.allclose(results[True][0], results[False][0], rtol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6)
    one_input = 8192 * 512 * 4
    assert held[False] - held[True] >= (layers - 1) * one_input, (held, one_input)
    assert peaks[True] <= peaks[False] + one_input, (peaks, one_input)


@pytest.mark.parametrize("offload", [False, True])
def test_offloaded_inputs_are_freed_between_forward_and_backward(offload):
    """The point of offloading: once the forward is done, no checkpointed layer input is alive on
    the compute device (checkpointing alone keeps every one of them until the backward)."""
    import gc
    import weakref

    model = tiny_model()
    model.gradient_checkpointing, model.offload_checkpoints = True, offload
    inputs: list[weakref.ref] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args: inputs.append(weakref.ref(args[0])))
             for layer in model.model.layers]
    ids, labels = batch()
    out = model(ids, labels=labels, return_logits=False)
    for hook in hooks:
        hook.remove()
    gc.collect()
    alive = [ref() is not None for ref in inputs]
    assert len(alive) == model.config.num_hidden_layers
    assert alive == [not offload] * len(alive)
    (out.loss_sum / out.num_targets).backward()   # and the backward still finds every input
