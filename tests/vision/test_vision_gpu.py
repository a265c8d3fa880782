"""Vision-language training on a GPU (`-m gpu`): `velotune train` on the tiny LLaVA, Gemma 3 and
Qwen2.5-VL (its tower through the two-way flash kernel) with real photographs, where the trainer lays micro-batches end to end (padding-free, bf16
autocast) and images ride along; the loss of such a batch against the float32 CPU padded one."""
from __future__ import annotations

import json

import pytest
import torch
from tests.cli.cli_helpers import write_config
from tests.vision.vlm_helpers import (
    image_rows,
    make_gemma3_vlm,
    make_qwen25_vlm,
    make_vlm_model,
    write_rows,
    write_samples,
)

import velotune
from velotune.cli import main
from velotune.data.batching import collate_flat, collate_padded
from velotune.data.files import read_rows
from velotune.data.formats import convert_rows
from velotune.data.tokenize import tokenize_samples
from velotune.loaders import load_tokenizer
from velotune.models.masks import DocumentSpans

pytestmark = pytest.mark.gpu
pytest.importorskip("skimage")          # the photographs (carry its wheel and Pillow's to the device)
pytest.importorskip("transformers")     # writes the tiny models
MAKERS = {"llava": make_vlm_model, "gemma3": make_gemma3_vlm, "qwen2_5_vl": make_qwen25_vlm}


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_train_on_gpu(tmp_path, family):
    model = MAKERS[family](tmp_path / "model")
    files = write_samples(tmp_path / "data")
    data = write_rows(tmp_path / "data" / "train.jsonl", image_rows(files, repeat=2))
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset=str(data), output_dir=str(run),
                          method="lora", lora_r=8, max_steps=6, micro_batch_size=4, learning_rate=1e-2,
                          max_seq_length=96, eval_split=0.25, eval_steps=6, sample_prompts=0, save_steps=0,
                          device="cuda", seed=0)
    assert main(["train", str(config), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_flat_bf16_loss_near_the_float32_padded_one(tmp_path, family):
    folder = MAKERS[family](tmp_path / "model")
    files = write_samples(tmp_path / "data")
    rows = convert_rows(read_rows(write_rows(tmp_path / "data" / "rows.jsonl", image_rows(files))))
    examples, _ = tokenize_samples(rows, load_tokenizer(folder), max_seq_length=128)
    cpu, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    padded = collate_padded(examples, tokenizer.pad_token_id)
    grid = {"image_grid_thw": padded["image_grid_thw"]} if "image_grid_thw" in padded else {}
    want = cpu(padded["input_ids"], labels=padded["labels"], pixel_values=padded["pixel_values"],
               return_logits=False, **grid).loss.item()
    gpu, _ = velotune.load_model(folder, dtype=torch.bfloat16, device="cuda")
    flat = collate_flat(examples, tokenizer.pad_token_id)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = gpu(flat["input_ids"].cuda(), position_ids=flat["position_ids"].cuda(), labels=flat["labels"].cuda(),
                  pixel_values=flat["pixel_values"].cuda(), return_logits=False, **grid,
                  documents=DocumentSpans(flat["cu_seqlens"].cuda(), int(flat["max_document_length"]))).loss.item()
    assert abs(got - want) <= 3e-2 * want
