"""Faithfulness: deletion/insertion curves and effects re-score exactly what the model would see."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from engine.eval import faithfulness as fa
from engine.explain import masking
from engine.explain.pairs import MAP_NAMES, PairExplanation
from tests.conftest import make_model
from whymatch.cli import main


@pytest.fixture(scope="module")
def model():
    return make_model(input_size=96)


def decision(score: float, is_match: bool) -> float:
    return score if is_match else 1.0 - score


def count_backbone_passes(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = model.fmaps_from_pixels

    def counted(pixels):
        calls.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(model, "fmaps_from_pixels", counted)
    return calls


def test_curves_start_and_end_at_the_original_and_the_filled_score(model, photos):
    steps = 4
    result = fa.pair_curves(model, photos["cat"], photos["cat_crop"], steps=steps)
    original = float(model.score([photos["cat"]], [photos["cat_crop"]])[0])
    assert result.similarity == pytest.approx(original, abs=1e-5)
    pixels = model.pixels([photos["cat"], photos["cat_crop"]])
    filled = masking.fill_pixels(pixels, "blur")
    fmaps, filled_fmaps = model.fmaps_from_pixels(pixels), model.fmaps_from_pixels(filled)
    filled_scores = {"a": model.score_fmaps(filled_fmaps[:1], fmaps[1:])[0], "b": model.score_fmaps(fmaps[:1], filled_fmaps[1:])[0]}
    assert set(result.curves) == {"a", "b"}
    for side, curves in result.curves.items():
        assert set(curves) == set(fa.ORDERINGS)
        for curve in curves.values():
            assert curve.deletion.shape == curve.insertion.shape == (steps + 1,)
            assert curve.deletion[0] == pytest.approx(decision(original, result.is_match), abs=1e-5)
            assert curve.insertion[-1] == pytest.approx(decision(original, result.is_match), abs=1e-5)
            empty = decision(float(filled_scores[side]), result.is_match)
            assert curve.deletion[-1] == pytest.approx(empty, abs=1e-5)
            assert curve.insertion[0] == pytest.approx(empty, abs=1e-5)
            assert 0.0 <= curve.deletion_auc <= 1.0 and 0.0 <= curve.insertion_auc <= 1.0
    aucs = result.aucs()
    assert set(aucs) == {f"{k}_auc{s}" for k in ("deletion", "insertion") for s in ("", "_random", "_centre")}
    assert all(0.0 <= v <= 1.0 for v in aucs.values())


def test_occlusion_ordering_measures_each_cell_by_masking_it_alone(model, photos):
    pixels = model.pixels([photos["cat"], photos["coffee"]])
    fmaps = model.fmaps_from_pixels(pixels)
    explanation = model.explain_feature_maps(fmaps[:1], fmaps[1:])[0]
    filled = masking.fill_pixels(pixels, "blur")
    maps = fa.occlusion_maps(model, pixels, filled, fmaps, explanation)
    h, w = fmaps.shape[-2:]
    assert maps["a"].shape == maps["b"].shape == (h, w)
    i, j = np.unravel_index(np.abs(maps["b"]).argmax(), (h, w))
    rows, cols = pixels.shape[-2] // h, pixels.shape[-1] // w
    masked = pixels[1:].clone()
    masked[..., i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = filled[1:, :, i * rows : (i + 1) * rows, j * cols : (j + 1) * cols]
    by_hand = model.score_fmaps(fmaps[:1], model.fmaps_from_pixels(masked))[0]
    drop = decision(explanation.similarity, explanation.is_match) - decision(float(by_hand), explanation.is_match)
    assert maps["b"][i, j] == pytest.approx(drop, abs=1e-5)
    result = fa.curves_from_tensors(model, pixels, fmaps, explanation, steps=3, references=[fa.OCCLUSION])
    assert set(result.curves["a"]) == {*fa.ORDERINGS, fa.OCCLUSION}
    assert {"deletion_auc_occlusion", "insertion_auc_occlusion"} <= set(result.aucs())


def top_cells(importance: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-importance.flatten(), kind="stable")[:k].tolist())


def test_greedy_ordering_starts_with_the_cells_whose_loss_alone_costs_most(model, photos):
    pixels = model.pixels([photos["cat"], photos["cat_crop"]])
    fmaps = model.fmaps_from_pixels(pixels)
    explanation = model.explain_feature_maps(fmaps[:1], fmaps[1:])[0]
    filled = masking.fill_pixels(pixels, "blur")
    steps = 4
    greedy = fa.greedy_deletion_maps(model, pixels, filled, fmaps, explanation, steps)
    occlusion = fa.occlusion_maps(model, pixels, filled, fmaps, explanation)
    n = fmaps.shape[-2] * fmaps.shape[-1]
    first_step = round(n / steps)
    for side in "ab":
        assert greedy[side].shape == fmaps.shape[-2:]
        assert sorted(greedy[side].flatten().tolist()) == list(range(1, n + 1))
        # The first step searches single cells, which is what occlusion measures: the same cells come first.
        assert top_cells(greedy[side], first_step) == top_cells(occlusion[side], first_step)
    result = fa.curves_from_tensors(model, pixels, fmaps, explanation, steps=steps, references=fa.REFERENCES)
    assert {f"{kind}_auc_{name}" for kind in ("deletion", "insertion") for name in fa.REFERENCES} <= set(result.aucs())
    with pytest.raises(ValueError, match="unknown reference"):
        fa.curves_from_tensors(model, pixels, fmaps, explanation, steps=steps, references=["oracle"])


def test_unmasked_variant_scores_the_original_pair(model, photos):
    pixels = model.pixels([photos["cat"], photos["coffee"]])
    fmaps = model.fmaps_from_pixels(pixels)
    keep = torch.ones(pixels.shape[-2:], dtype=torch.bool)
    variants = masking.Variants(pixels, masking.fill_pixels(pixels), fmaps, [0, 1], [keep, keep], [1, 0], [True, False])
    expected = model.score_fmaps(fmaps[:1], fmaps[1:])[0]
    np.testing.assert_allclose(masking.score_variants(model, variants), [expected, expected], atol=1e-6)


def test_non_match_curves_use_one_minus_similarity(photos):
    model = make_model()
    model.config.threshold = 1.0
    result = fa.pair_curves(model, photos["cat"], photos["coffee"], steps=2)
    assert not result.is_match
    assert result.curves["a"]["factual"].deletion[0] == pytest.approx(1.0 - result.similarity, abs=1e-6)


def test_batched_curves_equal_unbatched(photos):
    batched, single = make_model(input_size=96), make_model(input_size=96)
    single.batch_size = 1
    args = (photos["cat"], photos["rocket"])
    one = fa.pair_curves(batched, *args, steps=3, rng=np.random.default_rng(1))
    two = fa.pair_curves(single, *args, steps=3, rng=np.random.default_rng(1))
    for side in ("a", "b"):
        for name in fa.ORDERINGS:
            np.testing.assert_allclose(one.curves[side][name].deletion, two.curves[side][name].deletion, atol=1e-5)
            np.testing.assert_allclose(one.curves[side][name].insertion, two.curves[side][name].insertion, atol=1e-5)


def test_auc_of_simple_curves():
    assert fa.auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert fa.auc(np.array([1.0, 0.5, 0.0])) == pytest.approx(0.5)
    assert fa.auc(np.array([0.0, 0.0, 0.0, 1.0])) == pytest.approx(1 / 6)


def test_region_has_the_requested_area_and_the_largest_values():
    rng = np.random.default_rng(0)
    key = masking.importance_key(rng.random((4, 4)), (64, 48), masking.random_map((4, 4), rng))
    for area in (0.05, 0.2, 0.5, 1.0):
        region = masking.top_region(key, area)
        assert int(region.sum()) == round(area * 64 * 48)
        if area < 1.0:
            assert key[region].min() >= key[~region].max()
    ranks = fa.pixel_ranks(key)
    assert torch.equal(ranks.flatten().sort().values, torch.arange(64 * 48))
    first = ranks < round(0.2 * 64 * 48)
    assert int(first.sum()) == int(masking.top_region(key, 0.2).sum()) and key[first].min() >= key[~first].max()
    with pytest.raises(ValueError):
        masking.top_region(key, 0.0)


def test_a_stack_of_maps_gives_each_map_its_own_key_and_region():
    rng = np.random.default_rng(1)
    maps, tie_break = rng.random((3, 4, 4)), masking.random_map((4, 4), rng)
    keys = masking.importance_key(maps, (64, 48), tie_break)
    regions = masking.top_region(keys, 0.2)
    assert keys.shape == regions.shape == (3, 64, 48)
    for importance, key, region in zip(maps, keys, regions):
        assert torch.equal(key, masking.importance_key(importance, (64, 48), tie_break))
        assert torch.equal(region, masking.top_region(key, 0.2))


def test_ties_are_not_broken_in_raster_order():
    zeros = np.zeros((4, 4), np.float32)
    region = masking.top_region(masking.importance_key(zeros, (32, 32), masking.random_map((4, 4), np.random.default_rng(0))), 0.25)
    assert not region[:8].all()


def test_fills():
    pixels = torch.randn(2, 3, 64, 64)
    mean = masking.fill_pixels(pixels, "mean")
    torch.testing.assert_close(mean[:, :, 5, 7], pixels.mean(dim=(2, 3)))
    blur = masking.fill_pixels(pixels, "blur")
    assert blur.shape == pixels.shape
    assert blur.std() < 0.5 * pixels.std()
    torch.testing.assert_close(blur.mean(dim=(2, 3)), pixels.mean(dim=(2, 3)), atol=0.05, rtol=0)
    with pytest.raises(ValueError):
        masking.fill_pixels(pixels, "noise")


def test_effects_keys_values_and_one_backbone_pass(model, photos, monkeypatch):
    """The masked variants share backbone passes: all four in one when the batch holds four."""
    explanation = model.explain(photos["cat"], [photos["coffee"]])[0]
    assert explanation.effects is None and "effects" not in explanation.to_dict()
    fmaps = model.feature_maps([photos["cat"], photos["coffee"]])
    monkeypatch.setattr(model, "batch_size", 4)
    calls = count_backbone_passes(model, monkeypatch)
    model.add_effects(photos["cat"], [photos["coffee"]], [explanation], fmap_a=fmaps[:1], fmaps_b=fmaps[1:])
    assert calls == [4 - len(explanation.empty_maps)]
    effects = explanation.effects
    assert effects["fill"] == "blur" and effects["area"] == masking.DEFAULT_AREA
    to_score = model.net.score_from_evidence
    assert float(to_score(torch.tensor(effects["evidence"]))) == pytest.approx(explanation.similarity, abs=1e-5)
    for name in MAP_NAMES:
        entry = effects[name]
        assert set(entry) == {"masked_similarity", "change", "masked_evidence", "evidence_change", "flips"}
        assert 0.0 <= entry["masked_similarity"] <= 1.0
        assert entry["change"] == pytest.approx(entry["masked_similarity"] - explanation.similarity)
        assert float(to_score(torch.tensor(entry["masked_evidence"]))) == pytest.approx(entry["masked_similarity"], abs=1e-5)
        assert entry["evidence_change"] == pytest.approx(entry["masked_evidence"] - effects["evidence"])
        assert entry["flips"] == ((entry["masked_similarity"] >= explanation.threshold) != explanation.is_match)
    assert json.loads(json.dumps(explanation.to_dict()))["effects"] == effects


def test_effects_equal_masking_by_hand(model, photos):
    explanation = model.explain(photos["cat"], [photos["cat_crop"]], effects=True)[0]
    pixels = model.pixels([photos["cat"], photos["cat_crop"]])
    fmaps = model.fmaps_from_pixels(pixels)
    tie_break = masking.random_map(fmaps.shape[-2:], np.random.default_rng(0))
    region = masking.top_region(masking.importance_key(explanation.factual_b, pixels.shape[-2:], tie_break), masking.DEFAULT_AREA)
    masked = torch.where(region, masking.fill_pixels(pixels[1:], "blur"), pixels[1:])
    by_hand = model.score_fmaps(fmaps[:1], model.fmaps_from_pixels(masked))[0]
    assert explanation.effects["factual_b"]["masked_similarity"] == pytest.approx(float(by_hand), abs=1e-5)


def test_effects_of_k_pairs_share_backbone_passes(photos, monkeypatch):
    model = make_model()
    others = [photos["cat_crop"], photos["coffee"], photos["rocket"]]
    single = [model.explain(photos["cat"], [other], effects=True)[0].effects for other in others]
    explanations = model.explain(photos["cat"], others)
    fmaps = model.feature_maps([photos["cat"], *others])
    model.batch_size = 5
    calls = count_backbone_passes(model, monkeypatch)
    model.add_effects(photos["cat"], others, explanations, fmap_a=fmaps[:1], fmaps_b=fmaps[1:])
    variants = sum(4 - len(e.empty_maps) for e in explanations)
    assert sum(calls) == variants and len(calls) == -(-variants // 5)
    for explanation, alone in zip(explanations, single):
        for name in MAP_NAMES:
            if alone[name] is not None:
                assert explanation.effects[name]["masked_similarity"] == pytest.approx(alone[name]["masked_similarity"], abs=1e-5)


def test_mean_fill_and_area_options(model, photos):
    explanation = model.explain(photos["cat"], [photos["rocket"]])[0]
    model.add_effects(photos["cat"], [photos["rocket"]], [explanation], fill="mean", area=0.5)
    assert explanation.effects["fill"] == "mean" and explanation.effects["area"] == 0.5
    mean_half = explanation.effects["factual_a"]["masked_similarity"]
    model.add_effects(photos["cat"], [photos["rocket"]], [explanation])
    assert explanation.effects["factual_a"]["masked_similarity"] != pytest.approx(mean_half, abs=1e-6)
    with pytest.raises(ValueError):
        model.add_effects(photos["cat"], [photos["rocket"]], [explanation], fill="noise")


def test_effect_sentences(model, photos):
    explanation = model.explain(photos["cat"], [photos["coffee"]], effects=True)[0]
    sentences = masking.effect_sentences(explanation)
    assert len(sentences) == 4
    assert sentences[0].startswith("masking the factual region of image a (20% of its area, blurred)")
    assert f"{explanation.similarity:.2f}" in sentences[1]
    explanation.effects["counterfactual_b"] = None
    explanation.effects["factual_a"] = {"masked_similarity": 0.0, "change": -explanation.similarity, "flips": explanation.is_match}
    sentences = masking.effect_sentences(explanation)
    assert "lowers the similarity" in sentences[0]
    assert "empty" in sentences[3]
    named = masking.effect_sentences(explanation, names=("the query", "the match"))
    assert named[0].startswith("masking the factual region of the query") and named[3] == "the counterfactual map of the match is empty: nothing to mask"
    assert masking.effect_sentences(model.explain(photos["cat"], [photos["coffee"]])[0]) == []


def test_evaluate_explanations_reports_every_key(groups_folder):
    from engine.data import load_labelled_images

    model = make_model(input_size=64)
    data = load_labelled_images(groups_folder, "groups")
    seen = []
    metrics = fa.evaluate_explanations(model, data, max_pairs=4, steps=2, on_pair=seen.append)
    assert metrics["n_pairs"] == 4 == len(seen)
    assert metrics["n_pairs_match"] + metrics["n_pairs_no_match"] == 4
    for key in ("deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random", "deletion_auc_centre", "insertion_auc_centre"):
        assert 0.0 <= metrics[key] <= 1.0
        assert f"{key}_match" in metrics and f"{key}_no_match" in metrics
    for key in ("effect_factual", "effect_counterfactual", "randomised_head_spearman"):
        assert metrics[key] is None or -1.0 <= metrics[key] <= 1.0


def test_cli_eval_explanations_and_compare_effects(tmp_path, groups_folder):
    model = make_model(input_size=64)
    model.save(tmp_path / "model")
    env = {"WHYMATCH_DATA_DIR": str(tmp_path / "data")}
    result = CliRunner().invoke(main, ["eval", "--data", str(groups_folder), "--form", "groups", "--model", str(tmp_path / "model"),
                                       "--explanations", "--max-pairs", "4", "--steps", "2", "--json"], env=env)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert {"deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random"} <= set(metrics)
    images = sorted(groups_folder.rglob("*.jpg"))
    result = CliRunner().invoke(main, ["compare", str(images[0]), str(images[1]), "--model", str(tmp_path / "model"), "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output)["effects"]) >= {"fill", "area", *MAP_NAMES}
    result = CliRunner().invoke(main, ["compare", str(images[0]), str(images[1]), "--model", str(tmp_path / "model")], env=env)
    assert result.exit_code == 0, result.output
    assert "masking the factual region of image a" in result.output


def test_effect_sentences_say_how_much_a_saturated_score_moves():
    """Where the similarity reads 1.00 before and after, the sentence gives the evidence (logit) it lost."""
    zeros = np.zeros((2, 2), np.float32)
    explanation = PairExplanation(0.9999, True, 0.9, zeros, zeros, zeros, zeros)
    entry = {"masked_similarity": 0.9990, "change": -0.0009, "masked_evidence": 6.9, "evidence_change": -2.3, "flips": False}
    explanation.effects = {"fill": "blur", "area": 0.2, "evidence": 9.2, **dict.fromkeys(MAP_NAMES, entry)}
    sentence = masking.effect_sentences(explanation)[0]
    assert "leaves the similarity at 1.00 but lowers the head's evidence (its logit) from 9.2 to 6.9" in sentence
