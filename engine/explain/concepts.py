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
``engine.eval.concepts.concept_masking_check`` tests that masking them lowers the pair score more than masking regions
of the same area and shape elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

from engine.explain.pairs import PairExplanation
from engine.nn.backbones import Backbone


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
    """n×h×w non-negative cell weights, on the feature maps' device; a missing or all-zero map weighs
    the whole image evenly."""
    n, _, h, w = fmaps.shape
    if maps is None:
        return torch.ones(n, h, w, device=fmaps.device)
    weights = torch.as_tensor(np.stack([np.asarray(m) for m in maps]), dtype=torch.float32, device=fmaps.device).clamp(min=0)
    empty = weights.sum(dim=(1, 2)) <= 0
    weights[empty] = 1.0
    return weights


@torch.no_grad()
def concept_probabilities(backbone: Backbone, fmaps: Tensor, maps: Sequence[np.ndarray] | Tensor | None = None) -> Tensor:
    """n×1000 softmax of the classifier on the map-weighted average of each feature map's cells (on the
    backbone's device)."""
    fmaps = fmaps.to(linear_classifier(backbone).weight.device)
    weights = _weights(maps, fmaps)
    pooled = (fmaps.float() * weights.unsqueeze(1)).sum(dim=(2, 3)) / weights.sum(dim=(1, 2)).unsqueeze(1)
    return torch.softmax(backbone.classifier(pooled), dim=1)


@torch.no_grad()
def concept_maps(backbone: Backbone, fmaps: Tensor, indices: Sequence[int], maps: Sequence[np.ndarray] | Tensor | None = None) -> Tensor:
    """n×len(indices)×h×w regions of the given concepts: each cell's part of the concept's logit on the
    map-weighted pooled features, relu(m_i · w_c · f_i) (with no maps, the class activation map), on
    the backbone's device."""
    directions = linear_classifier(backbone).weight[list(indices)]
    fmaps = fmaps.to(directions.device)
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
    probs_a = concept_probabilities(backbone, fmaps_a.expand(k, -1, -1, -1), maps_a).cpu().numpy()
    probs_b = concept_probabilities(backbone, fmaps_b, maps_b).cpu().numpy()
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


def describe_concepts(concepts: Sequence[dict]) -> str:
    """The concepts in words, e.g. ``"studio couch 31%, window shade 12%"``; for a non-match each
    concept says which image shows it (``"bathtub (only A) 40%"``)."""
    def word(c: dict) -> str:
        where = "" if c["present_in"] == "both" else f" (only {c['present_in'].upper()})"
        return f"{c['name']}{where} {100 * c['share']:.0f}%"

    return ", ".join(word(c) for c in concepts) if concepts else "no concept stands out"
