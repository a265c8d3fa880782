"""`gradient_checkpointing: auto`: the number of checkpointed layers from a memory budget (pure
arithmetic against hand-computed Llama-3.1-8B figures), and the model checkpointing exactly that
many layers with unchanged gradients; the config keys and their errors."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from velotune.models import checkpointing as checkpointing_module
from velotune.models.checkpointing import (
    GIB,
    MemoryBudget,
    activation_peak,
    auto_offload_tokens,
    choose_checkpointed_layers,
    configure_training_memory,
    gpu_bound_tokens,
    resident_bytes,
    training_method,
)
from velotune.models.config import ModelConfig
from velotune.models.known_configs import load_config
from velotune.models.transformer import Transformer
from velotune.placement import kept_attention_per_token
from velotune.train.config import TrainConfigError, load_config as load_train_config

LLAMA8B, _ = load_config("Llama-3.1-8B")
TOKENS = 4 * 2048
# Hand arithmetic, Llama-3.1-8B LoRA r16 (h 4096, q 4096, kv 1024, i 14336, 32 heads), per token:
# a layer keeps 2 B x (4h + 2q + 2kv + 2i) + 4 B x (2 + 32) + 2 B x 7 x 16 = 110,952 B (the fused
# MLP keeps gate and up, not act(gate) * up), plus the bf16 copies of its adapters' A and B,
# 2 B x 16 x 81,920 = 2,621,440 B whatever the tokens; a checkpointed layer keeps its input and
# the fused MLP's h @ A_down, 2 B x (h + 16) = 8,224 B, of which the input, 8,192 B, can be offloaded.
LAYER_PER_TOKEN = 2 * (4 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 14336) + 4 * 34 + 2 * 7 * 16
ADAPTER_COPIES = 2 * 16 * ((4096 + 4096) + 2 * (1024 + 4096) + (4096 + 4096) + 3 * (14336 + 4096))
KEPT_PER_TOKEN = 2 * (4096 + 16)
INPUT_PER_TOKEN = 2 * 4096


def budget(total_gib: float, resident_gib: float = 10.0) -> MemoryBudget:
    return MemoryBudget(total_bytes=int(total_gib * GIB), resident_bytes=int(resident_gib * GIB), method="lora",
                        lora_r=16)


def test_each_checkpointed_layer_saves_its_activations_minus_its_input():
    b = budget(80)
    assert LAYER_PER_TOKEN == 110_952 and ADAPTER_COPIES == 2_621_440
    for n in range(0, 31):   # below L, each more checkpointed layer frees one layer for its input and h @ A_down
        saved = activation_peak(LLAMA8B, b, 4, 2048, n) - activation_peak(LLAMA8B, b, 4, 2048, n + 1)
        assert saved == (LAYER_PER_TOKEN - KEPT_PER_TOKEN) * TOKENS + ADAPTER_COPIES


def test_choice_is_the_fewest_layers_that_fit():
    for wanted in (0, 1, 7, 20, 31):
        peak = activation_peak(LLAMA8B, budget(80), 4, 2048, wanted)
        exact = MemoryBudget(10 * GIB + peak, 10 * GIB, "lora", 16)
        choice = choose_checkpointed_layers(LLAMA8B, exact, 4, 2048)
        assert choice.layers == wanted and choice.fits
        assert choice.peak_bytes == exact.total_bytes
        # one byte less: one more layer must be checkpointed (the last one too: at this size the
        # model-wide buffers of the loss exceed the backward temporaries by more than one input)
        tighter = MemoryBudget(exact.total_bytes - 1, exact.resident_bytes, "lora", 16)
        assert choose_checkpointed_layers(LLAMA8B, tighter, 4, 2048).layers == wanted + 1
        assert choose_checkpointed_layers(LLAMA8B, tighter, 4, 2048).fits


def test_choice_on_an_80_gb_card_for_8b():
    """8B LoRA on an 80 GB card (74 GiB budget), ~17 GiB resident (bf16 weights, adapters, their
    gradients and AdamW states). The issue's micro-batch 4 x 2048: 32 un-checkpointed layers are
    32 x 110,952 B x 8192 = 27.1 GiB, and at 4 x 4096 54.2 GiB, so nothing needs checkpointing.
    At 4 x 6144 each layer is 2.54 GiB and checkpointing one saves 2.35 GiB: 81.3 GiB of layers
    must shed about 25.2 GiB (57 GiB less the 0.94 GiB of the loss's buffers remain), so 11 layers
    are checkpointed."""
    b = budget(74, resident_gib=17)
    assert choose_checkpointed_layers(LLAMA8B, b, 4, 2048).layers == 0
    assert choose_checkpointed_layers(LLAMA8B, b, 4, 4096).layers == 0
    choice = choose_checkpointed_layers(LLAMA8B, b, 4, 6144)
    assert choice.layers == 11 and choice.fits
    worse = activation_peak(LLAMA8B, b, 4, 6144, choice.layers - 1)
    assert b.resident_bytes + worse > b.total_bytes          # one fewer would not fit
    assert "of 32 decoder layers" in choice.describe() and "74.0 GiB" in choice.describe()


def test_nothing_needed_with_room_everything_when_nothing_fits():
    assert choose_checkpointed_layers(LLAMA8B, budget(10_000), 4, 2048).layers == 0
    hopeless = choose_checkpointed_layers(LLAMA8B, budget(11), 4, 2048)
    assert hopeless.layers == 32 and not hopeless.fits      # the smallest peak: every layer (see above)
    assert "does NOT fit" in hopeless.describe()


def test_offload_and_tiling_lower_the_estimated_peak():
    b = budget(80)
    # 8,192 tokens: 32 inputs on the GPU -> two layers' parked tensors in flight, in three pieces:
    # input, residual, q, k, v (4096 + 4096 + 4096 + 1024 + 1024 = 3.5 inputs each)
    short = activation_peak(LLAMA8B, b, 1, 8192, 32) - activation_peak(LLAMA8B, b, 1, 8192, 32, offload=True)
    assert short == (32 - 7) * INPUT_PER_TOKEN * 8192
    # 65,536 tokens: the attention kernel costs more than the projections' matmuls, so layers stay
    # whole and keep their attention output instead (the previous layer's in flight with its input)
    plain = activation_peak(LLAMA8B, b, 1, 65536, 32)
    offloaded = activation_peak(LLAMA8B, b, 1, 65536, 32, offload=True)
    assert plain - offloaded == (32 - 2) * INPUT_PER_TOKEN * 65536 - kept_attention_per_token(LLAMA8B, 2) * 65536
    # Sandwich norms (Gemma 2) keep layers whole at any length: one input parked per layer, and
    # (the host having room) each layer's attention output beside it.
    sandwich = replace(LLAMA8B, sandwich_norms=True)
    assert (activation_peak(sandwich, b, 1, 65536, 32) - activation_peak(sandwich, b, 1, 65536, 32, offload=True)
            == (32 - 2) * INPUT_PER_TOKEN * 65536 - kept_attention_per_token(sandwich, 2) * 65536)
    tiled = activation_peak(LLAMA8B, b, 1, 65536, 32, offload=True, mlp_chunk=8192)
    assert tiled < offloaded - 3 * 2 * 14336 * 65536 // 2


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return Transformer(cfg).train()


def run_counting_layer_calls(model: Transformer, ids: torch.Tensor):
    """(loss, grads, forward calls per layer): a checkpointed layer runs twice (forward and
    the backward's recomputation), any other once."""
    calls = [0] * len(model.model.layers)
    handles = [layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.model.layers)]
    try:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, return_logits=False)
        out.loss_sum.backward()
    finally:
        for h in handles:
            h.remove()
    return out.loss_sum.detach(), [p.grad.clone() for p in model.parameters()], calls


