"""Vision-language parity with transformers, in float32 on the CPU, on tiny random configs with
every quirk's switch exercised: LLaVA (CLIP tower, Llama decoder; feature layer and class-token
strategy) and Gemma 3 (SigLIP tower, pooled projector, images seen both ways across a sliding
window, as transformers masks them in training): logits, loss and every parameter gradient
(vision tower and projector included), with real photographs as the images."""
from __future__ import annotations

import pytest
import torch
from tests.vision.vlm_helpers import backward_after_equal_outputs, make_gemma3_vlm, make_vlm_model, write_samples

import velotune
from velotune.models.vision_families import to_ours

transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage")


def randomised(ref) -> None:
    """Norms, biases and the tower's embeddings away from their neutral starts, so their
    placement and arithmetic matter."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif "class_embedding" in name or "position_embedding" in name:
                p.normal_(0.0, 0.5)
            elif "mm_input_projection" in name:       # Gemma 3 starts it at zero
                p.normal_(0.0, 0.1)
            elif "vision_tower" in name and ("q_proj" in name or "k_proj" in name):
                p.mul_(3.0)


CASES = {
    "llava-default--2": (make_vlm_model, dict(select="default", feature_layer=-2), "LlavaForConditionalGeneration"),
    "llava-full--1": (make_vlm_model, dict(select="full", feature_layer=-1), "LlavaForConditionalGeneration"),
    "llava-default-1": (make_vlm_model, dict(select="default", feature_layer=1), "LlavaForConditionalGeneration"),
    "gemma3": (make_gemma3_vlm, {}, "Gemma3ForConditionalGeneration"),
}
TURNS = {"llava": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
         "gemma3": ("<bos><start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_gradients(tmp_path, case):
    make, options, architecture = CASES[case]
    folder = make(tmp_path / "model", **options)
    ref = getattr(transformers, architecture).from_pretrained(folder, dtype=torch.float32).eval()
    randomised(ref)
    ref.save_pretrained(folder)
    ours, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    processor = tokenizer.image_processor
    files = write_samples(tmp_path / "images")
    pixels = processor.pixel_values([str(files["astronaut"]), str(files["camera"]), str(files["coffee"])], "test")
    image = processor.image_text()
    user, assistant, end = TURNS[case.split("-")[0]]
    rows = [f"{user}{image}What is it?{assistant}An astronaut.{end}", f"{user}Two: {image} and {image}{assistant}A camera."]
    encoded = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == ours.config.image_token_id, -100)
    image_tokens = (ids == ours.config.image_token_id).long()   # Gemma 3 reads them as token_type_ids
    extra = {"token_type_ids": image_tokens} if case == "gemma3" else {}
    want = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels, **extra)
    got = ours(ids, attention_mask=mask, pixel_values=pixels, labels=labels, return_logits=True)
    real = mask.bool()
    backward_after_equal_outputs(got, want, real)
    params = dict(ours.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        if p.grad is None:      # layers past vision_feature_layer feed nothing
            continue
        mine, transposed = to_ours(name)
        grad = params[mine].grad
        reference = p.grad.t() if transposed else p.grad
        assert grad is not None, name
        assert (grad - reference).abs().max() <= 1e-5 * reference.abs().max() + 1e-9, name
        checked += 1
    assert checked >= 40
    assert params["vision_tower.embeddings.patch_embedding.weight"].grad.abs().max() > 0
    if extra:   # the two-way image attention is what made them agree
        causal = ref(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        assert (causal[real] - want.logits[real]).abs().max() > 1e-2


def test_wrong_number_of_images_is_named(tmp_path):
    folder = make_vlm_model(tmp_path / "model")
    ours, tokenizer = velotune.load_model(folder, dtype=torch.float32, device="cpu")
    ids = torch.tensor([tokenizer.encode(tokenizer.image_processor.image_text() + "hi", add_special_tokens=False)])
    with pytest.raises(ValueError, match="16 image placeholder tokens, its 2 image"):
        ours(ids, pixel_values=torch.zeros(2, 3, 28, 28))


@pytest.mark.parametrize("case", ["llava-default--2", "gemma3"])
def test_parameter_count_from_the_config(tmp_path, case):
    """The memory estimator's weights include the tower and projector, counted from the config."""
    make, options, _ = CASES[case]
    model, _ = velotune.load_model(make(tmp_path / "model", **options), dtype=torch.float32, device="cpu")
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_tower.", "multi_modal_projector.")))
    assert model.config.vision.num_parameters() == vision
    total = sum(p.numel() for p in model.parameters())   # a tied head counted once, as the config counts it
    assert model.config.num_parameters() == total
