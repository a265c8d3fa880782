"""The memory estimator: exact arithmetic, the activation model's terms, monotonicity, what fits,
model lookup, and the CLI."""
import json
from dataclasses import replace

import pytest

from velotune.cli import main
from velotune.estimate import (
    GIB,
    EstimateError,
    MLP_CHUNK_BYTES,
    Setup,
    backward_terms,
    checkpoint_terms,
    estimate,
    layer_terms,
    lora_parameters,
    mlp_chunk_bytes,
    nf4_bytes,
    optimizer_bytes,
    what_fits,
)
from velotune.models.config import ModelConfig
from velotune.errors import ConfigError
from velotune.models.known_configs import KNOWN_CONFIGS, load_config

# Published totals (safetensors metadata of each Hub repository).
PUBLISHED_PARAMETERS = {
    "Llama-3-8B": 8_030_261_248, "Llama-3.1-8B": 8_030_261_248, "Llama-3.1-70B": 70_553_706_496,
    "Llama-3.2-1B": 1_235_814_400, "Mistral-7B": 7_248_023_552, "Qwen2.5-7B": 7_615_616_512,
    "Gemma-2-9B": 9_241_705_984, "Phi-3-mini": 3_821_079_552, "Qwen3-30B-A3B": 30_532_122_624,
    "gpt-oss-20b": 20_914_757_184,
    "Qwen3-8B": 8_190_735_360,      # model.safetensors.index.json total_size 16,381,470,720 bf16 bytes
}


def config(name: str) -> ModelConfig:
    return load_config(name)[0]


def test_llama3_8b_full_finetune_weights_and_adamw():
    c = ModelConfig.from_hf_config(KNOWN_CONFIGS["Llama-3-8B"]["config"])
    est = estimate(c, Setup(method="full", batch=8, seq=512, optim="adamw"))
    assert est.parameters == c.num_parameters() == 8_030_261_248
    assert est.weights == 2 * est.parameters and est.optimizer == 8 * est.parameters
    assert f"{est.weights / GIB:.2f}" == "14.96"
    assert f"{est.optimizer / GIB:.2f}" == "59.83"
    assert f"{est.gradients / GIB:.2f}" == "14.96"


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_bundled_configs_match_published_parameter_counts(name):
    assert config(name).num_parameters() == PUBLISHED_PARAMETERS[name]


def test_llama_layer_terms_add_up_to_the_formula():
    c = config("Llama-3-8B")
    setup = Setup(method="full", batch=8, seq=512)
    h, q, kv, i, heads, r = 4096, 4096, 1024, 14336, 32, 8
    per_token = 2 * (4 * h + 2 * q + 2 * kv + 3 * i) + 4 * (2 + heads)
    assert per_token == 139_400
    assert sum(t.bytes(4096) for t in layer_terms(c, setup)) == 4096 * per_token
    assert sum(t.bytes(4096) for t in checkpoint_terms(c, setup)) == 4096 * 2 * h
    # full: the layer output's and MLP input's gradients, dh, dg and du
    assert sum(t.bytes(4096) for t in backward_terms(c, setup)) == 4096 * 2 * (2 * h + 2 * i)

    # lora: the fused MLP keeps g and u but not act(g) * u; 7 x r from X @ A (6 r) and h @ A_down;
    # the bf16 copies of every A and B the fused blocks save
    lora = replace(setup, method="lora", lora_r=r)
    lora_per_token = 2 * (4 * h + 2 * q + 2 * kv + 2 * i) + 4 * (2 + heads) + 2 * 7 * r
    copies = 2 * r * ((q + h) + 2 * (kv + h) + (h + q) + 2 * (i + h) + (h + i))
    assert sum(t.bytes(4096) for t in layer_terms(c, lora)) == 4096 * lora_per_token + copies
    # a recomputation makes no h, so no h @ A_down: the checkpointed forward's ctx keeps that
    recomputed = sum(t.bytes(4096) for t in layer_terms(c, lora, recomputation=True))
    assert recomputed == 4096 * (lora_per_token - 2 * r) + copies
    assert sum(t.bytes(4096) for t in checkpoint_terms(c, lora)) == 4096 * 2 * (h + r)
    # the layer output's gradient, then a 56 MiB dh chunk (2,048 rows) or the 32 MiB MLP input gradient
    assert mlp_chunk_bytes(c, 4096) == 2048 * i * 2 == 56 * 2**20
    assert sum(t.bytes(4096) for t in backward_terms(c, lora)) == 4096 * 2 * h + 56 * 2**20
    assert sum(t.bytes(16384) for t in backward_terms(c, replace(lora, batch=32))) == 16384 * 2 * h * 2
    qlora = sum(t.bytes(4096) for t in backward_terms(c, replace(lora, method="qlora")))
    assert qlora == 4096 * 2 * h + 56 * 2**20 + 2 * i * h      # + one dequantized MLP projection


