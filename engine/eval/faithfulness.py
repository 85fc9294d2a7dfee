"""Is an explanation faithful to the model? Deletion/insertion curves and quantified counterfactuals.

A heatmap only deserves trust if the model's *pair score* really depends on the highlighted pixels.
Everything here perturbs the model's own preprocessed pixel tensor (the normalised input it sees) and
re-scores the pair with the full head, the other image left untouched:

* **Deletion / insertion curves** (Petsiuk et al. 2018, on the pair score instead of a class
  probability). Pixels of one image are ranked by a map upsampled (bilinearly) to the input size;
  deletion replaces the top t/steps of them with a *fill*, insertion starts from the filled image and
  puts them back. The curve is the score of the decision made (similarity for a match, 1 − similarity
  for a non-match: the factual map explains that score), its area is taken over x in [0, 1]. A
  faithful map gives a small deletion area and a large insertion area. The same curves for a random
  map and for a centre-first map (image centre most important) are the baselines; every ordering is an
  h×w map upsampled the same way, so none of them is favoured by its shape. On request, reference
  orderings read off the model rather than explained are measured too: *occlusion* (each feature
  cell's block of pixels filled on its own and the pair re-scored; h·w backbone passes per image) and
  *greedy* (cells removed step by step, each step taking those whose removal, on top of the earlier
  ones, lowers the score most). The greedy one shows how low a deletion area some ordering of cells
  does reach on this model; occlusion, blind to how cells act together, does not.
The masked variants, fills and tie-breaks are those of the effects (``engine.explain.masking``).

The same curves on the stored descriptions (cells swapped, only the head re-scoring) make the fuller
protocol of the section "The protocol on descriptions" below affordable: the head's logit, normalised per
pair, two perturbations (blur and ROAD's imputation), both orders, one image, both or matched cell pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from engine.data import LabelledImages
from engine.eval.metrics import all_pairs
from engine.eval.sanity import map_rank_correlations, randomised_copy
from engine.explain.masking import (
    DEFAULT_FILL,
    Variants,
    effects_from_tensors,
    fill_pixels,
    importance_key,
    random_map,
    score_variants,
)
from engine.explain.pairs import PairExplanation
from engine.images import ImageSource
from engine.inference import SimilarityModel
from engine.nn.siamese import SiameseNet

ORDERINGS = ("factual", "random", "centre")
OCCLUSION, GREEDY = "occlusion", "greedy"
REFERENCES = (OCCLUSION, GREEDY)
DEFAULT_STEPS = 16


# --------------------------------------------------------------------------------------------
# Orderings
# --------------------------------------------------------------------------------------------


def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """Centre-bias baseline: importance falls with a cell's distance from the image centre."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    distance = np.hypot((y + 0.5) / h - 0.5, (x + 0.5) / w - 0.5)
    return (1 - distance / distance.max()).astype(np.float32)


def pixel_ranks(key: Tensor) -> Tensor:
    """H×W rank of each pixel: 0 for the most important, N − 1 for the least."""
    order = torch.argsort(key.flatten(), descending=True, stable=True)
    ranks = torch.empty(order.numel(), dtype=torch.long)
    ranks[order] = torch.arange(order.numel())
    return ranks.view_as(key)


# --------------------------------------------------------------------------------------------
# Deletion and insertion curves
# --------------------------------------------------------------------------------------------


def auc(curve: np.ndarray) -> float:
    """Trapezoidal area under a curve sampled at evenly spaced x in [0, 1]."""
    y = np.asarray(curve, np.float64)
    return float(((y[1:] + y[:-1]) / 2).sum() / (len(y) - 1))


@dataclass
class Curve:
    """Decision score after removing (deletion) or restoring (insertion) the top t/steps of the pixels."""

    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.insertion)


