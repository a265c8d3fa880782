"""`velotune train` on a tiny random LLaVA and Gemma 3 and real photographs (scikit-image's samples) on the
CPU: LoRA on the decoder and the projector, the tower frozen; the loss falls; the adapter answers
with images through `generate`; the merged Hugging Face export loads in transformers as
the same class (LlavaForConditionalGeneration, Gemma3ForConditionalGeneration) and answers the
same greedy tokens; GGUF export is refused with
the reason."""
from __future__ import annotations

import json

import pytest
import torch
from tests.cli.cli_helpers import write_config
from tests.vision.vlm_helpers import (image_rows, make_gemma3_vlm, make_vlm_model, train_on_photos, write_rows,
                                      write_samples)

import velotune
from velotune.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage")


def prompt(tokenizer, files, name):
    processor = tokenizer.image_processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text.replace(processor.marker, processor.image_text()), add_special_tokens=False)])
    return ids, processor.pixel_values([str(files[name])], name)


FAMILIES = {"llava": (make_vlm_model, "LlavaForConditionalGeneration", ["linear_1", "linear_2"]),
            "gemma3": (make_gemma3_vlm, "Gemma3ForConditionalGeneration", ["mm_input_projection"])}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_generate_and_export(tmp_path, capsys, family):
    make, architecture, projector = FAMILIES[family]
    model = make(tmp_path / "model")
    run, files = train_on_photos(tmp_path, model)
    trained, tokenizer = velotune.load_model(run / "adapter", dtype=torch.float32, device="cpu")
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in trained.named_parameters() if ".lora_A" in n}
    assert {f"multi_modal_projector.{name}" for name in projector} <= adapted
    assert not any(n.startswith("vision_tower.") for n in adapted)
    assert any(n.endswith("self_attn.q_proj") and n.startswith("model.layers.") for n in adapted)

    assert main(["export", str(run), "--to", "hf"]) == 0
    merged = getattr(transformers, architecture).from_pretrained(run / "export-hf", dtype=torch.float32).eval()
    for name in ("astronaut", "chelsea", "camera"):
        ids, pixels = prompt(tokenizer, files, name)
        stop = [tokenizer.eos_token_id]           # what transformers' generate stops at
        ours = trained.generate(ids, max_new_tokens=12, pixel_values=pixels, stop_token_ids=stop)[0, ids.shape[1]:]
        types = {"token_type_ids": (ids == trained.config.image_token_id).long()} if family == "gemma3" else {}
        with torch.no_grad():
            want = merged(input_ids=ids, pixel_values=pixels, **types).logits
            got = trained.eval()(ids, pixel_values=pixels).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        theirs = merged.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=12, do_sample=False,
                                 **types)[0, ids.shape[1]:]
        assert ours.tolist() == theirs.tolist(), name

    if family == "llava":   # PEFT loads the adapter onto transformers' model: the same logits
        import peft

        base_hf = transformers.LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
        peft_model = peft.PeftModel.from_pretrained(base_hf, run / "adapter").eval()
        ids, pixels = prompt(tokenizer, files, "coffee")
        with torch.no_grad():
            want = peft_model(input_ids=ids, pixel_values=pixels).logits
            got = trained(ids, pixel_values=pixels).logits
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        adapted_hf = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
        assert not any("vision_tower" in n for n in adapted_hf) and len(adapted_hf) == len(adapted)


def test_packed_rows_and_eval_with_images(tmp_path, capsys):
    """Packed rows carry each example's images; eval batches do too; `velotune data` shows an
    image as one line naming its file."""
    model = make_vlm_model(tmp_path / "model")
    files = write_samples(tmp_path / "data")
    data = write_rows(tmp_path / "data" / "train.jsonl", image_rows(files, repeat=2))
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", model=str(model), dataset=str(data), output_dir=str(run),
                          method="lora", lora_r=4, max_steps=2, micro_batch_size=2, packing=True,
                          max_seq_length=160, eval_split=0.25, eval_steps=2, sample_prompts=0, save_steps=0, seed=0)
    assert main(["train", str(config), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    capsys.readouterr()
    assert main(["data", str(config), "--rows", "1", "--output_dir", str(tmp_path / "other")]) == 0
    shown = capsys.readouterr().out
    assert "<image> x 16 (" in shown and "<image><image>" not in shown


def test_generate_command_with_images(tmp_path, capsys):
    """`velotune generate --image FILE` answers as `Transformer.generate` with the image does, and a
    missing file or a text model is an error naming it."""
    from tests.cli.cli_helpers import make_chat_model

    model = make_vlm_model(tmp_path / "model")
    files = write_samples(tmp_path / "data")
    loaded, tokenizer = velotune.load_model(model, dtype=torch.float32, device="cpu")
    ids, pixels = prompt(tokenizer, files, "chelsea")
    want = tokenizer.decode(loaded.generate(ids, max_new_tokens=8, pixel_values=pixels,
                                            stop_token_ids=tokenizer.stop_token_ids)[0, ids.shape[1]:].tolist(),
                            skip_special_tokens=True).strip()
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--device", "cpu", "--image", str(files["chelsea"]),
                 "--prompt", "What is in the picture?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert main(["generate", "--model", str(model), "--device", "cpu", "--image", str(tmp_path / "no.png"),
                 "--prompt", "hi"]) == 2
    assert "--image: image" in capsys.readouterr().err
    text_model = make_chat_model(tmp_path / "text")
    assert main(["generate", "--model", str(text_model), "--device", "cpu", "--image", str(files["chelsea"]),
                 "--prompt", "hi"]) == 2
    assert "needs a vision-language model" in capsys.readouterr().err
