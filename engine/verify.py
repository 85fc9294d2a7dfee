"""Geometric verification: do two photos show the same scene, judged by local features and geometry?

The embedding head scores *resemblance*, which is why it calls many different flower or skin photos a
match. A duplicate (the same room photographed again, or an edited copy of a photo) has something the
head does not check: many small patches that reappear in the other photo at positions one geometric
model explains. That is evidence independent of the embedding, and cheap to count:

1. ``extract``: SIFT keypoints (at most ``max_features``) on the image shrunk to ``max_side`` pixels, so
   the cost is bounded whatever the upload size. Descriptors are RootSIFT (L1-normalised, square-rooted:
   Hellinger instead of Euclidean comparison, the usual cheap gain in matching accuracy). Points are kept in
   the *original* image's pixel coordinates, so inliers can be drawn on the image the user sees.
2. Tentative matches: nearest neighbours that pass Lowe's ratio test (the best is clearly better than the
   second best, i.e. not a repeated texture) *and* are mutual (b's nearest neighbour in a is the same point).
3. A robust fit of one geometric model (OpenCV's USAC MAGSAC++) to the tentative matches; the number of
   inliers is the evidence. ``fundamental``: any two views of one rigid 3-D scene (re-photographed rooms);
   ``homography``: a plane or an edited copy (crop, rescale, rotation, perspective); ``affine``: edited
   copies only (fewest degrees of freedom, so the fewest chance inliers).

A mirrored copy matches nothing with SIFT (descriptors are not mirror invariant), so ``extract(...,
mirror=True)`` also describes the horizontally flipped image, its points mapped back to unflipped
coordinates; matching the flipped *query* against a candidate is the same as matching the query against
the flipped candidate, so a catalogue only ever stores one orientation. The better of the two fits is kept.

Everything geometric runs in "working pixels" (the original coordinates divided by ``Keypoints.unit``, i.e.
the shrunk image's pixels), so the thresholds mean the same for a 640 px and a 6000 px photo.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from engine.errors import ImageLoadError
from engine.images import ImageSource, image_size, load_pixels

__all__ = [
    "DEFAULT_CONTRAST_THRESHOLD",
    "DEFAULT_MAX_FEATURES",
    "DEFAULT_MAX_SIDE",
    "DEFAULT_RATIO",
    "DEFAULT_THRESHOLDS",
    "MIN_INLIERS",
    "GeometricModel",
    "Keypoints",
    "Verification",
    "extract",
    "tentative_matches",
    "verify",
    "verify_many",
    "verify_pair",
]

GeometricModel = Literal["fundamental", "homography", "affine"]

DEFAULT_MAX_SIDE: int = 512
"""Images are shrunk to this longer side before SIFT: enough detail for duplicates, bounded cost."""
DEFAULT_MAX_FEATURES: int = 1000
"""SIFT keeps the strongest this many keypoints: matching cost grows with its square."""
DEFAULT_CONTRAST_THRESHOLD: float = 0.01
"""SIFT's contrast threshold, a quarter of OpenCV's 0.04: skin lesions, walls and petals are low-contrast,
and at 0.04 a 224 px skin photo kept too few keypoints for even its own edited copies to verify (on the
development photos half of such copies stayed under 11 inliers; at 0.01 under 1 %). Textured photos keep
their strongest ``max_features`` either way."""
DEFAULT_RATIO: float = 0.8
"""Lowe's ratio: a match is kept when its distance is below this fraction of the second best."""
DEFAULT_THRESHOLDS: dict[str, float] = {"fundamental": 1.0, "homography": 3.0, "affine": 3.0}
"""Inlier thresholds in working pixels: the distance to the epipolar line for a fundamental matrix
(a point-to-line distance, hence tighter), the reprojection error for a homography or affine map."""
MIN_INLIERS: dict[str, int] = {"fundamental": 12, "homography": 8, "affine": 6}
"""The fewest inliers that count as a verified match, per model: above every count two *different* photos
reached in benchmarks/verify.py (1636 random pairs within and across flowers, skin lesions, AirBnB rooms and
scikit-image's samples: at most 11 / 6 / 5), while ≥ 99 % of edited copies and 57-62 % of AirBnB duplicate
pairs (re-photographed rooms) reach them. Chance counts sit just above each model's minimal sample."""
_MIN_MATCHES: dict[str, int] = {"fundamental": 8, "homography": 4, "affine": 3}
_CONFIDENCE = 0.999
_MAX_ITERS = 2000


