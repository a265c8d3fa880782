"""`benchmarks/bench_vision.py --vs-unsloth` and vision_peer.py on the CPU, on the tiny Qwen2.5-VL
and Gemma 3 of the smoke runs: the folders open offline (transformers' tokenizer and processor,
velotune's loader) and the processor's output matches the batch's shapes, each process builds the
parent's batch (digests), velotune and transformers + PEFT train the same adapters in their own
processes, the rows and their ratios, and a failing peer's message. Unsloth imports only with a
GPU: its run on the tiny folders, and Qwen2.5-VL's whole AutoProcessor (it needs torchvision, which
the device has), are the gpu-marked tests at the end."""
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
from common import run_peer  # noqa: E402

transformers = pytest.importorskip("transformers")
TINY = bench_vision.SMOKE_QWEN
TINIES = {"qwen2_5_vl": TINY, "gemma3": bench_vision.SMOKE}
SIDE, SEQ = 112, 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_peer")
    return {family: vision_inputs.write_folder(cfg, root / family, "cpu") for family, cfg in TINIES.items()}


@pytest.fixture
def folder(folders):
    return folders["qwen2_5_vl"]


def peer_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"batch": [1, 2], "seq": SEQ, "steps": 1, "image_side": SIDE, **kw})


def peer(system: str, folder: Path, args: argparse.Namespace, device: str) -> dict:
    return run_peer(bench_vision.peer_command(system, folder, args, device), "VISION", system, 400)


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


def test_gemma3_folder_opens_offline_with_its_processor(folders, monkeypatch):
    from PIL import Image

    import velotune

    cfg = TINIES["gemma3"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = transformers.AutoProcessor.from_pretrained(folders["gemma3"])
    assert type(processor).__name__ == "Gemma3Processor" and processor.image_seq_length == cfg["mm_tokens_per_image"]
    got = processor(text=["ab <start_of_image> cd"], images=[Image.new("RGB", (50, 40), (9, 99, 199))],
                    return_tensors="pt")
    ours = vision_inputs.batch(cfg, 1, SEQ, "cpu", SIDE)
    assert got["pixel_values"].shape == ours["pixel_values"].shape
    assert int(got["token_type_ids"].sum()) == int(ours["token_type_ids"].sum()) == cfg["mm_tokens_per_image"]
    assert int((got["input_ids"] == cfg["image_token_index"]).sum()) == cfg["mm_tokens_per_image"]
    model, tok = velotune.load_model(folders["gemma3"], dtype=torch.float32, device="cpu")
    assert tok.image_processor is not None and model.config.image_token_id == cfg["image_token_index"]


@pytest.mark.parametrize("config, ids", [
    (bench_vision.QWEN25_VL_7B, {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|image_pad|>": 151655,
                                 "<|video_pad|>": 151656}),
    (bench_vision.GEMMA3_4B, {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_image>": 255999,
                              "<end_of_image>": 256000, "<image_soft_token>": 262144})])
def test_real_config_tokenizers_keep_the_published_ids(tmp_path, config, ids):
    vision_inputs.write_tokenizer(config, tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == max(ids.values()) + 1 <= config["text_config"]["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(list(ids)) == list(ids.values())
    assert tokenizer.decode(tokenizer("a b").input_ids) == "a b"


def test_tokenizer_ids_that_cannot_be_laid_out_fail_naming_them(tmp_path):
    small = {**TINY, "text_config": {"bos_token_id": 5, "eos_token_id": 6}, "image_token_id": 7, "video_token_id": 8,
             "vision_start_token_id": 9, "vision_end_token_id": 10}
    with pytest.raises(SystemExit, match=r"'<\|image_pad\|>': 7.* room below the highest for the 256 bytes"):
        vision_inputs.write_tokenizer(small, tmp_path)
    with pytest.raises(SystemExit, match=r"'<\|im_end\|>': None"):
        vision_inputs.write_tokenizer({**TINY, "text_config": {"bos_token_id": 294}}, tmp_path)
    with pytest.raises(SystemExit, match=r"'<\|video_pad\|>': 296.*distinct"):
        vision_inputs.write_tokenizer({**TINY, "video_token_id": TINY["image_token_id"]}, tmp_path)


def test_write_folder_keeps_a_complete_one_and_rewrites_another_config(folder):
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert vision_inputs.write_folder(TINY, folder, "cpu") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = {**TINY, "text_config": {**TINY["text_config"], "num_hidden_layers": 1}}
    vision_inputs.write_folder(other, folder, "cpu")
    assert json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"] == 1
    vision_inputs.write_folder(TINY, folder, "cpu")     # back, for the other tests
    assert not folder.with_name("tiny.partial").exists()


@pytest.mark.parametrize("family", sorted(TINIES))
def test_peers_build_the_parents_batch_and_train_the_same_adapters(folders, family):
    cfg = TINIES[family]
    want = {rows: vision_inputs.digest(vision_inputs.batch(cfg, rows, SEQ, "cpu", SIDE)) for rows in (1, 2)}
    assert want[1] != want[2]
    results = {s: peer(s, folders[family], peer_args(), "cpu") for s in ("velotune", "hf")}
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
    budget = "skipped: the call's time budget ran out"
    skipped = bench_vision.peer_rows({"unsloth": {"outcome": budget}}, 4, "d", "m", 2048, "day", "H100", "")
    assert skipped[0][13] == budget and len(skipped[0]) == len(bench_vision.PEER_COLUMNS)


def test_a_failing_peer_is_reported_with_its_error(tmp_path, capsys):
    got = peer("velotune", tmp_path, peer_args(), "cpu")
    assert got == {"system": "velotune",
                   "outcome": f"exit 1: {tmp_path}: not a folder bench_vision.py wrote (no velotune_bench.json)"}
    assert "velotune printed no result (exit 1)" in capsys.readouterr().out
    rows = bench_vision.peer_rows({"velotune": got}, 1, "d", "m", SEQ, "day", "cpu", "")
    assert rows[0][6] == "-" and rows[0][13] == got["outcome"]


def test_vs_unsloth_names_the_families_it_can_write():
    done = subprocess.run([sys.executable, str(BENCH / "bench_vision.py"), "--vs-unsloth", "--model", "llava-1.5-7b"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "llava-1.5-7b has no offline tokenizer and processor files" in done.stderr
    assert "qwen2_5_vl, gemma3" in done.stderr


@pytest.mark.gpu
def test_transformers_processor_opens_the_folder(folder, monkeypatch):
    pytest.importorskip("torchvision")       # Qwen 2's video processor needs it (the device has it)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert processor.image_token_id == TINY["image_token_id"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(TINIES))
def test_unsloth_trains_the_tiny_folder_on_the_parents_batch(folders, family):
    if not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None:
        pytest.skip("needs a CUDA GPU and Unsloth (carry its wheels in .whl)")
    want = vision_inputs.digest(vision_inputs.batch(TINIES[family], 2, SEQ, "cpu", SIDE))
    results = {s: peer(s, folders[family], peer_args(batch=[2]), "cuda") for s in ("unsloth", "velotune")}
    for system, result in results.items():
        run, why = bench_vision.batch_run(result, 2, want)
        assert why == "ok" and 5.0 < run["loss"] < 6.5, (system, result)
    assert results["unsloth"]["trainable"] == results["velotune"]["trainable"]
    assert results["unsloth"]["optimizer"] == "AdamW8bit (bitsandbytes)"
