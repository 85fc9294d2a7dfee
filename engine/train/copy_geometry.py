"""Edited copies whose geometry is known exactly, and where each feature-grid cell of a copy truly lies.

A correspondence can only be checked against the truth when every point of the copy has a known place in
the original. ``engine.train.copies`` draws its edits at random inside each function and fills the corners
a rotation leaves with a colour, so neither the map nor a true place for those corners exists; here an edit
is one rectangle of the original (its *footprint*: centre, size, angle, mirrored or not) resampled to the
copy's size, always lying wholly inside the original. Crop, rotation and mirror image set the footprint;
rescaling sets the copy's size.

Coordinates are continuous pixels, pixel ``i`` spanning ``[i, i + 1)`` (PIL's convention for resizing and
affine transforms). The model squeezes each whole image to a square before the backbone, so cell column
``c`` of a ``w``-wide grid covers ``[c / w, (c + 1) / w]`` of the image's width whatever its aspect ratio
(``engine.explain.correspondences.cell_box``); cells are located in grid units where cell ``(r, c)``'s
centre is the point ``(r, c)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.explain.correspondences import cell_centres, pixels_to_cells
from engine.train.copies import CROP_AREA, MAX_ROTATION

Size = tuple[int, int]
GEOMETRIC_EDITS = ("crop", "rescale", "mirror", "rotate")
MIN_ROTATION = 3.0
# Copies smaller than this on a side are not made: the model would see a few pixels blown up.
MIN_SIDE = 16


@dataclass(frozen=True)
class KnownEdit:
    """A copy made from the rectangle of the original centred at ``centre`` (original pixels), ``footprint``
    (width, height) original pixels large, turned ``angle`` degrees counter-clockwise as seen (so the copy
    shows the scene turned clockwise), mirrored left-right when ``mirror``, and resampled to ``size``."""

    original: Size
    centre: tuple[float, float]
    footprint: Size
    angle: float
    mirror: bool
    size: Size

    def matrix(self) -> np.ndarray:
        """3×3 map from the copy's pixels to the original's (homogeneous column vectors)."""
        (fw, fh), (cw, ch) = self.footprint, self.size
        to_footprint = np.diag([fw / cw * (-1.0 if self.mirror else 1.0), fh / ch, 1.0])
        to_footprint[:2, 2] = [fw / 2 if self.mirror else -fw / 2, -fh / 2]
        theta = np.deg2rad(self.angle)
        # Image rows grow downwards: turning the footprint counter-clockwise as seen is a clockwise
        # rotation in (x, y) pixel coordinates.
        turn = np.array([[np.cos(theta), np.sin(theta), self.centre[0]],
                         [-np.sin(theta), np.cos(theta), self.centre[1]],
                         [0.0, 0.0, 1.0]])
        return turn @ to_footprint

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Copy pixels (n×2, x then y) → original pixels."""
        points, matrix = np.asarray(points, np.float64).reshape(-1, 2), self.matrix()
        return points @ matrix[:2, :2].T + matrix[:2, 2]

    def corners(self) -> np.ndarray:
        """The copy's corners in original pixels (4×2)."""
        width, height = self.size
        return self.to_original(np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64))

    def apply(self, image: Image.Image) -> Image.Image:
        """The copy of ``image`` (whose size must be ``original``): the footprint resampled at its own
        resolution (bicubic), then resized to ``size`` (antialiased, as a rescaled photo is)."""
        if image.size != tuple(self.original):
            raise ValueError(f"the edit was drawn for a {self.original} image, not {image.size}")
        at_footprint = KnownEdit(self.original, self.centre, self.footprint, self.angle, self.mirror, self.footprint)
        coefficients = at_footprint.matrix()[:2].ravel()
        region = image.convert("RGB").transform(tuple(self.footprint), Image.Transform.AFFINE, tuple(coefficients),
                                                resample=Image.Resampling.BICUBIC)
        return region if tuple(self.size) == tuple(self.footprint) else region.resize(tuple(self.size), Image.Resampling.BICUBIC)


def draw_edit(original: Size, kinds: Sequence[str], rng: np.random.Generator) -> KnownEdit:
    """A random edit of an ``original``-sized image combining ``kinds`` (of ``GEOMETRIC_EDITS``), drawn as
    ``engine.train.copies`` draws them: a crop keeps ``CROP_AREA`` of the image at an aspect within 3:4..4:3
    of the image's, a rotation turns it 3°..``MAX_ROTATION``° either way (keeping the largest rectangle of
    the footprint's aspect that stays inside the original), a rescale multiplies its size by 0.3..0.8 (or
    1.2..1.6, 30% of the time)."""
    unknown = set(kinds) - set(GEOMETRIC_EDITS)
    if unknown:
        raise ValueError(f"unknown edits {sorted(unknown)}; choose from {', '.join(GEOMETRIC_EDITS)}")
    width, height = original
    fw, fh = float(width), float(height)
    if "crop" in kinds:
        area = rng.uniform(*CROP_AREA)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        fw = min(width, width * np.sqrt(area * aspect))
        fh = min(height, height * area / (fw / width))
    angle = float(rng.uniform(MIN_ROTATION, MAX_ROTATION) * rng.choice([-1, 1])) if "rotate" in kinds else 0.0
    cos, sin = abs(np.cos(np.deg2rad(angle))), abs(np.sin(np.deg2rad(angle)))
    shrink = min(1.0, width / (fw * cos + fh * sin), height / (fw * sin + fh * cos))
    footprint = (max(MIN_SIDE, int(np.floor(fw * shrink))), max(MIN_SIDE, int(np.floor(fh * shrink))))
    reach_x = (footprint[0] * cos + footprint[1] * sin) / 2
    reach_y = (footprint[0] * sin + footprint[1] * cos) / 2
    centre = (float(rng.uniform(reach_x, max(reach_x, width - reach_x))), float(rng.uniform(reach_y, max(reach_y, height - reach_y))))
    mirror = "mirror" in kinds
    size = footprint
    if "rescale" in kinds:
        factor = rng.uniform(0.3, 0.8) if rng.random() < 0.7 else rng.uniform(1.2, 1.6)
        size = (max(MIN_SIDE, round(footprint[0] * factor)), max(MIN_SIDE, round(footprint[1] * factor)))
    return KnownEdit(tuple(original), centre, footprint, angle, mirror, size)


def true_cells(edit: KnownEdit, copy_cells: np.ndarray, grid: Size) -> np.ndarray:
    """Where the centres of the copy's cells (n×2, row then column) lie on the original's grid (grid units)."""
    return pixels_to_cells(edit.to_original(cell_centres(copy_cells, grid, edit.size)), grid, edit.original)


def cell_errors(edit: KnownEdit, copy_cells: np.ndarray, original_cells: np.ndarray, grid: Size) -> np.ndarray:
    """Distance in cells (Euclidean, on the original's grid) from each matched original cell to where its
    copy cell truly lies."""
    truth = true_cells(edit, copy_cells, grid)
    return np.linalg.norm(np.asarray(original_cells, np.float64).reshape(-1, 2) - truth, axis=1)
