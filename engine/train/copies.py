"""Edited copies of photos: positives that teach a model what "the same photo, edited" looks like.

A match, for the shipped model, is *the same scene or object, re-photographed or edited*. Duplicate
groups (the AirBnB rooms) teach the first half; this module makes the second: each copy combines
several of the edits a photo meets when it is re-published (``EDITS``: a crop keeping 35–90% of it, a
rescale, a mirror image, a rotation of at most 20°, colour jitter, greyscale, blur, text and shapes
drawn over it, a border, JPEG at quality 30–70), with torchvision's ``transforms.v2`` functional ops
and PIL. Every random choice comes from one seeded generator per copy, so a seed gives the same
pixels; copies are written once as JPEG files (``write_copies``) below a cache folder, so the feature
cache (keyed by path, size and time) keeps working on them.
"""

from __future__ import annotations

import hashlib
import io
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.v2 import functional as F

from engine.images import file_sha256, load_image

# Changes whenever an edit changes, so that copies made by another version are never reused.
COPY_VERSION = "copies-1"
# Every edit a copy can combine, in the order they are applied (geometry, then colour, then what is
# drawn over the photo, then its frame, then the compression of re-publishing).
EDITS = ("crop", "rescale", "mirror", "rotate", "colour", "greyscale", "blur", "text", "overlay", "border", "jpeg")
# How often each edit is part of a copy (about 3.7 edits per copy; at least ``MIN_EDITS``).
EDIT_PROBABILITY = {"crop": 0.6, "rescale": 0.35, "mirror": 0.4, "rotate": 0.3, "colour": 0.5, "greyscale": 0.15,
                    "blur": 0.25, "text": 0.3, "overlay": 0.25, "border": 0.2, "jpeg": 0.45}
MIN_EDITS = 2
CROP_AREA = (0.35, 0.90)
MAX_ROTATION = 20.0
JPEG_QUALITY = (30, 70)
# Quality of the copy's file (a ``jpeg`` edit has already compressed harder when it is one of the edits).
SAVE_QUALITY = 92


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = img.size
    area = rng.uniform(*CROP_AREA)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = round(min(width, max(8, width * np.sqrt(area * aspect))))
    h = round(min(height, max(8, height * area / (w / width))))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return F.crop(img, top, left, h, w)


def _rescale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    factor = rng.uniform(0.3, 0.8) if rng.random() < 0.7 else rng.uniform(1.2, 1.6)
    width, height = img.size
    return F.resize(img, [max(16, round(height * factor)), max(16, round(width * factor))], antialias=True)


def _mirror(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return F.horizontal_flip(img)


def _rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(3.0, MAX_ROTATION) * rng.choice([-1, 1]))
    return F.rotate(img, angle, interpolation=F.InterpolationMode.BILINEAR, expand=bool(rng.random() < 0.5),
                    fill=list(_colour(rng)))


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = F.adjust_brightness(img, rng.uniform(0.6, 1.4))
    img = F.adjust_contrast(img, rng.uniform(0.6, 1.4))
    img = F.adjust_saturation(img, rng.uniform(0.4, 1.6))
    return F.adjust_hue(img, rng.uniform(-0.08, 0.08))


def _greyscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return F.rgb_to_grayscale(img, num_output_channels=3)


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    sigma = float(rng.uniform(0.6, 2.0) * max(img.size) / 300)
    kernel = 2 * int(np.ceil(3 * sigma)) + 1
    return F.gaussian_blur(img, [kernel, kernel], [sigma, sigma])


def _text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = img.copy()
    draw = ImageDraw.Draw(img)
    width, height = img.size
    alphabet = string.ascii_letters + string.digits + "  .-@#"
    for _ in range(int(rng.integers(1, 3))):
        words = "".join(rng.choice(list(alphabet), int(rng.integers(3, 16)))).strip() or "copy"
        font = ImageFont.load_default(size=max(8, int(height * rng.uniform(0.05, 0.14))))
        left, top, right, bottom = draw.textbbox((0, 0), words, font=font)
        x = int(rng.integers(0, max(1, width - (right - left))))
        y = int(rng.integers(0, max(1, height - (bottom - top))))
        stroke = int(rng.integers(0, 3))
        draw.text((x, y), words, font=font, fill=_colour(rng), stroke_width=stroke, stroke_fill=_colour(rng))
    return img


