"""Region correspondences: which region of image a matches which region of image b, and how much it weighs.

MatchNet's head is a weighted sum of the embedding cosine and a local-match term, and the local term is
*exactly* a sum over pairs of feature-map cells (i of a, j of b), so no attribution method has to be
trusted for the pairing: regrouping ``MatchNet.local_match`` by pair gives

    local = Σ_ij corr_ij · (P_ij / N_a + Q_ij / N_b) / 2

with ``corr`` the cosine of the projected cell descriptors and P, Q its row- and column-softmax at the
head's temperature: the soft mutual nearest neighbours the head itself matched. (The cosine term splits
over cell pairs exactly too, as u_i · v_j / (N_a N_b |ū| |v̄|) with u = the projected cells, but that is
large for any two cells aligned with the shared embedding direction, whatever they show; adding it, or
weighting by the Grad-CAM maps, paired visibly wrong regions on AirBnB photos, so neither is used.)
PaperNet pools before anything pair-wise happens and has no such term; its fallback scores a cell pair
by the cosine of the two cells' first-layer projections (what its MLP sees of each cell) weighted by
both images' Grad-CAM maps of the *similarity* (factual maps of a match, counterfactual maps of a
non-match: correspondences always show what argues for the match).

Contributions are summed over a (2r+1)² window around each cell of a and of b: a correspondence is a
pair of regions, not of single cells. Greedy non-maximum suppression keeps a region pair when it shares no
cell pair with a pair already kept (its a-windows or its b-windows are disjoint from that pair's) and
neither of its centres lies in a kept window of the same image, so the kept pairs cover disjoint sets of
cell pairs and no region is the centre of two. Disjoint windows in *both* images are not required: a crop
or zoom spreads a few cells of one image over many of the other, and correct pairs a few cells apart in
the zoomed image then have overlapping windows in the other (``benchmarks/correspondences.py`` checks the
pairs against edits of known geometry).
Spatial verification orders the pairs before the suppression picks them: the head's descriptors are not
rotation-invariant, so on a rotated copy some of its strongest pairs are wrong while the right ones are among
its candidates. Each cell of a is paired with its strongest region pair (at most one cell of a per cell of b,
the strongest), and the ``CANDIDATES`` strongest of these are fitted one similarity transform (rotation,
scale and shift of image a or of its mirror image, in the original images' geometry) by RANSAC. When at
least ``MIN_INLIERS`` candidates agree with it, the pairs that put a cell of a on the cell of b its centre
lands in are picked first, by value, and every other pair after them. A pair of images without a shared
geometry (too few agree, or the fit zooms by more than ``MAX_ZOOM``) has its pairs picked by value alone.
``share`` = the region pair's contribution / the sum of all positive ones, so the shares of the kept
pairs add up to at most 1; for MatchNet it is exactly the pair's part of the local-match term.
Everything is computed from the images' projections (``SiameseNet.project``), so stored descriptions
suffice. Boxes are the windows' footprints on the input mapped back through the resize (the whole image is
squeezed to a square), in the pixel coordinates of the original image: ``[x0, y0, x1, y1]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.explain.pairs import PairExplanation
from engine.nn.siamese import SiameseNet

Size = tuple[int, int]

CANDIDATES = 50
"""How many of the head's region pairs (one per cell of a and of b, the strongest) the geometry is fitted to."""
MIN_INLIERS = 10
"""Candidates that must agree with the fitted geometry for it to order the pairs: nearly all of an edited
copy's agree, and a handful of a different photo's do (rooms, flowers and lesions are framed alike)."""
MAX_ZOOM = 4.0
"""The most a fitted geometry may scale a cell of a either way (a copy cropped to 1/16 of its original)."""


@torch.no_grad()
def pair_contributions(net: SiameseNet, projs_a: Tensor, projs_b: Tensor) -> Tensor:
    """Contribution of every pair of cells to each pair's similarity, k×N_a×N_b (projs_a: 1 or k images'
    ``net.project`` output, projs_b: k): ``SiameseNet.cell_contributions``, on the net's device."""
    projs_a, projs_b = projs_a.to(net.head_device).float(), projs_b.to(net.head_device).float()
    return net.cell_contributions(projs_a.expand(projs_b.shape[0], -1, -1, -1), projs_b)


def window_sums(contributions: Tensor, grid_a: Size, grid_b: Size, radius: int) -> Tensor:
    """Sum of the contributions over a (2r+1)² window around each cell of a and each cell of b
    (windows clipped at the border), shape k×h_a×w_a×h_b×w_b."""
    k = contributions.shape[0]
    (ha, wa), (hb, wb) = grid_a, grid_b
    size = 2 * radius + 1
    area = size * size

    def box_sum(planes: Tensor) -> Tensor:
        n, h, w = planes.shape
        return F.avg_pool2d(planes.view(n, 1, h, w), size, stride=1, padding=radius, count_include_pad=True).view(n, h, w) * area

    over_b = box_sum(contributions.reshape(k * ha * wa, hb, wb)).view(k, ha, wa, hb * wb)
    over_a = box_sum(over_b.permute(0, 3, 1, 2).reshape(k * hb * wb, ha, wa)).view(k, hb, wb, ha, wa)
    return over_a.permute(0, 3, 4, 1, 2)