def test_mlp_chunk_bytes_follow_the_fused_mlp():
    torch = pytest.importorskip("torch")
    from velotune.lora import fused

    assert MLP_CHUNK_BYTES == fused._MLP_CHUNK_BYTES
    for name in ("Llama-3.2-1B", "Llama-3.1-8B", "Qwen2.5-7B"):
        c = config(name)
        for tokens in (1, 100, 129, 2048, 4097, 8192, 16384, 50_000):
            t = torch.empty(tokens, c.intermediate_size, dtype=torch.bfloat16, device="meta")
            largest = max(s.stop - s.start for s in fused._row_chunks(t))
            assert mlp_chunk_bytes(c, tokens) == 2 * c.intermediate_size * largest, (name, tokens)


# torch.cuda.max_memory_allocated above the weights and optimizer states for one forward + backward
# of velotune.models.transformer (Llama-3.2-1B, random bf16 weights, fused kernels, eager, LoRA r=16
# on the seven projections, QLoRA on a 4-bit base), measured by benchmarks/measure_activations.py
# on an H100 80GB HBM3, 2026-11-23 (rows in benchmarks/RESULTS.md).
MEASURED_H100_GIB = [
    ("full", False, 4, 1024, 6.410), ("full", True, 4, 1024, 2.858), ("full", False, 8, 2048, 20.501),
    ("full", True, 8, 2048, 4.008), ("lora", False, 8, 2048, 15.048), ("lora", True, 8, 2048, 2.061),
    ("qlora", False, 8, 2048, 15.049), ("qlora", True, 8, 2048, 2.092),
]


@pytest.mark.parametrize(("method", "checkpointing", "batch", "seq", "measured"), MEASURED_H100_GIB)
def test_step_peak_within_5_percent_of_h100_measurement(method, checkpointing, batch, seq, measured):
    est = estimate(config("Llama-3.2-1B"), Setup(method=method, batch=batch, seq=seq, checkpointing=checkpointing))
    predicted = max(est.activations, est.backward_peak) / GIB
    assert predicted == pytest.approx(measured, rel=0.05)


def test_lora_parameter_count_and_qlora_weight_bytes():
    c = config("Llama-3-8B")
    assert lora_parameters(c, 16) == 41_943_040  # what PEFT reports for all seven projections at r=16
    n = 4096 * 4096
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * (16 + 256)


def test_nf4_bytes_match_the_quantizer():
    torch = pytest.importorskip("torch")
    from velotune.quant import quantize_nf4

    n = 64 * 300 + 5
    packed, state = quantize_nf4(torch.randn(n))
    stored = packed.numel() + state.absmax.numel() + 4 * (state.nested_absmax.numel() + 16 + 256)
    assert nf4_bytes(n) == stored


def test_adamw8bit_bytes_follow_torchao_rule():
    """torchao's AdamW8bit (tests/train/test_optim_8bit.py measures its states against these): 8 bits
    for tensors of at least 4,096 values made of whole 256-value blocks (codes, a float32 scale per
    block and a 256-entry float32 map, for each moment); float32 moments for any other."""
    assert optimizer_bytes([4096], "adamw8bit") == 2 * (4096 + 4 * 16 + 4 * 256)
    assert optimizer_bytes([8192 + 256], "adamw8bit") == 2 * (8448 + 4 * 33 + 4 * 256)
    for n in (4095, 4224, 4096 + 1):       # too small, not whole blocks (128 x 33), one value over
        assert optimizer_bytes([n], "adamw8bit") == 8 * n == optimizer_bytes([n], "adamw")


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_monotone(name):
    c = config(name)
    base = Setup(batch=2, seq=1024, method="lora")
    totals = {m: estimate(c, replace(base, method=m)).total for m in ("full", "lora", "qlora")}
    assert totals["qlora"] < totals["lora"] < totals["full"]
    for method in ("full", "lora", "qlora"):
        est = estimate(c, replace(base, method=method))
        assert est.activations_checkpointed < est.activations_full
        assert estimate(c, replace(base, method=method, optim="adamw8bit")).optimizer < est.optimizer
        assert estimate(c, replace(base, method=method, batch=3)).activations > est.activations
        assert estimate(c, replace(base, method=method, seq=1025)).activations > est.activations


@pytest.mark.parametrize(("name", "method", "gpu_gib"),
                         [("Llama-3-8B", "qlora", 24), ("Llama-3-8B", "lora", 80), ("Llama-3.2-1B", "full", 40),
                          ("Gemma-2-9B", "qlora", 24), ("Qwen2.5-7B", "qlora", 16)])
