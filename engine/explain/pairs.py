"""Factual and counterfactual explanations of pair decisions.

For a pair the model decides *match* (similarity ≥ threshold, or the pair geometrically verified where
that was measured: ``engine.explain.decision``) or *no match*. The **factual** map of an image shows where
the evidence for the decision made lies (Grad-CAM of the similarity for a match, of 1 − similarity
otherwise); the **counterfactual** map shows what argues for the opposite decision. A match that geometry
alone decides is explained the same way: its factual maps are the head's evidence for similarity.
Each image's maps come from its own gradients. Maps are normalised to [0, 1] by their maximum; a map
whose maximum is zero is returned as zeros and flagged, never divided by zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from engine.config import EXPLANATION_METHODS
from engine.explain.cam import CAM_METHODS, PairCams, Target, dissimilarity, similarity
from engine.explain.coalitions import COALITION_METHODS
from engine.explain.decision import decided_by
from engine.nn.siamese import SiameseNet


@dataclass
class PairExplanation:
    """Why a pair scored as it did. Maps are h×w float32 arrays in [0, 1] at feature resolution."""

    similarity: float
    is_match: bool
    threshold: float
    factual_a: np.ndarray
    factual_b: np.ndarray
    counterfactual_a: np.ndarray
    counterfactual_b: np.ndarray
    empty_maps: list[str] = field(default_factory=list)
    # Optional details, filled only on request (engine.explain.correspondences, engine.explain.concepts, engine.explain.masking).
    correspondences: list[dict] | None = None
    concepts: list[dict] | None = None
    effects: dict | None = None
    # The geometric verification of the pair (engine.explain.decision.summarise), when one was run: part of
    # the decision (a verified pair is a match whatever its similarity) and of its explanation (the lines).
    verification: dict | None = None

    @property
    def decided_by(self) -> str | None:
        """Which evidence makes the pair a match: "head", "geometry", "head and geometry"; None for no match."""
        return decided_by(self.similarity, self.threshold, self.verification)

    def to_dict(self) -> dict:
        """JSON-ready form (maps as nested lists)."""
        return {
            "similarity": self.similarity,
            "is_match": self.is_match,
            "threshold": self.threshold,
            "decision": "match" if self.is_match else "no match",
            "decided_by": self.decided_by,
            "empty_maps": self.empty_maps,
            **{name: getattr(self, name).round(4).tolist() for name in MAP_NAMES},
            **{name: getattr(self, name) for name in DETAIL_NAMES if getattr(self, name) is not None},
        }


def pair_explainer(net: SiameseNet, method: str, removed: tuple[Tensor, Tensor] | None = None,
                   ) -> Callable[[Tensor, Tensor, Sequence[Target]], PairCams]:
    """The explainer ``method`` names, working on projections: ``explainer(proj_a, proj_b, targets)``.
    ``removed`` (the removed descriptions of images a and b) is used by the coalition methods only."""
    if method in CAM_METHODS:
        return CAM_METHODS[method](net.evidence_projections, net.score_from_evidence)
    if method in COALITION_METHODS:
        return COALITION_METHODS[method](net, removed)
    raise ValueError(f"unknown explanation method {method!r}; choose from {', '.join(EXPLANATION_METHODS)}")


MAP_NAMES = ("factual_a", "factual_b", "counterfactual_a", "counterfactual_b")
DETAIL_NAMES = ("correspondences", "concepts", "effects", "verification")


def normalise_map(raw: np.ndarray) -> tuple[np.ndarray, bool]:
    """Scale a non-negative map to [0, 1]; report (zeros, True) when it carries no evidence at all."""
    peak = float(raw.max()) if raw.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros_like(raw, dtype=np.float32), True
    return (raw / peak).astype(np.float32), False


def explain_fmaps(
    net: SiameseNet, fmap_a: Tensor, fmaps_b: Tensor, threshold: float, method: str = "gradcam",
    verifications: Sequence[dict | None] | None = None,
) -> list[PairExplanation]:
    """Explain image a (1×C×h×w) against k images (k×C×h×w) in one forward and one backward pass."""
    with torch.no_grad():
        return explain_projections(net, net.project(fmap_a), net.project(fmaps_b), threshold, method, verifications)


def explain_projections(
    net: SiameseNet, proj_a: Tensor, projs_b: Tensor, threshold: float, method: str = "gradcam",
    verifications: Sequence[dict | None] | None = None, removed: tuple[Tensor, Tensor] | None = None,
) -> list[PairExplanation]:
    """Explain from the images' projections (``SiameseNet.project``, what the index stores): the maps
    are those of the Grad-CAM layer exactly (see ``engine.nn.siamese``), at a fraction of the cost, since
    image a is projected once and no gradient flows back through the projection.

    ``verifications`` (one per image b, None where none was run: ``engine.explain.decision``) take part in
    the decision, so the maps are those of the final decision. ``removed``: see ``pair_explainer``."""
    k = projs_b.shape[0]
    if verifications is not None and len(verifications) != k:
        raise ValueError(f"explain needs one verification (or None) per image b ({len(verifications)} != {k})")
    cam = pair_explainer(net, method, removed)
    # On the net's device, so that the gradients, the maps and the scores are all computed there.
    device = net.head_device
    cams = cam(proj_a.to(device).expand(k, -1, -1, -1), projs_b.to(device), targets=[similarity, dissimilarity])
    scores, maps_a, maps_b = cams.scores.cpu(), [m.cpu() for m in cams.maps_a], [m.cpu() for m in cams.maps_b]
    explanations = []
    for i in range(k):
        score = float(scores[i])
        verification = verifications[i] if verifications is not None else None
        is_match = decided_by(score, threshold, verification) is not None
        fact, counter = (0, 1) if is_match else (1, 0)
        raw = {
            "factual_a": maps_a[fact][i],
            "factual_b": maps_b[fact][i],
            "counterfactual_a": maps_a[counter][i],
            "counterfactual_b": maps_b[counter][i],
        }
        maps, empty = {}, []
        for name, tensor in raw.items():
            maps[name], is_empty = normalise_map(tensor.numpy())
            if is_empty:
                empty.append(name)
        explanations.append(PairExplanation(score, is_match, threshold, empty_maps=empty, verification=verification, **maps))
    return explanations
