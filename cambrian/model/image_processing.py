"""Image loading and per-tower pre-processing, as the released Cambrian-1 does it.

Each vision tower has its own resolution and normaliser.  For `image_aspect_ratio="pad"` an image is
first padded to a square (centred, like LLaVA's `expand2square`) with that tower's pad colour, then
resized to (R, R) with Pillow's default filter (BICUBIC for RGB in Pillow 12), scaled to [0, 1] and
normalised with the tower's mean/std.  `image_sizes` keeps every original (width, height) so the
connector can drop the padded part of the token grid again.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageLoadError", "ImageProcessor", "load_image", "process_images", "pad_to_square", "mean_to_color",
    "ASPECT_RATIOS",
]

ASPECT_RATIOS = ("pad", "square")

class ImageLoadError(ValueError):
    """An image file is missing, truncated, or not an image."""


def mean_to_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The pad colour LLaVA derives from a normaliser mean: `int(m * 255)` per channel (truncation)."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def pad_to_square(image: Image.Image, color: Sequence[int]) -> Image.Image:
    """Centre `image` on a square canvas of side max(w, h) filled with `color` (LLaVA's expand2square).

    The offset is `(side - short) // 2`, so an odd remainder leaves the extra row/column at the
    bottom/right, exactly like the original.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(color))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class ImageProcessor:
    """Pre-processing for one vision tower: pad colour, resolution, normaliser.

    `pad_color` defaults to `mean_to_color(image_mean)`; towers whose original pipeline padded with a
    different colour (SigLIP pads with the OpenAI mean colour although it normalises with 0.5) pass it
    explicitly.  Calling the processor on a PIL image returns a float32 (3, R, R) tensor.
    """

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pad_color: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self.image_size = int(self.image_size)
        self.image_mean = tuple(float(m) for m in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(s) for s in self.image_std)  # type: ignore[assignment]
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean/image_std need 3 values, got {self.image_mean} / {self.image_std}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.pad_color is None:
            self.pad_color = mean_to_color(self.image_mean)
        self.pad_color = tuple(int(c) for c in self.pad_color)  # type: ignore[assignment]

    @property
    def crop_size(self) -> dict[str, int]:
        """LLaVA-style `{"height": R, "width": R}` (what callers of HF image processors look for)."""
        return {"height": self.image_size, "width": self.image_size}

    def pad_to_square(self, image: Image.Image) -> Image.Image:
        """Centre on a square canvas of this tower's pad colour."""
        return pad_to_square(image, self.pad_color)  # type: ignore[arg-type]

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize to (R, R) with Pillow's default filter (no `resample` argument: BICUBIC for RGB)."""
        if image.size == (self.image_size, self.image_size):
            return image
        return image.resize((self.image_size, self.image_size))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB uint8 (R, R) image -> normalised float32 (3, R, R): (x / 255 - mean) / std."""
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)  # (H, W, 3)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32) / 255.0  # (3, H, W)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def __call__(self, image: Image.Image, pad: bool = True) -> torch.Tensor:
        """Pad (unless `pad=False`), resize, normalise -> (3, R, R) float32."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if pad:
            image = self.pad_to_square(image)
        return self.to_tensor(self.resize(image))

    preprocess = __call__


def load_image(image: str | os.PathLike | bytes | bytearray | Image.Image) -> Image.Image:
    """Open an image file, raw encoded bytes, or a PIL image, and return it as an RGB PIL image.

    The pixels are decoded here (not lazily), so a truncated file fails now, not deep inside the
    model.  Any failure raises `ImageLoadError` naming the file and the reason.  Alpha is dropped
    (`convert("RGB")`, as the original pipeline does); EXIF orientation is not applied (neither was it).
    """
    if isinstance(image, Image.Image):
        source = f"<PIL image {image.mode} {image.size[0]}x{image.size[1]}>"
        try:
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageLoadError(f"cannot load image {source}: {exc}") from exc

    if isinstance(image, (bytes, bytearray, memoryview)):
        source = f"<{len(image)} bytes>"
        fp: io.BytesIO | str = io.BytesIO(bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        source = os.fspath(image)
        if not os.path.exists(source):
            raise ImageLoadError(f"cannot load image {source!r}: file not found")
        if os.path.isdir(source):
            raise ImageLoadError(f"cannot load image {source!r}: it is a directory")
        fp = source
    else:
        raise TypeError(f"load_image takes a path, bytes or a PIL image, got {type(image).__name__}")

    try:
        with Image.open(fp) as opened:
            opened.load()  # decode now: truncated data raises here
            return opened.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"cannot load image {source!r}: not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot load image {source!r}: {exc}") from exc


def process_images(images: Sequence[Image.Image | str | os.PathLike | bytes],
                   processors: Sequence[ImageProcessor] | ImageProcessor,
                   image_aspect_ratio: str | None = "pad") -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Pre-process `images` once per tower.

    images: B PIL images (or anything `load_image` takes).
    processors: one `ImageProcessor` per tower (a single processor is treated as a list of one).
    image_aspect_ratio: "pad" (pad to square with each tower's pad colour, then resize) or "square"
        (resize straight to (R, R), distorting the aspect ratio).
    Returns (one float32 (B, 3, R_i, R_i) tensor per tower, B original (width, height)).
    """
    if isinstance(processors, ImageProcessor):
        processors = [processors]
    ratio = image_aspect_ratio or "square"
    if ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {image_aspect_ratio!r}")
    rgb = [load_image(im) for im in images]
    image_sizes = [im.size for im in rgb]  # (width, height) each
    pixel_values = []
    for proc in processors:
        if not rgb:
            pixel_values.append(torch.empty(0, 3, proc.image_size, proc.image_size))
            continue
        pixel_values.append(torch.stack([proc(im, pad=ratio == "pad") for im in rgb]))  # (B, 3, R, R)
    return pixel_values, image_sizes
