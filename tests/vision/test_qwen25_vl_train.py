"""`velotune train` on a tiny random Qwen2.5-VL and real photographs (scikit-image's samples, each
at its own resolution) on the CPU: LoRA on the decoder and the patch merger, the tower frozen; the
loss falls; the adapter answers with images through `generate` (M-RoPE positions continuing after
the prompt); the merged export loads in transformers as Qwen2_5_VLForConditionalGeneration with
the same logits and greedy tokens; PEFT reads the adapter onto transformers' model; packed rows
and `velotune data` carry images of different token counts; errors name the row."""
from __future__ import annotations

import pytest
import torch
from tests.cli.cli_helpers import write_config
from tests.vision.vlm_helpers import image_rows, make_qwen25_vlm, train_on_photos, write_rows, write_samples

import velotune
from velotune.cli import main
from velotune.data.files import DataError
from velotune.data.formats import ChatSample
from velotune.data.tokenize import tokenize_chat, tokenize_samples
from velotune.tokenizer.image_processor import ImageProcessor

transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage")


def prompt(tokenizer, files, names):
    processor = tokenizer.image_processor
    content = [{"type": "image"} for _ in names] + [{"type": "text", "text": "What is in the picture?"}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    images = processor.inputs([str(files[n]) for n in names], "prompt")
    pieces = text.split(processor.marker)
    counts = (images["image_grid_thw"].prod(-1) // 4).tolist()
    text = pieces[0] + "".join(processor.image_text(n) + piece for n, piece in zip(counts, pieces[1:]))
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)]), images


def test_train_generate_and_export(tmp_path, capsys):
    model = make_qwen25_vlm(tmp_path / "model")
    run, files = train_on_photos(tmp_path, model)
    trained, tokenizer = velotune.load_model(run / "adapter", dtype=torch.float32, device="cpu")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in trained.named_parameters() if ".lora_A" in n}
    assert {"multi_modal_projector.linear_1", "multi_modal_projector.linear_2"} <= adapted
    assert not any(n.startswith("vision_tower.") for n in adapted)

    assert main(["export", str(run), "--to", "hf"]) == 0
    merged = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(run / "export-hf",
                                                                            dtype=torch.float32).eval()
    image_id = trained.config.image_token_id
    for names in (["astronaut"], ["chelsea"], ["camera", "coins"]):
        ids, images = prompt(tokenizer, files, names)
        types = {"mm_token_type_ids": (ids == image_id).int()}
        stop = [tokenizer.eos_token_id]
        ours = trained.generate(ids, max_new_tokens=12, stop_token_ids=stop, **images)[0, ids.shape[1]:]
        with torch.no_grad():
            want = merged(input_ids=ids, **images, **types).logits
            got = trained.eval()(ids, **images).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        theirs = merged.generate(input_ids=ids, max_new_tokens=12, do_sample=False, **images, **types)
        assert ours.tolist() == theirs[0, ids.shape[1]:].tolist(), names

    import peft   # PEFT loads the adapter onto transformers' model: the same logits

    base_hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base_hf, run / "adapter").eval()
    ids, images = prompt(tokenizer, files, ["coffee"])
    with torch.no_grad():
        want = peft_model(input_ids=ids, mm_token_type_ids=(ids == image_id).int(), **images).logits
        got = trained(ids, **images).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    adapted_hf = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert not any(".visual.blocks" in n for n in adapted_hf) and len(adapted_hf) == len(adapted)


def test_packed_rows_lora_tower_and_data_view(tmp_path, capsys):
    """Packed rows carry images of different sizes; LoRA on the tower (fused qkv, gated MLP);
    `velotune data` shows each image as one line with its own token count."""
    model = make_qwen25_vlm(tmp_path / "model")
    files = write_samples(tmp_path / "data")
    data = write_rows(tmp_path / "data" / "train.jsonl", image_rows(files, repeat=2))
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset=str(data), output_dir=str(run),
                          method="lora", lora_r=4, max_steps=2, micro_batch_size=2, packing=True, lora_vision_tower=True,
                          max_seq_length=160, eval_split=0.25, eval_steps=2, sample_prompts=0, save_steps=0, seed=0)
    assert main(["train", str(config), "--no-progress"]) == 0
    trained, _ = velotune.load_model(run / "adapter", dtype=torch.float32, device="cpu")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in trained.named_parameters() if ".lora_A" in n}
    assert {"vision_tower.encoder.layers.0.self_attn.qkv", "vision_tower.encoder.layers.2.mlp.gate_proj"} <= adapted
    capsys.readouterr()
    assert main(["data", str(config), "--rows", "3", "--output_dir", str(tmp_path / "other")]) == 0
    shown = capsys.readouterr().out
    counts = {line.split("<|image_pad|> x ")[1].split(" ")[0] for line in shown.splitlines() if "<|image_pad|> x " in line}
    assert len(counts) >= 2 and "<|image_pad|><|image_pad|>" not in shown


