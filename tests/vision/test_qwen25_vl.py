"""Qwen2.5-VL against transformers, in float32 on the CPU, on a tiny random config with every
piece exercised (windowed and full-attention tower blocks, edge windows smaller than the rest, the
2-D rotary tower, the patch merger, M-RoPE in the decoder, images of different sizes in one batch,
padding): logits, loss and the gradients of decoder, projector and tower; the Pillow Qwen 2
processor's pixel_values and image_grid_thw on scikit-image's photographs; the M-RoPE position
ids of transformers' get_rope_index, packed rows included."""
from __future__ import annotations

import pytest
import torch
from tests.vision.test_vision_parity import randomised
from tests.vision.vlm_helpers import backward_after_equal_outputs, make_qwen25_vlm, write_samples

import velotune
from velotune.models.vision_families import to_ours
from velotune.tokenizer.image_processor import ImageProcessor

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("skimage")

USER, ASSISTANT, END = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"


def batch(tokenizer, files, names_per_row, answers):
    """Rows of images + text, right-padded, and the image arguments in reading order."""
    processor = tokenizer.image_processor
    paths = [str(files[name]) for names in names_per_row for name in names]
    images = processor.inputs(paths, "test")
    counts = iter(int(n) for n in images["image_grid_thw"].prod(-1) // 4)
    rows = []
    for names, answer in zip(names_per_row, answers):
        pictures = "".join(processor.image_text(next(counts)) for _ in names)
        rows.append(f"{USER}{pictures}What is it?{ASSISTANT}{answer}{END}")
    encoded = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    return ids, mask, images


@pytest.mark.parametrize("window_size", [56, 112])
def test_logits_and_gradients(tmp_path, window_size):
    folder = make_qwen25_vlm(tmp_path / "model", window_size=window_size)
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    randomised(ref)
    ref.save_pretrained(folder)
    ours, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    files = write_samples(tmp_path / "images")
    ids, mask, images = batch(tokenizer, files, [["astronaut"], ["camera", "coffee"]], ["An astronaut.", "Two."])
    assert len(set(map(tuple, images["image_grid_thw"].tolist()))) > 1      # sizes differ
    image_id = ours.config.image_token_id
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == image_id, -100)
    types = (ids == image_id).int()
    want = ref(input_ids=ids, attention_mask=mask, labels=labels, mm_token_type_ids=types, **images)
    got = ours(ids, attention_mask=mask, labels=labels, return_logits=True, **images)
    real = mask.bool()
    backward_after_equal_outputs(got, want, real)
    params = dict(ours.named_parameters())
    checked = set()
    for name, p in ref.named_parameters():
        mine, _ = to_ours(name)
        grad = params[mine].grad
        assert grad is not None and p.grad is not None, name
        assert (grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-9, name
        checked.add(mine.split(".")[0])
    assert checked == {"model", "lm_head", "vision_tower", "multi_modal_projector"}
    assert len(params) == len(list(ref.named_parameters()))
    # without M-RoPE (plain positions) the logits differ: the 3-D positions are what agree
    plain = ours(ids, attention_mask=mask, position_ids=None, **images).logits
    flat = ref(input_ids=ids, attention_mask=mask, **images).logits
    assert (plain[real] - flat[real]).abs().max() > 1e-3


def test_mrope_positions_equal_get_rope_index(tmp_path):
    folder = make_qwen25_vlm(tmp_path / "model")
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    files = write_samples(tmp_path / "images")
    ids, mask, images = batch(tokenizer, files, [["rocket", "chelsea"], ["coins"]], ["A.", "Some coins here."])
    types = (ids == ours.config.image_token_id).int()
    want, _ = ref.model.get_rope_index(ids, types, image_grid_thw=images["image_grid_thw"], attention_mask=mask)
    got = ours.rope_positions(ids, None, images["image_grid_thw"])
    assert torch.equal(got[:, mask.bool()], want[:, mask.bool()])
    # two rows packed end to end: each document's ids are its own row's
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    packed = torch.cat([ids[0, :n0], ids[1, :n1]])[None]
    positions = torch.cat([torch.arange(n0), torch.arange(n1)])[None]
    both = ours.rope_positions(packed, positions, images["image_grid_thw"])
    assert torch.equal(both[:, 0, :n0], want[:, 0, :n0]) and torch.equal(both[:, 0, n0:], want[:, 1, :n1])
    wrong = images["image_grid_thw"].clone()
    wrong[0, 1] += 2
    with pytest.raises(ValueError, match="image 0 has a 1x.* patch grid .* image tokens in row 0 is"):
        ours.rope_positions(ids, None, wrong)
    with pytest.raises(ValueError, match="3 image grid"):
        ours.rope_positions(ids[1:], None, images["image_grid_thw"][[2, 0, 1]])


@pytest.mark.parametrize("bounds", [(28 * 28 * 4, 28 * 28 * 12), (56 * 56, 28 * 28 * 1280), (28 * 28 * 130, 28 * 28 * 200)])
def test_pixels_equal_transformers(tmp_path, bounds):
    reference = transformers.Qwen2VLImageProcessorPil(min_pixels=bounds[0], max_pixels=bounds[1])
    reference.save_pretrained(tmp_path / "model")
    ours = ImageProcessor.from_folder(tmp_path / "model", image_token="<|image_pad|>", tokens_per_image=0,
                                      placeholder="", expansion="{tokens}")
    files = write_samples(tmp_path / "images")
    for name, path in files.items():
        want = reference(images=PIL.open(path), return_tensors="pt")
        got = ours.inputs([str(path)], name)
        assert torch.equal(got["image_grid_thw"], want["image_grid_thw"]), name
        assert got["pixel_values"].shape == want["pixel_values"].shape, name
        assert (got["pixel_values"] - want["pixel_values"]).abs().max() == 0, name
        assert ours.tokens_for(ours.open(path, name)) == int(want["image_grid_thw"].prod()) // 4
    several = ours.inputs([str(files["astronaut"]), str(files["camera"])], "two")
    want = reference(images=[PIL.open(files["astronaut"]), PIL.open(files["camera"])], return_tensors="pt")
    assert torch.equal(several["pixel_values"], want["pixel_values"])
    assert torch.equal(several["image_grid_thw"], want["image_grid_thw"])


def test_parameter_count_from_the_config(tmp_path):
    model, _ = velotune.load_model(make_qwen25_vlm(tmp_path / "model"), dtype=torch.float32, device="cpu")
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_tower.", "multi_modal_projector.")))
    assert model.config.vision.num_parameters() == vision
    assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_hub_config_layout_reads_the_same(tmp_path):
    """The Hub's Qwen2.5-VL config.json keeps the decoder's keys at the top and M-RoPE as
    rope_scaling {"type": "mrope"} (transformers 4); it reads as transformers 5's nested one."""
    import json

    from velotune.errors import ConfigError
    from velotune.models.config import ModelConfig

    nested = json.loads((make_qwen25_vlm(tmp_path / "model") / "config.json").read_text())
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **text, "model_type": "qwen2_5_vl",
            "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    a, b = ModelConfig.from_hf_config(nested), ModelConfig.from_hf_config(flat)
    assert a.mrope_section == b.mrope_section == [2, 3, 3] and a.rope_scaling is None is b.rope_scaling
    assert a.vision == b.vision and (a.hidden_size, a.num_hidden_layers, a.qkv_bias) == (b.hidden_size, 2, True)
    flat["rope_scaling"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ConfigError, match=r"mrope_section \[2, 2, 2\] does not cover half the rotary dimension 16"):
        ModelConfig.from_hf_config(flat)
    nested["vision_config"]["fullatt_block_indexes"] = [5]
    with pytest.raises(ConfigError, match="fullatt_block_indexes"):
        ModelConfig.from_hf_config(nested)
