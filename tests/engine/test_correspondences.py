"""Region correspondences: an exact decomposition for MatchNet, boxes in original pixels, disjoint regions, the pairs
that agree with the shared geometry first."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.errors import ImageLoadError
from engine.explain.correspondences import (
    cell_box,
    cell_centres,
    find_correspondences,
    pair_contributions,
    pixels_to_cells,
    window_sums,
)
from engine.explain.figures import pair_figure
from engine.images import image_size
from tests.conftest import make_model


@pytest.fixture(scope="module")
def model():
    """7×7 feature grids (224 px), so five disjoint 3×3 windows fit."""
    return make_model(input_size=224)


@pytest.fixture(scope="module")
def tall(photos) -> Image.Image:
    return photos["coffee"].crop((100, 0, 300, 400))  # 200×400: portrait, unlike the other photos


def test_decomposition_is_exact(model, photos):
    net = model.net
    fmaps = model.feature_maps([photos["cat"], photos["cat_crop"], photos["coffee"]])
    local_a, local_b = net.local_descriptors(fmaps[:1].expand(2, -1, -1, -1)), net.local_descriptors(fmaps[1:])
    projs = net.project(fmaps)
    terms = net.cell_contributions(projs[:1].expand(2, -1, -1, -1), projs[1:])
    local = net.local_match(local_a, local_b)
    torch.testing.assert_close(terms.sum(dim=(1, 2)), local, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pair_contributions(net, projs[:1], projs[1:]).sum(dim=(1, 2)), local.detach(), atol=1e-6, rtol=1e-5)


def test_shares_are_parts_of_the_local_match_term(model, photos):
    projs = model.net.project(model.feature_maps([photos["cat"], photos["cat_crop"]]))
    size = photos["cat"].size
    found = find_correspondences(model.net, projs[:1], projs[1:], [size], [photos["cat_crop"].size], top=1, radius=0)[0]
    terms = pair_contributions(model.net, projs[:1], projs[1:])[0]
    (ya, xa), (yb, xb) = found[0]["cell_a"], found[0]["cell_b"]
    w = projs.shape[3]
    assert found[0]["share"] == pytest.approx(float(terms.max() / terms.clamp(min=0).sum()), rel=1e-5)
    assert float(terms[ya * w + xa, yb * w + xb]) == pytest.approx(float(terms.max()), rel=1e-6)


def test_window_sums_match_brute_force():
    torch.manual_seed(0)
    values = torch.randn(2, 3 * 4, 5 * 2)
    sums = window_sums(values, (3, 4), (5, 2), radius=1)
    grid = values.view(2, 3, 4, 5, 2)
    for ya, xa, yb, xb in [(0, 0, 0, 0), (1, 2, 4, 1), (2, 3, 2, 0)]:
        expected = grid[:, max(ya - 1, 0) : ya + 2, max(xa - 1, 0) : xa + 2, max(yb - 1, 0) : yb + 2, max(xb - 1, 0) : xb + 2].sum(dim=(1, 2, 3, 4))
        torch.testing.assert_close(sums[:, ya, xa, yb, xb], expected)


def test_cell_centres_and_pixels_to_cells_are_inverse():
    cells = np.array([[row, col] for row in range(14) for col in range(14)])
    points = cell_centres(cells, (14, 14), (333, 121))
    assert points[0].tolist() == pytest.approx([333 / 28, 121 / 28])
    np.testing.assert_allclose(pixels_to_cells(points, (14, 14), (333, 121)), cells, atol=1e-9)


def test_cell_box_maps_the_squeezed_grid_to_original_pixels():
    assert cell_box(1, 2, (4, 4), (400, 200)) == [200, 50, 300, 100]
    assert cell_box(0, 0, (4, 4), (400, 200), radius=1) == [0, 0, 200, 100]
    assert cell_box(3, 3, (4, 4), (401, 203), radius=1) == [200, 101, 401, 203]


def check_boxes(correspondences: list[dict], size_a, size_b) -> None:
    assert correspondences
    for c in correspondences:
        for key, (width, height) in (("box_a", size_a), ("box_b", size_b)):
            x0, y0, x1, y1 = c[key]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (key, c[key], width, height)
    shares = [c["share"] for c in correspondences]
    assert shares == sorted(shares, reverse=True) and all(s > 0 for s in shares) and sum(shares) <= 1 + 1e-6
    assert [c["rank"] for c in correspondences] == list(range(1, len(correspondences) + 1))


def test_boxes_lie_in_the_original_images(model, photos, tall):
    explanation = model.explain(photos["cat"], [tall], correspondences=True)[0]
    check_boxes(explanation.correspondences, photos["cat"].size, tall.size)
    assert max(c["box_b"][3] for c in explanation.correspondences) > tall.size[0]  # y reaches beyond the width
    assert 3 <= len(explanation.correspondences) <= 5


def chebyshev(first: list[int], second: list[int]) -> int:
    return max(abs(first[0] - second[0]), abs(first[1] - second[1]))


def test_kept_regions_share_no_cell_pair_nor_centre(model, photos):
    found = model.explain(photos["cat"], [photos["cat_crop"]], correspondences=True)[0].correspondences
    for n, first in enumerate(found):
        for second in found[n + 1 :]:
            gaps = [chebyshev(first[key], second[key]) for key in ("cell_a", "cell_b")]
            assert min(gaps) > 1 and max(gaps) > 2  # centres outside each other's windows; windows disjoint on one side


class ZoomNet:
    """A stand-in net whose only contributions pair each cell of a with where a 2× zoom puts it in b."""

    head_device = torch.device("cpu")

    def __init__(self, grid: int) -> None:
        self.truth = {}
        terms = torch.zeros(1, grid * grid, grid * grid)
        for row in range(grid):
            for col in range(grid):
                self.truth[(row, col)] = (row // 2 + grid // 4, col // 2 + grid // 4)
                terms[0, row * grid + col, self.truth[(row, col)][0] * grid + self.truth[(row, col)][1]] = 1.0 + 0.01 * (row + col)
        self.terms = terms

    def cell_contributions(self, projs_a: torch.Tensor, projs_b: torch.Tensor) -> torch.Tensor:
        return self.terms


def test_a_zoom_keeps_pairs_whose_windows_overlap_in_the_zoomed_out_image():
    """Regions three cells apart in a zoomed image are one or two apart in the other: requiring disjoint
    windows there too would keep only a handful of the true pairs."""
    net, grid = ZoomNet(14), torch.zeros(1, 1, 14, 14)
    found = find_correspondences(net, grid, grid, [(14, 14)], [(14, 14)], top=20)[0]
    assert len(found) >= 12
    for c in found:
        assert chebyshev(list(net.truth[tuple(c["cell_a"])]), c["cell_b"]) <= 1
    assert sum(c["share"] for c in found) <= 1 + 1e-6


class TurnNet:
    """A stand-in net pairing each cell of a with the cell of b where a mirrored, turned and zoomed copy puts
    it (4:3 images of different sizes, so the turn is no similarity on the squeezed grids), plus ``wrong``
    pairs far from there, each stronger than any window of true pairs."""

    head_device = torch.device("cpu")
    size_a, size_b = (280, 210), (400, 300)

    def __init__(self, grid: int, wrong: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
        theta = np.deg2rad(15.0)
        turn = 1.1 * np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        rows, cols = np.divmod(np.arange(grid * grid), grid)
        (wa, ha), (wb, hb) = self.size_a, self.size_b
        points = np.stack([wa - (cols + 0.5) * wa / grid, (rows + 0.5) * ha / grid], axis=1)  # mirrored
        landed = (points - [wa / 2, ha / 2]) @ turn.T + [wb / 2, hb / 2]
        cells_b = np.floor(landed / [wb / grid, hb / grid]).astype(int)[:, ::-1]
        self.truth, self.wrong = {}, wrong
        terms = torch.zeros(1, grid * grid, grid * grid)
        for n, (row, col) in enumerate(cells_b):
            if 0 <= row < grid and 0 <= col < grid:
                self.truth[divmod(n, grid)] = (int(row), int(col))
                terms[0, n, row * grid + col] = 1.0 + 0.01 * n / grid
        for (ya, xa), (yb, xb) in wrong:
            assert chebyshev(list(self.truth[(ya, xa)]), [yb, xb]) > 3
            terms[0, ya * grid + xa, yb * grid + xb] = 30.0
        self.terms = terms

    def cell_contributions(self, projs_a: torch.Tensor, projs_b: torch.Tensor) -> torch.Tensor:
        return self.terms


def test_pairs_that_agree_with_the_geometry_come_before_stronger_wrong_ones():
    """A turned, mirrored copy: the head's strongest pairs are wrong (its descriptors do not turn), and the
    one geometry most of its pairs agree with puts the right ones first."""
    net, grid = TurnNet(14, wrong=[((3, 3), (10, 11)), ((10, 9), (2, 2)), ((6, 2), (12, 7))]), torch.zeros(1, 1, 14, 14)
    regions = window_sums(net.terms, (14, 14), (14, 14), radius=1)[0]
    ya, xa, yb, xb = map(int, np.unravel_index(int(regions.argmax()), regions.shape))
    # By value alone the first pick would be a window around a wrong pair.
    assert any(chebyshev([ya, xa], list(a)) <= 1 and chebyshev([yb, xb], list(b)) <= 1 for a, b in net.wrong)
    found = find_correspondences(net, grid, grid, [net.size_a], [net.size_b], top=10)[0]
    assert len(found) == 10
    for c in found:
        assert chebyshev(list(net.truth[tuple(c["cell_a"])]), c["cell_b"]) <= 1
    everything = find_correspondences(net, grid, grid, [net.size_a], [net.size_b], top=196)[0]
    agree = [chebyshev(list(net.truth[tuple(c["cell_a"])]), c["cell_b"]) <= 1 for c in everything]
    assert agree == sorted(agree, reverse=True)  # every agreeing pair before the first that does not


def test_without_a_shared_geometry_pairs_keep_their_order_by_value():
    """Unrelated contributions: no geometry is shared, so the pairs are picked by value alone."""
    torch.manual_seed(0)
    net, grid = ZoomNet(14), torch.zeros(1, 1, 14, 14)
    net.terms = torch.rand(1, 196, 196) ** 8
    found = find_correspondences(net, grid, grid, [(140, 140)], [(140, 140)], top=20)[0]
    assert len(found) == 20
    shares = [c["share"] for c in found]
    assert shares == sorted(shares, reverse=True)


def test_swapping_images_swaps_boxes(model, photos, tall):
    ab = model.explain(photos["cat"], [tall], correspondences=True)[0].correspondences
    ba = model.explain(tall, [photos["cat"]], correspondences=True)[0].correspondences
    assert [(c["box_a"], c["box_b"]) for c in ab] == [(c["box_b"], c["box_a"]) for c in ba]
    np.testing.assert_allclose([c["share"] for c in ab], [c["share"] for c in ba], rtol=1e-4)


def test_batched_equals_single(model, photos, tall):
    others = [tall, photos["rocket"]]
    batched = model.explain(photos["cat"], others, correspondences=True)
    for other, explanation in zip(others, batched):
        single = model.explain(photos["cat"], [other], correspondences=True)[0]
        assert [c["box_b"] for c in single.correspondences] == [c["box_b"] for c in explanation.correspondences]


def test_paper_preset_falls_back_to_weighted_cell_cosines(photos, tall):
    paper = make_model("paper")
    explanation = paper.explain(photos["cat"], [tall], correspondences=True)[0]
    check_boxes(explanation.correspondences, photos["cat"].size, tall.size)


def test_only_asked_for_and_sizes_required(model, photos):
    plain = model.explain(photos["cat"], [photos["coffee"]])[0]
    assert plain.correspondences is None and "correspondences" not in plain.to_dict()
    fmaps = model.feature_maps([photos["cat"], photos["coffee"]])
    with pytest.raises(ValueError, match="sizes"):
        model.explain_feature_maps(fmaps[:1], fmaps[1:], correspondences=True)
    explained = model.explain_feature_maps(fmaps[:1], fmaps[1:], correspondences=True, sizes=[photos["cat"].size, photos["coffee"].size])
    assert explained[0].to_dict()["correspondences"] == explained[0].correspondences
    with pytest.raises(ValueError, match="per pair"):
        find_correspondences(model.net, model.net.project(fmaps[:1]), model.net.project(fmaps[1:]), [(10, 10)], [])


def test_image_size_follows_exif_rotation(photos, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 390×260, shown 260×390
    buffer = io.BytesIO()
    photos["cat_crop"].save(buffer, format="JPEG", exif=exif)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buffer.getvalue())
    assert image_size(buffer.getvalue()) == image_size(path) == (260, 390)
    assert image_size(np.zeros((5, 7, 3), np.uint8)) == (7, 5)
    assert image_size(photos["cat_crop"]) == (390, 260)
    with pytest.raises(ImageLoadError, match="not an image"):
        image_size(b"not an image")


def test_figure_draws_boxes_scaled_to_the_pictures(model, photos, tall, tmp_path):
    explanation = model.explain(photos["cat"], [tall], correspondences=True, concepts=True)[0]
    small = [photos["cat"].resize((226, 150)), tall.resize((100, 200))]
    path = pair_figure(*small, explanation, tmp_path / "fig.png", sizes=(photos["cat"].size, tall.size))
    assert Image.open(path).size[0] > 0