@dataclass(frozen=True, eq=False)
class Keypoints:
    """The local features of one image: compute once (``extract``), verify against many images.

    ``points``: N×2 float32 (x, y) in the original image's pixel coordinates (pixel centres at integers).
    ``descriptors``: N×128 float32 RootSIFT, unit L2 norm. ``size``: the original (width, height).
    ``unit``: original pixels per working pixel (≥ 1). ``mirror``: the features of the horizontally
    flipped image, points mapped back to unflipped coordinates (``None`` unless extracted with ``mirror=True``).
    """

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]
    unit: float
    mirror: Keypoints | None = None

    def __len__(self) -> int:
        return len(self.points)


@dataclass(frozen=True, eq=False)
class Verification:
    """The outcome of verifying one pair.

    ``inliers``: matches the fitted model explains: the evidence. ``matches``: tentative matches (ratio +
    mutual) the model was fitted to. ``points_a``/``points_b``: the inlier pairs, K×2 float32 (x, y) in each
    original image's pixel coordinates. ``model``: the fitted model in those coordinates (3×3 fundamental
    matrix F with ``[x_b, 1] F [x_a, 1]ᵀ = 0``, 3×3 homography or 2×3 affine map from a to b), ``None``
    when nothing could be fitted. ``mirrored``: the match was found between a *flipped* and b (the model then
    includes the reflection). ``kind``: which model was fitted.
    """

    inliers: int
    matches: int
    points_a: np.ndarray
    points_b: np.ndarray
    model: np.ndarray | None
    kind: GeometricModel
    mirrored: bool = False

    def verified(self, min_inliers: int | None = None) -> bool:
        """Whether the pair carries at least ``min_inliers`` (default ``MIN_INLIERS[kind]``) inliers."""
        return self.inliers >= (MIN_INLIERS[self.kind] if min_inliers is None else min_inliers)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------


def extract(
    image: ImageSource | Keypoints,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_features: int = DEFAULT_MAX_FEATURES,
    contrast_threshold: float = DEFAULT_CONTRAST_THRESHOLD,
    mirror: bool = False,
) -> Keypoints:
    """SIFT keypoints of ``image`` (a path, bytes, PIL image or array; decoded by ``engine.images``).

    The image is decoded (a JPEG already DCT-scaled close to ``max_side``), shrunk to ``max_side`` on its
    longer side with area averaging, and described in greyscale. ``mirror=True`` also describes the flipped
    image (twice the cost): do that for the one query that is verified against many stored candidates.
    A ``Keypoints`` is returned as is (its mirror added when asked for and missing is impossible without
    the pixels, so that raises ``ValueError``). Raises ``ImageLoadError`` for undecodable input.
    """
    if isinstance(image, Keypoints):
        if mirror and image.mirror is None:
            raise ValueError("these keypoints were extracted without mirror=True; extract the image again")
        return image
    if max_side < 16:
        raise ValueError(f"max_side must be at least 16, got {max_side}")
    if max_features < 1:
        raise ValueError(f"max_features must be positive, got {max_features}")
    size = _original_size(image)
    pixels = load_pixels(image, target_size=max_side)
    grey = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    height, width = grey.shape
    shrink = max_side / max(height, width)
    if shrink < 1.0:
        grey = cv2.resize(grey, (max(1, round(width * shrink)), max(1, round(height * shrink))),
                          interpolation=cv2.INTER_AREA)
    # Per-axis factors from the working grid to the original one (a decoder may have DCT-scaled it).
    scale = (size[0] / grey.shape[1], size[1] / grey.shape[0])
    unit = max(size) / max(grey.shape)
    sift = cv2.SIFT_create(nfeatures=max_features, contrastThreshold=contrast_threshold)
    direct = _describe(sift, grey, scale, size, unit, flipped=False)
    if not mirror:
        return direct
    flipped = _describe(sift, np.ascontiguousarray(grey[:, ::-1]), scale, size, unit, flipped=True)
    return Keypoints(direct.points, direct.descriptors, size, unit, mirror=flipped)


def _original_size(image: ImageSource) -> tuple[int, int]:
    """(width, height) of the image as ``load_image`` shows it at full size (EXIF-rotated)."""
    if isinstance(image, Image.Image):
        return image_size(image)
    if isinstance(image, np.ndarray):
        if image.ndim < 2 or image.size == 0:
            # load_pixels passes an empty H×W×3 uint8 array through as is; refuse it as load_image does.
            raise ImageLoadError(f"empty or unsupported image array of shape {image.shape}")
        return int(image.shape[1]), int(image.shape[0])
    return image_size(image)  # header only; raises ImageLoadError for a bad file


