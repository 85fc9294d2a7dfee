"""Turning user input (paths, uploaded bytes, PIL images, numpy arrays) into RGB pixels.

This is the single place where whymatch decodes images, so the model, the indexer and the API
all see *the same* pixels for the same file.  That matters for duplicate detection: if the
indexer and a query decoded a photo differently (EXIF rotation ignored, alpha dropped to black,
16-bit clipped to white), the same image would not match itself.

Why each rule exists:

* EXIF orientation is applied: phones store portrait photos sideways plus an orientation tag.
* Alpha is composited on *white*: Pillow's plain ``convert("RGB")`` drops alpha, and the hidden
  colour under transparent pixels is usually black or garbage, unlike what a viewer shows.
* 16-bit greyscale is scaled by its real range (65535 -> 255); Pillow's ``I -> L`` clips instead,
  which turns almost every 16-bit image white.
* Truncated files raise instead of loading as half-grey images (Pillow's
  ``LOAD_TRUNCATED_IMAGES`` is deliberately left alone, i.e. False).
* The pixel count is checked from the header *before* decoding, so a tiny file that claims
  50000x50000 pixels (a decompression bomb) costs nothing.  Pillow's global
  ``Image.MAX_IMAGE_PIXELS`` is not touched; its own bomb error still applies on top of ours.
* Only common raster formats are opened (``SUPPORTED_FORMATS``): uploads are untrusted, and
  exotic plugins (e.g. EPS, which runs Ghostscript) are attack surface we do not need.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Union

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import ImageLoadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "SUPPORTED_FORMATS",
    "ImageSource",
    "file_sha256",
    "image_size",
    "load_image",
    "load_pixels",
    "to_tensor",
]

DEFAULT_MAX_PIXELS: int = 60_000_000
"""Refuse larger images: 60 MP is more than almost any camera, and ~180 MB once decoded as RGB."""

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

# Formats Pillow may try on paths/bytes.  Filtered to the plugins this Pillow build registers
# (AVIF/HEIF need optional libraries), because Image.open fails on unknown format names.
_WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "AVIF", "HEIF")
Image.init()  # registers the bundled plugins; idempotent, Image.open would do it anyway
SUPPORTED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)

IMAGE_SUFFIXES: Mapping[str, str] = MappingProxyType({".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"})
"""The file suffixes (lower case) a data folder or catalogue is scanned for, each with its Pillow format:
photo formats every Pillow build opens, so a folder indexes the same on every machine."""

# What decoding can raise for bad data.  Deliberately not ``Exception``: anything else is a bug
# and should surface as one.  DecompressionBombWarning only arrives as an exception when the
# caller runs with warnings as errors; we do not change warning filters (global state).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
_HASH_CHUNK = 1 << 20
_ORIENTATION_TAG = 0x0112


# --------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource,
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``source`` into a new RGB image, EXIF-rotated, alpha composited on white.

    ``target_size`` is only a decoding hint: JPEGs are DCT-scaled while decoding (much faster)
    but never below ``target_size`` on either side; the caller still resizes (``to_tensor``).
    Raises ``ImageLoadError`` with a short reason for anything a user can get wrong.
    """
    _check_arguments(target_size, max_pixels)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels)
        return _decode(source, target_size=None, owned=False)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = ""
    elif isinstance(source, (str, os.PathLike)):
        data = _read_file(source)
        where = f" ({os.fspath(source)})"
    else:
        raise TypeError(
            "image source must be a path, bytes, PIL image or numpy array, "
            f"got {type(source).__name__}"
        )
    return _load_bytes(data, where, target_size, max_pixels)


def _check_arguments(target_size: int | None, max_pixels: int) -> None:
    if target_size is not None and (not isinstance(target_size, int) or target_size < 1):
        raise ValueError(f"target_size must be a positive int or None, got {target_size!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")


def _load_bytes(data: bytes, where: str, target_size: int | None, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageLoadError(f"empty file{where}")

    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"not an image (cannot identify image file){where}") from exc
    except _DECODE_ERRORS as exc:
        raise _decode_error(exc, where) from exc
    # Image.open only parsed the header: refuse bombs before allocating any pixels.
    _check_pixels(img.size, max_pixels, where)
    rgb = _decode(img, target_size=target_size, owned=True, where=where)
    if rgb is not img:
        img.close()  # frees the decoded original; `rgb` is independent of it
    return rgb