def test_row_errors_name_file_and_row(tmp_path):
    model = make_qwen25_vlm(tmp_path / "model")
    _, tokenizer = velotune.load_model(model, dtype=torch.float32, device="cpu")
    files = write_samples(tmp_path / "data")

    def row(path):
        return ChatSample([{"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": "?"}]},
                           {"role": "assistant", "content": "x"}], "rows.jsonl line 7")

    example = tokenize_chat(row(str(files["astronaut"])), tokenizer)
    assert example.input_ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 9   # 512 x 512 -> 84 x 84 pixels
    with pytest.raises(DataError, match=r"rows.jsonl line 7: image '.*missing.png' does not exist"):
        tokenize_chat(row(str(tmp_path / "missing.png")), tokenizer)
    with pytest.raises(DataError, match=r"rows.jsonl line 7: the row's 1 image\(s\) take 9 tokens .* max_seq_length=8"):
        tokenize_samples([row(str(files["astronaut"]))], tokenizer, max_seq_length=8, workers=1)


def test_padding_free_batch_equals_padded(tmp_path):
    """Rows laid end to end (M-RoPE ids restarting with each document, its images' shifts kept
    inside it) give the padded batch's loss, in float32 on the CPU."""
    from velotune.data.batching import collate_flat, collate_padded
    from velotune.data.files import read_rows
    from velotune.data.formats import convert_rows
    from velotune.models.masks import DocumentSpans

    folder = make_qwen25_vlm(tmp_path / "model")
    files = write_samples(tmp_path / "data")
    model, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    rows = convert_rows(read_rows(write_rows(tmp_path / "data" / "rows.jsonl", image_rows(files))))
    examples, _ = tokenize_samples(rows, tokenizer, max_seq_length=128, workers=1)
    padded, flat = collate_padded(examples, tokenizer.pad_token_id), collate_flat(examples, tokenizer.pad_token_id)
    assert torch.equal(padded["image_grid_thw"], flat["image_grid_thw"])
    want = model(padded["input_ids"], labels=padded["labels"], pixel_values=padded["pixel_values"],
                 image_grid_thw=padded["image_grid_thw"], return_logits=False).loss
    got = model(flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                pixel_values=flat["pixel_values"], image_grid_thw=flat["image_grid_thw"], return_logits=False,
                documents=DocumentSpans(flat["cu_seqlens"], int(flat["max_document_length"]))).loss
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()


def test_generate_command_with_images(tmp_path, capsys, monkeypatch):
    """`velotune generate --image A --image B` answers as `Transformer.generate` with both images
    (their own token counts and grids) does, decoding each file once (its token count and its
    pixels come from the same opened image)."""
    model = make_qwen25_vlm(tmp_path / "model")
    files = write_samples(tmp_path / "data")
    loaded, tokenizer = velotune.load_model(model, dtype=torch.float32, device="cpu")
    ids, images = prompt(tokenizer, files, ["chelsea", "camera"])
    out = loaded.generate(ids, max_new_tokens=8, stop_token_ids=tokenizer.stop_token_ids, **images)
    want = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
    opened: list[str] = []
    real_open = ImageProcessor.open

    def counted_open(self, path, where):
        opened.append(str(path))
        return real_open(self, path, where)

    monkeypatch.setattr(ImageProcessor, "open", counted_open)
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--device", "cpu", "--image", str(files["chelsea"]),
                 "--image", str(files["camera"]), "--prompt", "What is in the picture?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert opened == [str(files["chelsea"]), str(files["camera"])]
    assert main(["generate", "--model", str(model), "--device", "cpu", "--image", str(files["chelsea"]),
                 "--image", str(tmp_path / "gone.png"), "--prompt", "?"]) == 2
    assert f"--image: image '{tmp_path / 'gone.png'}' does not exist" in capsys.readouterr().err
