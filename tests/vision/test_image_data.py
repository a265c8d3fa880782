"""Rows with images into examples: the chat template's image markers expanded to the image's
tokens (equal to transformers' LlavaProcessor on the same text and photographs), labels on the
assistant turns only, pixels in placeholder order through every collation, and bad rows named."""
from __future__ import annotations

import json

import pytest
import torch
from tests.vision.vlm_helpers import (
    IMAGE,
    TEMPLATES,
    image_rows,
    make_gemma3_vlm,
    make_vlm_model,
    write_rows,
    write_samples,
)

import velotune
from velotune.loaders import load_tokenizer
from velotune.data.batching import collate_flat, collate_packed, collate_padded
from velotune.data.files import DataError, read_rows
from velotune.data.formats import convert_rows
from velotune.data.tokenize import IGNORE_INDEX, tokenize_samples

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm")
    model = make_vlm_model(folder / "model")
    files = write_samples(folder / "data")
    return model, files, load_tokenizer(model)


def examples(path, tokenizer, max_seq_length=512):
    return tokenize_samples(convert_rows(read_rows(path)), tokenizer, max_seq_length=max_seq_length)


def test_examples_equal_llava_processor(vlm):
    model, files, tokenizer = vlm
    rows = image_rows(files)
    rows.append({"messages": [{"role": "user", "content": "Compare these."},
                              {"role": "assistant", "content": "Fine."},
                              {"role": "user", "content": [{"type": "image", "image": "coffee.png"},
                                                           {"type": "text", "text": " and "},
                                                           {"type": "image", "url": "chelsea.png"}]},
                              {"role": "assistant", "content": "Coffee and a cat."}]})
    path = write_rows(files["coffee"].parent / "rows.jsonl", rows)
    got, report = examples(path, tokenizer)
    assert report.kept == len(rows)
    reference = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil.from_pretrained(model),
        tokenizer=transformers.AutoTokenizer.from_pretrained(model), patch_size=7,
        vision_feature_select_strategy="default", image_token=IMAGE, num_additional_image_tokens=1)
    for row, example in zip(rows, got):
        text = tokenizer.apply_chat_template(
            [{**m, "content": m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]}
             for m in row["messages"]], tokenize=False)
        images = [PIL.open(files["coffee"].parent / (p.get("path") or p.get("image") or p.get("url")))
                  for m in row["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
        want = reference(text=text, images=images, return_tensors="pt")
        assert example.input_ids == want["input_ids"][0].tolist()
        assert torch.equal(example.image_inputs()["pixel_values"], want["pixel_values"])
        trained = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(a + "<|im_end|>" for a in answers)
    assert sum(t == tokenizer.convert_tokens_to_ids(IMAGE) for t in got[-1].input_ids) == 2 * 16


def test_gemma3_examples_equal_its_processor(tmp_path):
    """Gemma 3's template writes <start_of_image>; its processor frames the image's tokens with
    blank lines and <end_of_image>: ids, pixels and labels as transformers' Gemma3Processor makes them."""
    model = make_gemma3_vlm(tmp_path / "model")
    files = write_samples(tmp_path / "data")
    tokenizer = load_tokenizer(model)
    rows = image_rows(files)
    got, _ = examples(write_rows(tmp_path / "data" / "rows.jsonl", rows), tokenizer)
    reference = transformers.Gemma3Processor(
        image_processor=transformers.Gemma3ImageProcessorPil.from_pretrained(model),
        tokenizer=transformers.AutoTokenizer.from_pretrained(model, extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}),
        image_seq_length=16, chat_template=(TEMPLATES / "gemma3.jinja").read_text())
    for row, example in zip(rows, got):
        messages = [{**m, "content": m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]}
                    for m in row["messages"]]
        text = reference.apply_chat_template(messages, tokenize=False)
        path = files["coffee"].parent / row["messages"][0]["content"][0]["path"]
        want = reference(text=text, images=[PIL.open(path)], return_tensors="pt")
        assert example.input_ids == want["input_ids"][0].tolist()
        assert torch.equal(example.image_inputs()["pixel_values"], want["pixel_values"])
        trained = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
        assert trained == row["messages"][1]["content"] + "<end_of_turn>"


def test_examples_keep_no_pixels(vlm):
    """Pixels are made per batch (a 896-pixel image is 9.6 MB of float32): an example holds the
    file names and the processor, every image having been opened once when its row was read."""
    import dataclasses

    _, files, tokenizer = vlm
    [example], _ = examples(write_rows(files["coffee"].parent / "lean.jsonl", image_rows(files)[:1]), tokenizer)
    assert not any(isinstance(getattr(example, f.name), torch.Tensor) for f in dataclasses.fields(example))
    assert example.image_processor is tokenizer.image_processor and example.image_inputs()["pixel_values"].shape == (1, 3, 28, 28)


