"""Shared fixtures: small synthetic/sample images and tiny untrained models (fast, no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest_plugins = ["tests.catalogues"]

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _single_thread() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """scikit-image's sample photos (shipped in its wheel) and edits of them."""
    from skimage import data

    cat = Image.fromarray(data.chelsea())
    return {
        "cat": cat,
        "cat_crop": cat.crop((30, 20, 420, 280)),
        "coffee": Image.fromarray(data.coffee()),
        "rocket": Image.fromarray(data.rocket()),
    }


def make_model(preset: str = "whymatch", input_size: int = 128, seed: int = 0, **overrides):
    """A model with randomly initialised trained layers, float32 so gradients are exact."""
    from engine.config import ModelConfig
    from engine.inference import build_model

    torch.manual_seed(seed)
    config = ModelConfig.for_preset(preset, input_size=input_size, bf16=False, **overrides)
    model = build_model(config)
    if hasattr(model.net, "calibration"):
        # Untrained heads give huge logits; scale them into sigmoid's unsaturated range, where a
        # plain autograd reference is still exact (saturation has its own test).
        model.net.calibration.copy_(torch.tensor([0.02, 0.0]))
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_model()


@pytest.fixture()
def groups_folder(tmp_path: Path, photos) -> Path:
    """A duplicate-groups folder: 4 photos × 3 edits, in the <class>/<city>_<listing>_<n>.jpg layout."""
    rng = np.random.default_rng(0)
    for listing, (name, photo) in enumerate(sorted(photos.items())):
        folder = tmp_path / ("room" if listing % 2 else "kitchen")
        folder.mkdir(exist_ok=True)
        w, h = photo.size
        for n in range(3):
            dx, dy = rng.integers(0, w // 8), rng.integers(0, h // 8)
            photo.crop((dx, dy, w - w // 8 + dx, h - h // 8 + dy)).convert("RGB").save(folder / f"city_{listing}_{n}.jpg", quality=90)
    return tmp_path


def shared_or_skip(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real photos not available: {path} is missing (clone with ../shared beside the repo)")
    return path
