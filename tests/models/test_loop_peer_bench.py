"""benchmarks/bench_train.py --vs-unsloth (the call) and loop_peer.py (one system) on the CPU: the
rows and their ratios, the peer command lines and argument checks, a peer's JSON line and the
outcome when it prints none, velotune's side of the loop on a toy folder (in process and through
the whole smoke call). Unsloth imports only with a GPU: its side is the gpu-marked test at the end."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_train  # noqa: E402
import common  # noqa: E402
import loop_peer  # noqa: E402

UNSLOTH_OK = dict(outcome="ok", tok_s=10_000.0, ms=819.0, alloc=16.0, version="Unsloth 2026.10.9",
                  setup="FastLanguageModel bf16", optimizer=loop_peer.OPTIMIZERS["unsloth"])
VELOTUNE_OK = dict(outcome="ok", tok_s=12_500.0, ms=655.0, alloc=15.8, version="velotune 0.1.0",
                   setup="eager", optimizer=loop_peer.OPTIMIZERS["velotune"])


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    cfg = {**bench_train.hf_config("Llama-3.1-8B"), **bench_train.TOY}
    return common.write_folder(cfg, tmp_path_factory.mktemp("loop") / "toy", None, "cpu")


def test_rows_carry_the_ratios_to_unsloth_and_every_failure():
    rows = bench_train.loop_rows({"unsloth": UNSLOTH_OK, "velotune": VELOTUNE_OK}, "8B LoRA mb4", "2026-12-07", "H100")
    assert all(len(r) == len(bench_train.LOOP_COLUMNS) for r in rows)
    assert rows[0][3:] == ["Unsloth 2026.10.9", "FastLanguageModel bf16", "bitsandbytes AdamW 8-bit (adamw_8bit)",
                           "10,000", "819", "16.00", "-", "-", "ok"]
    assert rows[1][3:] == ["velotune 0.1.0", "eager", "torch AdamW, fused (adamw)", "12,500", "655", "15.80",
                           "1.25x", "0.988x", "ok"]
    failed = {"system": "unsloth", "outcome": "exit 1: ImportError: no GPU"}
    rows = bench_train.loop_rows({"unsloth": failed, "velotune": VELOTUNE_OK}, "c", "d", "x")
    assert rows[0][3:] == ["unsloth", "-", "-", "-", "-", "-", "-", "-", "exit 1: ImportError: no GPU"]
    assert rows[1][9:] == ["n/a", "n/a", "ok"]
    oom = {**VELOTUNE_OK, "outcome": "GPU OOM in the loop"}
    assert bench_train.loop_rows({"unsloth": UNSLOTH_OK, "velotune": oom}, "c", "d", "x")[1][6:] == \
        ["-", "-", "-", "n/a", "n/a", "GPU OOM in the loop"]


def test_peer_commands_give_velotunes_memory_options_to_velotune_only(tmp_path):
    args = bench_train.parser().parse_args(["--vs-unsloth", "--qlora", "--batch", "4", "--seq", "512", "--steps", "2",
                                            "--checkpointing", "auto", "--offload", "--no-offload-embeddings"])
    theirs = loop_peer.parse(bench_train.peer_command("unsloth", tmp_path, 4, args, "cuda")[2:])
    ours = loop_peer.parse(bench_train.peer_command("velotune", tmp_path, 4, args, "cuda")[2:])
    for peer, system in ((theirs, "unsloth"), (ours, "velotune")):
        assert (peer.system, peer.model, peer.batch, peer.seq, peer.steps, peer.qlora, peer.device) == \
            (system, tmp_path, 4, 512, 2, True, "cuda")
    assert (theirs.checkpointing, theirs.offload, theirs.no_offload_embeddings) == ("on", False, False)
    assert (ours.checkpointing, ours.offload, ours.no_offload_embeddings) == ("auto", True, True)


def test_smoke_needs_vs_unsloth_and_the_real_run_a_tokenizer_before_anything_is_written(tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        bench_train.main(["--smoke"])
    monkeypatch.setattr(bench_train, "TOKENIZER", tmp_path / "no-tokenizer")
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="tokenizer.json"):
        bench_train.main(["--vs-unsloth", "--workdir", str(work)])
    assert not work.exists()


def test_a_peers_json_line_is_read_and_a_silent_failure_explained(tmp_path, capsys):
    noisy = tmp_path / "noisy.py"
    noisy.write_text('print("Unsloth: patching"); print(\'LOOP {"system": "unsloth", "outcome": "ok", "tok_s": 5.0}\')')
    assert common.run_peer([sys.executable, str(noisy)], "LOOP", "unsloth", 60) == \
        {"system": "unsloth", "outcome": "ok", "tok_s": 5.0}
    crash = tmp_path / "crash.py"
    crash.write_text('import sys; print("partial"); sys.stderr.write("Traceback\\nRuntimeError: boom\\n"); sys.exit(3)')
    assert common.run_peer([sys.executable, str(crash)], "LOOP", "unsloth", 60) == \
        {"system": "unsloth", "outcome": "exit 3: RuntimeError: boom"}
    said = capsys.readouterr().out
    assert "unsloth printed no result (exit 3)" in said and "partial" in said and "Traceback" in said
    assert common.run_peer([sys.executable, str(crash)], "LOOP", "unsloth", 29)["outcome"].startswith("skipped")


def test_velotune_side_runs_the_loop_with_the_trainers_defaults(toy_folder):
    args = loop_peer.parse(["--system=velotune", f"--model={toy_folder}", "--batch=2", "--seq=24", "--steps=1",
                            "--device=cpu"])
    r = loop_peer.measure_system(toy_folder, args)
    assert r["outcome"] == "ok" and r["tok_s"] > 0 and r["ms"] > 0, r
    assert r["optimizer"] == "torch AdamW, fused (adamw)" and r["version"].startswith("velotune ")
    assert "float32 base" in r["setup"] and "offload_checkpoints auto: off" in r["setup"]
    assert "embeddings in device memory" in r["setup"]       # offload_embeddings auto: only on a GPU
    missing = loop_peer.measure_system(toy_folder.parent / "missing", args)
    assert missing["outcome"].startswith("FileNotFoundError") and "missing" in missing["outcome"]


def test_the_smoke_call_appends_a_row_per_system(tmp_path):
    results = tmp_path / "RESULTS.md"
    bench_train.main(["--vs-unsloth", "--smoke", "--model", "Llama-3.2-1B", "--batch", "2", "--seq", "16",
                      "--steps", "1", "--workdir", str(tmp_path / "w"), "--results", str(results)])
    text = results.read_text()
    assert text.count(f"## {bench_train.LOOP_SECTION}") == 1
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if "Llama-3.2-1B at toy widths LoRA r16 seq 16 micro-batch 2" in line]
    assert len(rows) == 2 and rows[1][3].startswith("velotune ") and rows[1][-3:] == ["n/a", "n/a", "ok"]
    assert float(rows[1][6].replace(",", "")) > 0
    if importlib.util.find_spec("unsloth") is None:       # here: the peer's own failure is the row's outcome
        assert rows[0][3] == "unsloth" and rows[0][-1] == "ModuleNotFoundError: No module named 'unsloth'"


@pytest.mark.gpu
def test_velotune_side_on_the_gpu(toy_folder):
    args = loop_peer.parse(["--system=velotune", f"--model={toy_folder}", "--batch=2", "--seq=64", "--steps=1"])
    r = loop_peer.measure_system(toy_folder, args)
    assert r["outcome"] == "ok" and r["alloc"] > 0 and "bfloat16 base" in r["setup"], r
    assert "input embeddings in host memory" in r["setup"]


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs the Unsloth wheels")
def test_unsloth_and_velotune_in_their_own_processes_on_one_toy_folder(tmp_path):
    """The call's GPU path at toy widths, with SmolLM2's tokenizer as on the device: both rows ok."""
    if not (bench_train.TOKENIZER / "tokenizer.json").exists():
        pytest.skip("needs .bench/tokenizer (bench_e2e.py prepare)")
    cfg = {**bench_train.hf_config("Llama-3.1-8B"), **bench_train.TOY}
    folder = common.write_folder(cfg, tmp_path / "toy", bench_train.TOKENIZER, "cuda")
    args = bench_train.parser().parse_args(["--vs-unsloth", "--batch", "2", "--seq", "64", "--steps", "1"])
    found = {s: common.run_peer(bench_train.peer_command(s, folder, 2, args, "cuda"), "LOOP", s, 400)
             for s in ("unsloth", "velotune")}
    assert all(r["outcome"] == "ok" and r["alloc"] > 0 for r in found.values()), found
    assert found["unsloth"]["version"].startswith("Unsloth 20")
    speed, memory = bench_train.loop_rows(found, "toy", "d", "x")[1][9:11]
    assert speed.endswith("x") and memory.endswith("x"), (speed, memory)