def test_collations_keep_placeholder_order(vlm):
    _, files, tokenizer = vlm
    rows = image_rows(files)[:3]
    rows[1]["messages"][0]["content"].append({"type": "image", "path": "coins.png"})
    got, _ = examples(write_rows(files["coffee"].parent / "order.jsonl", rows), tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    want = torch.cat([e.image_inputs()["pixel_values"] for e in got])
    for batch in (collate_padded(got, 0), collate_packed([got[:2], got[2:]], 0), collate_flat(got, 0)):
        assert torch.equal(batch["pixel_values"], want)
        assert int((batch["input_ids"] == image_id).sum()) == want.shape[0] * 16


def test_images_column_goes_before_the_first_user_turn(vlm):
    _, files, tokenizer = vlm
    row = {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A cat."}],
           "images": ["chelsea.png"]}
    [example], _ = examples(write_rows(files["coffee"].parent / "column.jsonl", [row]), tokenizer)
    text = tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>user\n" + IMAGE * 16 + "What is it?")
    assert example.images == (str(files["chelsea"]),)


def bad(vlm, rows, match, max_seq_length=512):
    _, files, tokenizer = vlm
    path = write_rows(files["coffee"].parent / "bad.jsonl", rows)
    with pytest.raises(DataError, match=match):
        examples(path, tokenizer, max_seq_length)


def test_bad_rows_are_named(vlm, tmp_path):
    _, files, tokenizer = vlm
    good = image_rows(files)[0]
    missing = json.loads(json.dumps(good))
    missing["messages"][0]["content"][0]["path"] = "nowhere.png"
    bad(vlm, [good, missing], r"bad.jsonl line 2: image '.*nowhere.png' does not exist")
    (files["coffee"].parent / "text.png").write_text("not an image")
    broken = json.loads(json.dumps(good))
    broken["messages"][0]["content"][0]["path"] = "text.png"
    bad(vlm, [broken], r"bad.jsonl line 1: image '.*text.png' cannot be read")
    bad(vlm, [good], r"bad.jsonl line 1: the row's 1 image\(s\) take 16 tokens and end at token 22, "
                     r"past max_seq_length=10", max_seq_length=10)
    typed = json.loads(json.dumps(good))
    typed["messages"][0]["content"][1]["text"] = "What is <image>?"
    bad(vlm, [typed], r"bad.jsonl line 1: the chat template wrote 2 image marker\(s\) '<image>' for the row's 1")
    web = json.loads(json.dumps(good))
    web["messages"][0]["content"][0] = {"type": "image", "url": "https://example.com/a.png"}
    bad(vlm, [web], r"bad.jsonl line 1: messages\[0\].content\[0\]: 'https://example.com/a.png' is not a local file")


def test_images_for_a_text_model_are_refused(tmp_path, vlm):
    from tests.cli.cli_helpers import make_chat_model

    _, files, _ = vlm
    text_model = make_chat_model(tmp_path / "text")
    path = write_rows(files["coffee"].parent / "for-text.jsonl", image_rows(files)[:1])
    with pytest.raises(DataError, match=r"for-text.jsonl line 1: the row holds 1 image\(s\), but the model has no vision"):
        examples(path, load_tokenizer(text_model))


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_padding_free_and_packed_batches_give_the_padded_loss(tmp_path, family):
    """The GPU's padding-free layout (rows end to end, variable-length attention, or Gemma 3's
    image blocks through an explicit mask) and packed rows give the padded batch's loss and
    gradients, images included."""
    make = make_vlm_model if family == "llava" else make_gemma3_vlm
    model, tokenizer = velotune.load_model(make(tmp_path / "model"), dtype=torch.float32, device="cpu")
    files = write_samples(tmp_path / "data")
    rows = image_rows(files)[:4]
    rows[2]["messages"][0]["content"].append({"type": "image", "path": "coins.png"})
    got, _ = examples(write_rows(tmp_path / "data" / "rows.jsonl", rows), tokenizer)
    from velotune.models.masks import DocumentSpans

    def loss_and_grad(batch):
        model.zero_grad()
        documents = (DocumentSpans(batch["cu_seqlens"], int(batch["max_document_length"]))
                     if batch.get("cu_seqlens") is not None else None)
        out = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    pixel_values=batch["pixel_values"], documents=documents, return_logits=False)
        out.loss_sum.backward()
        return out.loss_sum.item(), model.multi_modal_projector.state_dict(keep_vars=True)
    padded, padded_grads = loss_and_grad(collate_padded(got, tokenizer.pad_token_id))
    padded_grads = {k: v.grad.clone() for k, v in padded_grads.items()}
    for batch in (collate_flat(got, tokenizer.pad_token_id), collate_packed([got[:2], got[2:]], tokenizer.pad_token_id)):
        loss, grads = loss_and_grad(batch)
        assert abs(loss - padded) <= 1e-5 * padded
        for name, p in grads.items():
            assert (p.grad - padded_grads[name]).abs().max() <= 1e-5 * padded_grads[name].abs().max(), name