def _describe(sift: cv2.SIFT, grey: np.ndarray, scale: tuple[float, float], size: tuple[int, int],
              unit: float, *, flipped: bool) -> Keypoints:
    keypoints, descriptors = sift.detectAndCompute(grey, None)
    if descriptors is None or not keypoints:
        return Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), size, unit)
    work = np.array([kp.pt for kp in keypoints], dtype=np.float64)
    if flipped:
        work[:, 0] = grey.shape[1] - 1 - work[:, 0]
    # Pixel centres at integers on both grids: x_orig + 0.5 = (x_work + 0.5) * scale.
    points = ((work + 0.5) * np.asarray(scale) - 0.5).astype(np.float32)
    root = np.sqrt(descriptors / np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-7))
    return Keypoints(points, root.astype(np.float32), size, unit)


# --------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------


def verify(
    a: Keypoints,
    b: Keypoints,
    *,
    model: GeometricModel = "fundamental",
    ratio: float = DEFAULT_RATIO,
    threshold: float | None = None,
) -> Verification:
    """Verify two images' keypoints: tentative matches, then a robust fit of ``model``.

    When ``a`` carries its mirror features, b is also matched against the flipped a and the result with
    more inliers is returned (``mirrored`` says which). ``threshold`` (working pixels) defaults to
    ``DEFAULT_THRESHOLDS[model]``.
    """
    if model not in DEFAULT_THRESHOLDS:
        raise ValueError(f"model must be one of {sorted(DEFAULT_THRESHOLDS)}, got {model!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    limit = DEFAULT_THRESHOLDS[model] if threshold is None else float(threshold)
    best = _verify_one(a, b, model, ratio, limit, mirrored=False)
    if a.mirror is not None:
        flipped = _verify_one(a.mirror, b, model, ratio, limit, mirrored=True)
        if flipped.inliers > best.inliers:
            best = flipped
    return best


def verify_pair(
    image_a: ImageSource | Keypoints,
    image_b: ImageSource | Keypoints,
    *,
    model: GeometricModel = "fundamental",
    mirror: bool = True,
    ratio: float = DEFAULT_RATIO,
    threshold: float | None = None,
) -> Verification:
    """Verify one pair of images (or their ``Keypoints``): see ``verify``. ``mirror`` also tries a mirrored
    copy (a is described flipped too). Images are described with ``extract``'s defaults; for other settings
    pass ``Keypoints``. Raises ``ImageLoadError`` for undecodable input."""
    a = _without_mirror(extract(image_a, mirror=mirror), mirror)
    return verify(a, extract(image_b), model=model, ratio=ratio, threshold=threshold)


def verify_many(
    query: ImageSource | Keypoints,
    candidates: Sequence[ImageSource | Keypoints],
    *,
    model: GeometricModel = "fundamental",
    mirror: bool = True,
    ratio: float = DEFAULT_RATIO,
    threshold: float | None = None,
) -> list[Verification]:
    """Verify one query against many candidates (e.g. a search's top k), in the candidates' order.

    The query is described once (with its mirror when ``mirror``); candidates given as ``Keypoints`` are
    not described again, so a caller that stores them pays only for matching and fitting. Images are
    described with ``extract``'s defaults; for other settings pass ``Keypoints``.
    """
    q = _without_mirror(extract(query, mirror=mirror), mirror)
    return [verify(q, extract(c), model=model, ratio=ratio, threshold=threshold) for c in candidates]


def _without_mirror(keys: Keypoints, mirror: bool) -> Keypoints:
    """``keys`` without its mirror features unless ``mirror``: the caller said not to try the mirror."""
    return keys if mirror or keys.mirror is None else Keypoints(keys.points, keys.descriptors, keys.size, keys.unit)


def _empty(kind: GeometricModel, matches: int, mirrored: bool) -> Verification:
    none = np.zeros((0, 2), np.float32)
    return Verification(0, matches, none, none, None, kind, mirrored)


def tentative_matches(a: Keypoints, b: Keypoints, ratio: float = DEFAULT_RATIO) -> np.ndarray:
    """Index pairs (M×2: row of a, row of b) that pass Lowe's ratio test (a to b) and are mutual nearest
    neighbours; one match per distinct pair of locations (SIFT repeats a location with each dominant
    orientation, which would count one patch twice)."""
    if len(a) < 2 or len(b) < 2:
        return np.zeros((0, 2), np.int64)
    # Unit-norm descriptors: squared distance = 2 - 2 cos, so one matrix product serves both directions,
    # and only the two best similarities of each row need turning into distances. The product is OpenCV's
    # (same values): numpy's multi-threaded OpenBLAS took 2-8× longer on these small matrices on a busy
    # 2-core machine (its threads spin waiting for each other), which made it most of a verification's cost.
    similarity = cv2.gemm(a.descriptors, b.descriptors, 1.0, None, 0.0, flags=cv2.GEMM_2_T)
    rows = np.arange(len(a))
    best = np.argmax(similarity, axis=1)
    back = np.argmax(similarity, axis=0)
    first = similarity[rows, best]
    similarity[rows, best] = -np.inf
    second = similarity.max(axis=1)
    first, second = (np.sqrt(np.maximum(2.0 - 2.0 * s, 0.0)) for s in (first, second))
    keep = (first < ratio * second) & (back[best] == rows)
    pairs = np.stack([rows[keep], best[keep]], axis=1)
    if len(pairs) == 0:
        return pairs
    where = np.concatenate([np.round(a.points[pairs[:, 0]]), np.round(b.points[pairs[:, 1]])], axis=1)
    _, unique = np.unique(where, axis=0, return_index=True)
    return pairs[np.sort(unique)]


def _verify_one(a: Keypoints, b: Keypoints, kind: GeometricModel, ratio: float, threshold: float,
                *, mirrored: bool) -> Verification:
    pairs = tentative_matches(a, b, ratio)
    if len(pairs) < _MIN_MATCHES[kind]:
        return _empty(kind, len(pairs), mirrored)
    pa = a.points[pairs[:, 0]].astype(np.float64)
    pb = b.points[pairs[:, 1]].astype(np.float64)
    # OpenCV's USAC rejects samples whose orientation flips (a reflection is no camera motion), so a
    # mirrored match is fitted on a's flipped coordinates and the flip composed into the model after.
    flip = np.array([[-1.0, 0.0, a.size[0] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if mirrored else np.eye(3)
    fa = pa @ flip[:2, :2].T + flip[:2, 2]
    wa, wb = fa / a.unit, pb / b.unit  # fit in working pixels: thresholds independent of image size
    try:
        fitted, mask = _fit(kind, wa, wb, threshold, usac=True)
    except cv2.error:
        # OpenCV 5.1's USAC now and then fails an internal assertion (``!model.empty()``) on data it
        # fits on another call; the classic RANSAC estimator of the same model answers instead.
        fitted, mask = _fit(kind, wa, wb, threshold, usac=False)
    if fitted is None or mask is None or fitted.shape[0] not in (2, 3) or not np.isfinite(fitted).all():
        return _empty(kind, len(pairs), mirrored)  # nothing fitted (or a degenerate, non-finite model)
    inlier = mask.ravel().astype(bool)
    return Verification(
        inliers=int(inlier.sum()),
        matches=len(pairs),
        points_a=pa[inlier].astype(np.float32),
        points_b=pb[inlier].astype(np.float32),
        model=_to_original(fitted, kind, a.unit, b.unit, flip),
        kind=kind,
        mirrored=mirrored,
    )


def _fit(kind: GeometricModel, wa: np.ndarray, wb: np.ndarray, threshold: float,
         *, usac: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The robust fit of one model (a to b, working pixels) and its inlier mask."""
    if kind == "fundamental":
        method = cv2.USAC_MAGSAC if usac else cv2.FM_RANSAC
        return cv2.findFundamentalMat(wa, wb, method, threshold, _CONFIDENCE, _MAX_ITERS)
    if kind == "homography":
        return cv2.findHomography(wa, wb, cv2.USAC_MAGSAC if usac else cv2.RANSAC, threshold,
                                  maxIters=_MAX_ITERS, confidence=_CONFIDENCE)
    return cv2.estimateAffine2D(wa, wb, method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                maxIters=_MAX_ITERS, confidence=_CONFIDENCE)


def _to_original(fitted: np.ndarray, kind: GeometricModel, unit_a: float, unit_b: float,
                 flip: np.ndarray) -> np.ndarray:
    """The model fitted on working pixels (of a flipped by ``flip``), expressed on original pixels
    (x_work = x_orig / unit)."""
    to_work_a = np.diag([1.0 / unit_a, 1.0 / unit_a, 1.0]) @ flip
    if kind == "fundamental":
        to_work_b = np.diag([1.0 / unit_b, 1.0 / unit_b, 1.0])
        return to_work_b.T @ fitted @ to_work_a
    from_work_b = np.diag([unit_b, unit_b, 1.0])
    full = fitted if fitted.shape[0] == 3 else np.vstack([fitted, [0.0, 0.0, 1.0]])
    out = from_work_b @ full @ to_work_a
    out = out / out[2, 2] if kind == "homography" and abs(out[2, 2]) > 1e-12 else out
    return out if kind == "homography" else out[:2]