@pytest.mark.parametrize("wanted", [0, 1, 3])
def test_model_checkpoints_exactly_the_chosen_layers(wanted):
    model = tiny_model()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    reference = run_counting_layer_calls(model, ids)
    assert reference[2] == [1, 1, 1, 1]
    resident = resident_bytes(model)
    fake = MemoryBudget(0, resident, "full", 16)
    peak = activation_peak(model.config, fake, 2, 9, wanted)
    model.gradient_checkpointing = "auto"
    model.memory_budget = MemoryBudget(resident + peak, resident, "full", 16)
    loss, grads, calls = run_counting_layer_calls(model, ids)
    assert model.checkpoint_choice.layers == wanted
    assert calls == [2] * wanted + [1] * (4 - wanted)
    assert torch.equal(loss, reference[0])
    assert all(torch.equal(a, b) for a, b in zip(grads, reference[1]))


def test_auto_without_a_budget_uses_the_device_and_the_model():
    model = tiny_model()
    model.gradient_checkpointing = "auto"
    model(torch.randint(0, 61, (1, 5)), labels=torch.randint(0, 61, (1, 5)), return_logits=False)
    assert model.memory_budget is not None and model.memory_budget.method == "full"
    assert model.checkpoint_choice.layers == 0          # a tiny model fits any host