def cell_box(row: int, col: int, grid: Size, size: Size, radius: int = 0) -> list[int]:
    """``[x0, y0, x1, y1]`` in original pixels of the window of ``radius`` cells around a cell.

    The image is squeezed to a square before the backbone, so cell column c of w spans the fraction
    [c / w, (c + 1) / w] of the original width whatever the aspect ratio.
    """
    (h, w), (width, height) = grid, size
    x0, x1 = max(col - radius, 0) / w, min(col + radius + 1, w) / w
    y0, y1 = max(row - radius, 0) / h, min(row + radius + 1, h) / h
    return [int(np.floor(x0 * width)), int(np.floor(y0 * height)), int(np.ceil(x1 * width)), int(np.ceil(y1 * height))]


def cell_centres(cells: np.ndarray, grid: Size, size: Size) -> np.ndarray:
    """Pixels (n×2, x then y) of the centres of feature-grid cells (n×2, row then column) of a ``size``
    (width, height) image squeezed onto a ``grid`` (rows, columns), as ``cell_box`` places cells."""
    cells = np.asarray(cells, np.float64).reshape(-1, 2)
    (rows, columns), (width, height) = grid, size
    return np.stack([(cells[:, 1] + 0.5) / columns * width, (cells[:, 0] + 0.5) / rows * height], axis=1)


def pixels_to_cells(points: np.ndarray, grid: Size, size: Size) -> np.ndarray:
    """The inverse of ``cell_centres``: grid coordinates (n×2, row then column; cell (r, c)'s centre is
    (r, c)) of pixels (n×2, x then y)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    (rows, columns), (width, height) = grid, size
    return np.stack([points[:, 1] / height * rows - 0.5, points[:, 0] / width * columns - 0.5], axis=1)


def find_correspondences(
    net: SiameseNet,
    projs_a: Tensor,
    projs_b: Tensor,
    sizes_a: Sequence[Size],
    sizes_b: Sequence[Size],
    maps_a: Sequence[np.ndarray] | None = None,
    maps_b: Sequence[np.ndarray] | None = None,
    *,
    top: int = 5,
    radius: int = 1,
) -> list[list[dict]]:
    """The ``top`` corresponding region pairs of each of k pairs (projs_a: 1 or k images, projs_b: k).

    ``sizes_*`` are the (width, height) of the original images, one per pair; ``maps_*`` the h×w
    similarity maps weighting the cells (None: the bare contributions; an all-zero map weighs its
    cells evenly). Returns per pair ``[{"rank", "box_a", "box_b", "share", "cell_a", "cell_b"}, ...]``,
    sorted by share, those that agree with the pair's geometry (if it has one) before the others, with
    ``cell_*`` the [row, column] of the window's centre on the feature grid.
    """
    k = projs_b.shape[0]
    if len(sizes_a) != k or len(sizes_b) != k:
        raise ValueError(f"need one (width, height) per pair for both images: {k} pairs, {len(sizes_a)} and {len(sizes_b)} sizes")
    grid_a, grid_b = tuple(projs_a.shape[2:]), tuple(projs_b.shape[2:])
    contributions = pair_contributions(net, projs_a, projs_b)
    if maps_a is not None and maps_b is not None:
        weights_a, weights_b = _cell_weights(maps_a).to(contributions.device), _cell_weights(maps_b).to(contributions.device)
        contributions = contributions * weights_a.unsqueeze(2) * weights_b.unsqueeze(1)
    totals = contributions.clamp(min=0).sum(dim=(1, 2)).cpu()
    # The suppression below reads single values, one after another: on the CPU.
    regions = window_sums(contributions, grid_a, grid_b, radius).cpu()
    return [
        _suppress(regions[n], float(totals[n]), grid_a, grid_b, sizes_a[n], sizes_b[n], top, radius,
                  _agreement(regions[n], grid_a, grid_b, sizes_a[n], sizes_b[n]))
        for n in range(k)
    ]


def _agreement(regions: Tensor, grid_a: Size, grid_b: Size, size_a: Size, size_b: Size) -> Tensor | None:
    """h_a×w_a×h_b×w_b: the region pairs that put a cell of a on the cell of b its centre lands in under the
    pair's geometry (see the module), or None when the pair has none."""
    (ha, wa), (hb, wb) = grid_a, grid_b
    values, best = regions.reshape(ha * wa, hb * wb).max(dim=1)
    values, best = values.numpy(), best.numpy()
    order = np.argsort(-values, kind="stable")
    order = order[values[order] > 0]
    _, first = np.unique(best[order], return_index=True)
    chosen = order[np.sort(first)][:CANDIDATES]
    if len(chosen) < MIN_INLIERS:
        return None
    # Fitted in units of a cell's mean side (√ of its area in pixels), so the RANSAC threshold is one cell.
    side_a, side_b = (np.sqrt(size[0] / grid[1] * size[1] / grid[0]) for grid, size in ((grid_a, size_a), (grid_b, size_b)))
    pixels_a = cell_centres(np.stack(np.divmod(np.arange(ha * wa), wa), axis=1), grid_a, size_a)
    pixels_b = cell_centres(np.stack(np.divmod(np.arange(hb * wb), wb), axis=1), grid_b, size_b)
    mirror = pixels_a * [-1.0, 1.0] + [size_a[0], 0.0]
    landed, most = None, MIN_INLIERS - 1
    for points in (pixels_a / side_a, mirror / side_a):
        # OpenCV's RANSAC seeds its sampling the same on every call.
        model, inliers = cv2.estimateAffinePartial2D(points[chosen], pixels_b[best[chosen]] / side_b, method=cv2.RANSAC,
                                                     ransacReprojThreshold=1.0, maxIters=2000, confidence=0.999)
        if model is None or not 1 / MAX_ZOOM <= np.sqrt(abs(np.linalg.det(model[:, :2]))) <= MAX_ZOOM:
            continue
        if int(inliers.sum()) > most:
            landed, most = (points @ model[:, :2].T + model[:, 2]) * side_b, int(inliers.sum())
    if landed is None:
        return None
    rows, cols = np.rint(pixels_to_cells(landed, grid_b, size_b)).astype(int).T
    inside = (rows >= 0) & (rows < hb) & (cols >= 0) & (cols < wb)
    agree = torch.zeros(ha * wa, hb * wb, dtype=torch.bool)
    agree[torch.as_tensor(np.flatnonzero(inside)), torch.as_tensor(rows[inside] * wb + cols[inside])] = True
    return agree.view(ha, wa, hb, wb)


