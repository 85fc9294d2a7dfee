"""Model randomisation sanity check: the shipped model's maps must change when its trained layers are random."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import load_model
from engine.eval.sanity import (
    TARGET_MAPS,
    map_rank_correlations,
    randomised_copy,
    sanity_check,
    spearman,
)

# Rank correlation above this between trained and randomised maps would mean the maps show the
# image, not the model (the shipped model measures about 0.4 with a random head, 0.2 with a random
# last backbone convolution too, on these photos).
MAX_CORRELATION = 0.6


@pytest.fixture(scope="module")
def shipped():
    return load_model()


def test_maps_of_a_randomised_head_differ(shipped, photos):
    result = sanity_check(shipped, photos["cat"], [photos["cat_crop"], photos["coffee"], photos["rocket"]])
    assert set(result) == {*TARGET_MAPS, "mean"}
    assert result["mean"] < MAX_CORRELATION


def test_maps_of_a_randomised_head_and_last_convolution_differ(shipped, photos):
    result = sanity_check(shipped, photos["cat"], [photos["cat_crop"], photos["coffee"]], backbone=True)
    assert result["mean"] < MAX_CORRELATION


def test_the_check_detects_maps_that_ignore_the_weights(shipped, photos):
    fmaps = shipped.feature_maps([photos["cat"], photos["coffee"]])
    same = map_rank_correlations(shipped.net, shipped.net, fmaps[:1], fmaps[1:])
    assert same["mean"] == pytest.approx(1.0)


def test_randomised_copy_leaves_the_model_alone(shipped):
    before = {k: v.clone() for k, v in shipped.net.state_dict().items()}
    copy = randomised_copy(shipped, backbone=True)
    after = shipped.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(copy.net.local_proj.weight, shipped.net.local_proj.weight)
    assert torch.equal(copy.net.head_weights, shipped.net.head_weights)
    assert not torch.equal(copy.net.backbone.stem[-1][0].weight, shipped.net.backbone.stem[-1][0].weight)
    assert torch.equal(copy.net.backbone.stem[-2].conv[0][0].weight, shipped.net.backbone.stem[-2].conv[0][0].weight)


def test_spearman():
    x = np.array([[0.0, 0.0, 1.0], [2.0, 3.0, 5.0]])
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Ties get average ranks (scipy.stats.spearmanr gives the same value).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert np.isnan(spearman(np.zeros(4), np.arange(4)))
