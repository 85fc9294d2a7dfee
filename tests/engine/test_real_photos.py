"""Integration on real AirBnB photos (../shared/data): the shipped model, explanations and the demo job."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from engine import load_model
from engine.data import load_labelled_images, split
from engine.eval.evaluate import evaluate_fmaps
from tests.conftest import shared_or_skip
from whymatch.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped():
    return load_model()


@pytest.fixture(scope="module")
def held_out_sample():
    data = load_labelled_images(shared_or_skip("airbnb"))
    held = data.subset(split(data, 0.3, seed=0)[1])
    groups = sorted({g for g in held.groups if held.groups.count(g) >= 2})[:25]
    return held.subset([i for i, g in enumerate(held.groups) if g in groups])


def test_shipped_model_finds_duplicates_it_never_saw(shipped, held_out_sample):
    fmaps = shipped.feature_maps(held_out_sample.paths)
    metrics = evaluate_fmaps(shipped.net, fmaps, held_out_sample.groups, "groups", shipped.threshold)
    # A floor far above random weights (~0.1) and below the benchmarked figures: catches a broken model.
    assert metrics["recall@1"] >= 0.8
    assert metrics["pair_auc"] >= 0.9


def test_real_duplicate_pair_is_explained(shipped, held_out_sample):
    groups = held_out_sample.groups
    a = 0
    partner = next(i for i in range(1, len(groups)) if groups[i] == groups[a])
    stranger = next(i for i in range(len(groups)) if groups[i] != groups[a])
    match, other = shipped.explain(held_out_sample.paths[a], [held_out_sample.paths[partner], held_out_sample.paths[stranger]])
    assert match.similarity > other.similarity
    side = shipped.config.input_size // 32
    for explanation in (match, other):
        for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"):
            values = getattr(explanation, name)
            assert values.shape == (side, side) and np.isfinite(values).all()
        assert not {"factual_a", "factual_b"} & set(explanation.empty_maps)


def test_demo_job_writes_figures(tmp_path):
    shared_or_skip("airbnb")
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--pairs", "1"], env={"WHYMATCH_DATA_DIR": str(tmp_path / "data")})
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "report.json").read_text())
    pairs = summary["pairs"]
    assert [r["kind"] for r in pairs] == ["best", "worst"]
    assert pairs[0]["similarity"] > pairs[1]["similarity"]
    assert all((out / f"{r['kind']}-{i + 1}.png").stat().st_size > 10_000 for i, r in enumerate(pairs))
    # The catalogue tour: the demo catalogue is indexed, its duplicates found, and one search explained.
    assert summary["indexed"]["ntotal"] > 50 and summary["duplicate_pairs"] > 0
    matches = summary["search"]["matches"]
    assert matches and matches[0]["head_score"] >= matches[-1]["head_score"] and "explanation" in matches[0]
    assert len(list((out / "search").glob("*.png"))) == 4 * len(matches)
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--pairs", "1"], env={"WHYMATCH_DATA_DIR": str(tmp_path / "data")})
    assert again.exit_code == 0 and json.loads((out / "report.json").read_text())["indexed"]["added"] == 0
