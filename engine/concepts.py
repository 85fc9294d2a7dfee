"""Concepts that explain a decision in words, after SANE (Plummer et al., "Why do these match?", ECCV 2020).

Without attribute annotations, the concepts are the backbone's own 1000 ImageNet classes. Its
classifier is linear on globally pooled Grad-CAM-layer features, so applying it to the *factual-map
weighted* average of the cells (instead of the plain average) scores every concept on the regions the
explanation points at; softmax gives per image a distribution p over concepts.

* **match**: a concept explains the match when it is strong in both images: joint_c = √(p_a,c · p_b,c)
  (geometric mean). Summed over all concepts that is the Bhattacharyya coefficient BC ≤ 1, the overlap
  of the two concept distributions; ``share`` = joint_c / BC is the concept's share of what the
  factual regions of the two images have in common (``present_in: "both"``).
* **no match**: a concept explains the difference when it is present in one image and absent in the
  other: d_c = p_a,c − p_b,c; ``share`` = |d_c| / Σ|d| is its share of the total-variation difference,
  ``present_in`` the image where it is stronger; both sides are represented in the answer.

``score_a`` / ``score_b`` are p_a,c and p_b,c. A concept's regions in an image are the cells its score
there came from, relu(m_i · w_c · f_i) (its class activation map weighted by the factual map m);
:func:`concept_masking_check` tests that masking them lowers the pair score more than masking regions
of the same area and shape elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from engine.backbones import Backbone
from engine.explain import PairExplanation, explain_fmaps
from engine.images import ImageSource

if TYPE_CHECKING:
    from engine.inference import SimilarityModel


@cache
def concept_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in the classifiers' order (shipped inside torchvision, offline)."""
    return tuple(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def linear_classifier(backbone: Backbone) -> nn.Linear:
    """The backbone classifier's (last) linear layer, whose rows are the concept directions."""
    linears = [m for m in backbone.classifier.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].out_features != len(concept_names()):
        raise ValueError("the backbone's classifier is not a linear ImageNet-1k classifier")
    return linears[-1]


def _weights(maps: Sequence[np.ndarray] | Tensor | None, fmaps: Tensor) -> Tensor:
    """n×h×w non-negative cell weights; a missing or all-zero map weighs the whole image evenly."""
    n, _, h, w = fmaps.shape
    if maps is None:
        return torch.ones(n, h, w)
    weights = torch.as_tensor(np.stack([np.asarray(m) for m in maps]), dtype=torch.float32).clamp(min=0)
    empty = weights.sum(dim=(1, 2)) <= 0
    weights[empty] = 1.0
    return weights


@torch.no_grad()
def concept_probabilities(backbone: Backbone, fmaps: Tensor, maps: Sequence[np.ndarray] | Tensor | None = None) -> Tensor:
    """n×1000 softmax of the classifier on the map-weighted average of each feature map's cells."""
    weights = _weights(maps, fmaps)
    pooled = (fmaps.float() * weights.unsqueeze(1)).sum(dim=(2, 3)) / weights.sum(dim=(1, 2)).unsqueeze(1)
    return torch.softmax(backbone.classifier(pooled), dim=1)


@torch.no_grad()
def concept_maps(backbone: Backbone, fmaps: Tensor, indices: Sequence[int], maps: Sequence[np.ndarray] | Tensor | None = None) -> Tensor:
    """n×len(indices)×h×w regions of the given concepts: each cell's part of the concept's logit on the
    map-weighted pooled features, relu(m_i · w_c · f_i) (with no maps, the class activation map)."""
    directions = linear_classifier(backbone).weight[list(indices)]
    cams = torch.einsum("kc,nchw->nkhw", directions, fmaps.float())
    return torch.relu(cams * _weights(maps, fmaps).unsqueeze(1))


def explain_concepts(
    backbone: Backbone,
    fmaps_a: Tensor,
    fmaps_b: Tensor,
    maps_a: Sequence[np.ndarray],
    maps_b: Sequence[np.ndarray],
    is_match: Sequence[bool],
    *,
    top: int = 3,
    min_share: float = 0.01,
) -> list[list[dict]]:
    """Per pair (fmaps_a: 1 or k maps, fmaps_b: k), the ``top`` concepts explaining its decision,
    ``[{"name", "index", "share", "present_in", "score_a", "score_b"}, ...]`` sorted by share;
    concepts with a share below ``min_share`` are left out."""
    k = fmaps_b.shape[0]
    probs_a = concept_probabilities(backbone, fmaps_a.expand(k, -1, -1, -1), maps_a).numpy()
    probs_b = concept_probabilities(backbone, fmaps_b, maps_b).numpy()
    return [_shared(pa, pb, top, min_share) if match else _differing(pa, pb, top, min_share)
            for pa, pb, match in zip(probs_a, probs_b, is_match)]


def _concept(index: int, share: float, present_in: str, pa: np.ndarray, pb: np.ndarray) -> dict:
    return {"name": concept_names()[index], "index": int(index), "share": float(share), "present_in": present_in,
            "score_a": float(pa[index]), "score_b": float(pb[index])}


def _shared(pa: np.ndarray, pb: np.ndarray, top: int, min_share: float) -> list[dict]:
    joint = np.sqrt(pa * pb)
    shares = joint / max(float(joint.sum()), 1e-12)
    order = np.argsort(-shares)[:top]
    return [_concept(i, shares[i], "both", pa, pb) for i in order if shares[i] >= min_share]


def _differing(pa: np.ndarray, pb: np.ndarray, top: int, min_share: float) -> list[dict]:
    diff = pa - pb
    shares = np.abs(diff) / max(float(np.abs(diff).sum()), 1e-12)
    sides = {side: [i for i in np.argsort(-sign * diff)[:top] if sign * diff[i] > 0 and shares[i] >= min_share]
             for side, sign in (("a", 1), ("b", -1))}
    # Alternate between the two images, starting with the stronger difference, so both are named.
    first, second = sorted(sides, key=lambda s: -max((shares[i] for i in sides[s]), default=0.0))
    picked: list[tuple[int, str]] = []
    while len(picked) < top and (sides[first] or sides[second]):
        for side in (first, second):
            if sides[side] and len(picked) < top:
                picked.append((sides[side].pop(0), side))
    return sorted((_concept(i, shares[i], side, pa, pb) for i, side in picked), key=lambda c: -c["share"])


def attach_concepts(backbone: Backbone, explanations: Sequence[PairExplanation], fmap_a: Tensor, fmaps_b: Tensor, top: int = 3) -> None:
    """Fill ``explanation.concepts`` from the factual maps of each explained pair."""
    found = explain_concepts(backbone, fmap_a, fmaps_b, [e.factual_a for e in explanations],
                             [e.factual_b for e in explanations], [e.is_match for e in explanations], top=top)
    for explanation, concepts in zip(explanations, found):
        explanation.concepts = concepts


def top_cells(values: Tensor, count: int) -> Tensor:
    """h×w boolean mask of the ``count`` highest cells."""
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.topk(values.flatten(), count).indices] = True
    return mask.view(values.shape)


