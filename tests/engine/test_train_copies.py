"""Edited copies (``engine.train.copies``): deterministic per seed, every edit kind made, written once."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.train.copies import CROP_AREA, EDITS, MIN_EDITS, copies_folder, edit_plan, edited_copy, write_copies


def synthetic_photo(width: int = 160, height: int = 120, seed: int = 0) -> Image.Image:
    """A colourful, asymmetric test picture: gradients, noise and a few shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=2)
    pixels = np.clip(pixels + rng.integers(-20, 20, pixels.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 10, 50, 40), fill=(250, 30, 30))
    draw.ellipse((90, 50, 140, 110), fill=(20, 20, 240))
    return img


def as_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_a_seed_gives_the_same_copy_and_another_seed_another():
    photo = synthetic_photo()
    first, plan = edited_copy(photo, 7)
    again, plan_again = edited_copy(photo, 7)
    assert plan == plan_again and first.size == again.size
    assert np.array_equal(as_array(first), as_array(again))
    others = [edited_copy(photo, seed) for seed in range(8, 12)]
    assert any(img.size != first.size or not np.array_equal(as_array(img), as_array(first)) for img, _ in others)


@pytest.mark.parametrize("kind", EDITS)
def test_each_edit_kind_changes_the_photo(kind):
    photo = synthetic_photo()
    copy, plan = edited_copy(photo, 3, [kind])
    assert plan == [kind]
    assert copy.mode == "RGB"
    original = as_array(photo)
    edited = as_array(copy)
    assert copy.size != photo.size or np.abs(edited - original).mean() > 0.5, f"{kind} left the photo as it was"
    width, height = photo.size
    if kind == "mirror":
        assert np.array_equal(edited, original[:, ::-1])
    elif kind == "greyscale":
        assert np.array_equal(edited[..., 0], edited[..., 1]) and np.array_equal(edited[..., 1], edited[..., 2])
    elif kind == "crop":
        area = copy.size[0] * copy.size[1] / (width * height)
        assert CROP_AREA[0] - 0.05 <= area <= CROP_AREA[1] + 0.05
    elif kind == "border":
        assert copy.size[0] >= width and copy.size[1] >= height and copy.size != photo.size
    elif kind == "rescale":
        assert copy.size != photo.size
    elif kind in ("colour", "blur", "jpeg", "text", "overlay"):
        assert copy.size == photo.size


def test_random_plans_combine_several_edits_and_cover_every_kind():
    plans = [edit_plan(np.random.default_rng(seed)) for seed in range(300)]
    assert all(len(plan) >= MIN_EDITS for plan in plans)
    assert all(plan == [kind for kind in EDITS if kind in plan] for plan in plans), "edits run in EDITS order"
    assert {kind for plan in plans for kind in plan} == set(EDITS)
    assert np.mean([len(plan) for plan in plans]) > 3


def test_unknown_edit_is_refused():
    with pytest.raises(ValueError, match="unknown edits"):
        edited_copy(synthetic_photo(), 0, ["sepia"])


def test_copies_are_written_once_per_seed(tmp_path):
    sources = []
    for n in range(2):
        path = tmp_path / f"photo{n}.jpg"
        synthetic_photo(seed=n).save(path, quality=95)
        sources.append(path)
    made = write_copies(sources, 2, seed=0, cache_dir=tmp_path / "copies")
    assert [len(m) for m in made] == [2, 2]
    files = [p for m in made for p in m]
    assert all(p.is_file() and p.is_relative_to(copies_folder(tmp_path / "copies", 0)) for p in files)
    assert len(set(files)) == 4
    stamps = [p.stat().st_mtime_ns for p in files]
    assert write_copies(sources, 2, seed=0, cache_dir=tmp_path / "copies") == made
    assert [p.stat().st_mtime_ns for p in files] == stamps, "existing copies are reused, not rewritten"
    other = write_copies(sources, 1, seed=1, cache_dir=tmp_path / "copies")
    assert other[0][0].parent.parent != made[0][0].parent.parent