def test_what_fits_is_the_boundary(name, method, gpu_gib):
    c = config(name)
    setup = Setup(method=method, seq=1024, checkpointing=True)
    fit = what_fits(c, setup, gpu_gib)
    budget = (gpu_gib - 1.5) * GIB
    assert fit.max_batch >= 1
    assert estimate(c, replace(setup, batch=fit.max_batch)).total <= budget
    assert estimate(c, replace(setup, batch=fit.max_batch + 1)).total > budget
    assert estimate(c, replace(setup, batch=1, seq=fit.max_seq)).total <= budget
    if fit.seq_capped:
        assert fit.max_seq == c.max_position_embeddings
    else:
        assert estimate(c, replace(setup, batch=1, seq=fit.max_seq + 1)).total > budget


def test_nothing_fits():
    fit = what_fits(config("Llama-3.1-70B"), Setup(method="full"), 80)
    assert (fit.max_batch, fit.max_seq) == (0, 0)
    with pytest.raises(EstimateError, match="gpu-gib must exceed"):
        what_fits(config("Llama-3.2-1B"), Setup(), 1.0)


def test_bad_setup_names_the_setting():
    with pytest.raises(EstimateError, match="batch must be >= 1, got 0"):
        Setup(batch=0)
    with pytest.raises(EstimateError, match="method 'dora'"):
        Setup(method="dora")


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ConfigError, match="unknown model 'Lama-3-8B'.*Did you mean Llama-3-8B"):
        load_config("Lama-3-8B")
    assert load_config("llama-3.2-1b")[0].num_hidden_layers == 16  # names ignore case


def test_local_folder_and_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KNOWN_CONFIGS["Phi-3-mini"]["config"]))
    assert load_config(str(tmp_path))[0].num_parameters() == PUBLISHED_PARAMETERS["Phi-3-mini"]
    assert load_config(str(tmp_path / "config.json"))[1] == str(tmp_path / "config.json")
    (tmp_path / "bad.json").write_text('{\n  "hidden_size": 4096,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"bad.json:3:3: invalid JSON"):
        load_config(str(tmp_path / "bad.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json in this folder"):
        load_config(str(empty))


def test_hub_id_offline_says_so(monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never reach the network, whatever the env
    with pytest.raises(ConfigError, match="nobody/no-such-model: cannot fetch config.json.*Offline, pass a local"):
        load_config("nobody/no-such-model")


def test_cli_prints_the_table(capsys):
    rc = main(["estimate", "Llama-3-8B", "--method", "full", "--batch", "8", "--seq", "512",
               "--no-checkpointing", "--gpu-gib", "80"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("weights", "14.96", "optimizer states", "59.83", "activations, checkpointing",
                 "activations, no checkpointing", "total", "2 B x 3i", "8-bit AdamW", "Does not fit"):
        assert text in out, text


def test_cli_what_fits_and_errors(capsys):
    assert main(["estimate", "Llama-3.2-1B", "--method", "qlora", "--seq", "1024", "--gpu-gib", "24"]) == 0
    out = capsys.readouterr().out
    fit = what_fits(config("Llama-3.2-1B"), Setup(method="qlora", seq=1024), 24)
    assert f"largest batch at seq 1024 = {fit.max_batch}" in out
    assert main(["estimate", "Mistral7B"]) == 2
    assert "Did you mean Mistral-7B" in capsys.readouterr().err


def test_offloaded_embeddings_leave_the_gpu_total():
    c = config("Llama-3.1-8B")
    table = 2 * 128_256 * 4_096                          # 0.98 GiB of bf16
    for method in ("lora", "qlora"):
        on_gpu = estimate(c, Setup(method=method))
        offloaded = estimate(c, Setup(method=method, offload_embeddings=True))
        assert offloaded.host_weights == table and on_gpu.host_weights == 0
        assert on_gpu.weights - offloaded.weights == table
        assert on_gpu.total - offloaded.total == table
        assert offloaded.activations == on_gpu.activations and offloaded.backward_peak == on_gpu.backward_peak
    with pytest.raises(EstimateError, match="offload_embeddings: a full fine-tune trains the input embeddings"):
        Setup(method="full", offload_embeddings=True)
    with pytest.raises(EstimateError, match="offload_embeddings: .*tie_word_embeddings"):
        estimate(config("Gemma-2-9B"), Setup(offload_embeddings=True))


def test_cli_offload_embeddings_flag(capsys):
    assert main(["estimate", "Llama-3.1-8B", "--method", "qlora", "--offload-embeddings"]) == 0
    out = capsys.readouterr().out
    assert "In host memory, not counted above: input embeddings 0.98 GiB" in out
    assert "embeddings in host memory (in use): weights 0.98 -> 0.00 GiB" in out
    on_gpu = estimate(config("Llama-3.1-8B"), Setup(method="qlora"))
    assert f"{(on_gpu.total - 2 * 128_256 * 4_096) / GIB:.2f}" in out
    assert main(["estimate", "Gemma-2-9B", "--offload-embeddings"]) == 2
    assert "tie_word_embeddings" in capsys.readouterr().err
