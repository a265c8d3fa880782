"""benchmarks/bench_long_context.py runs end to end on the CPU with a tiny config: NF4 projections,
LoRA adapters that learn, offloaded checkpoints, the tiled MLP, and it stops at the first length
that cannot fit (here: host memory, by asking for more than the machine has)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 97, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
# what an offloaded layer parks per token when checkpointed in three pieces: input, q, k, v, residual
PARKED_PER_TOKEN = 64 + 64 + 32 + 32 + 64


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("bench_long_context")
    yield module
    sys.modules.pop("bench_long_context", None)


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_build_quantizes_adds_adapters_and_one_step_trains_them(bench, tiny_config):
    from velotune.quant.linear4bit import Linear4bit

    args = bench.parse_args(["--config", tiny_config, "--device", "cpu", "--dtype", "float32", "--mlp-chunk", "16"])
    config = bench.model_config(args)
    model, optimizer = bench.build(config, torch.device("cpu"), torch.float32, args)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * 3
    assert model.offload_checkpoints and model.gradient_checkpointing is True and model.mlp_chunk_tokens == 16
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().sum()) == 0.0 for p in lora_b)
    seconds = bench.step(model, optimizer, 50, torch.device("cpu"), amp=False)
    assert seconds > 0
    assert all(float(p.detach().abs().sum()) > 0.0 for p in lora_b)          # the adapters moved
    # three pieces per layer, the host having room: its input, q, k, v and the residual between
    # attention and MLP (64 + 64 + 32 + 32 + 64 values per token)
    assert model.offload_stats.offloaded == 15
    assert model.offload_stats.offloaded_bytes == 3 * PARKED_PER_TOKEN * 50 * 4


def test_run_reports_each_length_and_stops_at_the_first_that_does_not_fit(bench, tiny_config):
    args = bench.parse_args(["--config", tiny_config, "--device", "cpu", "--dtype", "float32", "--keep-on-gpu", "0",
                             "--mlp-chunk", "32", "--seq", "40", "129", "10000000000", "64", "--no-record"])
    rows = bench.run(args)
    assert [r["seq"] for r in rows] == [40, 129, 10_000_000_000]     # 64 never tried
    assert [r["outcome"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[0]["host_offloaded_gib"] == pytest.approx(3 * PARKED_PER_TOKEN * 40 * 4 / 2**30)   # three pieces
    assert rows[0]["placement"] == "3 host (3 piece) + 0 GPU"
    assert rows[2]["outcome"].startswith("host memory: offloaded inputs need") and rows[2]["seconds"] is None


def test_host_bytes_needed_counts_offloaded_layers_only_at_their_exact_size(bench, tiny_config):
    config = bench.model_config(bench.parse_args(["--config", tiny_config]))
    assert bench.host_bytes_needed(config, 1000, 0) == 3 * 1000 * 64 * 2   # not rounded to 2**17
    assert bench.host_bytes_needed(config, 1000, 1) == 2 * 1000 * 64 * 2
    assert bench.host_bytes_needed(config, 1000, 5) == 0


def test_the_8b_config_the_gpu_run_will_use(bench):
    """The GPU run's model: Llama-3.1-8B from the bundled table. 262,144 tokens of offloaded
    inputs take 64 GiB of pinned host memory (as measured); 350,000 tokens take 85.4 GiB, which
    the 125 GiB GPU box holds now that the buffers are exact-size (power-of-two blocks: 128)."""
    config = bench.model_config(bench.parse_args([]))
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (32, 4096, 14336)
    assert bench.host_bytes_needed(config, 262_144, 0) / 2**30 == 64
    assert bench.host_bytes_needed(config, 350_000, 0) / 2**30 == pytest.approx(85.45, abs=0.01)
    assert bench.host_bytes_needed(config, 350_000, 0) < 125 * 2**30 - 4 * 2**30 - 16 * 2**30


def test_the_length_check_counts_the_pool_as_room(bench, tiny_config, monkeypatch, capsys):
    """Lengths in one run share the model's host pool: its buffers are released or reused before
    the next length allocates, so a longer length is not refused for memory the pool holds."""
    from velotune.models import offload

    per_layer_40 = 40 * 64 * 4                     # float32 inputs of the tiny model at 40 tokens
    state = {"available": offload.HOST_RESERVE_BYTES + 3 * per_layer_40 + 100}

    def memory():   # what the host has left: the pool's buffers are taken out of it
        return 2**40, state["available"] - model_pool_bytes()

    pools = []
    original_build = bench.build

    def build(*a, **k):
        model, optimizer = original_build(*a, **k)
        pools.append(model.offload_pool)
        return model, optimizer

    def model_pool_bytes():
        return pools[0].held_bytes if pools else 0

    monkeypatch.setattr(offload, "host_memory_bytes", memory)
    monkeypatch.setattr(bench, "build", build)
    args = bench.parse_args(["--config", tiny_config, "--device", "cpu", "--dtype", "float32", "--keep-on-gpu", "0",
                             "--mlp-chunk", "32", "--seq", "40", "40", "41", "--no-record"])
    rows = bench.run(args)
    assert [r["outcome"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["outcome"].startswith("host memory: offloaded inputs need")   # 41 > 40 tokens of room
    out = capsys.readouterr().out
    assert "host buffers: 3 new" in out and "host buffers: 0 new" in out and "3 reused" in out


def test_auto_placement_keeps_what_the_host_cannot_hold_on_the_device(bench, tiny_config, monkeypatch):
    """The default (--keep-on-gpu auto): room for two of the three layer inputs parks two, whole,
    and keeps the last on the device; the row says so."""
    from velotune.models import offload

    room = 2 * 48 * 64 * 4 + 100            # two float32 inputs of the tiny model at 48 tokens
    monkeypatch.setattr(offload, "host_memory_bytes", lambda: (2**40, offload.HOST_RESERVE_BYTES + room))
    args = bench.parse_args(["--config", tiny_config, "--device", "cpu", "--dtype", "float32",
                             "--mlp-chunk", "16", "--seq", "48", "--no-record"])
    (row,) = bench.run(args)
    assert row["outcome"] == "ok" and row["placement"] == "2 host (1 piece) + 1 GPU"
    assert row["host_offloaded_gib"] == pytest.approx(2 * 48 * 64 * 4 / 2**30)


def test_a_probe_stops_the_backward_after_the_last_layers(bench, tiny_config):
    """--probe-layers 1: the backward ends once the last layer has run its own: its adapters have
    gradients, the first layer's none, and no optimizer step is taken."""
    args = bench.parse_args(["--config", tiny_config, "--device", "cpu", "--dtype", "float32",
                             "--mlp-chunk", "16", "--seq", "40", "--no-record"])
    config = bench.model_config(args)
    model, optimizer = bench.build(config, torch.device("cpu"), torch.float32, args)
    seen, stepped = {}, []
    clear = optimizer.zero_grad

    def zero_grad(set_to_none=True):
        seen.update({n: p.grad is not None for n, p in model.named_parameters() if p.requires_grad})
        clear(set_to_none=set_to_none)
    optimizer.zero_grad, optimizer.step = zero_grad, lambda: stepped.append(True)
    bench.step(model, optimizer, 40, torch.device("cpu"), amp=False, probe_layers=1)
    assert not stepped
    last = [n for n in seen if n.startswith("model.layers.2.")]
    assert last and all(seen[n] for n in last)
    assert not any(seen[n] for n in seen if n.startswith("model.layers.0."))
    bench.step(model, optimizer, 40, torch.device("cpu"), amp=False)          # hooks gone: a whole step
    assert stepped and all(seen.values())


