"""Tests for engine.images on small synthetic images written to tmp_path."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ImageLoadError
from engine.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    SUPPORTED_FORMATS,
    file_sha256,
    image_size,
    load_image,
    load_pixels,
    to_tensor,
)


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height (1-bit grey) with an empty IDAT: tiny on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- orientation and colour modes


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # red marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)

    out = load_image(path)
    assert out.mode == "RGB"
    assert out.size == (20, 40)
    r, g, b = out.getpixel((out.width - 3, 2))  # top-left moved to top-right
    assert r > 200 and b < 60
    r, g, b = out.getpixel((2, 2))
    assert b > 200 and r < 60


def test_cmyk_jpeg_pure_red(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    r, g, b = load_image(path).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_greyscale_and_1bit(tmp_path: Path) -> None:
    grey = load_image(_save(Image.new("L", (8, 8), 100), tmp_path / "g.png"))
    assert grey.mode == "RGB" and grey.getpixel((0, 0)) == (100, 100, 100)
    one = Image.new("1", (8, 8), 0)
    one.putpixel((1, 1), 1)
    out = load_image(_save(one, tmp_path / "one.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)


def test_16bit_png_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert abs(int(out[0, 1, 0]) - 128) <= 1
    assert out[0, 2, 0] == 0 and out[0, 3, 0] == 1


def test_float_mode_f() -> None:
    out = np.asarray(load_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 255), (0, 0, 5, 10))
    out = load_image(_save(img, tmp_path / "a.png"))
    assert out.getpixel((8, 5)) == (255, 255, 255)
    assert out.getpixel((2, 5)) == (255, 0, 0)
    half = load_image(Image.new("LA", (2, 2), (0, 128)))  # 50 % black over white -> mid grey
    assert abs(half.getpixel((0, 0))[0] - 127) <= 1


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (0, 0, 5, 10))
    path = _save(img, tmp_path / "p.png", transparency=0)
    out = load_image(path)
    assert out.getpixel((2, 2)) == (0, 255, 0)
    assert out.getpixel((8, 2)) == (255, 255, 255)  # transparent index, not black
    gif = load_image(_save(img, tmp_path / "p.gif", transparency=0))
    assert gif.getpixel((8, 2)) == (255, 255, 255)


def test_webp(tmp_path: Path) -> None:
    img = Image.new("RGBA", (12, 12), (0, 0, 255, 255))
    img.paste((0, 0, 0, 0), (6, 0, 12, 12))
    out = load_image(_save(img, tmp_path / "x.webp", lossless=True))
    assert out.mode == "RGB" and out.size == (12, 12)
    assert out.getpixel((2, 2)) == (0, 0, 255)
    assert out.getpixel((10, 2)) == (255, 255, 255)


# ---------------------------------------------------------------- other source types


def test_numpy_inputs() -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200
    out = load_image(rgb)
    assert out.size == (6, 4) and out.getpixel((0, 0)) == (200, 0, 0)

    assert load_image(np.full((4, 6), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.full((3, 3, 3), 65535, np.uint16)).getpixel((0, 0)) == (255,) * 3
    assert load_image(np.full((3, 3), 32768, np.uint16)).getpixel((0, 0)) == (128,) * 3
    assert load_image(np.full((3, 3), 77, np.uint8)).getpixel((1, 1)) == (77, 77, 77)
    assert load_image(np.full((3, 3, 1), 9, np.uint8)).getpixel((1, 1)) == (9, 9, 9)

    rgba = np.zeros((2, 2, 4), np.uint8)  # transparent black -> white
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)

    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(np.full((3, 3), 200.0))
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((3, 8, 8), np.uint8)[None])


def test_pil_input_not_mutated() -> None:
    src = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA"
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_image(rgb) is not rgb


def test_bytes_input(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), (0, 255, 0)).save(buf, format="PNG")
    out = load_image(buf.getvalue())
    assert out.size == (7, 5) and out.getpixel((3, 3)) == (0, 255, 0)


def test_draft_reduces_jpeg_decode(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (2000, 1500), (10, 120, 200)), tmp_path / "big.jpg")
    out = load_image(path, target_size=224)
    assert 224 <= min(out.size) < 1500
    assert out.size[0] > out.size[1]  # aspect ratio kept
    assert load_image(path).size == (2000, 1500)  # no hint, full size
    assert min(load_image(path, target_size=1400).size) >= 1400  # never below target


# ---------------------------------------------------------------- bad input


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello, this is not a picture\n")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(path)


def test_too_large_refused_before_decoding(tmp_path: Path) -> None:
    small = _save(Image.new("RGB", (40, 40)), tmp_path / "s.png")
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(small, max_pixels=1000)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(np.zeros((40, 40), np.uint8), max_pixels=1000)

    # Header claims 10000×7000 = 70 MP: over our default, under Pillow's own limit.
    claim = tmp_path / "claim.png"
    claim.write_bytes(_png_header_only(10_000, 7_000))
    assert 10_000 * 7_000 > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(claim)
    # Header claims 10^10 pixels: Pillow's DecompressionBombError, also mapped.
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(_png_header_only(100_000, 100_000), max_pixels=10**12)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError):
        load_image(str(tmp_path))  # a directory


# ---------------------------------------------------------------- to_tensor, sha256


def test_to_tensor_shape_dtype_normalisation() -> None:
    imgs = [Image.new("RGB", (50, 30), (255, 0, 128)), Image.new("L", (8, 80), 51)]
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    x = to_tensor(imgs, 16, mean, std)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    for c, v in enumerate((255, 0, 128)):
        expected = (v / 255 - mean[c]) / std[c]
        assert torch.allclose(x[0, c], torch.full((16, 16), expected), atol=1e-5)
    assert torch.allclose(x[1, 0], torch.full((16, 16), (0.2 - 0.5) / 0.5), atol=1e-5)
    assert to_tensor([], 8, mean, std).shape == (0, 3, 8, 8)


def test_to_tensor_keeps_whole_image() -> None:
    img = Image.new("RGB", (100, 20), (0, 0, 0))
    img.paste((255, 255, 255), (90, 0, 100, 20))  # white strip at the right edge
    x = to_tensor([img], 10, (0.0,) * 3, (1.0,) * 3)
    assert x[0, 0, :, -1].min() > 0.5  # not cropped away (blended with its neighbour)
    assert x[0, 0, :, 0].max() < 0.1


def test_file_sha256(tmp_path: Path) -> None:
    data = np.random.default_rng(1).bytes(3 << 20)  # spans several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_image_suffixes_are_of_formats_every_build_opens() -> None:
    assert set(IMAGE_SUFFIXES.values()) <= set(SUPPORTED_FORMATS)
    assert all(suffix.startswith(".") and suffix == suffix.lower() for suffix in IMAGE_SUFFIXES)


def test_image_size_honours_exif_orientation() -> None:
    image = Image.new("RGB", (30, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert image_size(buffer.getvalue()) == (10, 30)


def test_trns_colour_key_becomes_white() -> None:
    for mode, colour in (("RGB", (1, 2, 3)), ("L", 7)):
        buf = io.BytesIO()
        Image.new(mode, (4, 4), colour).save(buf, "PNG", transparency=colour)
        assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- load_pixels: the model's fast path


def _textured(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A photo-like image (smooth gradients plus noise) so JPEG decoders have real work to do."""
    rng = np.random.default_rng(width * 7 + height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], axis=2)
    pixels = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.mark.parametrize(
    ("size", "mode", "target", "subsampling", "progressive"),
    [
        ((640, 427), "RGB", 448, 2, False),
        ((2000, 1500), "RGB", 224, 2, False),  # DCT-scaled by 4
        ((1000, 900), "RGB", 448, 1, True),  # scaled by 2, progressive, 4:2:2
        ((333, 501), "RGB", 224, 0, False),  # 4:4:4, odd sides
        ((800, 600), "L", 300, 0, False),  # greyscale
    ],
)
def test_load_pixels_matches_load_image(tmp_path: Path, size, mode, target, subsampling, progressive) -> None:
    path = _save(_textured(*size, mode), tmp_path / "photo.jpg", quality=90, subsampling=subsampling,
                 progressive=progressive)
    for hint in (target, None):
        expected = np.asarray(load_image(path, target_size=hint))
        pixels = load_pixels(path, target_size=hint)
        assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
        assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_pixels_exif_orientations_match_load_image(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(_textured(48, 32), tmp_path / "o.jpg", exif=exif, quality=95)
    assert np.array_equal(load_pixels(path), np.asarray(load_image(path)))


def test_load_pixels_other_formats_and_inputs(tmp_path: Path) -> None:
    cmyk = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    png = _save(_textured(20, 10).convert("RGBA"), tmp_path / "a.png")
    for source in (cmyk, png, png.read_bytes(), Image.open(png), np.zeros((4, 5), np.uint8)):
        assert np.array_equal(load_pixels(source), np.asarray(load_image(source)))
    rgb = np.full((6, 7, 3), 9, np.uint8)
    assert load_pixels(rgb) is rgb  # already model-ready: no copy


def test_load_pixels_bad_input_reports_like_load_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _textured(128, 128).save(buf, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_pixels(cut)
    with pytest.raises(ImageLoadError, match="empty"):
        load_pixels(b"")
    with pytest.raises(ImageLoadError, match="too large"):
        load_pixels(buf.getvalue(), max_pixels=100)
    with pytest.raises(ImageLoadError, match="too large"):
        load_pixels(np.zeros((20, 20, 3), np.uint8), max_pixels=100)


def test_load_pixels_decodes_plain_jpegs_without_pillow(tmp_path: Path, monkeypatch) -> None:
    """The speed of the model's input path rests on this; identical pixels are checked above."""
    from engine import images

    calls = []
    decode = images.simplejpeg.decode_jpeg
    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or decode(*a, **k))
    load_pixels(_save(_textured(64, 48), tmp_path / "p.jpg"))
    load_pixels(_save(_textured(64, 48), tmp_path / "p.png"))
    assert len(calls) == 1