def load_pixels(
    source: ImageSource,
    *,
    target_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The pixels of ``load_image(source, ...)`` as an H×W×3 uint8 array: the model's input path.

    Plain JPEGs (YCbCr or greyscale: nearly every photo in a catalogue) are decoded by
    libjpeg-turbo straight into numpy through simplejpeg, at the DCT scale Pillow's draft mode
    picks and with the same IDCT and upsampling, so the pixels are identical (tests check it);
    that is ~25 % faster than Pillow's decoder and skips Pillow's copy into an array, together
    ~1 ms of a 640×427 photo. Everything else, and any JPEG simplejpeg refuses, goes through
    ``load_image``, whose verdict on bad data is the one reported. An RGB uint8 array is returned as is.
    """
    _check_arguments(target_size, max_pixels)
    if isinstance(source, np.ndarray) and source.dtype == np.uint8 and source.ndim == 3 and source.shape[2] == 3:
        _check_pixels((source.shape[1], source.shape[0]), max_pixels)
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), ""
    elif isinstance(source, (str, os.PathLike)):
        data, where = _read_file(source), f" ({os.fspath(source)})"
    else:
        return np.asarray(load_image(source, target_size=target_size, max_pixels=max_pixels))
    pixels = _decode_plain_jpeg(data, target_size, max_pixels, where)
    if pixels is None:
        pixels = np.asarray(_load_bytes(data, where, target_size, max_pixels))
    return pixels


_JPEG_START = b"\xff\xd8"
_PLAIN_JPEG_MODES = frozenset({"RGB", "L"})  # CMYK/YCCK need Pillow's (Adobe-aware) conversion
# EXIF orientation -> the array operation of Pillow's ImageOps.exif_transpose.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def _decode_plain_jpeg(data: bytes, target_size: int | None, max_pixels: int, where: str) -> np.ndarray | None:
    """RGB pixels of a plain JPEG decoded by libjpeg-turbo, or None to leave it to Pillow."""
    if not data.startswith(_JPEG_START):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            width, height, mode = img.width, img.height, img.mode
            try:
                orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            except _DECODE_ERRORS:
                orientation = 1  # as load_image: broken EXIF keeps the stored orientation
    except (UnidentifiedImageError, *_DECODE_ERRORS):
        return None
    _check_pixels((width, height), max_pixels, where)
    if mode not in _PLAIN_JPEG_MODES:
        return None
    scale = _draft_scale(width, height, target_size)
    wanted = (-(-height // scale), -(-width // scale))
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=wanted[0], min_width=wanted[1],
                                        min_factor=scale)
    except ValueError:
        return None
    if pixels.shape[:2] != wanted:
        return None
    if orientation in _ORIENT:
        pixels = np.ascontiguousarray(_ORIENT[orientation](pixels))
    return pixels


def _draft_scale(width: int, height: int, target_size: int | None) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's ``draft`` picks: the largest keeping both sides >= target."""
    if target_size is None:
        return 1
    fits = min(width // target_size, height // target_size)
    return next(scale for scale in (8, 4, 2, 1) if scale <= max(fits, 1))


def _read_file(path: str | os.PathLike) -> bytes:
    """Read the whole (compressed) file: simpler than keeping a handle open for lazy decoding,
    and compressed files are small next to their decoded pixels."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ImageLoadError(f"file not found: {name}") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(f"not a file (is a directory): {name}") from exc
    except PermissionError as exc:
        raise ImageLoadError(f"cannot read file (permission denied): {name}") from exc
    except OSError as exc:
        raise ImageLoadError(f"cannot read file: {name}: {exc.strerror or exc}") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str = "") -> None:
    pixels = int(size[0]) * int(size[1])
    if pixels > max_pixels:
        raise ImageLoadError(
            f"image too large: {pixels} pixels > limit {max_pixels} "
            f"(possible decompression bomb){where}"
        )


def _decode_error(exc: BaseException, where: str) -> ImageLoadError:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageLoadError(f"image too large (possible decompression bomb): {exc}{where}")
    return ImageLoadError(f"truncated or corrupt image: {exc}{where}")


def _decode(
    img: Image.Image, *, target_size: int | None, owned: bool, where: str = ""
) -> Image.Image:
    """Load pixels (forcing errors to surface now), apply EXIF orientation, convert to RGB.

    ``owned`` images were opened here and may be modified in place (saves a full-size copy);
    a caller's image is never mutated.
    """
    try:
        if owned and target_size is not None:
            # No-op for formats without draft support; JPEG picks scale 1, 1/2, 1/4 or 1/8 so
            # that both sides stay >= target_size.
            img.draft("RGB", (target_size, target_size))
        img.load()
    except _DECODE_ERRORS as exc:
        raise _decode_error(exc, where) from exc

    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
        else:
            img = ImageOps.exif_transpose(img)  # copy; the caller keeps their image
            owned = True
    except _DECODE_ERRORS:
        # Broken EXIF in an otherwise valid image: the pixels are still worth more than a
        # refusal, so keep the stored orientation.
        pass

    rgb = _to_rgb(img, where)
    if rgb is img and not owned:
        rgb = img.copy()
    return rgb


def _to_rgb(img: Image.Image, where: str = "") -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer would show it."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        # High bit depth / float: scale to 8 bit ourselves (Pillow clips to 0..255).
        grey = _to_uint8(np.asarray(img))
        return Image.fromarray(grey).convert("RGB")
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            # P/L/RGB with a tRNS colour become RGBA too, so transparency is honoured.
            return _composite_on_white(img.convert("RGBA"))
        # CMYK (incl. Adobe-inverted JPEGs, which Pillow un-inverts), L, 1, P, YCbCr...
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageLoadError(f"unsupported colour mode {mode!r}{where}") from exc


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale one greyscale plane of any numeric dtype to uint8.

    Integers within 0..65535 are treated as 16-bit (65535 -> 255, 32768 -> 128); floats within
    [0, 1] are scaled by 255 and within [0, 255] kept; anything else is stretched min..max.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind in "ui":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            wide = arr.astype(np.uint32)
            return ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return _stretch(arr.astype(np.float64), lo, hi)
    values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _stretch(values, lo, hi)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    """numpy H×W / H×W×{1,3,4} (uint8, uint16, bool or float in [0, 1]) -> RGB image."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageLoadError(
            f"unsupported array shape {arr.shape}: expected H×W, H×W×3 or H×W×4 "
            "(channels last)"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"empty image array of shape {arr.shape}")
    _check_pixels((arr.shape[1], arr.shape[0]), max_pixels)

    kind = arr.dtype.kind
    if kind == "b":
        pixels = arr.astype(np.uint8) * np.uint8(255)
    elif arr.dtype == np.uint8:
        pixels = arr
    elif arr.dtype == np.uint16:
        pixels = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif kind == "f":
        if arr.size and not np.isfinite(arr).all():
            raise ImageLoadError("float image array contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            # Silently clipping e.g. 0..255 floats would give a white image; say so instead.
            raise ImageLoadError(
                f"float image array must be in [0, 1], got values in [{lo:g}, {hi:g}]"
            )
        pixels = np.rint(arr.astype(np.float32) * 255.0).astype(np.uint8)
    elif kind in "ui" and int(arr.min()) >= 0 and int(arr.max()) <= 255:
        pixels = arr.astype(np.uint8)  # e.g. int64 from np.array([...]) holding 8-bit values
    else:
        raise ImageLoadError(
            f"unsupported array dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]"
        )

    img = Image.fromarray(np.ascontiguousarray(pixels))
    if img.mode == "RGBA":
        return _composite_on_white(img)
    return img.convert("RGB") if img.mode != "RGB" else img


# --------------------------------------------------------------------------------------------
# to_tensor
# --------------------------------------------------------------------------------------------


def to_tensor(
    images: Sequence[Image.Image | np.ndarray],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Resize each image (RGB PIL image or H×W×3 uint8 array) to size×size and return a normalised
    float32 batch B×3×size×size (in channels_last memory layout).

    The *whole* image is squeezed to a square, not centre-cropped: for duplicate detection a
    change in the border matters as much as one in the middle.  OpenCV resizes (about 2.5× faster
    than Pillow here, which matters once the backbone runs at ~15 ms per image): pixel-area
    averaging when the image shrinks (antialiased), bilinear when it grows. torch is imported on
    the first call, so that decoding alone (the CLI's checks of a data folder) does not load it.
    """
    import torch

    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std need one value per RGB channel")
    if any(s == 0 for s in std):
        raise ValueError("std must not contain zeros")
    if len(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)

    # One table lookup per pixel normalises it. The pixels stay in their decoded HWC order, i.e.
    # torch's channels_last layout, which the CPU convolutions want: no copy to NCHW and back.
    table = _normalisation_table(tuple(mean), tuple(std))
    batch = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, img in enumerate(images):
        rgb = img if isinstance(img, np.ndarray) else np.asarray(img if img.mode == "RGB" else _to_rgb(img))
        if rgb.shape[:2] != (size, size):
            shrinking = rgb.shape[0] * rgb.shape[1] > size * size
            rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
        cv2.LUT(rgb, table, dst=batch[i])
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x / 255 - mean) / std of every possible byte x, per channel (1×256×3 float32, for ``cv2.LUT``)."""
    table = (np.arange(256, dtype=np.float64)[:, None] / 255.0 - np.asarray(mean)) / np.asarray(std)
    table = table.astype(np.float32).reshape(1, 256, 3)
    table.flags.writeable = False
    return table


# --------------------------------------------------------------------------------------------
# file_sha256
# --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks (catalogues and weights hold large files).

    Byte-identical images are exact duplicates without decoding anything.  I/O errors
    (missing file...) propagate as ``OSError``: this is not a decoding problem.
    """
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# image_size
# --------------------------------------------------------------------------------------------


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of the image ``load_image`` returns at full size, from the header only.

    Explanations give boxes in these coordinates, while the pixels the model saw may have been
    decoded at a reduced size (JPEG draft mode). EXIF orientations 5–8 swap the sides.
    """
    if isinstance(source, np.ndarray):
        return int(source.shape[1]), int(source.shape[0])
    if isinstance(source, Image.Image):
        return _displayed_size(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), ""
    elif isinstance(source, (str, os.PathLike)):
        data, where = _read_file(source), f" ({os.fspath(source)})"
    else:
        raise TypeError(f"image source must be a path, bytes, PIL image or numpy array, got {type(source).__name__}")
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
            return _displayed_size(img)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"not an image (cannot identify image file){where}") from exc
    except _DECODE_ERRORS as exc:
        raise _decode_error(exc, where) from exc


def _displayed_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:  # broken EXIF: load_image keeps the stored orientation too
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
