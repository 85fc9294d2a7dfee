"""Tests for engine.eval.metrics on small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from engine.eval.metrics import (
    all_pairs,
    best_f1_threshold,
    best_threshold,
    pair_metrics,
    retrieval_metrics,
    threshold_for_precision,
)

# Gallery: two "a", two "b", one distractor (None).
GALLERY_GROUPS = ["a", "a", "b", "b", None]
# Query 0 ("a"): ranking g4(None) .95, g0(a) .9, g2 .8, g1(a) .2, g3 .1
#   -> positives at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5; no hit @1, hit @5.
# Query 1 ("b"): ranking g2(b) .7, g3(b) .3, g1 .2, g0 .1, g4 0
#   -> AP = 1; hit @1.
# Query 2 ("c"): no positive in the gallery -> skipped.
SCORES = np.array(
    [
        [0.9, 0.2, 0.8, 0.1, 0.95],
        [0.1, 0.2, 0.7, 0.3, 0.0],
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ]
)
QUERY_GROUPS = ["a", "b", "c"]


def _dummy_emb(n: int) -> np.ndarray:
    return np.zeros((n, 2))


def test_retrieval_hand_computed():
    m = retrieval_metrics(
        _dummy_emb(3), QUERY_GROUPS, _dummy_emb(5), GALLERY_GROUPS, scores=SCORES
    )
    assert m["n_queries"] == 2
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["map"] == pytest.approx((0.5 + 1.0) / 2)


def test_retrieval_custom_ks():
    m = retrieval_metrics(
        _dummy_emb(3), QUERY_GROUPS, _dummy_emb(5), GALLERY_GROUPS, scores=SCORES, ks=(1, 2, 3)
    )
    # Query 0's first positive is at rank 2.
    assert (m["recall@1"], m["recall@2"], m["recall@3"]) == (0.5, 1.0, 1.0)


def test_retrieval_uses_dot_product_of_embeddings():
    # Angles: query at 0 deg; gallery at 10 (b), 30 (a), 90 (a).
    ang = np.deg2rad([10, 30, 90])
    gallery = np.c_[np.cos(ang), np.sin(ang)]
    query = np.array([[1.0, 0.0]])
    m = retrieval_metrics(query, ["a"], gallery, ["b", "a", "a"])
    # Ranking: b, a, a -> AP = (1/2 + 2/3) / 2
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == 1.0
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_query_never_retrieves_itself():
    e = np.array([[1.0, 0.0], [0.0, 1.0], [np.cos(0.2), np.sin(0.2)]])
    gallery_groups = ["x", "x", "y"]
    query = e[:1]  # identical to gallery entry 0, same image file
    # Without ids the query finds itself at rank 1: a meaningless hit.
    assert retrieval_metrics(query, ["x"], e, gallery_groups)["recall@1"] == 1.0

    m = retrieval_metrics(
        query, ["x"], e, gallery_groups, query_ids=["img0"], gallery_ids=["img0", "img1", "img2"]
    )
    # Remaining ranking: img2 (y), img1 (x) -> miss @1, AP = 1/2.
    assert m["n_queries"] == 1
    assert m["recall@1"] == 0.0
    assert m["map"] == pytest.approx(0.5)


def test_identical_copy_with_other_id_is_a_hit():
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(
        e[:1], ["x"], e, ["x", "x", "y"], query_ids=["a.jpg"], gallery_ids=["a.jpg", "a_copy.jpg", "c.jpg"]
    )
    assert m["recall@1"] == 1.0 and m["map"] == 1.0


def test_query_whose_only_positive_is_itself_is_skipped():
    e = np.eye(3)
    groups = ["x", "y", "y"]
    m = retrieval_metrics(e, groups, e, groups, query_ids=[0, 1, 2], gallery_ids=[0, 1, 2])
    # Query 0's only "x" is itself -> skipped; queries 1 and 2 have each other.
    assert m["n_queries"] == 2


def test_no_usable_query_gives_nan():
    e = np.eye(2)
    m = retrieval_metrics(e, ["x", None], e, ["y", None])
    assert m["n_queries"] == 0
    assert math.isnan(m["recall@1"]) and math.isnan(m["map"])


def test_distractors_are_negatives_even_for_none_queries():
    # A None-group query must not treat None-group gallery entries as positives.
    scores = np.array([[0.9, 0.1]])
    m = retrieval_metrics(_dummy_emb(1), [None], _dummy_emb(2), [None, None], scores=scores)
    assert m["n_queries"] == 0


def test_ties_are_not_resolved_in_the_models_favour():
    # Constant scores: the positive is listed first but must not count as rank 1.
    scores = np.zeros((1, 4))
    m = retrieval_metrics(_dummy_emb(1), ["a"], _dummy_emb(4), ["a", "b", "b", "b"], scores=scores)
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == 1.0


def test_retrieval_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(_dummy_emb(3), QUERY_GROUPS, _dummy_emb(5), GALLERY_GROUPS, scores=SCORES.T)
    bad = SCORES.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(_dummy_emb(3), QUERY_GROUPS, _dummy_emb(5), GALLERY_GROUPS, scores=bad)
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(_dummy_emb(3), QUERY_GROUPS, _dummy_emb(5), GALLERY_GROUPS, scores=SCORES, query_ids=[1, 2, 3])


# --------------------------------------------------------------------------- pairs

# Scores descending with labels; precision at each score as threshold:
# .9:1/1  .8:2/2  .7:2/3  .6:3/4  .5:3/5  .4:3/6
SIMS = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
LABELS = np.array([1, 1, 0, 1, 0, 0])


def test_all_pairs_labels():
    i, j, y = all_pairs(["a", "b", "a", None, None])
    assert list(zip(i.tolist(), j.tolist())) == [
        (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)
    ]
    # Only (0, 2) share a group; two None items do not match each other.
    assert y.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]


def test_pair_auc_equals_sklearn_on_all_pairs():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 5, size=30).tolist()
    emb = rng.normal(size=(30, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    i, j, y = all_pairs(groups)
    sims = np.sum(emb[i] * emb[j], axis=1)
    m = pair_metrics(sims, y)
    assert m["pair_auc"] == pytest.approx(roc_auc_score(y, sims))
    assert m["n_pairs"] == 30 * 29 // 2
    assert m["n_positive"] == int(y.sum())


def test_perfect_separation():
    sims = np.array([0.95, 0.9, 0.85, 0.3, 0.2, 0.1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = pair_metrics(sims, labels)
    assert m["pair_auc"] == 1.0
    assert m["pair_accuracy"] == 1.0
    assert 0.3 < m["threshold"] < 0.85


def test_best_threshold_maximises_accuracy():
    # Accuracy 5/6 is reached between .8/.7 and between .6/.5; the higher one is chosen.
    t = best_threshold(SIMS, LABELS)
    assert t == pytest.approx(0.75)
    m = pair_metrics(SIMS, LABELS)
    assert m["threshold"] == pytest.approx(0.75)
    assert m["pair_accuracy"] == pytest.approx(5 / 6)


def test_best_threshold_all_negative_is_best():
    t = best_threshold(np.array([0.9, 0.5, 0.4]), np.array([0, 0, 1]))
    # Predicting nothing gets 2/3; any threshold admitting 0.9 does worse or equal.
    assert t > 0.9


def test_best_f1_threshold_keeps_the_rare_duplicates_that_accuracy_gives_up():
    sims = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0])
    # Accuracy 7/8 both above .95 alone and above .85 (one false match): the higher one.
    assert best_threshold(sims, labels) == pytest.approx(0.925)
    # F1: .95 alone 2/3, down to .85 4/5: the second duplicate is worth the false match.
    assert best_f1_threshold(sims, labels) == pytest.approx(0.825)
    with pytest.raises(ValueError, match="no similar pair"):
        best_f1_threshold(sims, np.zeros(8, int))


def test_pair_metrics_with_given_threshold():
    m = pair_metrics(SIMS, LABELS, threshold=0.65)
    # Predicted match: .9 .8 .7 -> correct: 1,1,0 ; rest predicted no: .6 wrong, .5 .4 right
    assert m["pair_accuracy"] == pytest.approx(4 / 6)
    assert m["threshold"] == 0.65


def test_pair_metrics_needs_both_classes():
    with pytest.raises(ValueError, match="both"):
        pair_metrics(np.array([0.1, 0.2]), np.array([1, 1]))


@pytest.mark.parametrize(
    ("target", "expected"),
    [(1.0, 0.8), (0.75, 0.6), (0.7, 0.6), (0.6, 0.5), (0.5, 0.4)],
)
def test_threshold_for_precision(target, expected):
    t = threshold_for_precision(SIMS, LABELS, target)
    assert t == pytest.approx(expected)
    predicted = SIMS >= t
    assert LABELS[predicted].mean() >= target


def test_threshold_for_precision_unreachable():
    with pytest.raises(ValueError, match="no threshold reaches precision"):
        threshold_for_precision(np.array([0.9, 0.8]), np.array([0, 1]), 0.9)
    with pytest.raises(ValueError, match="must be in"):
        threshold_for_precision(SIMS, LABELS, 0.0)


def test_threshold_for_precision_groups_tied_scores():
    # Tied .8 scores (one pos, one neg) are admitted together: precision 2/3 at .8.
    sims = np.array([0.9, 0.8, 0.8, 0.1])
    labels = np.array([1, 1, 0, 0])
    assert threshold_for_precision(sims, labels, 1.0) == pytest.approx(0.9)
    assert threshold_for_precision(sims, labels, 0.6) == pytest.approx(0.8)


def test_false_match_table_gives_each_rate_its_threshold():
    from engine.eval.metrics import false_match_table

    rng = np.random.default_rng(0)
    scores, labels = rng.random(20_000), np.zeros(20_000, int)
    labels[:5] = 1
    table = false_match_table(scores, labels)
    rates = [rate for rate, _ in table]
    assert rates[0] == 0.1 and rates == sorted(rates, reverse=True) and rates[-1] * 19_995 >= 1
    negatives = scores[labels == 0]
    for rate, threshold in table:
        assert (negatives >= threshold).mean() <= rate
    assert [t for _, t in table] == sorted(t for _, t in table)
