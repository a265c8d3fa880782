"""Image preprocessing equal to transformers' processors (their Pillow backend) on scikit-image's
bundled photographs: colour and grey, landscape and portrait, resized by shortest edge and
center-cropped (CLIP, LLaVA), or resized to a square (SigLIP, Gemma 3)."""
from __future__ import annotations

import pytest
from tests.vision.vlm_helpers import write_samples

from velotune.errors import LoadError
from velotune.tokenizer.image_processor import ImageError, ImageProcessor

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

PROCESSORS = {
    "clip-336": ("CLIPImageProcessorPil", dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})),
    "clip-odd": ("CLIPImageProcessorPil", dict(size={"shortest_edge": 37}, crop_size={"height": 29, "width": 33})),
    "siglip": ("SiglipImageProcessorPil", dict(size={"height": 224, "width": 224})),
    "gemma3": ("Gemma3ImageProcessorPil", dict(size={"height": 96, "width": 96})),
}


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
def test_pixels_equal_transformers(kind, tmp_path):
    cls, settings = PROCESSORS[kind]
    reference = getattr(transformers, cls)(**settings)
    reference.save_pretrained(tmp_path / "model")
    ours = ImageProcessor.from_folder(tmp_path / "model", image_token="<image>", tokens_per_image=1,
                                      placeholder="", expansion="{tokens}")
    files = write_samples(tmp_path / "images")
    for name, path in files.items():
        image = ours.open(path, name)
        want = reference(images=PIL.open(path), return_tensors="pt")["pixel_values"][0]
        got = ours.preprocess(image)
        assert got.shape == want.shape, name
        assert (got - want).abs().max() == 0, name


def test_bad_images_name_file_and_row(tmp_path):
    transformers.CLIPImageProcessorPil().save_pretrained(tmp_path)
    ours = ImageProcessor.from_folder(tmp_path, image_token="<image>", tokens_per_image=1, placeholder="",
                                      expansion="{tokens}")
    with pytest.raises(ImageError, match=r"rows.jsonl line 3: image '.*missing.png' does not exist"):
        ours.open(tmp_path / "missing.png", "rows.jsonl line 3")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match=r"rows.jsonl line 4: image '.*broken.png' cannot be read"):
        ours.open(broken, "rows.jsonl line 4")


def test_missing_or_unusable_settings(tmp_path):
    with pytest.raises(LoadError, match="needs preprocessor_config.json"):
        ImageProcessor.from_folder(tmp_path, image_token="<image>", tokens_per_image=1, placeholder="", expansion="")
    (tmp_path / "preprocessor_config.json").write_text('{"size": 224}')
    with pytest.raises(LoadError, match="'size' must hold shortest_edge, or height and width"):
        ImageProcessor.from_folder(tmp_path, image_token="<image>", tokens_per_image=1, placeholder="", expansion="")
