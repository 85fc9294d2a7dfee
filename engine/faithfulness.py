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
* **Effects**: each of the four maps of an explanation, its top ``area`` fraction of the image's
  pixels (20% by default) filled, re-scored: "masking the factual region of image b lowers the
  similarity from 0.91 to 0.37". All masked variants of k explanations share batched backbone passes.

Fills: ``blur`` (Gaussian, σ = 1/32 of the side, i.e. half a feature cell of MobileNetV2; computed at
a quarter of the resolution and upsampled, which is indistinguishable once blurred and much cheaper)
or ``mean`` (the image's own mean colour). Ties between cells (e.g. the zeros of a ReLU map) are
broken by a seeded random map, so results are reproducible and no raster order sneaks in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from engine.evaluate import signatures
from engine.explain import MAP_NAMES, PairExplanation

if TYPE_CHECKING:
    from engine.data import LabelledImages
    from engine.images import ImageSource
    from engine.inference import SimilarityModel

FILLS = ("blur", "mean")
ORDERINGS = ("factual", "random", "centre")
OCCLUSION, GREEDY = "occlusion", "greedy"
REFERENCES = (OCCLUSION, GREEDY)
DEFAULT_FILL = "blur"
DEFAULT_AREA = 0.2
DEFAULT_STEPS = 16
BLUR_SIGMA = 1 / 32
BLUR_REDUCTION = 4
TIE_BREAK = 1e-4


# --------------------------------------------------------------------------------------------
# Pixels, fills and orderings
# --------------------------------------------------------------------------------------------


def fill_pixels(pixels: Tensor, fill: str = DEFAULT_FILL) -> Tensor:
    """What a removed pixel becomes, for a batch n×3×H×W of preprocessed (normalised) pixels."""
    if fill == "mean":
        return pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels).contiguous()
    if fill == "blur":
        return _blur(pixels)
    raise ValueError(f"unknown fill {fill!r}; choose from {', '.join(FILLS)}")


