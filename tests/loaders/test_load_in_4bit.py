"""load_model(..., load_in_4bit=True): quantized as the tensors stream in, equal to quantizing after
loading, never holding all 16-bit linear weights at once; keep_16bit and the dynamic choice."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import velotune
from velotune import LoadError
from velotune.loaders import build as build_module
from velotune.models.transformer import Transformer
from velotune.quant import Linear4bit, quantize_linears

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():  # one projection with outliers: the largest quantization error by far
        model.model.layers[1].mlp.up_proj.weight[:, 0] *= 40.0
    model.save_pretrained(tmp_path)
    return tmp_path


def test_logits_equal_load_then_quantize(folder):
    streamed, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True)
    after, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    quantize_linears(after)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(streamed.eval()(ids).logits, after.eval()(ids).logits)
    report = streamed.quant_report
    assert len(report.quantized) == 3 * 7 and report.kept == {"lm_head": "keep_16bit"}
    assert isinstance(streamed.lm_head, nn.Linear) and streamed.lm_head.weight.dtype == torch.float32
    assert all(isinstance(m, Linear4bit) for n, m in streamed.named_modules() if n.endswith(PROJECTIONS))


def test_no_full_16bit_copy_of_the_linear_weights_exists_while_loading(folder, monkeypatch):
    """At every tensor the stream hands over, count the bytes of 16-bit projection weights alive:
    those materialised in the model plus the streamed tensors not yet freed."""
    models: list[Transformer] = []

    class Recorded(Transformer):
        def __init__(self, config):
            super().__init__(config)
            models.append(self)

    monkeypatch.setattr(build_module, "Transformer", Recorded)
    original_open = velotune.loaders.open_checkpoint

    def tracked_open(path):
        ckpt = original_open(path)
        stream = ckpt.tensors
        alive: dict[int, tuple[weakref.ref, int]] = {}

        def tensors():
            for name, tensor in stream():
                live = sum(size for ref, size in alive.values() if ref() is not None)
                for m in models:
                    for n, p in m.named_parameters():
                        if n.endswith(tuple(f"{x}.weight" for x in PROJECTIONS)) and p.device.type != "meta":
                            live += p.numel() * p.element_size()
                peaks.append(live)
                if name.endswith(tuple(f"{x}.weight" for x in PROJECTIONS)):
                    alive[id(tensor)] = (weakref.ref(tensor), tensor.numel() * tensor.element_size())
                yield name, tensor
        ckpt.tensors = tensors
        return ckpt

    monkeypatch.setattr(velotune.loaders, "open_checkpoint", tracked_open)
    cfg = TINY
    largest = 4 * cfg["intermediate_size"] * cfg["hidden_size"]        # float32 gate/up/down
    total = 4 * cfg["num_hidden_layers"] * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)

    peaks: list[int] = []
    velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True)
    assert max(peaks) <= 2 * largest < total / 4   # the tensor just placed, and nothing else

    peaks = []
    velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True, keep_16bit_dynamic=2)
    assert max(peaks) <= 4 * largest               # the dynamic heap adds at most two layers

    peaks = []
    velotune.load_model(folder, dtype=torch.float32, device="cpu")
    assert max(peaks) >= total                     # the 16-bit load holds them all: the check can fail


def test_keep_16bit_patterns(folder):
    model, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                   keep_16bit=["lm_head", "down_proj", "model.layers.0.self_attn.*"])
    kept = model.quant_report.kept
    assert set(kept) == {"lm_head", *(f"model.layers.{i}.mlp.down_proj" for i in range(3)),
                         *(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))}
    assert type(model.model.layers[2].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)


def test_dynamic_keeps_the_layers_with_the_largest_error(folder):
    model, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                   keep_16bit_dynamic=1)
    report = model.quant_report
    assert report.kept["model.layers.1.mlp.up_proj"] == "dynamic"
    errors = report.errors
    assert len(errors) == 3 * 7
    assert max(errors, key=errors.get) == "model.layers.1.mlp.up_proj"
    assert errors["model.layers.1.mlp.up_proj"] > 1.2 * sorted(errors.values())[-2]
    assert type(model.model.layers[1].mlp.up_proj) is nn.Linear
    assert "model.layers.1.mlp.up_proj" in report.summary()
    # the 16-bit layer holds the checkpoint's weight exactly
    ref, _ = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight)


def test_bad_options_are_named(folder):
    with pytest.raises(LoadError, match="keep_16bit pattern 'dwn_proj' matches no module"):
        velotune.load_model(folder, device="cpu", load_in_4bit=True, keep_16bit=["dwn_proj"])
    with pytest.raises(LoadError, match="quant_type"):
        velotune.load_model(folder, device="cpu", load_in_4bit=True, quant_type="int4")
    with pytest.raises(LoadError, match="only apply with load_in_4bit"):
        velotune.load_model(folder, device="cpu", keep_16bit=["lm_head"])
    with pytest.raises(LoadError, match="float64"):
        velotune.load_model(folder, device="cpu", dtype=torch.float64, load_in_4bit=True)


def test_gguf_and_qwen2_bias_paths(tmp_path):
    """GGUF streams dequantized float32 tensors: the same quantizer handles them. Qwen2's q/k/v
    biases arrive as separate tensors and end up in the 4-bit layers."""
    torch.manual_seed(0)
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in qwen.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    qwen.save_pretrained(tmp_path / "qwen")
    model, _ = velotune.load_model(tmp_path / "qwen", dtype=torch.float32, device="cpu", load_in_4bit=True)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and torch.equal(q.bias, qwen.model.layers[0].self_attn.q_proj.bias)
    assert "lm_head" not in model.quant_report.kept  # tied: it is the embedding
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        ref = qwen(ids).logits
        rel = (model.eval()(ids).logits - ref).norm() / ref.norm()
    assert 0 < rel < 0.2

    from velotune.loaders import default_model_path

    gguf_model, _ = velotune.load_model(default_model_path(), dtype=torch.float32, device="cpu", load_in_4bit=True,
                                        keep_16bit_dynamic=0)
    ref_model, _ = velotune.load_model(default_model_path(), dtype=torch.float32, device="cpu")
    quantize_linears(ref_model)
    ids = torch.arange(100, 130)[None]
    with torch.no_grad():
        assert torch.equal(gguf_model.eval()(ids).logits, ref_model.eval()(ids).logits)


@pytest.mark.gpu
def test_peak_gpu_memory_while_loading_stays_near_the_4bit_size(tmp_path):
    """A ~0.5B-parameter random Llama: loading in 4-bit must peak near its 4-bit size plus one
    layer in flight, far below the bf16 size."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=4)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _ = velotune.load_model(tmp_path, dtype=torch.bfloat16, device="cuda", load_in_4bit=True)
    peak = torch.cuda.max_memory_allocated() - before
    resident = torch.cuda.memory_allocated() - before
    linear = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear4bit))
    largest = 2048 * 5632
    assert resident < 2 * linear * 0.6 + 2 * 2 * 8000 * 2048          # 4-bit linears + bf16 embed/head
    assert peak - resident < 24 * largest                              # one layer's quantization workspace
    assert peak < 0.6 * (2 * linear + 2 * 2 * 8000 * 2048)            # well under the bf16 model