def test_resident_bytes_counts_tied_weights_once_and_adds_gradients_and_adam_states():
    model = tiny_model()
    params = sum(p.numel() for p in model.parameters())      # parameters() yields a tied weight once
    buffers = sum(b.numel() for b in model.buffers())
    assert resident_bytes(model) == 4 * (params + buffers) + (4 + 8) * params
    assert training_method(model) == ("full", 16)


def test_configure_training_memory_sets_the_model_and_reports_auto():
    model = tiny_model()
    note = configure_training_memory(model, checkpointing="auto", offload=True, mlp_chunk_tokens=0,
                                     budget_gib=0.001, batch=4, seq=64)
    assert model.gradient_checkpointing == "auto" and model.offload_checkpoints
    assert model.mlp_chunk_tokens == 0 and model.memory_budget.total_bytes == int(0.001 * GIB)
    assert note.startswith("checkpointing auto: ") and "of 4 decoder layers" in note and "batch 4 x seq 64" in note
    assert configure_training_memory(model, checkpointing=True) is None and model.memory_budget is None
    with pytest.raises(ValueError, match="true, false or auto"):
        configure_training_memory(model, checkpointing="sometimes")
    model.gradient_checkpointing = "always"
    with pytest.raises(ValueError, match="model.gradient_checkpointing"):
        model(torch.randint(0, 61, (1, 5)))


def test_offload_auto_offloads_when_the_memory_plan_needs_it_and_the_host_has_room(monkeypatch):
    model = tiny_model()
    assert load_train_config(None, []).offload_checkpoints == "auto"
    configure_training_memory(model, checkpointing=True, offload="auto", batch=4, seq=64)
    assert model.offload_checkpoints is False                        # the CPU: nothing to free
    monkeypatch.setattr(checkpointing_module, "_on_cuda", lambda weight: True)
    roomy, tight = MemoryBudget.of_model(model, 10.0), MemoryBudget.of_model(model, 1e-6)
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: 10 * GIB)
    assert auto_offload_tokens(model, True, roomy, 4, 64) is None     # fits with the inputs on the GPU
    assert auto_offload_tokens(model, True, tight, 4, 64) == 0        # does not: park every forward's
    assert auto_offload_tokens(model, "auto", tight, 4, 64) == 0
    assert auto_offload_tokens(model, False, tight, 4, 64) is None    # nothing checkpointed, nothing parked
    configure_training_memory(model, checkpointing=True, offload="auto", batch=4, seq=64, budget_gib=1e-6)
    assert model.offload_checkpoints is True
    layer_inputs = model.config.num_hidden_layers * 256 * model.config.hidden_size * 4
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: layer_inputs - 1)
    assert auto_offload_tokens(model, True, tight, 4, 64) is None     # the host cannot hold them
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: layer_inputs)
    assert auto_offload_tokens(model, True, tight, 4, 64) == 0


