"""Tests for engine.verify on scikit-image's sample photos and known edits of them (no real data needed).

Each edit is made with a transform we know, so the inliers can be checked point by point: an inlier is
only evidence if it sits where the transform puts it.
"""

from __future__ import annotations

import io
import itertools

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.errors import ImageLoadError
from engine.verify import (
    Keypoints,
    Verification,
    extract,
    tentative_matches,
    verify,
    verify_many,
    verify_pair,
)

DIFFERENT = ("astronaut", "camera", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in DIFFERENT}


@pytest.fixture(scope="module")
def astronaut(samples) -> Image.Image:
    return Image.fromarray(samples["astronaut"])


@pytest.fixture(scope="module")
def astronaut_keys(astronaut) -> Keypoints:
    return extract(astronaut, mirror=True)


def jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def errors(v: Verification, transform) -> np.ndarray:
    """Distance of each inlier of b from where ``transform`` puts its partner of a."""
    return np.linalg.norm(transform(v.points_a.astype(np.float64)) - v.points_b, axis=1)


# ---------------------------------------------------------------- edited copies verify, at the right places


@pytest.mark.parametrize("model", ["fundamental", "homography", "affine"])
def test_crop_and_rescale_verifies_at_the_known_offset(astronaut, astronaut_keys, model) -> None:
    box, size = (60, 40, 460, 400), (300, 270)  # crop 400×360, then shrink by 3/4
    copy = astronaut.crop(box).resize(size, Image.BICUBIC)
    v = verify(astronaut_keys, extract(copy), model=model)
    assert v.inliers >= 100 and v.inliers <= v.matches and not v.mirrored and v.verified()
    scale = np.array([size[0] / (box[2] - box[0]), size[1] / (box[3] - box[1])])
    dist = errors(v, lambda p: (p - box[:2] + 0.5) * scale - 0.5)
    assert np.median(dist) < 0.5 and np.quantile(dist, 0.95) < 2.0
    assert v.points_a.shape == v.points_b.shape == (v.inliers, 2)


def test_rotation_verifies_through_the_rotation(astronaut, astronaut_keys) -> None:
    pixels = np.asarray(astronaut)
    matrix = cv2.getRotationMatrix2D((255.5, 255.5), 17.0, 1.0)
    matrix[:, 2] += 60  # room for the corners on a 632 px canvas
    rotated = cv2.warpAffine(pixels, matrix, (632, 632), flags=cv2.INTER_LINEAR)
    v = verify(astronaut_keys, extract(rotated), model="homography")
    assert v.inliers >= 100
    dist = errors(v, lambda p: p @ matrix[:, :2].T + matrix[:, 2])
    assert np.median(dist) < 0.5 and np.quantile(dist, 0.95) < 2.0
    # The model is in original pixels too: it maps a's inliers onto b's.
    mapped = cv2.perspectiveTransform(v.points_a[None].astype(np.float64), v.model)[0]
    assert np.median(np.linalg.norm(mapped - v.points_b, axis=1)) < 1.0


