"""Image loading and per-tower pre-processing (pad colour, centring, resize filter, normalisation)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cambrian.model.image_processing import (
    ImageLoadError, ImageProcessor, load_image, mean_to_color, pad_to_square, process_images,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def noise_image(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w, channels) if channels else (h, w)
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_pad_colours_from_means():
    assert mean_to_color(OPENAI_MEAN) == (122, 116, 104)
    assert mean_to_color(IMAGENET_MEAN) == (123, 116, 103)
    assert ImageProcessor(32, IMAGENET_MEAN, IMAGENET_STD).pad_color == (123, 116, 103)
    # SigLIP: normalises with 0.5 but pads with the OpenAI colour (passed explicitly)
    sig = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, pad_color=(122, 116, 104))
    assert sig.pad_color == (122, 116, 104)


@pytest.mark.parametrize("w,h", [(9, 4), (4, 9), (10, 3), (6, 6)])
def test_pad_to_square_centres_like_expand2square(w, h):
    img = noise_image(w, h)
    color = (122, 116, 104)
    out = np.asarray(pad_to_square(img, color))
    side = max(w, h)
    assert out.shape == (side, side, 3)
    top, left = (side - h) // 2, (side - w) // 2  # odd remainder goes to the bottom / right
    np.testing.assert_array_equal(out[top:top + h, left:left + w], np.asarray(img))
    mask = np.ones((side, side), bool)
    mask[top:top + h, left:left + w] = False
    assert mask.sum() == side * side - w * h
    assert (out[mask] == np.array(color, np.uint8)).all()


def test_pillow_default_resize_filter_is_bicubic():
    img = noise_image(13, 7)
    assert np.array_equal(np.asarray(img.resize((5, 5))), np.asarray(img.resize((5, 5), Image.Resampling.BICUBIC)))
    assert not np.array_equal(np.asarray(img.resize((5, 5))),
                              np.asarray(img.resize((5, 5), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("w,h", [(40, 17), (17, 40)])
def test_processor_exact_values(w, h):
    img = noise_image(w, h, seed=1)
    proc = ImageProcessor(24, OPENAI_MEAN, OPENAI_STD)
    out = proc(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    # manual: expand2square with (122, 116, 104), BICUBIC to 24x24, /255, normalise (float32)
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (122, 116, 104))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    arr = np.asarray(canvas.resize((24, 24), Image.Resampling.BICUBIC)).astype(np.float32) / np.float32(255)
    manual = (arr - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    torch.testing.assert_close(out, torch.from_numpy(manual).permute(2, 0, 1), atol=1e-6, rtol=0)
    # a pad pixel (corner on the padded side) normalises to (int(m*255)/255 - m) / s
    corner = out[:, 0, 0]  # top-left is pad for both orientations
    expect = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(corner, expect.float(), atol=1e-6, rtol=0)


def test_process_images_per_tower_and_square():
    imgs = [noise_image(30, 12, seed=2), noise_image(12, 30, seed=3), noise_image(16, 16, seed=4)]
    procs = [ImageProcessor(16, (0.5,) * 3, (0.5,) * 3, pad_color=(122, 116, 104)),
             ImageProcessor(20, IMAGENET_MEAN, IMAGENET_STD)]
    pixels, sizes = process_images(imgs, procs, "pad")
    assert sizes == [(30, 12), (12, 30), (16, 16)]
    assert [tuple(p.shape) for p in pixels] == [(3, 3, 16, 16), (3, 3, 20, 20)]
    for t, proc in zip(pixels, procs):
        for i, img in enumerate(imgs):
            assert torch.equal(t[i], proc(img))
    # towers pad with their own colours: the top row of the wide image is pad in both
    top0 = (pixels[0][0, :, 0, 0] * 0.5 + 0.5) * 255
    top1 = (pixels[1][0, :, 0, 0] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)) * 255
    torch.testing.assert_close(top0, torch.tensor([122., 116., 104.]), atol=1e-3, rtol=0)
    torch.testing.assert_close(top1, torch.tensor([123., 116., 103.]), atol=1e-3, rtol=0)

    square, sizes2 = process_images(imgs, procs, "square")  # straight resize, no padding
    assert sizes2 == sizes
    manual = np.asarray(imgs[0].resize((16, 16))).astype(np.float32) / np.float32(255)
    torch.testing.assert_close(square[0][0], torch.from_numpy((manual - 0.5) / 0.5).permute(2, 0, 1),
                               atol=1e-6, rtol=0)
    assert not torch.equal(square[0][0], pixels[0][0])
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        process_images(imgs, procs, "anyres")
    empty, no_sizes = process_images([], procs)
    assert [tuple(e.shape) for e in empty] == [(0, 3, 16, 16), (0, 3, 20, 20)] and no_sizes == []


def test_load_image_sources_and_modes(tmp_path):
    rgb = noise_image(7, 5)
    path = tmp_path / "a.png"
    rgb.save(path)
    for src in (path, str(path), path.read_bytes(), rgb):
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(rgb))

    gray = noise_image(6, 4, mode="L")
    out = load_image(png_bytes(gray))
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.shape == (4, 6, 3)
    assert (arr[..., 0] == np.asarray(gray)).all() and (arr[..., 1] == arr[..., 2]).all()

    rgba = noise_image(6, 4, mode="RGBA")
    out = load_image(rgba)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(rgba)[..., :3])
    pal = rgb.convert("P")
    assert load_image(pal).mode == "RGB"
    # processors take any mode too
    assert ImageProcessor(8, OPENAI_MEAN, OPENAI_STD)(gray).shape == (3, 8, 8)


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageLoadError, match=r"missing\.png.*not found"):
        load_image(tmp_path / "missing.png")
    data = png_bytes(noise_image(64, 64, seed=5))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"trunc\.png"):
        load_image(trunc)
    jpg = io.BytesIO()
    noise_image(64, 64, seed=6).save(jpg, format="JPEG")
    tj = tmp_path / "trunc.jpg"
    tj.write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"trunc\.jpg.*truncated"):
        load_image(tj)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, not an image")
    with pytest.raises(ImageLoadError, match=r"notes\.txt.*not a recognised image"):
        load_image(txt)
    with pytest.raises(ImageLoadError, match="bytes"):
        load_image(b"\x89PNG garbage")
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)
    assert issubclass(ImageLoadError, ValueError)
    with pytest.raises(TypeError):
        load_image(123)  # type: ignore[arg-type]