def test_offload_auto_offloads_eager_forwards_whose_gpu_work_outlasts_the_host_work(monkeypatch):
    """Eager, the offload's per-layer host work costs speed only while the host sets the pace:
    8B micro-batch 1 x 2,048 keeps its inputs on the GPU, micro-batch 4 parks them even though
    they fit; Llama-3.2-1B micro-batch 8 x 2,048 is still host-paced. A run whose longest
    micro-batch is that large offloads its forwards from that many tokens on, not shorter ones."""
    llama1b, _ = load_config("Llama-3.2-1B")
    assert gpu_bound_tokens(LLAMA8B) == 5_502                 # ceil(1.2e12 / 218,103,808 a layer)
    assert 2048 < gpu_bound_tokens(LLAMA8B) <= 4 * 2048
    assert 8 * 2048 < gpu_bound_tokens(llama1b) <= 10 * 2048
    model = tiny_model()
    monkeypatch.setattr(checkpointing_module, "_on_cuda", lambda weight: True)
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: 10 * GIB)
    roomy, tight = MemoryBudget.of_model(model, 10.0), MemoryBudget.of_model(model, 1e-6)
    h, i = model.config.hidden_size, model.config.intermediate_size
    q = model.config.num_attention_heads * model.config.head_dim
    kv = model.config.num_key_value_heads * model.config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    monkeypatch.setattr(checkpointing_module, "GPU_BOUND_TOKEN_PARAMETERS", 200 * per_layer)
    assert auto_offload_tokens(model, True, roomy, 4, 64) == 200     # 256 tokens: the GPU's pace from 200 on
    assert auto_offload_tokens(model, True, roomy, 4, 49) is None    # 196: the host's, and it fits
    assert auto_offload_tokens(model, True, tight, 4, 49) == 0       # it does not fit: every forward
    assert auto_offload_tokens(model, True, roomy, 4, 49, graphed=True) == 0
    assert auto_offload_tokens(model, False, roomy, 4, 64) is None   # nothing checkpointed, nothing parked
    configure_training_memory(model, checkpointing=True, offload="auto", batch=4, seq=64)
    assert model.offload_checkpoints is True and model.offload_min_tokens == 200
    assert model.offloads(200) and model.offloads(256) and not model.offloads(199)
    assert model.offload_pool.max_tokens == 256     # buffers sized for the longest micro-batch at once
    configure_training_memory(model, checkpointing=True, offload=True, batch=4, seq=64)
    assert model.offload_min_tokens == 0 and model.offloads(1)      # an explicit true: every forward
    fresh = tiny_model()
    configure_training_memory(fresh, checkpointing=True, offload=True, batch=4, seq=64, graphed=True)
    assert fresh.offload_pool.max_tokens is None    # a graphed step sets its own (bucketed) figure
    configure_training_memory(fresh, checkpointing=True, offload=False, batch=4, seq=64)
    assert fresh.offload_pool.max_tokens is None
    layer_inputs = model.config.num_hidden_layers * 256 * model.config.hidden_size * 4
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: 2 * layer_inputs)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert auto_offload_tokens(model, True, roomy, 4, 64) == 200    # two processes, room for both
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert auto_offload_tokens(model, True, roomy, 4, 64) is None   # three: a third each is too little
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: 0)
    assert auto_offload_tokens(model, True, roomy, 4, 64) is None   # the host cannot hold them


def test_offload_auto_offloads_graphed_steps_whenever_the_host_has_room(monkeypatch):
    """A replayed graph pays none of the offload's per-layer host work: graphed steps offload
    even when the inputs would fit on the GPU, as long as the host holds them; eager ones not."""
    model = tiny_model()
    monkeypatch.setattr(checkpointing_module, "_on_cuda", lambda weight: True)
    roomy = MemoryBudget.of_model(model, 10.0)
    layer_inputs = model.config.num_hidden_layers * 256 * model.config.hidden_size * 4
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: layer_inputs)
    assert auto_offload_tokens(model, True, roomy, 4, 64, graphed=True) == 0
    assert auto_offload_tokens(model, "auto", roomy, 4, 64, graphed=True) == 0
    assert auto_offload_tokens(model, True, roomy, 4, 64) is None            # eager, and it fits: keep them
    assert auto_offload_tokens(model, False, roomy, 4, 64, graphed=True) is None   # nothing checkpointed
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: layer_inputs - 1)
    assert auto_offload_tokens(model, True, roomy, 4, 64, graphed=True) is None    # the host cannot hold them
    monkeypatch.setattr(checkpointing_module, "host_room_bytes", lambda: layer_inputs)
    configure_training_memory(model, checkpointing=True, offload="auto", batch=4, seq=64, graphed=True)
    assert model.offload_checkpoints is True
    configure_training_memory(model, checkpointing=True, offload=False, batch=4, seq=64, graphed=True)
    assert model.offload_checkpoints is False                     # an explicit setting wins


def test_train_config_keys(tmp_path):
    cfg = load_train_config(None, ["--gradient_checkpointing=auto", "--offload_checkpoints=true",
                                   "--mlp_chunk_tokens=4096", "--memory_budget_gib=70"])
    assert (cfg.gradient_checkpointing, cfg.offload_checkpoints, cfg.mlp_chunk_tokens, cfg.memory_budget_gib) == \
        ("auto", True, 4096, 70.0)
    assert load_train_config(None, []).mlp_chunk_tokens is None
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 3\ngradient_checkpointing: sometimes\n")
    with pytest.raises(TrainConfigError,
                       match=r"run.yaml line 2: key 'gradient_checkpointing' must be true, false or auto"):
        load_train_config(path)
    with pytest.raises(TrainConfigError, match="offload_checkpoints.*needs gradient_checkpointing"):
        load_train_config(None, ["--offload_checkpoints=true"])
    assert load_train_config(None, ["--offload_checkpoints=auto"]).offload_checkpoints == "auto"
    with pytest.raises(TrainConfigError, match="key 'offload_checkpoints' must be true, false or auto"):
        load_train_config(None, ["--offload_checkpoints=sometimes"])
    with pytest.raises(TrainConfigError, match="mlp_chunk_tokens"):
        load_train_config(None, ["--mlp_chunk_tokens=-5"])
    with pytest.raises(TrainConfigError, match="memory_budget_gib"):
        load_train_config(None, ["--gradient_checkpointing=auto", "--memory_budget_gib=0"])