@dataclass
class PairCurves:
    """Curves of one pair: ``curves[side][ordering]`` for side ``a``/``b`` and ordering in ``ORDERINGS``
    (and the ``REFERENCES`` measured)."""

    similarity: float
    is_match: bool
    curves: dict[str, dict[str, Curve]]

    def aucs(self) -> dict[str, float]:
        """Areas averaged over both images: ``deletion_auc``, ``insertion_auc_random``, ..."""
        result = {}
        for ordering in next(iter(self.curves.values())):
            suffix = "" if ordering == "factual" else f"_{ordering}"
            for kind in ("deletion", "insertion"):
                values = [getattr(side[ordering], f"{kind}_auc") for side in self.curves.values()]
                result[f"{kind}_auc{suffix}"] = float(np.mean(values))
        return result


def decision_score(similarity: np.ndarray | float, is_match: bool) -> np.ndarray:
    """The score the factual map explains: similarity for a match, 1 − similarity otherwise."""
    similarity = np.asarray(similarity, np.float64)
    return similarity if is_match else 1.0 - similarity


def curves_from_tensors(
    model: SimilarityModel,
    pixels: Tensor,
    fmaps: Tensor,
    explanation: PairExplanation,
    *,
    steps: int = DEFAULT_STEPS,
    fill: str = DEFAULT_FILL,
    rng: np.random.Generator | None = None,
    references: Sequence[str] = (),
) -> PairCurves:
    """Deletion/insertion curves of a pair (pixels and feature maps of a and b, stacked 2×...), for
    both images, for the factual map and the baselines, and for the reference orderings named in
    ``references`` (``REFERENCES``); 2·(3·2·(steps − 1) + 1) masked images in batched backbone passes
    (the fully filled image is shared by all orderings), plus 2·2·(steps − 1) per reference and what
    the reference's search costs (``occlusion_maps``, ``greedy_deletion_maps``)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    rng = rng if rng is not None else np.random.default_rng(0)
    size = tuple(pixels.shape[-2:])
    cells = tuple(fmaps.shape[-2:])
    filled = fill_pixels(pixels, fill)
    measured = {name: reference_maps(name, model, pixels, filled, fmaps, explanation, steps) for name in references}
    counts = [round(t / steps * size[0] * size[1]) for t in range(1, steps)]
    variants = Variants(pixels, filled, fmaps, [], [], [], [])
    layout: dict[str, dict[str, slice]] = {}
    for side, own in (("a", 0), ("b", 1)):
        orderings = {"factual": getattr(explanation, f"factual_{side}"), "random": random_map(cells, rng), "centre": centre_map(cells)}
        orderings.update({name: maps[side] for name, maps in measured.items()})
        tie_break = random_map(cells, rng)
        masks = [torch.zeros(size, dtype=torch.bool)]
        layout[side] = {}
        for name, importance in orderings.items():
            ranks = pixel_ranks(importance_key(importance, size, tie_break))
            layout[side][name] = slice(len(masks), len(masks) + 2 * len(counts))
            masks += [ranks >= n for n in counts] + [ranks < n for n in counts]
        variants.source += [own] * len(masks)
        variants.keep += masks
        variants.partner += [1 - own] * len(masks)
        variants.masked_is_a += [side == "a"] * len(masks)
    scores = decision_score(score_variants(model, variants), explanation.is_match)
    original = float(decision_score(explanation.similarity, explanation.is_match))
    per_side = len(variants.source) // 2
    curves: dict[str, dict[str, Curve]] = {}
    for side, offset in (("a", 0), ("b", per_side)):
        empty = scores[offset]
        curves[side] = {}
        for name, where in layout[side].items():
            part = scores[offset + where.start : offset + where.stop]
            deletion, insertion = part[: len(counts)], part[len(counts) :]
            curves[side][name] = Curve(np.array([original, *deletion, empty]), np.array([empty, *insertion, original]))
    return PairCurves(explanation.similarity, explanation.is_match, curves)


def _cell_blocks(size: tuple[int, int], cells: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The pixel block of each feature cell, row by row (edges rounded, so the blocks tile the image)."""
    (height, width), (h, w) = size, cells
    rows = [round(i * height / h) for i in range(h + 1)]
    cols = [round(j * width / w) for j in range(w + 1)]
    return [(slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1])) for i in range(h) for j in range(w)]


