"""Grad-CAM for pairs (after pytorch-grad-cam: one small class per method, a shared base, targets as callables).

A pair model maps two activation batches of the Grad-CAM layer to one score per pair through an
unbounded *evidence* (the score's logit). The base class runs **one** forward and **one** backward
pass over the whole batch of pairs to get d evidence / d activation for both images — each image
from its *own* gradients — and applies any number of targets afterwards by the chain rule: a target
is a plain callable of the score (``lambda s: s``, ``lambda s: 1 - s``), so d target / d activation
= target'(score) · score'(evidence) · d evidence / d activation. A normalised Grad-CAM map does not
change when a pair's gradient is multiplied by a positive number, so only the *sign* of the scalar
factor is applied: the maps are exactly those of the target, yet a score saturated at 0 or 1 in
float32 (whose factor underflows to zero) still gets its maps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PairEvidence = Callable[[Tensor, Tensor], Tensor]
EvidenceToScore = Callable[[Tensor], Tensor]
Target = Callable[[Tensor], Tensor]


def similarity(score: Tensor) -> Tensor:
    """Target: the pair is a match."""
    return score


def dissimilarity(score: Tensor) -> Tensor:
    """Target: the pair is not a match."""
    return 1 - score


@dataclass
class PairCams:
    """Maps (non-negative, up to a positive per-pair scale) for each target, for images a and b of each pair."""

    scores: Tensor
    maps_a: list[Tensor]
    maps_b: list[Tensor]


class BasePairCAM:
    """Computes activation gradients once per batch and turns them into maps per target."""

    def __init__(self, evidence_fn: PairEvidence, to_score: EvidenceToScore) -> None:
        self.evidence_fn = evidence_fn
        self.to_score = to_score

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """B×C×h×w weights combining activations into a map; the method's one decision."""
        raise NotImplementedError

    def cam(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return torch.relu((self.channel_weights(activations, gradients) * activations).sum(dim=1))

    def __call__(self, acts_a: Tensor, acts_b: Tensor, targets: Sequence[Target]) -> PairCams:
        acts_a = acts_a.detach().float().clone().requires_grad_(True)
        acts_b = acts_b.detach().float().clone().requires_grad_(True)
        with torch.enable_grad():
            evidence = self.evidence_fn(acts_a, acts_b)
            grad_a, grad_b = torch.autograd.grad(evidence.sum(), (acts_a, acts_b))
        scores = self.to_score(evidence.detach())
        maps_a, maps_b = [], []
        for target in targets:
            # score'(evidence) > 0 by contract, so the sign of the chain's factor is that of target'(score).
            factor = torch.sign(_derivative(target, scores)).view(-1, 1, 1, 1)
            maps_a.append(self.cam(acts_a.detach(), factor * grad_a))
            maps_b.append(self.cam(acts_b.detach(), factor * grad_b))
        return PairCams(scores, maps_a, maps_b)


def _derivative(function: Target, values: Tensor) -> Tensor:
    """function'(value) per pair, by autograd on the scalars (cheap: no network involved)."""
    s = values.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (derivative,) = torch.autograd.grad(function(s).sum(), s)
    return derivative


class GradCAM(BasePairCAM):
    """Selvaraju et al. 2017: channel weights are the spatially averaged gradients."""

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)


class HiResCAM(BasePairCAM):
    """Draelos & Carin 2020: element-wise gradient × activation, faithful for any head."""

    def channel_weights(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return gradients


CAM_METHODS: dict[str, type[BasePairCAM]] = {"gradcam": GradCAM, "hirescam": HiResCAM}
