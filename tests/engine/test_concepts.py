"""Concepts in words: the backbone's ImageNet classes scored on the factual regions, and their check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.explain.concepts import (
    concept_names,
    concept_probabilities,
    describe_concepts,
    explain_concepts,
)
from engine.eval.concepts import concept_masking_check
from tests.conftest import make_model

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def check_concepts(concepts: list[dict]) -> None:
    assert concepts
    names = concept_names()
    for c in concepts:
        assert names[c["index"]] == c["name"]
        assert 0 <= c["score_a"] <= 1 and 0 <= c["score_b"] <= 1
    shares = [c["share"] for c in concepts]
    assert shares == sorted(shares, reverse=True) and all(s > 0 for s in shares) and sum(shares) <= 1 + 1e-6


def test_names_are_the_imagenet_classes():
    names = concept_names()
    assert len(names) == 1000 and names[0] == "tench" and names[281] == "tabby" and "four-poster" in names


def test_unweighted_probabilities_are_the_backbone_classifier(tiny_model, photos):
    fmaps = tiny_model.feature_maps([photos["cat"], photos["rocket"]])
    reference = torch.softmax(tiny_model.net.backbone.classify(fmaps), dim=1)
    torch.testing.assert_close(concept_probabilities(tiny_model.net.backbone, fmaps), reference)
    # A map with one hot cell scores that cell's features alone; an empty map falls back to the whole image.
    one_hot = np.zeros((2, *fmaps.shape[2:]), np.float32)
    one_hot[:, 1, 2] = 1.0
    cell = torch.softmax(tiny_model.net.backbone.classifier(fmaps[:, :, 1, 2]), dim=1)
    torch.testing.assert_close(concept_probabilities(tiny_model.net.backbone, fmaps, one_hot), cell)
    torch.testing.assert_close(concept_probabilities(tiny_model.net.backbone, fmaps, np.zeros_like(one_hot)), reference)


def test_match_names_concepts_strong_in_both(tiny_model, photos):
    model = tiny_model
    threshold, model.config.threshold = model.config.threshold, 0.0
    try:
        explanation = model.explain(photos["cat"], [photos["cat_crop"]], concepts=True)[0]
    finally:
        model.config.threshold = threshold
    check_concepts(explanation.concepts)
    assert {c["present_in"] for c in explanation.concepts} == {"both"}
    assert explanation.to_dict()["concepts"] == explanation.concepts
    assert "concepts" not in model.explain(photos["cat"], [photos["cat_crop"]])[0].to_dict()


@pytest.mark.parametrize("overrides", [{"preset": "paper"}, {"backbone": "efficientnet_lite0"}])
def test_non_match_names_what_each_image_shows(photos, overrides):
    model = make_model(**overrides)
    model.config.threshold = 1.0  # every pair is decided "no match"
    explanation = model.explain(photos["cat"], [photos["rocket"]], concepts=True)[0]
    check_concepts(explanation.concepts)
    assert {c["present_in"] for c in explanation.concepts} == {"a", "b"}
    for c in explanation.concepts:
        stronger, weaker = (c["score_a"], c["score_b"]) if c["present_in"] == "a" else (c["score_b"], c["score_a"])
        assert stronger > weaker
    assert any(c["name"] in CATS for c in explanation.concepts if c["present_in"] == "a")
    assert "(only A)" in describe_concepts(explanation.concepts) and "(only B)" in describe_concepts(explanation.concepts)


def test_swapping_images_swaps_sides(tiny_model, photos):
    fmaps = tiny_model.feature_maps([photos["cat"], photos["rocket"]])
    maps = [np.ones(fmaps.shape[2:], np.float32)]
    ab = explain_concepts(tiny_model.net.backbone, fmaps[:1], fmaps[1:], maps, maps, [False])[0]
    ba = explain_concepts(tiny_model.net.backbone, fmaps[1:], fmaps[:1], maps, maps, [False])[0]
    assert [(c["name"], c["present_in"]) for c in ab] == [(c["name"], {"a": "b", "b": "a"}[c["present_in"]]) for c in ba]


def test_shipped_model_names_the_cat(photos):
    """The packaged backbone weights and the shipped head: a cat against its own crop is about a cat."""
    from engine import load_model

    explanation = load_model().explain(photos["cat"], [photos["cat_crop"]], concepts=True)[0]
    assert explanation.is_match
    check_concepts(explanation.concepts)
    assert explanation.concepts[0]["name"] in CATS and explanation.concepts[0]["present_in"] == "both"


def test_masking_check_runs_the_variants_in_one_batch(tiny_model, photos, monkeypatch):
    calls = []
    forward = tiny_model.fmaps_from_pixels
    monkeypatch.setattr(tiny_model, "fmaps_from_pixels", lambda pixels: calls.append(len(pixels)) or forward(pixels))
    threshold, tiny_model.config.threshold = tiny_model.config.threshold, 0.0
    try:
        result = concept_masking_check(tiny_model, photos["cat"], photos["cat_crop"], top=2, random_draws=2)
    finally:
        tiny_model.config.threshold = threshold
    named = result["concepts"]
    assert 1 <= len(named) <= 2 and result["is_match"]
    # the originals, then one batch: per image the map mask, and each concept's mask with its 2 random placements
    assert calls == [2, 2 * (1 + 3 * len(named))]
    for drop in [result["concept_drop"], result["random_drop"], result["map_drop"], *(c["drop"] for c in named)]:
        assert set(drop) == {"similarity", "evidence"} and all(np.isfinite(v) for v in drop.values())
    assert 0 < result["area"] <= 0.2