def _keep_all_but(size: tuple[int, int], blocks: Sequence[tuple[slice, slice]], removed: Sequence[int]) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    for cell in removed:
        keep[blocks[cell]] = False
    return keep


def _score_removals(model: SimilarityModel, pixels: Tensor, filled: Tensor, fmaps: Tensor, explanation: PairExplanation,
                    own: int, blocks: Sequence[tuple[slice, slice]], removals: Sequence[Sequence[int]]) -> np.ndarray:
    """Decision scores of image ``own`` with each set of cell blocks filled, against the other image."""
    size = tuple(pixels.shape[-2:])
    variants = Variants(pixels, filled, fmaps, [own] * len(removals), [_keep_all_but(size, blocks, cells) for cells in removals],
                        [1 - own] * len(removals), [own == 0] * len(removals))
    return decision_score(score_variants(model, variants), explanation.is_match)


def reference_maps(name: str, model: SimilarityModel, pixels: Tensor, filled: Tensor, fmaps: Tensor,
                   explanation: PairExplanation, steps: int = DEFAULT_STEPS) -> dict[str, np.ndarray]:
    """The maps of reference ordering ``name`` (one of ``REFERENCES``) for images a and b."""
    if name == OCCLUSION:
        return occlusion_maps(model, pixels, filled, fmaps, explanation)
    if name == GREEDY:
        return greedy_deletion_maps(model, pixels, filled, fmaps, explanation, steps)
    raise ValueError(f"unknown reference ordering {name!r}; choose from {', '.join(REFERENCES)}")


def occlusion_maps(model: SimilarityModel, pixels: Tensor, filled: Tensor, fmaps: Tensor,
                   explanation: PairExplanation) -> dict[str, np.ndarray]:
    """Per image, each feature cell's measured importance for the decision made: how much the
    decision score falls when that cell's block of pixels alone is filled (negative: it rises)."""
    cells = tuple(fmaps.shape[-2:])
    blocks = _cell_blocks(tuple(pixels.shape[-2:]), cells)
    original = float(decision_score(explanation.similarity, explanation.is_match))
    singles = [[cell] for cell in range(len(blocks))]
    return {side: (original - _score_removals(model, pixels, filled, fmaps, explanation, own, blocks, singles)).astype(np.float32).reshape(cells)
            for own, side in ((0, "a"), (1, "b"))}


def greedy_deletion_maps(model: SimilarityModel, pixels: Tensor, filled: Tensor, fmaps: Tensor,
                         explanation: PairExplanation, steps: int = DEFAULT_STEPS) -> dict[str, np.ndarray]:
    """Per image, a cell ordering searched on the model itself to make the deletion curve fall fast:
    at each of the curve's ``steps``, every cell not yet removed is tried on top of those removed so
    far and the step's share of cells is taken from those whose removal leaves the lowest decision
    score. Unlike the occlusion ordering it sees how cells act together (a match resting on many
    redundant parts survives the loss of any one), so it shows how low a deletion area some map can
    reach on this model. About h·w·steps/2 backbone passes per image: a reference, not an explanation.
    Importance falls with the order of removal (the first cell removed has the largest)."""
    cells = tuple(fmaps.shape[-2:])
    blocks = _cell_blocks(tuple(pixels.shape[-2:]), cells)
    n = len(blocks)
    maps = {}
    for own, side in ((0, "a"), (1, "b")):
        removed: list[int] = []
        for t in range(1, steps + 1):
            taken = set(removed)
            rest = [cell for cell in range(n) if cell not in taken]
            need = round(t / steps * n) - len(removed)
            if 0 < need < len(rest):
                scores = _score_removals(model, pixels, filled, fmaps, explanation, own, blocks, [[*removed, cell] for cell in rest])
                removed += [rest[k] for k in np.argsort(scores, kind="stable")[:need]]
            elif need > 0:
                removed += rest
        importance = np.empty(n, np.float32)
        importance[removed] = np.arange(n, 0, -1, dtype=np.float32)
        maps[side] = importance.reshape(cells)
    return maps


