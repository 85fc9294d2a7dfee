"""Explained pairs kept in memory so their overlay PNGs can be rendered when the browser asks for them.

Search and compare responses carry the four maps as data (h×w floats in [0, 1], for pages that draw
them) *and* URLs of overlay PNGs rendered on demand by ``engine.explain.figures.overlay``:
``/api/explanations/{key}/{which}.png``. Rendering needs both photos, so each explanation is stored
with where its photos come from: a catalogue item (re-read from the catalogue when rendering) or an
upload (a small JPEG copy kept here). Both stores are bounded LRUs: memory stays flat under load, and
an evicted key answers 404, asking the client to explain again.

A key is a hash of the model fingerprint and both images' identities (catalogue item and its sha256,
or the upload's sha256), so the same pair explained again by the same model hits the cache.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from engine import PairExplanation
from engine.explain.figures import overlay
from engine.explain.pairs import MAP_NAMES

KEY_PATTERN = r"^[0-9a-f]{32}$"

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A thread-safe mapping that forgets its least recently used entries beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._entries


@dataclass(frozen=True)
class Picture:
    """Where one side's photo comes from: a catalogue item, or an upload kept in the store."""

    item_id: int | None = None
    upload_sha256: str | None = None


@dataclass(frozen=True)
class StoredExplanation:
    explanation: PairExplanation
    a: Picture
    b: Picture


def pair_key(model_key: str, identity_a: str, identity_b: str) -> str:
    return hashlib.sha256(f"{model_key}|{identity_a}|{identity_b}".encode()).hexdigest()[:32]


def item_identity(item_id: int, sha256: str) -> str:
    return f"item:{item_id}:{sha256}"


def upload_identity(sha256: str) -> str:
    return f"upload:{sha256}"


class ExplanationStore:
    """Explained pairs by key, and display copies of the uploads they refer to."""

    def __init__(self, capacity: int) -> None:
        self.explanations: LRU[str, StoredExplanation] = LRU(capacity)
        # Uploads are the big part (~100 kB each as JPEG); a search of k matches shares one.
        self.uploads: LRU[str, bytes] = LRU(max(8, capacity // 16))

    def remember_upload(self, sha256: str, display: Image.Image) -> None:
        if sha256 not in self.uploads:
            buffer = io.BytesIO()
            display.convert("RGB").save(buffer, format="JPEG", quality=90)
            self.uploads.put(sha256, buffer.getvalue())

    def upload_picture(self, sha256: str) -> Image.Image | None:
        data = self.uploads.get(sha256)
        return None if data is None else Image.open(io.BytesIO(data)).convert("RGB")

    def put(self, key: str, stored: StoredExplanation) -> None:
        self.explanations.put(key, stored)

    def get(self, key: str) -> StoredExplanation | None:
        return self.explanations.get(key)


def png_url(base: str, key: str, which: str) -> str:
    """URL of an explained pair's PNG: an overlay (a map name) or a photo (``image_a``, ``image_b``);
    ``base`` is the API prefix, e.g. ``/api``."""
    return f"{base}/explanations/{key}/{which}.png"


def overlay_urls(base: str, key: str) -> dict[str, str]:
    """URLs of the four overlay PNGs of an explained pair."""
    return {name: png_url(base, key, name) for name in MAP_NAMES}


def render_png(picture: Image.Image, heatmap: np.ndarray | None, alpha: float) -> bytes:
    """The photo with the heatmap blended in (``alpha`` 1 gives the coloured map alone), as PNG."""
    image = picture if heatmap is None else overlay(picture, heatmap, alpha=alpha)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)  # a fast level: these are rendered per request
    return buffer.getvalue()