def mask_pixels(pixels: Tensor, cells: Tensor) -> Tensor:
    """Fill the masked cells' footprints of a preprocessed 3×S×S image with 0, the normalisation mean
    colour (the image is squeezed to the square, so cell footprints tile it)."""
    footprint = F.interpolate(cells[None, None].float(), size=pixels.shape[1:], mode="nearest")[0]
    return pixels * (1 - footprint)


@torch.no_grad()
def concept_masking_check(
    model: SimilarityModel,
    image_a: ImageSource,
    image_b: ImageSource,
    *,
    top: int = 3,
    area: float = 0.1,
    random_draws: int = 2,
    seed: int = 0,
) -> dict:
    """Does masking the regions of each named concept lower the pair score more than masking random
    regions of the same area? All masked variants go through the backbone in one batch.

    A concept's regions are the top ``area`` fraction of cells of :func:`concept_maps` weighted by the
    factual map (the cells its score came from). They are masked in one image at a time, each image
    the concept is present in, the other image left intact: masking both with the same fill colour
    would add a shared grey patch that matches itself. Each random mask is the concept's mask moved
    by a random cyclic shift (same area and shape, another place: scattered random cells would break
    far more local features per masked cell); the factual map's top area is masked too, for
    reference. A drop is the pair's value minus the masked pair's, averaged over the masked sides,
    both for the similarity and for the evidence (its logit, which a saturated similarity cannot
    hide). Returns ``similarity``,
    ``is_match``, ``area`` (the fraction masked), ``concepts`` (each with its ``drop`` and the
    ``random_drop`` of the same sides), their means ``concept_drop`` and ``random_drop``, and
    ``map_drop``; every drop is ``{"similarity": .., "evidence": ..}``.
    """
    net, backbone = model.net, model.net.backbone
    pixels = model.pixels([image_a, image_b])
    fmaps = model.fmaps_from_pixels(pixels)
    explanation = explain_fmaps(net, fmaps[:1], fmaps[1:], model.threshold)[0]
    factual = [explanation.factual_a, explanation.factual_b]
    concepts = explain_concepts(backbone, fmaps[:1], fmaps[1:], factual[:1], factual[1:], [explanation.is_match], top=top)[0]
    h, w = fmaps.shape[2:]
    count = max(1, round(area * h * w))
    rng = np.random.default_rng(seed)
    regions = concept_maps(backbone, fmaps, [c["index"] for c in concepts], factual)

    variants: list[Tensor] = []
    pairs: dict[tuple, tuple[int, int]] = {}  # key -> (side masked, index of the masked variant)

    def mask(key: tuple, side: int, cells: Tensor) -> None:
        pairs[key] = (side, len(variants))
        variants.append(mask_pixels(pixels[side], cells))

    for side in (0, 1):
        mask(("map", side), side, top_cells(torch.from_numpy(factual[side]), count))
        for n, concept in enumerate(concepts):
            if side in _SIDES[concept["present_in"]]:
                cells = top_cells(regions[side, n], count)
                mask(("concept", n, side), side, cells)
                for r, shift in enumerate(rng.choice(np.arange(1, h * w), random_draws, replace=False)):
                    mask(("random", n, side, r), side, torch.roll(cells, (int(shift) // w, int(shift) % w), dims=(0, 1)))

    masked = model.fmaps_from_pixels(torch.stack(variants))
    keys = list(pairs)
    masked_of = torch.tensor([pairs[key][1] for key in keys])
    on_a = torch.tensor([pairs[key][0] == 0 for key in keys]).view(-1, 1, 1, 1)
    evidence = net.evidence_fmaps(torch.where(on_a, masked[masked_of], fmaps[:1]), torch.where(on_a, fmaps[1:], masked[masked_of]))
    original = net.evidence_fmaps(fmaps[:1], fmaps[1:])
    similarity_drops = (net.score_from_evidence(original) - net.score_from_evidence(evidence)).tolist()
    evidence_drops = (original - evidence).tolist()
    drops = {key: {"similarity": sd, "evidence": ed} for key, sd, ed in zip(keys, similarity_drops, evidence_drops)}

    named = []
    for n, concept in enumerate(concepts):
        sides = _SIDES[concept["present_in"]]
        named.append({**concept, "drop": _mean([drops[("concept", n, s)] for s in sides]),
                      "random_drop": _mean([drops[("random", n, s, r)] for s in sides for r in range(random_draws)])})
    return {
        "similarity": explanation.similarity,
        "is_match": explanation.is_match,
        "area": count / (h * w),
        "concepts": named,
        "concept_drop": _mean([c["drop"] for c in named]) if named else None,
        "random_drop": _mean([c["random_drop"] for c in named]) if named else None,
        "map_drop": _mean([drops[("map", s)] for s in (0, 1)]),
    }


_SIDES = {"both": (0, 1), "a": (0,), "b": (1,)}


def _mean(drops: Sequence[dict]) -> dict:
    return {key: float(np.mean([d[key] for d in drops])) for key in ("similarity", "evidence")}


def describe_concepts(concepts: Sequence[dict]) -> str:
    """The concepts in words, e.g. ``"studio couch 31%, window shade 12%"``; for a non-match each
    concept says which image shows it (``"bathtub (only A) 40%"``)."""
    def word(c: dict) -> str:
        where = "" if c["present_in"] == "both" else f" (only {c['present_in'].upper()})"
        return f"{c['name']}{where} {100 * c['share']:.0f}%"

    return ", ".join(word(c) for c in concepts) if concepts else "no concept stands out"
