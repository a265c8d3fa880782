"""Images into pixel tensors and placeholder tokens, as a vision-language model's processor does.

The settings come from the model folder's `preprocessor_config.json` (resize, crop, rescale,
normalise, RGB conversion), the arithmetic from Pillow and NumPy in the order and precision of
transformers' Pillow backend (`CLIPImageProcessorPil`, `SiglipImageProcessorPil`,
`Gemma3ImageProcessorPil`), so the tensors are equal to theirs (tests/vision/
test_image_processor.py, on scikit-image's sample photographs). transformers' torchvision
backend resizes with torch's antialiased kernels instead of Pillow's and differs from both by
up to a few 1e-2; training does not care which, a parity test does.

The processor also says what text an image becomes in the prompt: the chat template writes one
placeholder per image (`placeholder`), which is replaced by the model's image token repeated once
per image feature, framed as the family frames it (`expansion`, from models/vision_families.py).
It travels on the `Tokenizer` (`tokenizer.image_processor`), so every path that tokenizes rows
(training, `velotune data`, chat) has it without new plumbing.

Dynamic resolution (Qwen2.5-VL, `Qwen2VLImageProcessorPil`, recognised by `temporal_patch_size`
in the settings): each image is resized to the nearest multiple of patch x merge pixels on each
side whose area lies within min_pixels..max_pixels (`smart_resize`), normalised, and cut into flat
patches [patches, C x T x P x P] (a still image is its own frame T times), each merge block's
patches consecutive; its grid (1, rows, columns) of patches travels beside the pixels as
`image_grid_thw`, and its prompt text holds rows x columns / merge^2 image tokens, so the count
differs from image to image (`tokens_for`).
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velotune.errors import LoadError, read_json

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILES = (PREPROCESSOR_FILE, "processor_config.json")
# Pillow's resampling filters by the numbers transformers writes (PILImageResampling).
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the row."""


def _pil():
    try:
        import PIL.Image
    except ImportError:
        raise ImportError("images need Pillow: pip install 'velotune[vision]'") from None
    return PIL.Image