@pytest.mark.parametrize("model", ["fundamental", "homography"])
def test_mirror_is_found_by_matching_the_flipped_image(astronaut, astronaut_keys, model) -> None:
    width = astronaut.width
    mirrored = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    v = verify(astronaut_keys, extract(mirrored), model=model)
    assert v.mirrored and v.inliers >= 100
    dist = errors(v, lambda p: np.stack([width - 1 - p[:, 0], p[:, 1]], axis=1))
    assert np.quantile(dist, 0.95) < 1.0
    # Without the flipped features a mirror barely matches: SIFT descriptors are not mirror invariant (the
    # few that do match are mirror-symmetric patches; they keep their row, which an epipolar geometry of a
    # horizontal shift explains, so the fundamental model keeps some).
    plain = Keypoints(astronaut_keys.points, astronaut_keys.descriptors, astronaut_keys.size, astronaut_keys.unit)
    assert verify(plain, extract(mirrored), model=model).inliers < min(15 if model == "homography" else 60,
                                                                       v.inliers // 10)


def test_mirrored_homography_is_in_original_pixels(astronaut, astronaut_keys) -> None:
    copy = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((50, 0, 512, 480))
    v = verify(astronaut_keys, extract(copy), model="homography")
    assert v.mirrored and v.inliers >= 100
    expected = np.array([[-1.0, 0.0, 511.0 - 50.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert np.allclose(v.model, expected, atol=0.02 * 512)
    mapped = cv2.perspectiveTransform(v.points_a[None].astype(np.float64), v.model)[0]
    assert np.median(np.linalg.norm(mapped - v.points_b, axis=1)) < 1.0


def test_fundamental_matrix_holds_for_its_inliers(astronaut, astronaut_keys) -> None:
    copy = astronaut.crop((30, 30, 480, 500)).resize((360, 376))
    v = verify(astronaut_keys, extract(copy), model="fundamental")
    ones = np.ones((v.inliers, 1))
    xa, xb = np.hstack([v.points_a, ones]), np.hstack([v.points_b, ones])
    lines = xa @ v.model.T  # epipolar lines in b
    distance = np.abs(np.sum(lines * xb, axis=1)) / np.linalg.norm(lines[:, :2], axis=1)
    assert np.median(distance) < 1.0


def test_jpeg_bytes_and_colour_edits_verify(astronaut, astronaut_keys) -> None:
    grey = astronaut.convert("L").convert("RGB")
    darker = Image.fromarray((np.asarray(astronaut) * 0.6).astype(np.uint8))
    for copy in (jpeg(astronaut, 30), grey, darker):
        assert verify(astronaut_keys, extract(copy)).inliers >= 50


def test_large_jpeg_keeps_original_coordinates(astronaut) -> None:
    """A 2048 px JPEG is DCT-scaled while decoding and shrunk to 512 px: points must still be in 2048 px."""
    big = astronaut.resize((2048, 2048), Image.BICUBIC)
    keys = extract(jpeg(big, 90))
    assert keys.size == (2048, 2048) and keys.unit == pytest.approx(4.0)
    assert keys.points.max() > 1500
    v = verify_pair(astronaut, jpeg(big.crop((400, 200, 1800, 1900)), 90), model="homography")
    assert v.inliers >= 50
    dist = errors(v, lambda p: (p + 0.5) * 4.0 - 0.5 - [400, 200])
    assert np.median(dist) < 3.0  # 3 px of 2048 is under 1 px of the 512 px working image


# ---------------------------------------------------------------- different photos do not


def test_different_photos_get_few_inliers(samples) -> None:
    keys = {name: extract(pixels, mirror=True) for name, pixels in samples.items()}
    for a, b in itertools.combinations(DIFFERENT, 2):
        for model in ("fundamental", "homography"):
            v = verify(keys[a], keys[b], model=model)
            assert v.inliers < 15 and not v.verified(), (a, b, model, v.inliers)


def test_featureless_image_is_no_match(astronaut) -> None:
    blank = np.full((200, 300, 3), 128, np.uint8)
    keys = extract(blank)
    assert len(keys) == 0 and keys.descriptors.shape == (0, 128)
    v = verify_pair(astronaut, blank)
    assert v.inliers == v.matches == 0 and v.model is None and v.points_a.shape == (0, 2)


# ---------------------------------------------------------------- the API


def test_verify_many_extracts_the_query_once_and_agrees_with_verify_pair(astronaut, astronaut_keys) -> None:
    crop = astronaut.crop((100, 100, 400, 400))
    rocket = Image.open(io.BytesIO(jpeg(astronaut.rotate(90), 90)))
    candidates = [crop, extract(rocket), np.asarray(crop)]
    results = verify_many(astronaut_keys, candidates)
    assert [r.inliers for r in results] == [verify_pair(astronaut, c).inliers for c in candidates]
    assert results[0].inliers == results[2].inliers >= 100


def test_tentative_matches_are_mutual_and_unique(astronaut_keys) -> None:
    pairs = tentative_matches(astronaut_keys, astronaut_keys)
    assert len(pairs) > 0.5 * len(astronaut_keys)
    assert np.array_equal(pairs[:, 0], pairs[:, 1])  # an image matches itself point for point
    assert len(np.unique(pairs[:, 0])) == len(pairs)


def test_mirror_needs_the_pixels(astronaut_keys) -> None:
    plain = Keypoints(astronaut_keys.points, astronaut_keys.descriptors, astronaut_keys.size, astronaut_keys.unit)
    with pytest.raises(ValueError, match="mirror"):
        extract(plain, mirror=True)
    with pytest.raises(ValueError, match="model"):
        verify(plain, plain, model="similarity")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "/no/such/file.jpg",
     np.zeros((0, 10, 3), np.uint8), np.zeros((4, 4, 7), np.uint8)],
    ids=["empty", "text", "truncated-jpeg", "missing-file", "empty-array", "bad-channels"],
)
def test_bad_input_raises_image_load_error(astronaut, bad) -> None:
    with pytest.raises(ImageLoadError):
        extract(bad)
    with pytest.raises(ImageLoadError):
        verify_pair(astronaut, bad)


def test_truncated_real_jpeg_raises_image_load_error(astronaut) -> None:
    data = jpeg(astronaut, 90)
    with pytest.raises(ImageLoadError):
        extract(data[: len(data) // 2])
