"""benchmarks/bench_moe_peers.py (the call) and moe_peer.py (one system) on the CPU: the cut
configs, the random folder, the rows and their ratios, velotune's and transformers + PEFT's steps
on the same tiny folder (same adapters, same loss), the peers' expert module against velotune's
kernel, and the whole call without Unsloth. Unsloth imports only with a GPU: its step and
kernel, and the GPU paths of the other two, are the gpu-marked tests at the end."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_moe_peers as call  # noqa: E402
import common  # noqa: E402
import moe_peer  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / ".bench" / "tokenizer"


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """Each architecture at toy widths, 2 layers, written as the benchmark writes it."""
    root = tmp_path_factory.mktemp("moe_peer")
    out = {}
    for key, (_, full) in call.models().items():
        cfg = call.truncated(full, 2, tiny=True)
        out[key] = call.write_folder(cfg, call.folder_for(cfg, root), None, "cpu")
    return out


def test_truncated_keeps_every_other_field_and_gpt_oss_layer_pattern():
    table = call.models()
    name, qwen = table["qwen"]
    cut = call.truncated(qwen, 8)
    assert cut["num_hidden_layers"] == 8 and {k: v for k, v in cut.items() if k != "num_hidden_layers"} == \
        {k: v for k, v in qwen.items() if k != "num_hidden_layers"}
    assert call.label(name, cut, qwen) == "Qwen3-30B-A3B (8 of 48 layers)"
    assert call.truncated(qwen, 0) == qwen and call.label(name, qwen, qwen) == "Qwen3-30B-A3B"
    with pytest.raises(SystemExit, match="1..48"):
        call.truncated(qwen, 49)
    name, oss = table["gptoss"]
    cut = call.truncated(oss, 5)
    assert cut["layer_types"] == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    assert common.transformers_config(cut).layer_types == cut["layer_types"]
    toy = call.truncated(oss, 3, tiny=True)
    assert toy["hidden_size"] == 64 and toy["num_local_experts"] == 8 and "num_experts" not in toy
    assert call.label(name, toy, oss) == "gpt-oss-20b at toy widths (3 of 24 layers)"


def test_folder_sizes_are_the_published_models():
    table = call.models()
    assert 30.4e9 < call.bf16_bytes(table["qwen"][1]) / 2 < 30.6e9     # Qwen3-30B-A3B: 30.5B parameters
    assert 20.8e9 < call.bf16_bytes(table["gptoss"][1]) / 2 < 21.0e9   # gpt-oss-20b: 20.9B
    cut = call.bf16_bytes(call.truncated(table["qwen"][1], 8))
    assert 11e9 < cut < 11.5e9


def test_write_folder_reuses_a_complete_one_and_checks_the_disk(tmp_path, monkeypatch):
    import shutil

    _, full = call.models()["qwen"]
    cfg = call.truncated(full, 1, tiny=True)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    folder = call.write_folder(cfg, tmp_path / "q", tok, "cpu")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1 and saved.get("num_experts", saved.get("num_local_experts")) == 8 and (folder / "tokenizer.json").exists()
    assert not folder.with_name("q.partial").exists()
    stamp = (folder / "config.json").stat().st_mtime_ns
    call.write_folder(cfg, tmp_path / "q", tok, "cpu")
    assert (folder / "config.json").stat().st_mtime_ns == stamp
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SystemExit, match="GB is free"):
        call.write_folder(call.truncated(full, 2, tiny=True), tmp_path / "other", None, "cpu")


def test_rows_carry_the_ratios_to_unsloth_and_every_failure():
    results = {"unsloth": dict(outcome="ok", tokens_per_s=1000.0, peak_gib=10.0, expert_gib=2.0, trainable=3_370_000,
                               note="MoE backend grouped_mm"),
               "velotune": dict(outcome="ok", tokens_per_s=1600.0, peak_gib=8.0, expert_gib=1.9, trainable=3_370_000),
               "hf": dict(outcome="GPU OOM (tried to allocate)")}
    rows = call.format_rows(results, "Qwen3-30B-A3B (8 of 48 layers)", "2026-12-07", "H100")
    assert [r[3] for r in rows] == ["unsloth", "velotune", "hf"]
    assert all(len(r) == len(call.COLUMNS) for r in rows)
    assert rows[0][5:] == ["1000", "10.00", "2.00", "3.37M", "1.00x", "1.00x", "ok; MoE backend grouped_mm"]
    assert rows[1][5:] == ["1600", "8.00", "1.90", "3.37M", "1.60x", "0.80x", "ok"]
    assert rows[2][5:] == ["-", "-", "-", "-", "n/a", "n/a", "GPU OOM (tried to allocate)"]
    alone = call.format_rows({"velotune": results["velotune"]}, "m", "d", "x")
    assert alone[0][9:11] == ["n/a", "n/a"]


def test_velotune_and_hf_train_the_same_adapters_on_the_same_folder(tiny_folders):
    torch.manual_seed(0)
    ours = moe_peer.measure("velotune", tiny_folders["qwen"], seq=24, steps=1, device="cpu")
    peer = moe_peer.measure("hf", tiny_folders["qwen"], seq=24, steps=1, device="cpu")
    assert ours["outcome"] == "ok" and peer["outcome"] == "ok", (ours, peer)
    assert ours["trainable"] == peer["trainable"]                # r16 on q/k/v/o and on every expert
    assert abs(ours["loss"] - peer["loss"]) < 0.05                 # same weights (hf in bf16 autocast)
    assert ours["tokens_per_s"] > 0 and peer["note"] == "experts grouped_mm"
    assert 0 < ours["expert_gib"] < peer["expert_gib"] / 3         # NF4 stacks against transformers' 16/32-bit ones


def test_gpt_oss_step_runs_on_the_cpu(tiny_folders):
    r = moe_peer.measure("velotune", tiny_folders["gptoss"], seq=24, steps=1, device="cpu")
    assert r["outcome"] == "ok" and r["loss"] == r["loss"] and r["trainable"] > 0


def test_failures_become_outcomes_not_crashes(tmp_path):
    r = moe_peer.measure("velotune", tmp_path / "missing", seq=8, steps=1, device="cpu")
    assert r["outcome"] != "ok" and "missing" in r["outcome"]
    through = call.run_system("velotune", tmp_path / "missing", 8, 1, "cpu", 300)     # its own process
    assert through["outcome"] == r["outcome"]
    assert call.run_system("velotune", tmp_path, 8, 1, "cpu", 20)["outcome"].startswith("skipped")


def test_transformers_experts_module_matches_velotunes_kernel():
    r = moe_peer.kernel_step("hf", "cpu", dict(tokens=40, hidden=32, inter=16, experts=5, k=2))
    assert r["outcome"] == "ok" and r["rel_diff"] < 1e-5, r
    assert call.kernel_name(r) == "transformers 5 experts (grouped_mm)"


def test_the_call_on_the_cpu_appends_a_row_per_model_and_system(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(BENCH / "bench_moe_peers.py"), "run", "--tiny", "--layers", "1",
                           "--device", "cpu", "--systems", "hf", "velotune", "--seq", "16", "--steps", "1",
                           "--workdir", str(tmp_path / "w"), "--tokenizer", "none", "--results", str(results)],
                          capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    text = results.read_text()
    assert text.count("## MoE QLoRA training vs Unsloth, same call (micro-batch 1 x 16") == 1
    rows = [line.split(" | ") for line in text.splitlines() if " | velotune | " in line or " | hf | " in line]
    assert [(r[2], r[3]) for r in rows] == [("Qwen3-30B-A3B at toy widths (1 of 48 layers)", "velotune"),
                                            ("Qwen3-30B-A3B at toy widths (1 of 48 layers)", "hf"),
                                            ("gpt-oss-20b at toy widths (1 of 24 layers)", "velotune"),
                                            ("gpt-oss-20b at toy widths (1 of 24 layers)", "hf")]
    assert all(r[-3:] == ["n/a", "n/a", r[-1]] and r[-1].startswith("ok") for r in rows)
    assert rows[0][8] == rows[1][8] == "0.04M"                       # the same adapters on both systems


def test_unsloth_needs_the_tokenizer_before_anything_is_written(tmp_path):
    with pytest.raises(SystemExit, match="tokenizer"):
        call.main(["run", "--tokenizer", "none", "--workdir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
def test_velotune_and_hf_steps_and_the_transformers_kernel_on_the_gpu(tiny_folders):
    """The GPU paths the call takes, at toy widths (bf16, peak memory read) and, for the kernel,
    at the benchmark's sizes."""
    for key in ("qwen", "gptoss"):
        for system in ("velotune", "hf"):
            r = moe_peer.measure(system, tiny_folders[key], seq=64, steps=1, device="cuda")
            assert r["outcome"] == "ok" and r["peak_gib"] > 0 and r["tokens_per_s"] > 0, (key, r)
    kernel = moe_peer.kernel_step("hf")
    assert kernel["outcome"] == "ok" and kernel["rel_diff"] < 2e-2 and kernel["ms"] > 0, kernel


UNSLOTH = pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs the Unsloth wheels")


@pytest.mark.gpu
@UNSLOTH
def test_unsloth_kernel_and_step_run_at_a_small_size(tmp_path):
    """Unsloth's patched expert forward agrees with velotune's kernel at the benchmark's sizes, and
    its step trains a 2-layer Qwen3-MoE at toy widths (the folder with SmolLM2's tokenizer)."""
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("needs .bench/tokenizer (bench_e2e.py prepare)")
    env = {**__import__("os").environ, **common.PEER_ENV}
    done = subprocess.run([sys.executable, str(BENCH / "moe_peer.py"), "kernel", "--system=unsloth"],
                          capture_output=True, text=True, env=env, timeout=400)
    kernel = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("KERNEL "))[7:])
    assert kernel["outcome"] == "ok" and kernel["rel_diff"] < 2e-2, kernel
    _, full = call.models()["qwen"]
    folder = call.write_folder(call.truncated(full, 2, tiny=True), tmp_path / "q", TOKENIZER, "cuda")
    r = call.run_system("unsloth", folder, 64, 1, "cuda", 400)
    assert r["outcome"] == "ok" and r["trainable"] > 0, r
