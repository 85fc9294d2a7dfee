"""Evaluation metrics for the similarity engine.

Two views of quality are measured:

* retrieval (`retrieval_metrics`): for each query image, does the ranked gallery put
  images of the same group first?  This is what a user of the search sees.
* pairs (`pair_metrics`, `best_threshold`, `best_f1_threshold`, `threshold_for_precision`): is a single
  similarity score, compared with a threshold, a good "same / not same" decision?
  This is what duplicate detection and a model's decision threshold rely on.

Conventions shared by every function:

* Higher similarity means more alike; a pair is predicted a match when
  ``similarity >= threshold``.
* A group of ``None`` means "belongs to no group" (a distractor): it never matches
  anything, not even another ``None``.
* Ties are never resolved in the model's favour: in rankings, a negative that scores
  exactly as high as a positive is ranked ahead of it, so a constant scorer cannot
  look good by the luck of the gallery order.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = [
    "retrieval_metrics",
    "pair_metrics",
    "best_threshold",
    "best_f1_threshold",
    "threshold_for_precision",
    "threshold_for_false_match_rate",
    "false_match_table",
    "match_rates",
    "all_pairs",
]


# --------------------------------------------------------------------------- helpers


def _group_codes(groups: Sequence, none_code: int, table: dict[Hashable, int]) -> np.ndarray:
    """Map group labels to non-negative ints (shared `table`), None to `none_code` (< 0).

    Comparing ints is vectorisable; comparing arbitrary Python labels is not.  Passing
    distinct negative `none_code`s for two sides guarantees None never equals None.
    """
    codes = np.empty(len(groups), dtype=np.int64)
    for k, g in enumerate(groups):
        codes[k] = none_code if g is None else table.setdefault(g, len(table))
    return codes


def _as_pairs(similarities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate pair inputs and return them as flat float64 / bool arrays."""
    s = np.asarray(similarities, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"similarities ({s.size}) and labels ({y.size}) must have the same length")
    if s.size == 0:
        raise ValueError("no pairs given")
    if not np.all(np.isfinite(s)):
        raise ValueError("similarities contain NaN or infinite values")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (different) or 1 (similar)")
    return s, y.astype(bool)