def _overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width, height = img.size
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(width * rng.uniform(0.08, 0.3)), int(height * rng.uniform(0.08, 0.3))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        fill = (*_colour(rng), int(rng.integers(110, 256)))
        kind = rng.choice(["rectangle", "ellipse", "line"])
        if kind == "rectangle":
            draw.rectangle((x, y, x + w, y + h), fill=fill)
        elif kind == "ellipse":
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        else:
            draw.line((x, y, x + w, y + h), fill=fill, width=max(2, int(min(width, height) * rng.uniform(0.01, 0.04))))
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def _border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = img.size
    if rng.random() < 0.5:  # an even frame
        side = int(min(width, height) * rng.uniform(0.03, 0.12))
        padding = [side] * 4
    else:  # letterbox or pillarbox bands, or uneven padding
        padding = [int(width * rng.uniform(0, 0.15)), int(height * rng.uniform(0, 0.15)),
                   int(width * rng.uniform(0, 0.15)), int(height * rng.uniform(0, 0.15))]
        padding[int(rng.integers(0, 4))] += max(2, int(min(width, height) * 0.03))
    return F.pad(img, padding, fill=list(_colour(rng)))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


_APPLY: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": _crop, "rescale": _rescale, "mirror": _mirror, "rotate": _rotate, "colour": _jitter,
    "greyscale": _greyscale, "blur": _blur, "text": _text, "overlay": _overlay, "border": _border, "jpeg": _jpeg,
}


def edit_plan(rng: np.random.Generator) -> list[str]:
    """Which edits one copy combines (``EDITS`` order): each with its ``EDIT_PROBABILITY``, topped up at
    random to ``MIN_EDITS``."""
    chosen = {kind for kind in EDITS if rng.random() < EDIT_PROBABILITY[kind]}
    while len(chosen) < MIN_EDITS:
        chosen.add(str(rng.choice([kind for kind in EDITS if kind not in chosen])))
    return [kind for kind in EDITS if kind in chosen]


def edited_copy(image: Image.Image, seed: int, kinds: Sequence[str] | None = None) -> tuple[Image.Image, list[str]]:
    """An edited copy of ``image`` (RGB) and the edits it went through: ``kinds`` in ``EDITS`` order, or a
    random ``edit_plan``. The same image and seed always give the same pixels."""
    rng = np.random.default_rng(seed)
    plan = edit_plan(rng) if kinds is None else [kind for kind in EDITS if kind in set(kinds)]
    unknown = set(kinds or ()) - set(EDITS)
    if unknown:
        raise ValueError(f"unknown edits {sorted(unknown)}; choose from {', '.join(EDITS)}")
    img = image.convert("RGB")
    for kind in plan:
        img = _APPLY[kind](img, rng).convert("RGB")
    return img, plan


def copy_seed(seed: int, identity: str, number: int) -> int:
    """The seed of copy ``number`` of the file with content hash ``identity``: the same copy whatever
    else is copied with it."""
    digest = hashlib.sha256(f"{COPY_VERSION}|{seed}|{identity}|{number}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def copies_folder(cache_dir: Path, seed: int) -> Path:
    """Where the copies of one seed (and ``COPY_VERSION``) live: ``<cache_dir>/<hash>/``."""
    return Path(cache_dir) / hashlib.sha256(f"{COPY_VERSION}|{seed}".encode()).hexdigest()[:16]


def write_copies(paths: Sequence[Path], copies: int, seed: int, cache_dir: Path) -> list[list[Path]]:
    """``copies`` edited copies of each file (JPEG, quality ``SAVE_QUALITY``), written once to
    ``copies_folder(cache_dir, seed)/<sha[:2]>/<sha>-<n>.jpg`` and reused after: for each path, its copies' paths."""
    folder = copies_folder(cache_dir, seed)
    made: list[list[Path]] = []
    for path in paths:
        identity = file_sha256(path)
        targets = [folder / identity[:2] / f"{identity}-{n}.jpg" for n in range(copies)]
        missing = [(n, target) for n, target in enumerate(targets) if not target.is_file()]
        if missing:
            original = load_image(path)
            for n, target in missing:
                copy, _ = edited_copy(original, copy_seed(seed, identity, n))
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                copy.save(tmp, format="JPEG", quality=SAVE_QUALITY)
                tmp.replace(target)
        made.append(targets)
    return made
