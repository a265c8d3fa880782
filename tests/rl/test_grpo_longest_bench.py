"""benchmarks/bench_grpo_longest.py (the search and its rows) and grpo_peer.py (one trial) on the CPU:
doubling then bisection with a fake trial, the budget and error stops, the failure reasons kept,
the rows and the velotune/Unsloth ratio, the peer command lines, and velotune's trial process on a
tiny Qwen3-shaped config (the code path of the H100 run). Unsloth imports only with a GPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_grpo_longest as bench  # noqa: E402
import common  # noqa: E402
import grpo_peer  # noqa: E402

TINY_QWEN3 = dict(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)


def fake(limit: int, seconds_per_token: float = 0.0, clock: list[float] | None = None, error_at: int | None = None,
         wall: bool = False):
    """A trial that trains up to `limit` tokens, runs out of GPU memory above, and spends simulated time."""
    asked = []

    def trial(new: int, seconds_left: float) -> dict:
        asked.append(new)
        if seconds_left < 30:
            return {"system": "x", "outcome": "skipped: the call's time budget ran out"}
        cost = seconds_per_token * new
        if clock is not None:
            if cost > seconds_left:
                clock[0] += seconds_left
                return {"system": "x", "outcome": f"timed out after {seconds_left:.0f} s"}
            clock[0] += cost
        if new == error_at:
            return {"system": "x", "outcome": "exit 1: ImportError: no module named vllm"}
        if new > limit:
            return {"system": "x", "outcome": "GPU OOM (CUDA out of memory. Tried to allocate 2.00 GiB)"}
        return {"system": "x", "outcome": "ok", "seconds": cost, "peak_gib": new / 1000, "version": "sys 1.0",
                **({"wall_s": cost} if wall else {})}
    return trial, asked


def test_doubling_then_bisection_finds_the_limit_to_the_grain():
    trial, asked = fake(limit=5000)
    found = bench.search("velotune", trial, 1024, 512, deadline=1e9, clock=lambda: 0.0)
    assert asked == [1024, 2048, 4096, 8192, 6144, 5120, 4608]
    assert found.longest_ok()["new"] == 4608
    assert found.first_failed()["new"] == 5120 and found.first_failed()["outcome"].startswith("GPU OOM")
    assert found.ended == "limit within 512"


def test_a_limit_below_the_start_bisects_down_and_says_nothing_fits():
    trial, asked = fake(limit=700)
    found = bench.search("unsloth", trial, 1024, 512, deadline=1e9, clock=lambda: 0.0)
    assert asked == [1024, 512]
    assert found.longest_ok()["new"] == 512 and found.ended == "limit within 512"
    trial, asked = fake(limit=100)
    found = bench.search("unsloth", trial, 1024, 512, deadline=1e9, clock=lambda: 0.0)
    assert asked == [1024, 512] and found.longest_ok() is None
    assert found.ended == "N=512 does not fit and 512 is the grain"
    with pytest.raises(ValueError, match="multiple of --grain"):
        bench.search("unsloth", trial, 1000, 512, deadline=1e9)


def test_the_budget_ends_the_search_with_the_trial_that_outlived_it():
    clock = [0.0]
    trial, asked = fake(limit=10**6, seconds_per_token=0.05, clock=clock)
    found = bench.search("velotune", trial, 1024, 512, deadline=500.0, clock=lambda: clock[0])
    # 1024 (51 s), 2048 (102 s), 4096 (205 s) train; 8192 would need 410 s of the 142 left
    assert asked == [1024, 2048, 4096, 8192]
    assert found.longest_ok()["new"] == 4096 and found.first_failed() is None
    assert found.ended.startswith("timed out after 142 s at N=8,192")
    clock = [0.0]
    trial, asked = fake(limit=10**6, seconds_per_token=0.01, clock=clock)
    found = bench.search("velotune", trial, 1024, 512, deadline=100.0, clock=lambda: clock[0])
    assert asked == [1024, 2048, 4096, 8192] and found.ended.startswith("skipped")  # 10+20+41 s, 29 s left


def test_a_trial_predicted_to_outlast_the_time_left_is_not_started():
    clock = [0.0]
    # the first trials report their wall time: 4096's 205 s predicts 410 s for 8192, with 142 s left
    trial, asked = fake(limit=10**6, seconds_per_token=0.05, clock=clock, wall=True)
    found = bench.search("velotune", trial, 1024, 512, deadline=500.0, clock=lambda: clock[0])
    assert asked == [1024, 2048, 4096] and clock[0] == pytest.approx(358.4)
    assert found.ended == "N=8,192 not started: predicted over 410 s, 142 s left"



def test_an_error_that_is_not_memory_ends_the_search_without_bounding_it():
    trial, asked = fake(limit=10**6, error_at=2048)
    found = bench.search("unsloth", trial, 1024, 512, deadline=1e9, clock=lambda: 0.0)
    assert asked == [1024, 2048] and found.first_failed() is None
    assert found.ended == "exit 1: ImportError: no module named vllm at N=2,048"
    assert bench.memory_failure("host memory OOM (offloaded inputs need 90 GiB)")
    assert not bench.memory_failure("timed out after 200 s")


def test_rows_give_each_systems_limit_its_failure_and_the_ratio():
    ours, _ = fake(limit=9000)
    theirs, _ = fake(limit=3000)
    searches = {"unsloth": bench.search("unsloth", theirs, 1024, 512, 1e9, lambda: 0.0),
                "velotune": bench.search("velotune", ours, 1024, 512, 1e9, lambda: 0.0)}
    rows = bench.rows(searches, "Qwen3-8B arch", "2026-12-07", "H100")
    assert all(len(r) == len(bench.COLUMNS) for r in rows)
    assert rows[0][3:8] == ["sys 1.0", "2,560", "0 / 2.6", "3,072: GPU OOM (CUDA out of memory. Tried to allocate "
                            "2.00 GiB)", "limit within 512"]
    assert rows[0][8] == "1,024 ok; 2,048 ok; 4,096 GPU OOM; 3,072 GPU OOM; 2,560 ok" and rows[0][9] == "-"
    assert rows[1][4] == "8,704" and rows[1][9] == "3.40x"
    clock = [0.0]
    slow, _ = fake(limit=10**6, seconds_per_token=0.05, clock=clock)   # Unsloth stopped by the time at 4,096
    searches["unsloth"] = bench.search("unsloth", slow, 1024, 512, 500.0, lambda: clock[0])
    assert not searches["unsloth"].limit_found() and searches["velotune"].limit_found()
    assert bench.rows(searches, "c", "d", "x")[1][9] == "<= 2.12x (Unsloth's limit not reached)"
    assert bench.ratio_text(2.0, False, True) == ">= 2.00x (velotune's limit not reached)"
    assert bench.ratio_text(2.0, False, False) == "2.00x (neither limit reached)"
    stuck, _ = fake(limit=10**6, error_at=1024)
    searches["unsloth"] = bench.search("unsloth", stuck, 1024, 512, 1e9, lambda: 0.0)
    rows = bench.rows(searches, "c", "d", "x")
    assert rows[0][3:7] == ["unsloth", "none", "-", "none"] and rows[1][9] == "n/a"


def test_peer_commands_parse_and_give_unsloth_the_folder_and_velotune_the_config(tmp_path):
    args = bench.parser().parse_args(["--prompt", "64", "--micro-batch", "2", "--config", "Qwen3-8B",
                                      "--generation-batch", "2"])
    theirs = grpo_peer.parse(bench.peer_command("unsloth", 4096, args, tmp_path)[2:])
    ours = grpo_peer.parse(bench.peer_command("velotune", 4096, args, None)[2:])
    for peer, system in ((theirs, "unsloth"), (ours, "velotune")):
        assert (peer.system, peer.new, peer.group, peer.prompt, peer.micro_batch, peer.device) == \
            (system, 4096, 8, 64, 2, "cuda")
    assert theirs.model == tmp_path and ours.model is None and ours.config == "Qwen3-8B"
    assert (theirs.generation_batch, ours.generation_batch) == (0, 2)  # TRL decodes the whole group
    with pytest.raises(SystemExit):
        grpo_peer.parse(["--system", "unsloth", "--new", "8", "--model", str(tmp_path), "--generation-batch", "2"])
    with pytest.raises(SystemExit):
        grpo_peer.parse(["--system", "unsloth", "--new", "8", "--device", "cpu", "--model", str(tmp_path)])
    with pytest.raises(SystemExit):
        grpo_peer.parse(["--system", "velotune", "--new", "8", "--group", "8", "--micro-batch", "3"])


def test_the_real_run_needs_a_tokenizer_and_unsloth_a_gpu_before_anything_is_written(tmp_path):
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="tokenizer.json"):
        bench.unsloth_folder(bench.parser().parse_args(["--tokenizer", str(tmp_path / "none"),
                                                        "--workdir", str(work)]))
    assert not work.exists()
    with pytest.raises(SystemExit, match="CUDA GPU"):
        bench.main(["--device", "cpu", "--results", str(tmp_path / "R.md")])
    assert not (tmp_path / "R.md").exists()


def test_suppressed_ids_are_every_id_trl_ends_a_completion_at():
    class Tok:
        eos_token_id, pad_token_id = 2, 2

    class Model:
        class generation_config:
            eos_token_id = [151645, 151643]

        class config:
            eos_token_id = 151645
    assert grpo_peer.suppressed_ids(Tok(), Model()) == [2, 151643, 151645]
    assert grpo_peer.distinct_ids(["p"] * 2, ["", ""], [[5, 5, 6], [7, 8, 9]]) == [2.0, 3.0]


def test_velotune_trial_process_trains_a_tiny_qwen3_on_the_cpu(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_QWEN3))
    args = bench.parser().parse_args(["--systems", "velotune", "--device", "cpu", "--config", str(config),
                                      "--group", "4", "--prompt", "9", "--micro-batch", "2", "--generation-batch", "2"])
    r = common.run_peer(bench.peer_command("velotune", 16, args, None), "GRPO", "velotune", 300)
    assert r["outcome"] == "ok", r
    assert (r["system"], r["new"], r["min_length"], r["prompt_tokens"]) == ("velotune", 16, 16, 9)
    assert r["seconds"] > 0 and r["peak_gib"] is None and r["version"].startswith("velotune ")
    bad = common.run_peer(bench.peer_command("velotune", 16, args, None)[:-1] + ["--config=nope.json"], "GRPO",
                          "velotune", 300)
    assert bad["outcome"].startswith("FileNotFoundError")


def test_the_smoke_call_searches_velotune_on_the_cpu_and_appends_its_row(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_QWEN3))
    results = tmp_path / "RESULTS.md"
    searches = bench.main(["--systems", "velotune", "--device", "cpu", "--config", str(config), "--group", "2",
                           "--prompt", "5", "--micro-batch", "2", "--start", "8", "--grain", "8",
                           "--budget-s", "45", "--results", str(results)])
    found = searches["velotune"]
    assert found.trials[0] == {**found.trials[0], "new": 8, "outcome": "ok"}
    assert found.trials[0]["wall_s"] > found.trials[0]["seconds"] > 0
    # no memory limit on the CPU: the time ends it (a trial predicted too long, skipped or timed out)
    assert "not started: predicted over" in found.ended or found.ended.startswith(("skipped", "timed out"))
    text = results.read_text()
    assert bench.SECTION in text and "config arch, random weights" in text and "| velotune " in text


def test_both_systems_weigh_the_kl_term_alike():
    from velotune.train import TrainConfig

    assert grpo_peer.GRPO_BETA == TrainConfig.grpo_beta