@dataclass
class ImageProcessor:
    """Preprocessing settings (Hugging Face's names) and the prompt text of one image."""

    size: dict[str, int]
    image_token: str                       # the model's image token (e.g. "<image>")
    tokens_per_image: int
    placeholder: str = ""                  # what the chat template writes per image ("" = image_token)
    expansion: str = "{tokens}"            # the prompt text of one image around its tokens
    crop_size: dict[str, int] | None = None
    do_resize: bool = True
    do_center_crop: bool = False
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resample: int = 3
    source: Path | None = None             # the folder it was read from (exports copy its files)
    # Dynamic resolution (patch_size > 0): the patch grid's settings and the area bounds in pixels
    patch_size: int = 0
    temporal_patch_size: int = 1
    merge_size: int = 1
    min_pixels: int = 0
    max_pixels: int = 0

    @classmethod
    def from_folder(cls, folder: Path, *, image_token: str, tokens_per_image: int, placeholder: str,
                    expansion: str) -> ImageProcessor:
        path = folder / PREPROCESSOR_FILE
        if not path.is_file():
            raise LoadError(f"{folder}: a vision-language model needs {PREPROCESSOR_FILE} (its image "
                            "preprocessing settings) next to config.json")
        raw: dict[str, Any] = read_json(path)
        if raw.get("do_pan_and_scan"):
            raise LoadError(f"{path}: do_pan_and_scan is not supported (set it to false)")
        known = {k: raw[k] for k in ("crop_size", "do_resize", "do_center_crop", "do_rescale", "do_normalize",
                                     "do_convert_rgb", "rescale_factor", "image_mean", "image_std", "resample")
                 if raw.get(k) is not None}
        size = raw.get("size")
        if "temporal_patch_size" in raw:   # Qwen 2 / 2.5-VL's dynamic resolution; size holds pixel areas
            size = dict(size or {})
            known.update(patch_size=int(raw.get("patch_size", 14)), temporal_patch_size=int(raw["temporal_patch_size"]),
                         merge_size=int(raw.get("merge_size", 2)),
                         min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge", 56 * 56)),
                         max_pixels=int(raw.get("max_pixels") or size.get("longest_edge", 28 * 28 * 1280)))
            if known["min_pixels"] > known["max_pixels"]:
                raise LoadError(f"{path}: min_pixels {known['min_pixels']} exceeds max_pixels {known['max_pixels']}")
        elif not isinstance(size, dict) or not ({"shortest_edge"} <= set(size) or {"height", "width"} <= set(size)):
            raise LoadError(f"{path}: 'size' must hold shortest_edge, or height and width; got {size!r}")
        if int(known.get("resample", 3)) not in RESAMPLE:
            raise LoadError(f"{path}: unknown resample {known['resample']!r}")
        return cls(size=dict(size), image_token=image_token, tokens_per_image=tokens_per_image,
                   placeholder=placeholder, expansion=expansion, source=folder, **known)

    # ---------------------------------------------------------------- prompt text
    @property
    def marker(self) -> str:
        """What the chat template writes for one image."""
        return self.placeholder or self.image_token

    @property
    def dynamic(self) -> bool:
        """Whether images keep their own size (a patch grid each) instead of one fixed size."""
        return self.patch_size > 0

    def image_text(self, tokens: int | None = None) -> str:
        """The prompt text one image's marker becomes (`tokens`: its count, for dynamic resolution)."""
        return self.expansion.format(tokens=self.image_token * (self.tokens_per_image if tokens is None else tokens))

    def expand(self, text: str, counts: Sequence[int]) -> str:
        """`text` with its i-th image marker replaced by the i-th image's tokens (`counts[i]` of them)."""
        pieces = text.split(self.marker)
        return pieces[0] + "".join(self.image_text(n) + piece for n, piece in zip(counts, pieces[1:]))

    def tokens_for(self, image) -> int:
        """Decoder tokens of this Pillow image."""
        if not self.dynamic:
            return self.tokens_per_image
        height, width = self._resized(image.height, image.width)
        return height * width // (self.patch_size * self.merge_size) ** 2

    # ---------------------------------------------------------------- pixels
    def open(self, path: str | Path, where: str):
        """The image at `path` as a Pillow image, fully read; an ImageError names the file and row."""
        Image = _pil()
        file = Path(path)
        if not file.is_file():
            raise ImageError(f"{where}: image {str(path)!r} does not exist")
        try:
            with Image.open(file) as image:
                image.load()
                return image.copy()
        except (OSError, SyntaxError, ValueError) as exc:   # PIL.UnidentifiedImageError is an OSError
            raise ImageError(f"{where}: image {str(path)!r} cannot be read ({exc})") from None

    def preprocess(self, image) -> torch.Tensor:
        """One Pillow image -> float32 [C, H, W], as transformers' Pillow backend computes it."""
        Image = _pil()
        if self.do_convert_rgb and image.mode != "RGB":
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        if self.do_resize:
            image = image.resize(self._resized(image.height, image.width)[::-1],
                                 resample=getattr(Image.Resampling, RESAMPLE[int(self.resample)]))
        pixels = np.asarray(image)
        pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        if self.do_center_crop and self.crop_size:
            pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            pixels = pixels.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.dynamic:
            return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        if "shortest_edge" in self.size:
            edge = self.size["shortest_edge"]
            short, long = min(height, width), max(height, width)
            new_short, new_long = edge, int(edge * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        return self.size["height"], self.size["width"]

    def patches(self, image) -> tuple[torch.Tensor, list[int]]:
        """A dynamic-resolution image's flat patches [patches, C x T x P x P] and grid [1, rows, cols],
        in the layout of transformers' Qwen 2 processor (each merge block's patches consecutive)."""
        pixels = self.preprocess(image)
        c, height, width = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        rows, cols = height // p, width // p
        blocks = pixels.reshape(c, rows // m, m, p, cols // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
        frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], t, p, p)
        return frames.reshape(rows * cols, c * t * p * p), [1, rows, cols]

    def inputs(self, paths: list[str], where: str) -> dict[str, torch.Tensor]:
        """The model's image arguments for the files, opened and preprocessed (`images_inputs`)."""
        return self.images_inputs([self.open(path, where) for path in paths])

    def images_inputs(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The model's image arguments for Pillow images already opened: `pixel_values`
        [images, C, H, W], or for dynamic resolution the flat patches of all of them and
        `image_grid_thw` [images, 3]."""
        if not self.dynamic:
            return {"pixel_values": torch.stack([self.preprocess(image) for image in images])}
        made = [self.patches(image) for image in images]
        return {"pixel_values": torch.cat([pixels for pixels, _ in made]),
                "image_grid_thw": torch.tensor([grid for _, grid in made], dtype=torch.long)}

    def pixel_values(self, paths: list[str], where: str) -> torch.Tensor:
        """The `pixel_values` of `inputs`."""
        return self.inputs(paths, where)["pixel_values"]

    def save(self, directory: Path) -> None:
        """Copy the processor files of the folder it came from (so transformers' AutoProcessor
        opens an export), or write preprocessor_config.json from these settings."""
        directory.mkdir(parents=True, exist_ok=True)
        copied = False
        for name in PROCESSOR_FILES:
            if self.source is not None and (self.source / name).is_file():
                shutil.copyfile(self.source / name, directory / name)
                copied = True
        if not copied:
            keys = ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "do_normalize",
                    "do_convert_rgb", "rescale_factor", "image_mean", "image_std", "resample")
            settings = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
            if self.dynamic:
                settings.update(patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size,
                                merge_size=self.merge_size,
                                size={"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels})
            (directory / PREPROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' NumPy center crop (channels first), padding with zeros where the image is smaller."""
    _, h, w = pixels.shape
    if h < height or w < width:
        padded = np.zeros((pixels.shape[0], max(h, height), max(w, width)), dtype=pixels.dtype)
        top, left = -(-(padded.shape[1] - h) // 2), -(-(padded.shape[2] - w) // 2)
        padded[:, top:top + h, left:left + w] = pixels
        pixels, h, w = padded, padded.shape[1], padded.shape[2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top:top + height, left:left + width]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into min_pixels..max_pixels of area
    with the aspect ratio kept as well as the rounding allows (Qwen 2's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width} x {height} pixels: the aspect ratio must be below 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w