@pytest.mark.gpu
def test_bench_runs_on_the_gpu_with_a_tiny_config(bench, tiny_config):
    """The CUDA path of the benchmark (pinned copies on the side stream, NF4 + LoRA under bf16
    autocast, tiled MLP) on a tiny model, before the 8B run."""
    args = bench.parse_args(["--config", tiny_config, "--device", "cuda", "--mlp-chunk", "256",
                             "--seq", "1024", "8192", "--no-record"])
    rows = bench.run(args)
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert all(r["alloc_gib"] is not None and r["alloc_gib"] > 0 for r in rows)
    # the placement plan keeps attention outputs (and their log-sum-exp, float32 per head) beside
    # each whole parked input rather than parking pieces (models/kept_attention.py)
    assert "keep attention" in rows[1]["placement"]
    per_token = (64 + 64) * 2 + 4 * 4
    assert rows[1]["host_offloaded_gib"] == pytest.approx(3 * per_token * 8192 / 2**30)


def test_the_unsloth_comparison_row_gives_the_speed_ratio(bench, tmp_path):
    """--vs-unsloth's row: Unsloth's seconds over velotune's, and a dash where either did not run."""
    results = tmp_path / "RESULTS.md"
    args = bench.parse_args(["--results", str(results), "--seq", "262144", "300000"])
    rows = [dict(seq=262144, seconds=180.0, outcome="ok", alloc_gib=36.0, placement="32 host (1 piece) + 0 GPU"),
            dict(seq=300000, seconds=None, outcome="GPU OOM (x)", alloc_gib=None, placement=None)]
    peers = {262144: {"seconds": 270.0, "peak_gib": 40.0, "outcome": "ok"}, 300000: {"outcome": "GPU OOM (y)"}}
    bench.record_vs_unsloth(rows, peers, args)
    text = results.read_text()
    assert "## Long-context training vs Unsloth" in text
    assert "| 262,144 | 180.0 | 270.0 | 1.50x | 36.0 | 40.0 | 32 host (1 piece) + 0 GPU | ok |" in text
    assert "| 300,000 | - | - | - | - | - | - | GPU OOM (y) |" in text