MOE = {"qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=96,
                                            head_dim=16)),
       "gpt_oss": ("GptOssConfig", dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=96,
                                        head_dim=16, sliding_window=8))}


@pytest.mark.parametrize("family", sorted(MOE))
def test_experts_are_quantized_as_they_stream_one_layer_at_a_time(family, tmp_path):
    """Qwen3-MoE's experts arrive one tensor per expert, gpt-oss's whole and transposed: either way
    the 4-bit experts equal quantizing after the load, and only one layer's 16-bit stacked expert
    weights are alive at any time: for Qwen3-MoE its two buffers, which fill together (the file
    goes expert by expert), for gpt-oss one buffer, the file's tensor and its de-interleaved copy
    on their way in. Quantizing after the load held all 2 x 6."""
    from tests.live_storages import LiveStorages
    from velotune.quant.experts4bit import ExpertWeights4bit, quantize_experts

    cls, extra = MOE[family]
    config = getattr(transformers, cls)(**{**TINY, "num_hidden_layers": 6, **extra})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    expert_shapes = {(6, 192, 64), (6, 64, 96)}
    with LiveStorages(lambda shape: tuple(shape) in expert_shapes) as live:
        streamed, _ = velotune.load_model(tmp_path, dtype=torch.float32, device="cpu", load_in_4bit=True)
    assert 1 <= live.most <= (2 if family == "qwen3_moe" else 3), live.most
    assert all(isinstance(layer.mlp.experts, ExpertWeights4bit) for layer in streamed.model.layers)
    assert len(streamed.quant_report.quantized) == 6 * 4 + 6          # q/k/v/o per layer, and the experts
    after, _ = velotune.load_model(tmp_path, dtype=torch.float32, device="cpu")
    assert sum(tuple(p.shape) in expert_shapes for p in after.parameters()) == 2 * 6   # what quantizing after held
    quantize_linears(after)
    assert quantize_experts(after) == 6
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(streamed.eval()(ids).logits, after.eval()(ids).logits)
    kept, _ = velotune.load_model(tmp_path, dtype=torch.float32, device="cpu", load_in_4bit=True,
                                  keep_16bit=["lm_head", "model.layers.0.mlp.experts"])
    assert not isinstance(kept.model.layers[0].mlp.experts, ExpertWeights4bit)
    assert kept.quant_report.kept["model.layers.0.mlp.experts"] == "keep_16bit"


@pytest.mark.gpu
def test_peak_gpu_memory_while_loading_4bit_experts_stays_near_one_layer(tmp_path):
    """A random Qwen3-MoE with 16 layers of 16 experts (bf16 experts: 151 MiB a layer, 2.4 GiB in
    all): loading in 4-bit peaks at the resident 4-bit model plus about one layer's 16-bit experts
    and their quantization workspace, not at the 16-bit experts of every layer."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=8000, hidden_size=2048, intermediate_size=4096, num_hidden_layers=16,
                                      num_attention_heads=16, num_key_value_heads=4, head_dim=128, num_experts=16,
                                      num_experts_per_tok=4, moe_intermediate_size=768)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _ = velotune.load_model(tmp_path, dtype=torch.bfloat16, device="cuda", load_in_4bit=True)
    peak = torch.cuda.max_memory_allocated() - before
    resident = torch.cuda.memory_allocated() - before
    layer = 2 * 16 * 3 * 2048 * 768                                   # one layer's bf16 experts
    assert peak - resident < 4 * layer, (peak - resident) / layer
    # 4-bit experts (~0.27 of bf16), bf16 embedding and head, attention at under 1 byte a weight
    assert resident < 0.35 * 16 * layer + 2 * 2 * 8000 * 2048 + 16 * 2048 * 5120
