"""The final decision on a pair (engine.explain.decision): the head's score OR geometric verification, and
verification as part of the explanation (the JSON, the CLI, the figure).

The tiny untrained model's scores are arbitrary, so its threshold is set where the head alone says what the
test needs; scikit-image's rocket and an edited copy of it verify, the rocket and the coffee cup do not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from engine.explain import figures
from engine.explain.decision import LINES, decided_by, pair_verification, summarise, verification_sentence
from engine.verify import MIN_INLIERS, Verification
from tests.conftest import make_model
from whymatch.cli import main

MAP_NAMES = ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b")
CROP = (30, 20)  # the copy's offset in the rocket photo


@pytest.fixture(scope="module")
def rocket() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.rocket())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee())


@pytest.fixture(scope="module")
def rocket_copy(rocket) -> Image.Image:
    """Cropped, brighter: an edited copy at the known offset ``CROP`` (same scale)."""
    w, h = rocket.size
    return ImageEnhance.Brightness(rocket.crop((*CROP, w - 40, h - 30))).enhance(1.2)


@pytest.fixture(scope="module")
def strict_model():
    """The tiny model with a threshold no pair reaches: the head alone says "no match" to everything."""
    return make_model(threshold=0.999)


def test_the_tier_rule():
    verified, unverified = {"verified": True}, {"verified": False}
    assert decided_by(0.9, 0.5) == "head" and decided_by(0.5, 0.5, unverified) == "head"
    assert decided_by(0.9, 0.5, verified) == "head and geometry"
    assert decided_by(0.1, 0.5, verified) == "geometry"
    assert decided_by(0.1, 0.5) is None and decided_by(0.1, 0.5, unverified) is None


def test_a_verified_pair_is_a_match_whatever_the_head_says(strict_model, rocket, rocket_copy):
    e = strict_model.compare(rocket, rocket_copy, effects=True, concepts=False)
    assert e.similarity < e.threshold  # the head alone: no match
    v = e.verification
    assert v["model"] == "homography" and v["verified"] and v["inliers"] >= MIN_INLIERS["homography"] == v["min_inliers"]
    assert e.is_match and e.decided_by == "geometry"
    # The maps explain the final decision: the factual maps are the head's evidence for similarity, i.e. what
    # the head alone shows as counterfactual.
    head_only = strict_model.compare(rocket, rocket_copy, effects=False, concepts=False, correspondences=False, verify=False)
    assert not head_only.is_match and head_only.decided_by is None and head_only.verification is None
    for side in "ab":
        np.testing.assert_allclose(getattr(e, f"factual_{side}"), getattr(head_only, f"counterfactual_{side}"), atol=1e-6)
    # Masking moves the head's score only: with the geometry held, nothing flips a verified match.
    assert not any(e.effects[name]["flips"] for name in MAP_NAMES if e.effects[name] is not None)
    # The lines: a few dozen inlier pairs in the original pixels, where the crop put them.
    lines = np.array(v["lines"])
    assert 8 <= len(lines) <= LINES and lines.shape[1] == 4
    np.testing.assert_allclose(lines[:, 2:], lines[:, :2] - CROP, atol=2.0)
    payload = json.loads(json.dumps(e.to_dict()))
    assert payload["decision"] == "match" and payload["decided_by"] == "geometry" and payload["verification"] == v


def test_different_photos_above_the_head_threshold_are_no_match(strict_model, rocket, coffee):
    e = strict_model.compare(rocket, coffee, effects=False, concepts=False)
    assert not e.is_match and e.decided_by is None
    assert not e.verification["verified"] and e.verification["lines"] == []  # chance inliers are not drawn
    assert e.to_dict()["decided_by"] is None


def test_the_head_decides_alone_without_verification(rocket, coffee):
    lenient = make_model(threshold=0.0)  # every pair passes the head
    e = lenient.compare(rocket, coffee, effects=False, concepts=False, correspondences=False, verify=False)
    assert e.is_match and e.decided_by == "head" and "verification" not in e.to_dict()
    assert lenient.compare(rocket, coffee, effects=False, concepts=False).decided_by == "head"  # unverified: still the head's


def test_lines_are_in_the_original_pixels_of_a_reduced_copy(rocket, rocket_copy):
    """Keypoints found on copies decoded at half size are scaled back to the sizes given."""
    half = [im.resize((im.width // 2, im.height // 2), Image.BILINEAR) for im in (rocket, rocket_copy)]
    v = pair_verification(half[0], half[1], sizes=(rocket.size, rocket_copy.size))
    assert v["verified"]
    lines = np.array(v["lines"])
    np.testing.assert_allclose(lines[:, 2:], lines[:, :2] - CROP, atol=4.0)
    assert lines[:, 0].max() > rocket.width / 2  # original pixels, not the half-size copy's


def test_summary_and_sentence():
    points = np.array([[float(i), float(2 * i)] for i in range(40)], np.float32)
    v = Verification(40, 55, points, points + 1, np.eye(3), "homography", mirrored=True)
    s = summarise(v)
    assert len(s["lines"]) == LINES and s["verified"] and s["mirrored"]
    assert len({tuple(line) for line in s["lines"]}) == LINES  # distinct points, spread over the image
    assert all(line[2] == line[0] + 1 for line in s["lines"])
    assert verification_sentence(s) == "geometry: 40 homography inliers of 55 matches, one image mirrored → verified"
    few = summarise(Verification(3, 9, points[:3], points[:3], None, "homography"))
    assert verification_sentence(few) == "geometry: 3 homography inliers of 9 matches → not verified (needs 8)"


def test_the_figure_draws_the_inlier_lines(strict_model, rocket, rocket_copy, coffee, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures.plt, "close", drawn.append)  # keep each figure to look at
    e = strict_model.compare(rocket, rocket_copy, effects=False, concepts=False, figure=tmp_path / "copy.png")
    strict_model.compare(rocket, coffee, effects=False, concepts=False, figure=tmp_path / "other.png")
    verified, other = drawn
    lines = [a for a in verified.artists if a.get_gid() == "verification"]
    assert len(lines) == len(e.verification["lines"]) >= 8
    assert all(line.get_linewidth() < 1 for line in lines)  # thin, unlike the correspondences' lines
    boxes = [a for a in verified.artists if a.get_gid() != "verification"]
    assert len(boxes) == len(e.correspondences)  # the numbered correspondences are drawn as before
    assert not [a for a in other.artists if a.get_gid() == "verification"]
    words = " ".join(t.get_text() for t in verified.texts) + verified._suptitle.get_text()
    assert "match by geometry" in words and "→ verified" in words
    assert (tmp_path / "copy.png").stat().st_size > 10_000


def test_compare_command_prints_and_returns_the_verification(tmp_path, rocket, rocket_copy, strict_model):
    strict_model.save(tmp_path / "model")
    a, b = tmp_path / "rocket.png", tmp_path / "copy.png"
    rocket.save(a)
    rocket_copy.save(b)
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data")}
    args = ["compare", str(a), str(b), "--model", str(tmp_path / "model"), "--no-effects"]
    text = CliRunner().invoke(main, args, env=env)
    assert text.exit_code == 0, text.output
    assert "→ match by geometry (threshold 0.999)" in text.output
    assert "homography inliers of" in text.output and "matches → verified" in text.output
    payload = json.loads(CliRunner().invoke(main, [*args, "--json"], env=env).output)
    assert payload["verification"]["verified"] and payload["decided_by"] == "geometry" and payload["is_match"]
    skipped = json.loads(CliRunner().invoke(main, [*args, "--json", "--no-verify"], env=env).output)
    assert "verification" not in skipped and skipped["decided_by"] is None and not skipped["is_match"]
