"""Reading uploaded images: bytes, pixels and format are checked before the model ever sees them.

Uploads are untrusted, so every check has its own status code and a one-line ``detail``:

* 413 — more bytes than ``max_upload_bytes`` (read stops one byte past the limit), or more pixels than
  ``max_pixels`` (read from the header, so a decompression bomb costs nothing to refuse);
* 415 — not an image, or a format the API does not open (``engine.images.SUPPORTED_FORMATS``);
* 400 — empty, truncated or corrupt.

Decoding goes through ``engine.images.load_image``, so the API sees the same pixels as the indexer.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass

from fastapi import HTTPException, UploadFile
from PIL import Image, UnidentifiedImageError

from api.deps import ApiState
from engine.errors import ImageLoadError
from engine.images import IMAGE_SUFFIXES, SUPPORTED_FORMATS, load_image

# Formats the indexer scans (engine.images.IMAGE_SUFFIXES), by Pillow format name: the suffix an upload is stored under.
INDEXABLE_SUFFIXES = {fmt: suffix for suffix, fmt in reversed(IMAGE_SUFFIXES.items())}
DISPLAY_SIZE = 768  # longest side of the copies kept for overlays

_HEADER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Upload:
    """An uploaded image that passed every check."""

    label: str  # how messages name it: the client's file name, else the form field
    data: bytes
    sha256: str
    format: str  # Pillow's format name (JPEG, PNG, ...)
    image: Image.Image  # RGB, EXIF-rotated; JPEGs draft-decoded to at least the model's input size


def filename_of(file: UploadFile) -> str | None:
    """The client's file name, made single-line and short (it is client-controlled)."""
    return " ".join((file.filename or "").split())[:80] or None


def label_of(file: UploadFile, field: str) -> str:
    """How messages name an upload: its file name, else its form field."""
    name = filename_of(file)
    return f"'{name}'" if name else field


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


async def read_upload(file: UploadFile, *, field: str, max_bytes: int) -> bytes:
    """The upload's bytes; 413 as soon as it is longer than ``max_bytes``."""
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"{label_of(file, field)}: larger than the upload limit of {_mb(max_bytes)}")
    return data


def status_for(exc: ImageLoadError) -> int:
    """The status code of a ``load_image`` refusal, from its cause (the message is only a fallback)."""
    cause, message = exc.__cause__, str(exc)
    if isinstance(cause, _BOMBS) or message.startswith("image too large"):
        return 413
    if isinstance(cause, UnidentifiedImageError) or message.startswith(("not an image", "unsupported colour mode")):
        return 415
    return 400


def one_line(text: str) -> str:
    return " ".join(text.split())


_DIB_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}


def signature_format(data: bytes) -> str | None:
    """The image format ``data`` announces by its magic number, whatever follows; None when it names none."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"):
        return "AVIF/HEIF"
    if data.startswith(b"BM") and len(data) >= 18 and struct.unpack("<I", data[14:18])[0] in _DIB_HEADER_SIZES:
        return "BMP"
    return None


def decode_upload(data: bytes, *, label: str, max_pixels: int, target_size: int | None) -> Upload:
    """Check and decode one upload; raises ``HTTPException`` 400/413/415 with a one-line ``detail``."""
    if not data:
        raise HTTPException(400, f"{label}: empty file")
    supported = ", ".join(SUPPORTED_FORMATS)
    try:
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as probe:
            image_format, (width, height) = probe.format or "", probe.size
    except UnidentifiedImageError as exc:
        # Pillow cannot tell "not an image" from "an image too damaged to open"; the magic number can.
        claimed = signature_format(data)
        if claimed is not None:
            raise HTTPException(400, f"{label}: corrupt {claimed} image (its header cannot be read)") from exc
        raise HTTPException(415, f"{label}: not an image in a supported format ({supported})") from exc
    except _BOMBS as exc:
        raise HTTPException(413, f"{label}: too many pixels (possible decompression bomb)") from exc
    except _HEADER_ERRORS as exc:
        raise HTTPException(400, f"{label}: corrupt image header: {one_line(str(exc))}") from exc
    if width * height > max_pixels:
        raise HTTPException(413, f"{label}: {width}×{height} = {width * height} pixels is over the limit of {max_pixels}")
    try:
        image = load_image(data, target_size=target_size, max_pixels=max_pixels)
    except ImageLoadError as exc:
        raise HTTPException(status_for(exc), f"{label}: {one_line(str(exc))}") from exc
    return Upload(label, data, hashlib.sha256(data).hexdigest(), image_format, image)


def decode_for_model(state: ApiState, data: bytes, label: str) -> Upload:
    """``decode_upload`` under the API's pixel limit, no finer than the catalogue's model will look."""
    return decode_upload(data, label=label, max_pixels=state.settings.max_pixels, target_size=state.catalogue.input_size)


def display_copy(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """A copy no larger than ``size`` on its longest side, for overlays shown in a browser."""
    copy = image.copy()
    copy.thumbnail((size, size), Image.Resampling.BILINEAR)
    return copy
