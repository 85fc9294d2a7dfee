"""The final decision on a pair, and which evidence made it: the head's score, and geometry where measured.

**Tiers.** A pair is a *match* when the head's calibrated similarity reaches the model's threshold **or**
the pair is geometrically verified: at least ``MIN_INLIERS["homography"]`` (8) SIFT matches that one
homography explains (``engine.verify``). The two kinds of evidence are independent: the head scores
resemblance (and calls many different flowers or skin lesions alike), geometry finds the same patches
at positions one plane-to-plane map explains, which different photos did not reach in benchmarks/verify.py
(0 of 1,636 random pairs of different photos), while ≥ 99 % of edited copies and 57 % of re-photographed
AirBnB rooms did. So geometry only ever *adds* matches: an unverified pair is decided by the head alone
(too few inliers is no evidence against a match: a re-shot room often has none). ``decided_by`` says which
evidence carried the match: ``"head"``, ``"geometry"``, ``"head and geometry"``, or ``None`` for no match.

The maps explain the final decision: for a match decided by geometry alone the factual maps are still
Grad-CAM of the head's *similarity* (the head's view of what argues for the match, weak as it is), and the
counterfactual maps Grad-CAM of 1 − similarity (``engine.explain.pairs``).

A verification travels as a JSON-ready dict (``summarise``): ``model``, ``inliers``, ``matches`` (tentative
matches the model was fitted to), ``mirrored`` (b matched a mirror image of a), ``verified``,
``min_inliers``, and ``lines``: for a verified pair, up to ``LINES`` of its inlier pairs ``[xa, ya, xb, yb]``
in each original image's pixels, spread over image a (farthest-point order), for drawing; for an unverified
pair none (its few inliers are what chance gives different photos: nothing to show).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine.images import ImageSource
from engine.verify import MIN_INLIERS, GeometricModel, Keypoints, Verification, extract, verify

__all__ = ["LINES", "VERIFY_MODEL", "decided_by", "is_verified", "pair_verification", "query_keypoints", "summarise",
           "verification_sentence", "verify_keypoints"]

VERIFY_MODEL: GeometricModel = "homography"
"""The geometric model a decision is verified with: edited copies and (largely planar views of) rooms alike,
and the benchmarked minimum count (``MIN_INLIERS``) kept different photos apart."""
LINES = 30
"""How many inlier pairs a verification keeps for drawing: enough to show the mapping, few enough to read."""


def is_verified(verification: Mapping | None) -> bool:
    """Whether a verification (``summarise``'s dict, or None when none was run) verifies the pair."""
    return bool(verification is not None and verification.get("verified"))


def decided_by(similarity: float, threshold: float, verification: Mapping | None = None) -> str | None:
    """The tier rule: which evidence makes the pair a match (``"head"``, ``"geometry"``, ``"head and
    geometry"``), or None for no match. The one place the decision is made; ``is_match`` is ``decided_by(...)
    is not None``."""
    head, geometry = similarity >= threshold, is_verified(verification)
    if head and geometry:
        return "head and geometry"
    return "head" if head else "geometry" if geometry else None


def query_keypoints(image: ImageSource | Keypoints) -> Keypoints:
    """The keypoints of the side verified against others (image a), with its mirror image's: a mirrored copy
    matches nothing otherwise. Extract once, verify against many (search's top k)."""
    return extract(image, mirror=True)


def verify_keypoints(keys_a: Keypoints, keys_b: Keypoints,
                     sizes: Sequence[tuple[int, int] | None] | None = None) -> dict:
    """Verify a pair from its keypoints (a with its mirror: ``query_keypoints``) with ``VERIFY_MODEL`` and
    summarise it. ``sizes``: each original image's (width, height) when the keypoints were extracted from a
    copy decoded at reduced size, so that the lines are in the original pixels."""
    return summarise(verify(keys_a, keys_b, model=VERIFY_MODEL), keys_a, keys_b, sizes)


def pair_verification(image_a: ImageSource | Keypoints, image_b: ImageSource | Keypoints,
                      sizes: Sequence[tuple[int, int] | None] | None = None) -> dict:
    """Verify one pair of images (a is also tried mirrored): ``verify_keypoints`` after extracting both.
    Raises ``ImageLoadError`` for an undecodable image."""
    return verify_keypoints(query_keypoints(image_a), extract(image_b), sizes)


def summarise(verification: Verification, keys_a: Keypoints | None = None, keys_b: Keypoints | None = None,
              sizes: Sequence[tuple[int, int] | None] | None = None, *, lines: int = LINES) -> dict:
    """A verification as a JSON-ready dict (see the module). The points are scaled from the images the
    keypoints were extracted from (``Keypoints.size``) to ``sizes`` where those are given."""
    points_a, points_b = (np.array(p, np.float64).reshape(-1, 2) for p in (verification.points_a, verification.points_b))
    for n, keys in enumerate((keys_a, keys_b)):
        size = sizes[n] if sizes is not None else None
        if keys is not None and size is not None and tuple(size) != tuple(keys.size):
            scale = np.array([size[0] / keys.size[0], size[1] / keys.size[1]])
            (points_a if n == 0 else points_b)[:] *= scale
    verified = bool(verification.verified())
    keep = spread(points_a, lines) if verified else []
    return {
        "model": verification.kind,
        "inliers": int(verification.inliers),
        "matches": int(verification.matches),
        "mirrored": bool(verification.mirrored),
        "verified": verified,
        "min_inliers": int(MIN_INLIERS[verification.kind]),
        "lines": [[round(float(v), 1) for v in (*points_a[i], *points_b[i])] for i in keep],
    }


def spread(points: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices of ``points`` spread over them: the point nearest their centre first, then each
    time the one farthest from those taken (deterministic)."""
    if len(points) <= n:
        return list(range(len(points)))
    taken = [int(np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1)))]
    distance = np.linalg.norm(points - points[taken[0]], axis=1)
    while len(taken) < n:
        taken.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[taken[-1]], axis=1))
    return taken


def verification_sentence(verification: Mapping) -> str:
    """One line, e.g. ``geometry: 57 homography inliers of 130 matches → verified``."""
    mirrored = ", one image mirrored" if verification.get("mirrored") else ""
    verdict = ("verified" if verification.get("verified")
               else f"not verified (needs {verification.get('min_inliers', MIN_INLIERS[VERIFY_MODEL])})")
    return (f"geometry: {verification['inliers']} {verification['model']} inliers of {verification['matches']} "
            f"matches{mirrored} → {verdict}")