def _suppress(regions: Tensor, total: float, grid_a: Size, grid_b: Size, size_a: Size, size_b: Size, top: int, radius: int,
              agree: Tensor | None = None) -> list[dict]:
    """Greedy non-maximum suppression (see the module): kept pairs share no cell pair, and no kept window
    holds another pair's centre; the positive pairs that ``agree`` with the geometry are picked first."""
    if total <= 0:
        return []
    ranks = regions.clone()
    if agree is not None:
        lift = agree & (regions > 0)
        ranks[lift] += float(regions.max())  # above every other pair, in the same order among themselves
    reach = 2 * radius
    found = []
    while len(found) < top:
        best = int(ranks.argmax())
        value = float(regions.flatten()[best])
        if not np.isfinite(float(ranks.flatten()[best])) or value <= 0:
            break
        ya, xa, yb, xb = np.unravel_index(best, regions.shape)
        found.append({
            "rank": len(found) + 1,
            "box_a": cell_box(ya, xa, grid_a, size_a, radius),
            "box_b": cell_box(yb, xb, grid_b, size_b, radius),
            "share": value / total,
            "cell_a": [int(ya), int(xa)],
            "cell_b": [int(yb), int(xb)],
        })
        near_a = (slice(max(ya - reach, 0), ya + reach + 1), slice(max(xa - reach, 0), xa + reach + 1))
        near_b = (slice(max(yb - reach, 0), yb + reach + 1), slice(max(xb - reach, 0), xb + reach + 1))
        ranks[near_a + near_b] = -np.inf
        ranks[max(ya - radius, 0) : ya + radius + 1, max(xa - radius, 0) : xa + radius + 1] = -np.inf
        ranks[:, :, max(yb - radius, 0) : yb + radius + 1, max(xb - radius, 0) : xb + radius + 1] = -np.inf
    return found


def _cell_weights(maps: Sequence[np.ndarray]) -> Tensor:
    """k×N weights from h×w maps; an empty map (no evidence anywhere) weighs every cell evenly."""
    weights = torch.as_tensor(np.stack([np.asarray(m) for m in maps]), dtype=torch.float32).flatten(1).clamp(min=0)
    weights[weights.sum(dim=1) <= 0] = 1.0
    return weights


def similarity_maps(explanation: PairExplanation) -> tuple[np.ndarray, np.ndarray]:
    """The maps of what argues for the match: factual for a match, counterfactual for a non-match."""
    if explanation.is_match:
        return explanation.factual_a, explanation.factual_b
    return explanation.counterfactual_a, explanation.counterfactual_b


def attach_correspondences(
    net: SiameseNet, explanations: Sequence[PairExplanation], proj_a: Tensor, projs_b: Tensor,
    size_a: Size, sizes_b: Sequence[Size], top: int = 5,
) -> None:
    """Fill ``explanation.correspondences`` of image a (size ``size_a``) against each image b; only
    nets without an exact decomposition (PaperNet) weight the cells by the similarity maps."""
    maps_a = maps_b = None
    if not net.exact_cell_contributions:
        maps_a, maps_b = zip(*(similarity_maps(e) for e in explanations))
    found = find_correspondences(net, proj_a, projs_b, [size_a] * len(explanations), sizes_b, maps_a, maps_b, top=top)
    for explanation, correspondences in zip(explanations, found):
        explanation.correspondences = correspondences
