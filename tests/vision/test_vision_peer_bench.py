"""`benchmarks/bench_vision.py --vs-unsloth` and vision_peer.py on the CPU, on the tiny Qwen2.5-VL
of the smoke run: the folder opens offline (transformers' tokenizer and image processor, velotune's
loader), each process builds the parent's batch (digests), velotune and transformers + PEFT train
the same adapters in their own processes, the rows and their ratios, and a failing peer's message.
Unsloth imports only with a GPU: its run on the tiny folder, and transformers' whole AutoProcessor
(it needs torchvision, which the device has), are the gpu-marked tests at the end."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_vision  # noqa: E402
import vision_inputs  # noqa: E402

transformers = pytest.importorskip("transformers")
TINY = bench_vision.SMOKE_QWEN
SIDE, SEQ = 112, 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return vision_inputs.write_folder(TINY, tmp_path_factory.mktemp("vision_peer") / "tiny", "cpu")


def peer_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"batch": [1, 2], "seq": SEQ, "steps": 1, "image_side": SIDE, **kw})


def test_folder_opens_offline_as_the_processor_reads_it(folder, monkeypatch):
    from PIL import Image

    import velotune

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == TINY["text_config"]["vocab_size"]
    assert [tokenizer.convert_tokens_to_ids(t) for t in vision_inputs.SPECIALS["qwen2_5_vl"]] == [294, 295, 298, 299,
                                                                                                  296, 297]
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tokenizer("ab<|image_pad|>").input_ids[-1] == TINY["image_token_id"]
    images = transformers.AutoImageProcessor.from_pretrained(folder)
    got = images(images=[Image.new("RGB", (SIDE, SIDE), (200, 30, 90))], return_tensors="pt")
    ours = vision_inputs.batch(TINY, 1, SEQ, "cpu", SIDE)
    assert got["pixel_values"].shape == ours["pixel_values"].shape
    assert torch.equal(got["image_grid_thw"], ours["image_grid_thw"])
    merge = images.merge_size ** 2
    assert int(got["image_grid_thw"].prod()) // merge == int((ours["input_ids"] == TINY["image_token_id"]).sum())
    model, tok = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    assert tok.image_processor is not None and model.config.image_token_id == TINY["image_token_id"]


def test_real_config_tokenizer_keeps_qwen_ids(tmp_path):
    vision_inputs.write_tokenizer(bench_vision.QWEN25_VL_7B, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 151657 <= bench_vision.QWEN25_VL_7B["text_config"]["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>"]) == \
        [151643, 151645, 151655, 151656]
    bad = {**TINY, "image_token_id": 7}
    with pytest.raises(SystemExit, match="above 255"):
        vision_inputs.write_tokenizer(bad, tmp_path / "bad")


def test_write_folder_keeps_a_complete_one_and_rewrites_another_config(folder):
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert vision_inputs.write_folder(TINY, folder, "cpu") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = {**TINY, "text_config": {**TINY["text_config"], "num_hidden_layers": 1}}
    vision_inputs.write_folder(other, folder, "cpu")
    assert json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    vision_inputs.write_folder(TINY, folder, "cpu")     # back, for the other tests
    assert not folder.with_name("tiny.partial").exists()


def test_peers_build_the_parents_batch_and_train_the_same_adapters(folder):
    want = {rows: vision_inputs.digest(vision_inputs.batch(TINY, rows, SEQ, "cpu", SIDE)) for rows in (1, 2)}
    assert want[1] != want[2]
    results = {system: bench_vision.run_peer(system, folder, peer_args(), "cpu", 300) for system in ("velotune", "hf")}
    for result in results.values():
        assert [r["digest"] for r in result["runs"]] == [want[1], want[2]], result
        assert all(r["outcome"] == "ok" and 5.0 < r["loss"] < 6.5 for r in result["runs"])   # ln(300) = 5.7
    assert results["velotune"]["trainable"] == results["hf"]["trainable"] > 0
    assert results["velotune"]["optimizer"] == "AdamW (torch)"
    rows = bench_vision.peer_rows(results, 2, want[2], "tiny", SEQ, "day", "cpu", "peft 1")
    assert [r[4] for r in rows] == ["velotune", "transformers+PEFT"] and all(r[13] == "ok" for r in rows)
    assert rows[0][12].endswith("x") and rows[1][12] == "-"
    stale = bench_vision.peer_rows(results, 2, "0" * 16, "tiny", SEQ, "day", "cpu", "")
    assert all(r[13].startswith("ran on another batch") and r[6] == "-" for r in stale)


def test_rows_ratios_and_failures():
    def result(seconds: float, peak: float, **kw) -> dict:
        return {"optimizer": "o", "trainable": 1000, "runs": [{"batch": 4, "digest": "d", "outcome": "ok",
                                                              "seconds": seconds, "peak_gib": peak}], **kw}

    results = {"unsloth": result(2.0, 20.0), "velotune": result(1.0, 15.0),
               "hf": {"runs": [{"batch": 4, "digest": "d", "outcome": "GPU OOM (x)"}]}}
    rows = {r[4]: r for r in bench_vision.peer_rows(results, 4, "d", "m", 2048, "day", "H100", "unsloth 1")}
    assert rows["velotune"][6:13] == ["8,192", "1000", "15.00", "1,000", "2.00x", "0.75x", "-"]
    assert rows["Unsloth"][10:13] == ["-", "-", "-"]
    assert rows["transformers+PEFT"][6] == "-" and rows["transformers+PEFT"][13] == "GPU OOM (x)"
    skipped = bench_vision.peer_rows({"unsloth": {"outcome": "skipped: the time budget ran out"}}, 4, "d", "m", 2048,
                                     "day", "H100", "")
    assert skipped[0][13] == "skipped: the time budget ran out" and len(skipped[0]) == len(bench_vision.PEER_COLUMNS)


def test_a_failing_peer_is_reported_with_its_error(tmp_path, capsys):
    got = bench_vision.run_peer("velotune", tmp_path, peer_args(), "cpu", 300)
    assert got == {"outcome": f"exit 1: {tmp_path}: not a folder bench_vision.py wrote (no velotune_bench.json)"}
    assert "velotune failed (exit 1)" in capsys.readouterr().out
    assert bench_vision.run_peer("velotune", tmp_path, peer_args(), "cpu", 0.01) == {"outcome": "timed out after 0 s"}


def test_vs_unsloth_names_the_families_it_can_write():
    done = subprocess.run([sys.executable, str(BENCH / "bench_vision.py"), "--vs-unsloth", "--model", "gemma-3-4b"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "gemma-3-4b has no offline tokenizer and processor files" in done.stderr


@pytest.mark.gpu
def test_transformers_processor_opens_the_folder(folder, monkeypatch):
    pytest.importorskip("torchvision")       # Qwen 2's video processor needs it (the device has it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert processor.image_token_id == TINY["image_token_id"]


@pytest.mark.gpu
def test_unsloth_trains_the_tiny_folder_on_the_parents_batch(folder):
    if not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None:
        pytest.skip("needs a CUDA GPU and Unsloth (carry its wheels in .whl)")
    want = vision_inputs.digest(vision_inputs.batch(TINY, 2, SEQ, "cpu", SIDE))
    results = {s: bench_vision.run_peer(s, folder, peer_args(batch=[2]), "cuda", 400) for s in ("unsloth", "velotune")}
    for system, result in results.items():
        run, why = bench_vision.batch_run(result, 2, want)
        assert why == "ok" and 5.0 < run["loss"] < 6.5, (system, result)
    assert results["unsloth"]["trainable"] == results["velotune"]["trainable"]
    assert results["unsloth"]["optimizer"] == "AdamW8bit (bitsandbytes)"