def test_trainer_reports_the_auto_choice_and_trains_with_offload(tmp_path):
    """The run log names the choice; a tiny budget forces checkpointing, and the run with
    checkpointing auto + offload + tiled MLP gives the losses of the plain run, bit for bit."""
    from io import StringIO

    from rich.console import Console

    from velotune.data import IGNORE_INDEX, Example
    from velotune.train.trainer import Trainer

    examples = [Example(list(range(3, 3 + n)), [IGNORE_INDEX] * 2 + list(range(5, 3 + n)), f"ex {n}")
                for n in (9, 12, 7, 10)]

    def train(*overrides):
        model = tiny_model()
        cfg = load_train_config(None, ["--max_steps=2", "--micro_batch_size=2", "--max_seq_length=16",
                                       "--method=full", "--report=false", f"--output_dir={tmp_path / 'run'}",
                                       "--learning_rate=1e-3", *overrides])
        out = StringIO()
        trainer = Trainer(model, cfg, examples, console=Console(file=out, width=200), show_progress=False)
        result = trainer.train()
        return result.losses, out.getvalue(), model

    plain, log, _ = train()
    assert "checkpointing auto" not in log
    auto, log, model = train("--gradient_checkpointing=auto", "--offload_checkpoints=true",
                             "--mlp_chunk_tokens=0", "--memory_budget_gib=0.0001")
    assert "of 4 decoder layers checkpointed at batch 2 x seq 16" in log
    assert "does NOT fit" in log                     # 0.0001 GiB: nothing fits, the smallest peak is taken
    assert model.checkpoint_choice.layers >= 3       # the last forward's own choice
    assert model.offload_stats.offloaded == 5 * model.checkpoint_choice.layers   # 3 pieces: input, q, k, v, residual
    assert auto == plain


QWEN3_MOE, _ = load_config("Qwen3-30B-A3B")
# Hand arithmetic, Qwen3-30B-A3B LoRA r16 (h 2048, q 4096, kv 512, 32 heads, 4 kv heads, q/k norms;
# 128 experts of 768, top 8), per token: attention and norms keep 2 B x (4h + 2q + 2kv) + 4 B x (2 + 32)
# + 2 B x (q + kv) + 4 B x (32 + 4) = 44,312 B; the router and experts 2 B x 2 x 768 x 8 (gate|up rows)
# + 6 B x 8 (routing weights) + 8 B x 8 (expert ids) + 28 B x 8 (route plan) + 4 B x 128 (router
# probabilities) + 4 B x 9 (renormalised top 8) + 2 B x 2 x 16 x 8 (X A^T, h A^T) = 25,972 B; the
# attention adapters' X @ A 2 B x 4 x 16 = 128 B. A checkpointed layer keeps its input and the route
# plan, 2 B x 2048 + 28 B x 8 = 4,320 B; each layer also keeps bf16 copies of its attention adapters,
# 2 B x 16 x 17,408 = 557,056 B whatever the tokens (the route plan's tile tables are kept either way).
MOE_LAYER_PER_TOKEN = 44_312 + 25_972 + 128


def test_each_checkpointed_moe_layer_saves_its_activations_minus_its_input_and_route_plan():
    b = budget(80)
    for n in range(0, 47):
        saved = activation_peak(QWEN3_MOE, b, 4, 2048, n) - activation_peak(QWEN3_MOE, b, 4, 2048, n + 1)
        assert saved == (MOE_LAYER_PER_TOKEN - 4_320) * TOKENS + 557_056
    choice = choose_checkpointed_layers(QWEN3_MOE, budget(40, resident_gib=20.0), 4, 2048)
    assert 0 < choice.layers < 48 and choice.fits
