"""The demo job: its catalogue works without ../shared (scikit-image's photos plus known near-duplicate
edits), and it runs end to end through the Catalogue with a tiny untrained model."""

from __future__ import annotations

import json

from click.testing import CliRunner

from engine.data import load_labelled_images
from tests.conftest import make_model
from whymatch.cli import main
from whymatch.demo import SKIMAGE_PHOTOS, skimage_catalogue


def test_skimage_catalogue_has_one_duplicate_group_per_photo(tmp_path):
    root = skimage_catalogue(tmp_path / "demo")
    data = load_labelled_images(root)
    assert data.form == "groups"
    assert len(data) == 4 * len(SKIMAGE_PHOTOS)
    assert sorted(set(data.groups)) == sorted(SKIMAGE_PHOTOS)


def test_demo_indexes_then_explains_its_best_and_worst_pairs(tmp_path):
    make_model(input_size=64).save(tmp_path / "model")
    root = skimage_catalogue(tmp_path / "demo")
    out = tmp_path / "out"
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data"), "WHYMATCH_MODEL_PATH": str(tmp_path / "model")}
    args = ["demo", "--catalogue", str(root), "--out", str(out), "--pairs", "2"]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report.json").read_text())
    assert set(summary) == {"pairs", "indexed", "duplicate_pairs", "duplicate_groups", "dedup_threshold", "search"}
    pairs = summary["pairs"]
    assert [p["kind"] for p in pairs] == ["best", "best", "worst"]
    assert min(p["similarity"] for p in pairs[:2]) > pairs[2]["similarity"]
    assert all(p["a"].startswith(str(root)) and p["b"].startswith(str(root)) for p in pairs)
    assert all((out / f"{p['kind']}-{n + 1}.png").stat().st_size > 10_000 for n, p in enumerate(pairs))
    assert summary["indexed"]["added"] == 4 * len(SKIMAGE_PHOTOS) and summary["search"]["matches"]
    assert " best " in result.output and "worst " in result.output and "what " in result.output  # concepts in words
    again = CliRunner().invoke(main, args, env=env)
    assert again.exit_code == 0 and json.loads((out / "report.json").read_text())["indexed"]["added"] == 0