def _sorted_cumulative(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (descending) with TP and FP counts when thresholding at each of them.

    ``tp[k]`` / ``fp[k]`` = positives / negatives with ``s >= values[k]``; this is the
    whole confusion matrix for every threshold that matters, in O(n log n).
    """
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    tp_all = np.cumsum(y_sorted)
    fp_all = np.cumsum(~y_sorted)
    # Last index of each run of equal scores: thresholds are ">=", so ties go together.
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    return s_sorted[last], tp_all[last], fp_all[last]


# --------------------------------------------------------------------------- retrieval


def retrieval_metrics(
    query_emb: np.ndarray,
    query_groups: Sequence,
    gallery_emb: np.ndarray,
    gallery_groups: Sequence,
    *,
    query_ids: Sequence | None = None,
    gallery_ids: Sequence | None = None,
    ks: tuple[int, ...] = (1, 5),
    scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k and mean average precision of ranking the gallery for each query.

    Similarity is the dot product of the (L2-normalised) embeddings, unless `scores`
    (n_query x n_gallery, e.g. from a re-scoring head) is given.

    Gallery entries whose id equals the query's id are the query image itself and are
    removed from its ranking: finding yourself is not retrieval and would inflate every
    metric.  Positives are gallery entries of the query's group (never group None).
    Queries with no positive left are skipped, since recall and AP are undefined for
    them; ``n_queries`` reports how many were counted (metrics are NaN when it is 0).

    recall@k: fraction of queries with at least one positive among the top k.
    map: mean over queries of the average precision over the full ranked gallery
    (sklearn's ``average_precision_score``; tied scores are treated as one block).
    """
    n_q, n_g = len(query_groups), len(gallery_groups)
    if scores is None:
        q = np.asarray(query_emb, dtype=np.float64)
        g = np.asarray(gallery_emb, dtype=np.float64)
        if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
            raise ValueError(
                f"embeddings must be 2-D with the same width, got {q.shape} and {g.shape}"
            )
        sim = q @ g.T
    else:
        sim = np.asarray(scores, dtype=np.float64)
    if sim.shape != (n_q, n_g):
        raise ValueError(
            f"similarity matrix has shape {sim.shape}, expected (n_query, n_gallery) = ({n_q}, {n_g})"
        )
    if not all(k >= 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError("give both query_ids and gallery_ids, or neither")

    table: dict[Hashable, int] = {}
    qg = _group_codes(query_groups, -1, table)
    gg = _group_codes(gallery_groups, -2, table)

    if query_ids is not None:
        if len(query_ids) != n_q or len(gallery_ids) != n_g:
            raise ValueError("query_ids / gallery_ids must match the number of queries / gallery entries")
        ids: dict[Hashable, int] = {}
        qi = np.array([ids.setdefault(x, len(ids)) for x in query_ids], dtype=np.int64)
        gi = np.array([ids.setdefault(x, len(ids)) for x in gallery_ids], dtype=np.int64)
        keep = qi[:, None] != gi[None, :]
    else:
        keep = np.ones((n_q, n_g), dtype=bool)

    if not np.all(np.isfinite(sim[keep])):
        raise ValueError("similarity scores contain NaN or infinite values")

    positive = (qg[:, None] == gg[None, :]) & keep
    negative = ~positive & keep
    has_pos = positive.any(axis=1)
    n_used = int(has_pos.sum())
    if n_used == 0:
        return {**{f"recall@{k}": float("nan") for k in ks}, "map": float("nan"), "n_queries": 0}

    # Rank of the best positive with ties broken against the model: the number of
    # negatives scoring >= the best positive score.  A hit at k means that is < k.
    best_pos = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)
    neg_ahead = (negative & (sim >= best_pos)).sum(axis=1)[has_pos]
    out: dict[str, float] = {f"recall@{k}": float(np.mean(neg_ahead < k)) for k in ks}

    aps = [
        average_precision_score(positive[i, keep[i]], sim[i, keep[i]])
        for i in np.flatnonzero(has_pos)
    ]
    out["map"] = float(np.mean(aps))
    out["n_queries"] = n_used
    return out


# --------------------------------------------------------------------------- pairs


def pair_metrics(
    similarities: np.ndarray, labels: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """ROC AUC and thresholded accuracy of similarity scores as a same/different decision.

    The AUC is computed over all pairs at once (never averaged over batches, which
    would weight small batches too much) and needs both classes present.  Accuracy is
    at `threshold` (``similarity >= threshold`` means match); when None, at the
    accuracy-maximising threshold, which is then optimistic on these pairs and is
    reported so it can be reused on held-out data.
    """
    s, y = _as_pairs(similarities, labels)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise ValueError("pair AUC needs both similar (1) and dissimilar (0) pairs")
    t = best_threshold(s, y) if threshold is None else float(threshold)
    return {
        "pair_auc": float(roc_auc_score(y, s)),
        "pair_accuracy": float(np.mean((s >= t) == y)),
        "threshold": t,
        "n_pairs": int(y.size),
        "n_positive": n_pos,
    }


def best_threshold(similarities: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising accuracy of ``similarity >= threshold`` on these pairs.

    Used to calibrate a model's decision threshold on training/validation pairs, so
    the returned value sits midway between the two scores it separates rather than on
    a training score, to generalise better to new pairs.  If several gaps reach the
    best accuracy the highest one is chosen (fewer false matches).  If predicting
    "no match" for everything is best, a value just above the top score is returned.
    """
    s, y = _as_pairs(similarities, labels)
    values, tp, fp = _sorted_cumulative(s, y)
    n_neg = int((~y).sum())
    # Candidate k predicts positive for values[:k]; k = 0 predicts nothing positive.
    tp = np.r_[0, tp]
    fp = np.r_[0, fp]
    correct = tp + (n_neg - fp)
    k = int(np.argmax(correct))  # first max = highest threshold among equals
    if k == 0:
        return float(np.nextafter(values[0], np.inf))
    return _threshold_keeping(values, k)


def best_f1_threshold(similarities: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising F1 of ``similarity >= threshold`` on these pairs, placed midway as
    ``best_threshold`` places it.

    For duplicate detection over every pair of a set: similar pairs are rare there, and a threshold
    placed on balanced pairs lets in many false duplicates.  Raises ValueError without a similar pair.
    """
    s, y = _as_pairs(similarities, labels)
    if not y.any():
        raise ValueError("no similar pair among these pairs: F1 is undefined")
    values, tp, fp = _sorted_cumulative(s, y)
    f1 = 2 * tp / (tp + fp + y.sum())
    return _threshold_keeping(values, int(np.argmax(f1)) + 1)  # first max = highest threshold among equals


def _threshold_keeping(values: np.ndarray, k: int) -> float:
    """A threshold that predicts a match for exactly the ``k`` highest of the distinct descending
    ``values`` (k ≥ 1): midway to the next one, so that it generalises to new pairs."""
    if k == values.size:
        return float(values[-1])
    hi, lo = values[k - 1], values[k]
    mid = (hi + lo) / 2.0
    return float(mid if lo < mid <= hi else hi)


def threshold_for_precision(
    similarities: np.ndarray, labels: np.ndarray, precision: float
) -> float:
    """Lowest threshold whose precision (among ``similarity >= threshold``) reaches the target.

    For duplicate detection, where a false "duplicate" is costly: this keeps as many
    true duplicates as possible while meeting the precision target on these pairs.
    The threshold is one of the given scores.  Raises ValueError if no threshold
    reaches the target.
    """
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision target must be in (0, 1], got {precision}")
    s, y = _as_pairs(similarities, labels)
    values, tp, fp = _sorted_cumulative(s, y)
    prec = tp / (tp + fp)
    ok = np.flatnonzero(prec >= precision)
    if ok.size == 0:
        raise ValueError(
            f"no threshold reaches precision {precision:g} on these {s.size} pairs "
            f"(best achievable is {prec.max():.4g}); lower the target or improve the scores"
        )
    return float(values[ok[-1]])


def threshold_for_false_match_rate(similarities: np.ndarray, labels: np.ndarray, rate: float) -> float:
    """Lowest threshold that at most ``rate`` of the dissimilar pairs (label 0) reach: the upper
    ``rate`` quantile of their scores, placed midway to the next score down as ``best_threshold``
    places its own, so that it generalises to new pairs.

    A decision threshold stated as an error rate per pair ("1 in 1000 pairs of different photos is
    called a match") rather than a balance of two errors on pairs drawn half similar. Similar pairs
    are ignored. Ties go together: when more than the allowed count share the top score, the
    threshold lies just above it and nothing is a match. Raises ValueError without a dissimilar pair.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false-match rate must be in (0, 1), got {rate}")
    s, y = _as_pairs(similarities, labels)
    negatives = s[~y]
    if negatives.size == 0:
        raise ValueError("no dissimilar pair among these pairs: a false-match rate is undefined")
    values, _, fp = _sorted_cumulative(negatives, np.zeros(negatives.size, dtype=bool))
    allowed = int(np.floor(rate * negatives.size + 1e-9))
    k = int(np.searchsorted(fp, allowed, side="right"))  # distinct values kept: their cumulative count ≤ allowed
    if k == 0:
        return float(np.nextafter(values[0], np.inf))
    return _threshold_keeping(values, k)


def false_match_table(similarities: np.ndarray, labels: np.ndarray, per_decade: int = 2) -> list[list[float]]:
    """[[rate, threshold], ...] for per-pair false-match rates from 10⁻¹ down to the smallest the
    dissimilar pairs can resolve (one in their number), ``per_decade`` rates per power of ten: what a
    threshold costs in false pairs at any catalogue size (``indexer.dedup.threshold_for_catalogue``)."""
    negatives = int((np.asarray(labels) == 0).sum())
    if negatives == 0:
        raise ValueError("no dissimilar pair among these pairs: a false-match rate is undefined")
    steps = int(np.floor(np.log10(negatives) * per_decade))
    rates = [10 ** (-1 - k / per_decade) for k in range(max(0, steps - per_decade + 1))]
    return [[rate, threshold_for_false_match_rate(similarities, labels, rate)] for rate in rates if rate * negatives >= 1]


def match_rates(similarities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """At ``threshold`` (``similarity >= threshold`` is a match): the fraction of dissimilar pairs called
    a match (false-match rate) and of similar pairs (true-match rate); NaN where a kind is absent."""
    s, y = _as_pairs(similarities, labels)
    hit = s >= threshold
    return {
        "false_match_rate": float(hit[~y].mean()) if (~y).any() else float("nan"),
        "true_match_rate": float(hit[y].mean()) if y.any() else float("nan"),
        "n_negative": int((~y).sum()),
        "n_positive": int(y.sum()),
    }


def all_pairs(groups: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair ``i < j`` of items with label 1 when they share a group.

    Turns a labelled image set into pairs for `pair_metrics`; a None group never
    matches.  Memory is O(n^2): fine for a few thousand items.
    """
    codes = _group_codes(groups, -1, {})
    i, j = np.triu_indices(len(codes), k=1)
    label = ((codes[i] == codes[j]) & (codes[i] >= 0)).astype(np.int64)
    return i, j, label