def pair_curves(
    model: SimilarityModel,
    image_a: ImageSource,
    image_b: ImageSource,
    *,
    steps: int = DEFAULT_STEPS,
    fill: str = DEFAULT_FILL,
    method: str = "gradcam",
    rng: np.random.Generator | None = None,
) -> PairCurves:
    """Explain a pair of images (paths, bytes, PIL images or arrays) and measure its curves."""
    pixels = model.pixels([image_a, image_b])
    fmaps = model.fmaps_from_pixels(pixels)
    explanation = model.explain_feature_maps(fmaps[:1], fmaps[1:], method)[0]
    return curves_from_tensors(model, pixels, fmaps, explanation, steps=steps, fill=fill, rng=rng)


# --------------------------------------------------------------------------------------------
# Aggregate: mean areas over a data set's pairs
# --------------------------------------------------------------------------------------------


def sample_pairs(groups: Sequence[str | None], max_pairs: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Up to ``max_pairs`` pairs (i, j, label): half similar, half dissimilar where there are enough."""
    i, j, labels = all_pairs(groups)
    rng = np.random.default_rng(seed)
    positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_pos = min(len(positive), max_pairs // 2)
    n_neg = min(len(negative), max_pairs - n_pos)
    chosen = np.concatenate([rng.choice(positive, n_pos, replace=False), rng.choice(negative, n_neg, replace=False)])
    return [(int(i[c]), int(j[c]), int(labels[c])) for c in chosen]


def evaluate_explanations(
    model: SimilarityModel,
    data: LabelledImages,
    *,
    max_pairs: int = 100,
    steps: int = DEFAULT_STEPS,
    fill: str = DEFAULT_FILL,
    method: str = "gradcam",
    seed: int = 0,
    progress: bool = False,
    on_pair: Callable[[PairCurves], None] | None = None,
    references: Sequence[str] = (),
) -> dict[str, float | None]:
    """Mean deletion/insertion areas of the factual maps and of the baselines over sampled pairs of
    ``data``, overall and per decision (keys suffixed ``_match`` / ``_no_match``), the mean effects
    (``decision_changes``) and the mean rank correlation between the trained and the randomised
    head's maps (``randomised_head_spearman``, see ``engine.eval.sanity``). ``references`` adds the areas of
    those reference orderings (``deletion_auc_occlusion``, ``deletion_auc_greedy``, ...; see
    ``curves_from_tensors`` for their cost)."""
    pairs = sample_pairs(data.groups, max_pairs, seed)
    rng = np.random.default_rng(seed)
    randomised = randomised_copy(model, seed=seed)
    rows: list[tuple[bool, dict[str, float]]] = []
    correlations = []
    for a, b, _ in tqdm(pairs, desc="faithfulness", unit="pair", disable=not progress):
        pixels = model.pixels([data.paths[a], data.paths[b]])
        fmaps = model.fmaps_from_pixels(pixels)
        explanation = model.explain_feature_maps(fmaps[:1], fmaps[1:], method)[0]
        result = curves_from_tensors(model, pixels, fmaps, explanation, steps=steps, fill=fill, rng=rng, references=references)
        effects = effects_from_tensors(model, pixels[:1], fmaps[:1], pixels[1:], fmaps[1:], [explanation], fill=fill)[0]
        rows.append((result.is_match, {**result.aucs(), **decision_changes(explanation, effects)}))
        correlations.append(map_rank_correlations(model.net, randomised.net, fmaps[:1], fmaps[1:], method)["mean"])
        if on_pair is not None:
            on_pair(result)
    return summarise(rows, steps, correlations)


def decision_changes(explanation: PairExplanation, effects: Mapping) -> dict[str, float]:
    """How masking each kind of region moves the score of the decision made, averaged over both
    images: ``effect_factual`` should be negative (evidence removed), ``effect_counterfactual``
    positive (counter-evidence removed); NaN when both maps of a kind are empty."""
    sign = 1.0 if explanation.is_match else -1.0
    result = {}
    for role in ("factual", "counterfactual"):
        changes = [sign * effects[f"{role}_{side}"]["change"] for side in "ab" if effects[f"{role}_{side}"] is not None]
        result[f"effect_{role}"] = float(np.mean(changes)) if changes else float("nan")
    return result


def summarise(rows: Sequence[tuple[bool, Mapping[str, float]]], steps: int, correlations: Sequence[float] = ()) -> dict[str, float | None]:
    """Means of per-pair values, overall and per decision (NaNs skipped); None where there is none."""
    summary: dict[str, float | None] = {"steps": steps}
    for suffix, chosen in (("", [r for _, r in rows]), ("_match", [r for m, r in rows if m]), ("_no_match", [r for m, r in rows if not m])):
        summary[f"n_pairs{suffix}"] = len(chosen)
        for key in (rows[0][1] if rows else {}):
            summary[f"{key}{suffix}"] = _finite_mean([r[key] for r in chosen])
    if correlations:
        summary["randomised_head_spearman"] = _finite_mean(correlations)
    return summary


def _finite_mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


# --------------------------------------------------------------------------------------------
# The protocol on descriptions: curves on the head's logit, two perturbations, both orders, three modes
# --------------------------------------------------------------------------------------------
#
# A backbone pass per masked image makes pixel curves slow; on the stored descriptions
# (``SiameseNet.project``) a removed cell is a swap of its projection and only the head runs, so hundreds
# of pairs per stratum, and so confidence intervals, become affordable. Two perturbations:
# ``blur`` swaps a removed cell for the same cell of the blurred image's description (one backbone pass
# per image); ``road`` imputes it from its neighbours (Rong et al. 2022, ROAD's noisy linear imputation
# on the cell grid), so that a map is not judged only by the perturbation it may have been built with.

PERTURBATIONS = ("blur", "road")
# one: each image alone (a and b averaged); both: the same share of each image's cells, each by its own
# map; matched: each cell with its nearest cell of the other image (both ways), the two removed together.
MODES = ("one", "both", "matched")
ORDERS = ("morf", "lerf")
# ROAD's neighbour weights (direct, diagonal) and its noise, here a fraction of each channel's spread over
# the image's cells; the ridge pulls cells with no kept cell around them towards the image's mean cell.
ROAD_WEIGHTS = (1 / 6, 1 / 12)
ROAD_NOISE = 0.05
ROAD_RIDGE = 1e-3
# A pair whose logit barely moves when everything is removed has no curve to normalise.
MIN_LOGIT_SPAN = 0.5


@dataclass
class DescribedPair:
    """The projections of a pair's two images (each 1×P×h×w), those of their blurred versions, and the
    head's evidence and decision for the pair."""

    proj_a: Tensor
    proj_b: Tensor
    blurred_a: Tensor
    blurred_b: Tensor
    evidence: float
    is_match: bool


def described_pair(net: SiameseNet, projections: Tensor, blurred: Tensor, a: int, b: int, threshold: float) -> DescribedPair:
    """Pair (a, b) of a batch of images' projections and blurred projections."""
    proj_a, proj_b = projections[a : a + 1], projections[b : b + 1]
    with torch.no_grad():
        evidence = float(net.evidence_projections(proj_a, proj_b)[0])
    score = float(net.score_from_evidence(torch.tensor(evidence)))
    return DescribedPair(proj_a, proj_b, blurred[a : a + 1], blurred[b : b + 1], evidence, score >= threshold)


def neighbour_matrix(cells: tuple[int, int]) -> Tensor:
    """N×N weights of each cell's 8 neighbours on the h×w grid (ROAD's, left unnormalised)."""
    h, w = cells
    weights = torch.zeros(h * w, h * w)
    for y in range(h):
        for x in range(w):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if (dy or dx) and 0 <= y + dy < h and 0 <= x + dx < w:
                        weights[y * w + x, (y + dy) * w + x + dx] = ROAD_WEIGHTS[abs(dy) + abs(dx) - 1]
    return weights


def road_impute(projections: Tensor, keep: Tensor, neighbours: Tensor, generator: torch.Generator) -> Tensor:
    """n×P×h×w: image ``projections`` (1×P×h×w) with the cells where ``keep`` (n×N) is 0 imputed jointly,
    each the weighted mean of its neighbours (kept or imputed), plus Gaussian noise."""
    cells = projections[0].flatten(1).T  # N×P
    keep = keep.to(cells.dtype)
    removed = 1 - keep
    laplacian = torch.diag(neighbours.sum(dim=1) + ROAD_RIDGE) - neighbours
    system = torch.diag_embed(keep) + removed.unsqueeze(2) * laplacian
    mean = cells.mean(dim=0, keepdim=True)
    right = keep.unsqueeze(2) * cells + removed.unsqueeze(2) * (ROAD_RIDGE * mean)
    imputed = torch.linalg.solve(system, right)
    noise = torch.randn(imputed.shape, generator=generator) * (ROAD_NOISE * cells.std(dim=0))
    imputed = imputed + removed.unsqueeze(2) * noise
    return imputed.transpose(1, 2).reshape(len(keep), *projections.shape[1:])


def perturbed_evidence(net: SiameseNet, pair: DescribedPair, keep_a: Tensor, keep_b: Tensor, perturbation: str,
                       neighbours: Tensor | None = None, generator: torch.Generator | None = None, chunk: int = 64) -> Tensor:
    """The pair's evidence with the cells where ``keep_a`` / ``keep_b`` (n×N each) is 0 removed."""
    with torch.no_grad():
        if perturbation == "blur":
            return net.coalition_evidence(pair.proj_a, pair.proj_b, pair.blurred_a, pair.blurred_b, keep_a, keep_b)
        if perturbation != "road":
            raise ValueError(f"unknown perturbation {perturbation!r}; choose from {', '.join(PERTURBATIONS)}")
        parts = []
        for s in range(0, len(keep_a), chunk):
            ka, kb = keep_a[s : s + chunk], keep_b[s : s + chunk]
            side_a = road_impute(pair.proj_a, ka, neighbours, generator) if bool((ka < 1).any()) else pair.proj_a.expand(len(ka), -1, -1, -1)
            side_b = road_impute(pair.proj_b, kb, neighbours, generator) if bool((kb < 1).any()) else pair.proj_b.expand(len(kb), -1, -1, -1)
            parts.append(net.evidence_projections(side_a, side_b))
        return torch.cat(parts)


def nearest_cells(net: SiameseNet, pair: DescribedPair) -> tuple[np.ndarray, np.ndarray]:
    """Matched cell pairs (index into a's cells, index into b's), each cell with its nearest cell of the
    other image by the head's local descriptors, both ways."""
    with torch.no_grad():
        local_a = net.signature_from_projections(pair.proj_a)[-1][0]
        local_b = net.signature_from_projections(pair.proj_b)[-1][0]
    corr = (local_a @ local_b.T).cpu().numpy()
    n_a, n_b = corr.shape
    return (np.concatenate([np.arange(n_a), corr.argmax(axis=0)]),
            np.concatenate([corr.argmax(axis=1), np.arange(n_b)]))


def curve_masks(key_a: np.ndarray, key_b: np.ndarray, mode: str, steps: int, matches: tuple[np.ndarray, np.ndarray] | None,
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per curve of ``mode`` (``one`` has two: image a, then image b), the kept cells (steps+1 × N_a and
    × N_b, 0/1) after removing the top t/steps of the cells (or matched pairs) by key, t = 0 … steps. A
    deletion curve reads them in order; an insertion curve restores the same cells (``restored``)."""
    n_a, n_b = key_a.size, key_b.size
    fractions = np.arange(steps + 1) / steps

    def removal(key: np.ndarray) -> np.ndarray:
        order = np.argsort(-key, kind="stable")
        keep = np.ones((steps + 1, key.size), np.float32)
        for t, fraction in enumerate(fractions):
            keep[t, order[: round(fraction * key.size)]] = 0
        return keep

    full_a, full_b = np.ones((steps + 1, n_a), np.float32), np.ones((steps + 1, n_b), np.float32)
    if mode == "one":
        return [(removal(key_a), full_b), (full_a, removal(key_b))]
    if mode == "both":
        return [(removal(key_a), removal(key_b))]
    if mode == "matched":
        cells_a, cells_b = matches
        keep_pairs = removal(key_a[cells_a] + key_b[cells_b])
        keep_a, keep_b = full_a.copy(), full_b.copy()
        for t in range(steps + 1):
            gone = keep_pairs[t] == 0
            keep_a[t, cells_a[gone]] = 0
            keep_b[t, cells_b[gone]] = 0
        return [(keep_a, keep_b)]
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def restored(keep: np.ndarray) -> np.ndarray:
    """The insertion masks of deletion masks: the cells a deletion removes are restored in the same order,
    into an image whose cells are all removed; an image a deletion leaves whole stays whole."""
    return 1 - keep if (keep < 1).any() else keep


def described_curve_areas(net: SiameseNet, pair: DescribedPair, keys: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                          steps: int = DEFAULT_STEPS, perturbations: Sequence[str] = PERTURBATIONS,
                          modes: Sequence[str] = MODES, seed: int = 0) -> dict[str, float]:
    """Areas of the curves of every ordering in ``keys`` (name → per-cell importance of a and b, larger
    first) for the decision made, keyed ``{perturbation}/{mode}/{kind}/{order}/{name}`` with kind
    ``deletion``/``insertion`` on the normalised logit, ``.../raw`` the area of the decision's logit less
    its value at the curve's start (logit units, no normalisation) and ``.../prob`` on the decision's
    probability.
    The logit of the decision (the evidence, negated for no match) is normalised per pair and curve set
    by its two ends, everything kept (1) and everything removed (0); a pair whose ends lie within
    ``MIN_LOGIT_SPAN`` gives NaN logit areas."""
    cells = tuple(pair.proj_a.shape[-2:])
    n_a = pair.proj_a[0, 0].numel()
    neighbours = neighbour_matrix(cells)
    generator = torch.Generator().manual_seed(seed)
    matches = nearest_cells(net, pair) if "matched" in modes else None
    sign = 1.0 if pair.is_match else -1.0
    areas: dict[str, float] = {}
    for perturbation in perturbations:
        for mode in modes:
            batches, layout = [], []
            for name, (key_a, key_b) in keys.items():
                key_a, key_b = np.ravel(key_a), np.ravel(key_b)
                for order in ORDERS:
                    direction = 1.0 if order == "morf" else -1.0
                    for keep_a, keep_b in curve_masks(direction * key_a, direction * key_b, mode, steps, matches):
                        for kind, (ka, kb) in (("deletion", (keep_a, keep_b)), ("insertion", (restored(keep_a), restored(keep_b)))):
                            batches.append((ka, kb))
                            layout.append((name, order, kind))
            # Orderings share their curves' ends, and deleting the least relevant first removes what inserting
            # the most relevant first restores: each distinct pair of masks is scored once.
            masks = np.concatenate([np.concatenate([ka for ka, _ in batches]), np.concatenate([kb for _, kb in batches])], axis=1)
            distinct, where = np.unique(masks, axis=0, return_inverse=True)
            keep_a, keep_b = torch.from_numpy(distinct[:, :n_a]), torch.from_numpy(distinct[:, n_a:])
            scored = perturbed_evidence(net, pair, keep_a, keep_b, perturbation, neighbours, generator).cpu().numpy()
            logits = sign * scored.astype(np.float64)[where.ravel()].reshape(len(batches), steps + 1)
            values: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
            for (name, order, kind), curve in zip(layout, logits):
                full, empty = (curve[0], curve[-1]) if kind == "deletion" else (curve[-1], curve[0])
                span = full - empty
                normalised = auc((curve - empty) / span) if span >= MIN_LOGIT_SPAN else float("nan")
                raw = auc(curve) - curve[0]
                probability = auc(1 / (1 + np.exp(-curve)))
                values.setdefault((name, order, kind), []).append((normalised, raw, probability))
            for (name, order, kind), curves in values.items():
                for column, suffix in enumerate(("", "/raw", "/prob")):
                    areas[f"{perturbation}/{mode}/{kind}/{order}/{name}{suffix}"] = float(np.mean([c[column] for c in curves]))
    return areas


def described_occlusion(net: SiameseNet, pair: DescribedPair) -> tuple[np.ndarray, np.ndarray]:
    """Per cell of a and of b, how much the decision's logit falls when that cell alone is swapped for
    its blurred version (head only)."""
    n_a, n_b = pair.proj_a[0, 0].numel(), pair.proj_b[0, 0].numel()
    keep = 1 - torch.eye(n_a + n_b)
    sign = 1.0 if pair.is_match else -1.0
    logits = sign * perturbed_evidence(net, pair, keep[:, :n_a], keep[:, n_a:], "blur").cpu().numpy()
    drop = sign * pair.evidence - logits
    return drop[:n_a].astype(np.float32), drop[n_a:].astype(np.float32)


def described_greedy(net: SiameseNet, pair: DescribedPair, images: str, steps: int = DEFAULT_STEPS,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A removal order searched on the head (blur swaps) to make the logit's deletion curve fall fast:
    at each of ``steps`` steps every remaining cell of ``images`` (``a``, ``b`` or ``ab``: both, each
    image giving up its own share of cells per step, as the ``both`` curves do) is tried on top of
    those removed, and each image's share is taken from its cells leaving the lowest logit of the
    decision. Importance falls with the order of removal; cells of an image not searched are all 0."""
    sizes = (pair.proj_a[0, 0].numel(), pair.proj_b[0, 0].numel())
    offsets = (0, sizes[0])
    sides = [s for s, name in enumerate("ab") if name in images]
    sign = 1.0 if pair.is_match else -1.0
    removed: dict[int, list[int]] = {s: [] for s in sides}
    for t in range(1, steps + 1):
        gone = [offsets[s] + c for s in sides for c in removed[s]]
        for s in sides:
            taken = set(removed[s])
            rest = [c for c in range(sizes[s]) if c not in taken]
            need = round(t / steps * sizes[s]) - len(removed[s])
            if 0 < need < len(rest):
                keep = torch.ones(len(rest), sum(sizes))
                keep[:, gone] = 0
                keep[torch.arange(len(rest)), [offsets[s] + c for c in rest]] = 0
                logits = sign * perturbed_evidence(net, pair, keep[:, : sizes[0]], keep[:, sizes[0] :], "blur").cpu().numpy()
                removed[s] += [rest[k] for k in np.argsort(logits, kind="stable")[:need]]
            elif need > 0:
                removed[s] += rest
    importance = [np.zeros(n, np.float32) for n in sizes]
    for s in sides:
        importance[s][removed[s]] = np.arange(sizes[s], 0, -1, dtype=np.float32)
    return importance[0], importance[1]


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval of the finite values (NaNs when there are none)."""
    finite = np.asarray([v for v in values if np.isfinite(v)], np.float64)
    if not finite.size:
        return float("nan"), float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(finite, (resamples, finite.size)).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(finite.mean()), float(low), float(high)
