"""Thresholds placed by a stated false-match rate (``threshold_for_false_match_rate``, ``place_thresholds``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.eval.evaluate import pair_scores
from engine.eval.metrics import all_pairs, match_rates, threshold_for_false_match_rate
from engine.train.trainer import TrainOptions, place_thresholds
from tests.conftest import make_model


def test_the_threshold_is_the_upper_quantile_of_the_dissimilar_scores():
    rng = np.random.default_rng(0)
    negatives = rng.permutation(np.arange(1000) / 1000)  # 0.000 … 0.999
    positives = np.full(50, 0.2)  # ignored, even below the threshold
    scores = np.r_[negatives, positives]
    labels = np.r_[np.zeros(1000, int), np.ones(50, int)]
    t = threshold_for_false_match_rate(scores, labels, 0.01)
    assert 0.989 < t <= 0.990 and t == pytest.approx(0.9895)
    assert (negatives >= t).sum() == 10
    assert threshold_for_false_match_rate(scores, labels, 0.001) == pytest.approx(0.9985)
    # A rate below one pair in the set: just above the top score, nothing is a match.
    assert threshold_for_false_match_rate(scores, labels, 0.0005) > 0.999
    rates = match_rates(scores, labels, t)
    assert rates["false_match_rate"] == pytest.approx(0.01) and rates["true_match_rate"] == 0.0


def test_rate_is_never_exceeded_on_random_scores_and_ties_go_together():
    rng = np.random.default_rng(1)
    for rate in (0.003, 0.02, 0.1, 0.5):
        scores = rng.normal(size=5000).round(2)  # many ties
        labels = np.zeros(5000, int)
        t = threshold_for_false_match_rate(scores, labels, rate)
        reached = (scores >= t).mean()
        assert reached <= rate
        # The next distinct score down would have gone over the rate.
        lower = scores[scores < t].max()
        assert (scores >= lower).mean() > rate
    saturated = np.r_[np.ones(30), np.linspace(0, 0.9, 970)]
    assert threshold_for_false_match_rate(saturated, np.zeros(1000, int), 0.01) > 1.0


def test_bad_rates_and_missing_negatives_are_refused():
    with pytest.raises(ValueError, match="rate"):
        threshold_for_false_match_rate(np.array([0.1, 0.2]), np.array([0, 0]), 0.0)
    with pytest.raises(ValueError, match="dissimilar"):
        threshold_for_false_match_rate(np.array([0.1, 0.2]), np.array([1, 1]), 0.1)
    with pytest.raises(ValueError, match="false_match_rate"):
        TrainOptions(false_match_rate=1.5)


def test_place_thresholds_uses_every_inner_validation_pair():
    model = make_model(input_size=64)
    torch.manual_seed(0)
    groups = [f"g{k // 2}" for k in range(24)]
    classes = ["flowers/a"] * 8 + ["skin/b"] * 8 + ["rooms/c"] * 8
    fmaps = torch.rand(len(groups), 1280, 2, 2)
    config = model.config
    options = TrainOptions(false_match_rate=0.1, duplicate_false_match_rate=0.02)
    placed = place_thresholds(model.net, config, fmaps, groups, "groups", options, classes=classes)
    i, j, labels = all_pairs(groups)
    scores = pair_scores(model.net, fmaps, fmaps, i, j)
    assert config.threshold == threshold_for_false_match_rate(scores, labels, 0.1)
    assert config.duplicate_threshold == threshold_for_false_match_rate(scores, labels, 0.02)
    assert placed.scored is not None and np.allclose(placed.scored[3], scores)
    rates = placed.provenance["inner_val_rates"]
    assert set(rates) == {"all", "within flowers", "within skin", "within rooms", "across domains"}
    assert rates["all"]["negative_pairs"] == int((labels == 0).sum())
    assert rates["all"]["false_match_rate@threshold"] <= 0.1
    assert placed.provenance["false_match_rate"] == 0.1
    # Given which images are photos (not edited copies), each stratum is also measured on photo pairs alone.
    originals = [k % 2 == 0 for k in range(len(groups))]
    placed = place_thresholds(model.net, config, fmaps, groups, "groups", options, classes=classes, originals=originals)
    rates = placed.provenance["inner_val_rates"]
    photo_pairs = np.array(originals)[i] & np.array(originals)[j]
    assert rates["all (photos)"]["negative_pairs"] == int(((labels == 0) & photo_pairs).sum())
    assert rates["all (photos)"]["positive_pairs"] == 0 and "within skin (photos)" in rates


def test_without_rates_the_thresholds_are_placed_as_before():
    model = make_model(input_size=64)
    groups = [f"g{k // 2}" for k in range(12)]
    fmaps = torch.rand(len(groups), 1280, 2, 2)
    placed = place_thresholds(model.net, model.config, fmaps, groups, "groups", TrainOptions())
    assert placed.provenance == {}
    assert model.config.duplicate_threshold is not None