def _blur(pixels: Tensor) -> Tensor:
    channels, height, width = pixels.shape[1:]
    small_size = (max(1, height // BLUR_REDUCTION), max(1, width // BLUR_REDUCTION))
    # Plain (NCHW) layout: bilinear upsampling of a channels-last tensor is three times slower.
    small = F.interpolate(pixels.float(), size=small_size, mode="area").contiguous()
    sigma = BLUR_SIGMA * min(height, width) * small_size[0] / height
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(channels, 1, 1, 1)
    small = F.conv2d(F.pad(small, (radius, radius, 0, 0), mode="replicate"), kernel.view(channels, 1, 1, -1), groups=channels)
    small = F.conv2d(F.pad(small, (0, 0, radius, radius), mode="replicate"), kernel.view(channels, 1, -1, 1), groups=channels)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The random baseline's importance (and the tie-break of every other map)."""
    return rng.random(shape).astype(np.float32)


def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """Centre-bias baseline: importance falls with a cell's distance from the image centre."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    distance = np.hypot((y + 0.5) / h - 0.5, (x + 0.5) / w - 0.5)
    return (1 - distance / distance.max()).astype(np.float32)


def importance_key(importance: np.ndarray, size: tuple[int, int], tie_break: np.ndarray) -> Tensor:
    """Per-pixel sort key: the h×w map (plus a tiny tie-break) upsampled bilinearly to H×W; a stack
    of m maps (m×h×w) gives m×H×W keys in one call."""
    cells = torch.from_numpy(np.asarray(importance, np.float32) + TIE_BREAK * tie_break)
    stacked = cells.reshape(-1, 1, *cells.shape[-2:])
    return F.interpolate(stacked, size=size, mode="bilinear", align_corners=False).view(*cells.shape[:-2], *size)


def pixel_ranks(key: Tensor) -> Tensor:
    """H×W rank of each pixel: 0 for the most important, N − 1 for the least."""
    order = torch.argsort(key.flatten(), descending=True, stable=True)
    ranks = torch.empty(order.numel(), dtype=torch.long)
    ranks[order] = torch.arange(order.numel())
    return ranks.view_as(key)


def top_region(key: Tensor, area: float) -> Tensor:
    """Boolean mask of the ``area`` fraction of pixels with the largest key (exact count), for an
    H×W key or, map by map, for a stack of them."""
    if not 0.0 < area <= 1.0:
        raise ValueError(f"area must be in (0, 1], got {area}")
    flat = key.reshape(-1, key.shape[-2] * key.shape[-1])
    mask = torch.zeros(flat.shape, dtype=torch.bool)
    mask.scatter_(1, torch.topk(flat, round(area * flat.shape[1]), dim=1, sorted=False).indices, True)
    return mask.view_as(key)


# --------------------------------------------------------------------------------------------
# Scoring masked variants in batches
# --------------------------------------------------------------------------------------------


@dataclass
class Variants:
    """Masked images to score: variant v is ``where(keep[v], sources[source[v]], filled[source[v]])``,
    scored against the unmasked image ``partner[v]``, whose feature map is ``fmaps[partner[v]]``;
    ``masked_is_a[v]`` keeps the head's (a, b) argument order."""

    sources: Tensor
    filled: Tensor
    fmaps: Tensor
    source: list[int]
    keep: list[Tensor]
    partner: list[int]
    masked_is_a: list[bool]


def _masked(variants: Variants, v: int) -> Tensor:
    """Variant v's pixels (1×3×H×W). lerp with a 0/1 weight returns either end exactly, and is faster
    than ``where`` broadcasting a bool mask over channels-last pixels."""
    s = variants.source[v]
    return torch.lerp(variants.filled[s : s + 1], variants.sources[s : s + 1], variants.keep[v].to(variants.sources.dtype))


def score_variants(model: SimilarityModel, variants: Variants) -> np.ndarray:
    """Pair scores of all variants: ``model.batch_size`` masked images per backbone pass, then every
    pair scored by the head at once, each unmasked partner described once."""
    n = len(variants.source)
    if not n:
        return np.zeros(0, np.float32)
    masked = []
    for start in range(0, n, model.batch_size):
        rows = range(start, min(start + model.batch_size, n))
        batch = torch.cat([_masked(variants, r) for r in rows])
        masked.append(signatures(model.net, model.fmaps_from_pixels(batch)))
    described = tuple(torch.cat(parts) for parts in zip(*masked, signatures(model.net, variants.fmaps)))
    pairs = [(v, n + p) if is_a else (n + p, v) for v, (p, is_a) in enumerate(zip(variants.partner, variants.masked_is_a))]
    rows_a, rows_b = (list(rows) for rows in zip(*pairs))
    with torch.inference_mode():
        return model.net.score_pairs(described, rows_a, described, rows_b).numpy().astype(np.float32)


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
# Effects: the quantified counterfactual of each map
# --------------------------------------------------------------------------------------------


def effects_from_tensors(
    model: SimilarityModel,
    pixels_a: Tensor,
    fmap_a: Tensor,
    pixels_b: Tensor,
    fmaps_b: Tensor,
    explanations: Sequence[PairExplanation],
    *,
    fill: str = DEFAULT_FILL,
    area: float = DEFAULT_AREA,
    seed: int = 0,
) -> list[dict]:
    """Mask each map's top ``area`` of its image, re-score against the other image's original
    feature map, and store the result in ``explanation.effects`` (also returned).

    Image a (1×3×H×W) is shared by the k explanations, images b are k×3×H×W; the 4k masked variants
    go through the backbone ``model.batch_size`` at a time. An empty map
    has no region to mask: its entry is None.
    """
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}; choose from {', '.join(FILLS)}")
    sources = torch.cat([pixels_a, pixels_b])
    size, cells = tuple(sources.shape[-2:]), tuple(fmap_a.shape[-2:])
    tie_break = random_map(cells, np.random.default_rng(seed))
    variants = Variants(sources, fill_pixels(sources, fill), torch.cat([fmap_a, fmaps_b]), [], [], [], [])
    entries = [(i, name) for i, explanation in enumerate(explanations) for name in MAP_NAMES if name not in explanation.empty_maps]
    if entries:
        regions = top_region(importance_key(np.stack([getattr(explanations[i], name) for i, name in entries]), size, tie_break), area)
        variants.keep += list(~regions)
    for i, name in entries:
        is_a = name.endswith("_a")
        variants.source.append(0 if is_a else 1 + i)
        variants.partner.append(1 + i if is_a else 0)
        variants.masked_is_a.append(is_a)
    scores = score_variants(model, variants)
    results = [{"fill": fill, "area": area, **dict.fromkeys(MAP_NAMES)} for _ in explanations]
    for (i, name), masked in zip(entries, scores):
        explanation = explanations[i]
        results[i][name] = {
            "masked_similarity": float(masked),
            "change": float(masked) - explanation.similarity,
            "flips": bool(masked >= explanation.threshold) != explanation.is_match,
        }
    for explanation, result in zip(explanations, results):
        explanation.effects = result
    return results


def effect_sentences(explanation: PairExplanation, names: tuple[str, str] = ("image a", "image b")) -> list[str]:
    """The effects in words, e.g. "masking the factual region of image b (20% of its area, blurred)
    lowers the similarity from 0.91 to 0.37"; ``names`` call images a and b otherwise (search: the
    query and the match)."""
    effects = explanation.effects
    if not effects:
        return []
    filled = {"blur": "blurred", "mean": "filled with its mean colour"}[effects["fill"]]
    sentences = []
    for name in MAP_NAMES:
        entry = effects.get(name)
        role, side = name.rsplit("_", 1)
        image = names["ab".index(side)]
        if entry is None:
            sentences.append(f"the {role} map of {image} is empty: nothing to mask")
            continue
        before, after = explanation.similarity, entry["masked_similarity"]
        if abs(after - before) < 0.005:
            verb = f"leaves the similarity at {before:.2f}"
        else:
            verb = f"{'raises' if after > before else 'lowers'} the similarity from {before:.2f} to {after:.2f}"
        sentence = f"masking the {role} region of {image} ({effects['area']:.0%} of its area, {filled}) {verb}"
        if entry["flips"]:
            sentence += f", which flips the decision to {'no match' if explanation.is_match else 'match'}"
        sentences.append(sentence)
    return sentences


# --------------------------------------------------------------------------------------------
# Aggregate: mean areas over a data set's pairs
# --------------------------------------------------------------------------------------------


def sample_pairs(groups: Sequence[str | None], max_pairs: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Up to ``max_pairs`` pairs (i, j, label): half similar, half dissimilar where there are enough."""
    from engine.metrics import all_pairs

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
    head's maps (``randomised_head_spearman``, see ``engine.sanity``). ``references`` adds the areas of
    those reference orderings (``deletion_auc_occlusion``, ``deletion_auc_greedy``, ...; see
    ``curves_from_tensors`` for their cost)."""
    from engine.sanity import map_rank_correlations, randomised_copy

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
