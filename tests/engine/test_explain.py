"""Explanations: each map is exactly Grad-CAM of its own image's gradients, for the decision made."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch

from engine.explain.pairs import explain_fmaps, normalise_map
from engine.nn.siamese import PAIR_CHUNK
from tests.conftest import make_model


def reference_maps(model, image_a, image_b, threshold):
    """Grad-CAM computed independently: hook the CAM layer in a forward pass of the backbone over the
    pair (one batch, as the model runs it: convolutions may round differently per batch shape), then
    take the gradients of the score with respect to those activations with plain autograd, in float64
    (a map can be a small difference of large channel terms, where float32 rounding shows at 1e-5)."""
    pixels = model.pixels([image_a, image_b])
    captured = []
    hook = model.net.backbone.cam.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            model.net.backbone(pixels)
    finally:
        hook.remove()
    acts_a, acts_b = (acts.double().requires_grad_(True) for acts in captured[0].split(1))
    score = copy.deepcopy(model.net).double().score_fmaps(acts_a, acts_b)
    is_match = bool(score.item() >= threshold)
    factual = score if is_match else 1 - score
    counterfactual = 1 - score if is_match else score
    maps = {}
    for name, target in (("factual", factual), ("counterfactual", counterfactual)):
        grad_a, grad_b = torch.autograd.grad(target.sum(), (acts_a, acts_b), retain_graph=True)
        for side, acts, grad in (("a", acts_a, grad_a), ("b", acts_b, grad_b)):
            cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))[0].float().detach().numpy()
            maps[f"{name}_{side}"] = normalise_map(cam)[0]
    return float(score.detach()), is_match, maps, (acts_a, acts_b)


@pytest.mark.parametrize("preset", ["whymatch", "paper"])
def test_maps_equal_autograd_reference(photos, preset):
    model = make_model(preset)
    for other in ("cat_crop", "coffee"):
        explanation = model.explain(photos["cat"], [photos[other]])[0]
        score, is_match, maps, _ = reference_maps(model, photos["cat"], photos[other], model.threshold)
        assert explanation.similarity == pytest.approx(score, abs=1e-5)
        assert explanation.is_match == is_match
        for name, reference in maps.items():
            np.testing.assert_allclose(getattr(explanation, name), reference, atol=1e-5, err_msg=name)


def test_map_of_b_uses_b_gradients(tiny_model, photos):
    model = tiny_model
    explanation = model.explain(photos["cat"], [photos["coffee"]])[0]
    _, is_match, maps, _ = reference_maps(model, photos["cat"], photos["coffee"], model.threshold)
    np.testing.assert_allclose(explanation.factual_b, maps["factual_b"], atol=1e-5)
    # The reference code's bug was to weight image b's map by image a's gradients: that must differ.
    hooked = []
    hook = model.net.backbone.cam.register_forward_hook(lambda m, i, o: hooked.append(o))
    try:
        score = model.net(model.pixels([photos["cat"]]).requires_grad_(True), model.pixels([photos["coffee"]]).requires_grad_(True))
    finally:
        hook.remove()
    target = score if is_match else 1 - score
    grad_of_a = torch.autograd.grad(target.sum(), hooked[0])[0]
    wrong = torch.relu((grad_of_a.mean(dim=(2, 3), keepdim=True) * hooked[1]).sum(dim=1))[0].detach().numpy()
    assert not np.allclose(normalise_map(wrong)[0], explanation.factual_b, atol=1e-3)


def test_swapping_images_swaps_maps(tiny_model, photos):
    ab = tiny_model.explain(photos["cat"], [photos["cat_crop"]])[0]
    ba = tiny_model.explain(photos["cat_crop"], [photos["cat"]])[0]
    assert ab.similarity == pytest.approx(ba.similarity, abs=1e-6)
    np.testing.assert_allclose(ab.factual_a, ba.factual_b, atol=1e-5)
    np.testing.assert_allclose(ab.factual_b, ba.factual_a, atol=1e-5)
    np.testing.assert_allclose(ab.counterfactual_a, ba.counterfactual_b, atol=1e-5)


def test_batched_explanations_equal_single_ones(tiny_model, photos):
    others = [photos["cat_crop"], photos["coffee"], photos["rocket"]]
    batched = tiny_model.explain(photos["cat"], others)
    for other, explanation in zip(others, batched):
        single = tiny_model.explain(photos["cat"], [other])[0]
        assert explanation.similarity == pytest.approx(single.similarity, abs=1e-5)
        for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"):
            np.testing.assert_allclose(getattr(explanation, name), getattr(single, name), atol=1e-5)


@pytest.mark.parametrize("preset", ["whymatch", "paper"])
def test_no_match_pairs_have_real_maps(photos, preset):
    model = make_model(preset)
    model.config.threshold = 1.0  # every pair is decided "no match"
    for explanation in model.explain(photos["cat"], [photos["coffee"], photos["rocket"]]):
        assert not explanation.is_match
        for name in ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b"):
            values = getattr(explanation, name)
            assert np.isfinite(values).all()
            assert values.min() >= 0 and values.max() <= 1
        assert explanation.factual_a.max() == pytest.approx(1.0)
        assert explanation.factual_b.max() == pytest.approx(1.0)


def test_far_apart_pair_still_has_gradients():
    """The paper's min(d, 1) clipping zeroed every dissimilar pair's gradient; 1 / (1 + d) never does."""
    model = make_model("paper")
    fmap_a = torch.rand(1, 1280, 4, 4) * 20
    fmap_b = (torch.rand(1, 1280, 4, 4) * 20 + 100).requires_grad_(True)
    score = model.net.score_fmaps(fmap_a, fmap_b)
    assert model.net.distance(model.net.embed_fmap(fmap_a), model.net.embed_fmap(fmap_b)).item() > 1.0
    (grad,) = torch.autograd.grad(score.sum(), fmap_b)
    assert grad.abs().sum() > 0
    explanation = explain_fmaps(model.net, fmap_a, fmap_b.detach(), threshold=0.5)[0]
    assert not explanation.is_match
    assert len(explanation.empty_maps) < 4


def test_saturated_score_still_has_maps(tiny_model, photos):
    """A near-duplicate scoring 1.0 in float32 (sigmoid saturated) must keep its maps."""
    model = make_model()
    moderate = model.explain(photos["cat"], [photos["cat_crop"]])[0]
    model.net.calibration.copy_(torch.tensor([50.0, 0.0]))
    saturated = model.explain(photos["cat"], [photos["cat_crop"]])[0]
    assert saturated.similarity == 1.0 and saturated.is_match and moderate.is_match
    assert saturated.empty_maps == moderate.empty_maps
    np.testing.assert_allclose(saturated.factual_a, moderate.factual_a, atol=1e-5)
    np.testing.assert_allclose(saturated.factual_b, moderate.factual_b, atol=1e-5)


def test_all_zero_map_is_reported_not_normalised():
    values, empty = normalise_map(np.zeros((3, 3), np.float32))
    assert empty and not values.any() and np.isfinite(values).all()
    values, empty = normalise_map(np.array([[0.0, 2.0]], np.float32))
    assert not empty and values.max() == 1.0


@pytest.mark.parametrize("preset", ["whymatch", "paper"])
def test_scoring_in_chunks_and_from_descriptions_equals_direct_scores(photos, preset):
    """Dedup and search score many pairs of few images from stored descriptions, a few pairs per step."""
    model = make_model(preset)
    names = ["cat", "cat_crop", "coffee", "rocket"]
    fmaps = model.feature_maps([photos[n] for n in names])
    rng = np.random.default_rng(0)
    rows_a, rows_b = rng.integers(0, len(names), 3 * PAIR_CHUNK + 5), rng.integers(0, len(names), 3 * PAIR_CHUNK + 5)
    with torch.inference_mode():
        signature = model.net.signature(fmaps)
        direct = model.net.score_signatures(tuple(p[rows_a] for p in signature), tuple(p[rows_b] for p in signature))
        chunked = model.net.score_pairs(signature, rows_a, signature, rows_b)
        assert len(model.net.score_pairs(signature, [], signature, [])) == 0
    np.testing.assert_allclose(chunked.numpy(), direct.numpy(), atol=1e-6)
    _, packed = model.encode([photos[n] for n in names])
    described = model.score_described([packed[r] for r in rows_a], [packed[r] for r in rows_b])
    np.testing.assert_allclose(described, direct.numpy(), atol=2e-3)  # descriptions are stored as float16
