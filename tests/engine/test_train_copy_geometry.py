"""Edits of known geometry: the copy's pixels are where the map says, and cells land where expected."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.train.copy_geometry import (
    GEOMETRIC_EDITS,
    KnownEdit,
    cell_errors,
    draw_edit,
    true_cells,
)

GRID = (14, 14)
ALL_CELLS = np.array([[row, col] for row in range(14) for col in range(14)])


def spot_image(size: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """A black image with a bright 5×5 spot centred on pixel ``at`` (x, y)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    x, y = at
    pixels[y - 2 : y + 3, x - 2 : x + 3] = 255
    return Image.fromarray(pixels)


def spot(image: Image.Image) -> np.ndarray:
    """The brightness-weighted centre of the spot, in continuous pixels (x, y)."""
    grey = np.asarray(image.convert("L"), np.float64)
    grey = np.where(grey > grey.max() / 2, grey, 0.0)
    ys, xs = np.indices(grey.shape)
    return np.array([(xs * grey).sum(), (ys * grey).sum()]) / grey.sum() + 0.5


@pytest.mark.parametrize("edit", [
    KnownEdit((320, 200), (200, 90), (160, 120), 0.0, False, (160, 120)),  # crop
    KnownEdit((320, 200), (160, 100), (200, 150), 15.0, False, (200, 150)),  # rotation
    KnownEdit((320, 200), (160, 100), (320, 200), 0.0, True, (320, 200)),  # mirror image
    KnownEdit((320, 200), (170, 105), (180, 110), -12.0, True, (90, 70)),  # all, rescaled and squeezed
])
def test_the_copy_shows_each_point_where_the_map_says(edit):
    at = np.array([185, 95])
    copy = edit.apply(spot_image(edit.original, tuple(at)))
    assert copy.size == edit.size
    found = edit.to_original(spot(copy)[None])[0]
    scale = max(edit.footprint[0] / edit.size[0], edit.footprint[1] / edit.size[1])
    assert np.linalg.norm(found - (at + 0.5)) < 1.0 * scale


def test_mirror_maps_each_cell_to_its_mirror():
    edit = KnownEdit((300, 200), (150, 100), (300, 200), 0.0, True, (150, 80))
    np.testing.assert_allclose(true_cells(edit, ALL_CELLS, GRID), np.stack([ALL_CELLS[:, 0], 13 - ALL_CELLS[:, 1]], axis=1), atol=1e-9)
    assert cell_errors(edit, ALL_CELLS, np.stack([ALL_CELLS[:, 0], 13 - ALL_CELLS[:, 1]], axis=1), GRID).max() < 1e-9


def test_a_crop_accounts_for_each_image_being_squeezed_to_a_square():
    """The left half of a 2:1 image is square; both are squeezed onto 14×14 cells, so the copy's cell
    column c lies at column (c + 0.5) / 2 - 0.5 of the original, its row unchanged."""
    edit = KnownEdit((280, 140), (70, 70), (140, 140), 0.0, False, (140, 140))
    expected = np.stack([ALL_CELLS[:, 0], (ALL_CELLS[:, 1] + 0.5) / 2 - 0.5], axis=1)
    np.testing.assert_allclose(true_cells(edit, ALL_CELLS, GRID), expected, atol=1e-9)


def test_a_quarter_turn_maps_cells_as_rot90():
    """Footprint turned counter-clockwise: the copy shows the scene turned clockwise (``np.rot90(.., -1)``),
    so copy cell (r, c) shows original cell (13 - c, r)."""
    edit = KnownEdit((200, 200), (100, 100), (200, 200), 90.0, False, (200, 200))
    expected = np.stack([13 - ALL_CELLS[:, 1], ALL_CELLS[:, 0]], axis=1)
    np.testing.assert_allclose(true_cells(edit, ALL_CELLS, GRID), expected, atol=1e-9)
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    turned = np.asarray(edit.apply(Image.fromarray(pixels)), np.int16)
    assert np.abs(turned - np.rot90(pixels, -1)).max() <= 1


@pytest.mark.parametrize("kinds", [("crop",), ("rotate",), ("rescale",), ("mirror",), GEOMETRIC_EDITS])
def test_drawn_edits_stay_inside_the_original_and_repeat_with_the_seed(kinds):
    for seed in range(30):
        edit = draw_edit((640, 427), kinds, np.random.default_rng(seed))
        corners = edit.corners()
        assert (corners >= -1e-6).all() and (corners <= np.array([640, 427]) + 1e-6).all(), (kinds, seed, corners)
        assert edit == draw_edit((640, 427), kinds, np.random.default_rng(seed))
        assert edit.mirror == ("mirror" in kinds) and (edit.angle != 0) == ("rotate" in kinds)
        assert (edit.size != edit.footprint) == ("rescale" in kinds)


def test_unknown_edits_and_wrong_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown edits"):
        draw_edit((100, 100), ("crop", "blur"), np.random.default_rng(0))
    edit = KnownEdit((100, 80), (50, 40), (100, 80), 0.0, False, (100, 80))
    with pytest.raises(ValueError, match="drawn for"):
        edit.apply(Image.new("RGB", (80, 100)))
