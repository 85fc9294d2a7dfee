"""Grad-CAM for pairs (after pytorch-grad-cam: one small class per method, a shared base, targets as callables).

A pair model maps two activation batches of the Grad-CAM layer to one score per pair through an
unbounded *evidence* (the score's logit). The base class runs **one** forward and **one** backward
pass over the whole batch of pairs to get d evidence / d activation for both images — each image
from its *own* gradients — and applies any number of targets afterwards by the chain rule: a target
is a plain callable of the score (``lambda s: s``, ``lambda s: 1 - s``), so d target / d activation
= target'(score) · score'(evidence) · d evidence / d activation. A normalised Grad-CAM map does not
change when a pair's gradient is multiplied by a positive number, so only the *sign* of the scalar
factor is applied: the maps are exactly those of the target, yet a score saturated at 0 or 1 in
float32 (whose factor underflows to zero) still gets its maps. Every method's map before its ReLU is
linear in the gradients, so it is computed once per image and each target's map is the ReLU of it
times that sign.
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

    def signed_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        """B×h×w map before the ReLU, linear in the gradients: Σ_c weights · activations, the
        weights being the method's one decision."""
        raise NotImplementedError

    def __call__(self, acts_a: Tensor, acts_b: Tensor, targets: Sequence[Target]) -> PairCams:
        """Scores and maps of the pairs (acts_a[i], acts_b[i]), on the activations' device: the one the
        evidence function computes on."""
        acts_a, acts_b = _leaf(acts_a), _leaf(acts_b)
        with torch.enable_grad():
            evidence = self.evidence_fn(acts_a, acts_b)
            grad_a, grad_b = torch.autograd.grad(evidence.sum(), (acts_a, acts_b))
        scores = self.to_score(evidence.detach())
        signed_a, signed_b = self.signed_map(acts_a.detach(), grad_a), self.signed_map(acts_b.detach(), grad_b)
        return maps_for_targets(scores, signed_a, signed_b, targets)


def maps_for_targets(scores: Tensor, signed_a: Tensor, signed_b: Tensor, targets: Sequence[Target]) -> PairCams:
    """Each target's maps from the signed maps of the evidence (B×h×w): the part that moves the target up.
    The score rises with the evidence, so the sign that turns evidence into the target's direction is that
    of target'(score)."""
    maps_a, maps_b = [], []
    for target in targets:
        sign = torch.sign(_derivative(target, scores)).view(-1, 1, 1)
        maps_a.append(torch.relu(sign * signed_a))
        maps_b.append(torch.relu(sign * signed_b))
    return PairCams(scores, maps_a, maps_b)


def _leaf(activations: Tensor) -> Tensor:
    """A float32 leaf to differentiate against, sharing the input's memory (nothing writes to it);
    copied only when it was made under inference mode, which forbids gradients on it."""
    leaf = activations.detach().float()
    return (leaf.clone() if leaf.is_inference() else leaf).requires_grad_(True)


def _derivative(function: Target, values: Tensor) -> Tensor:
    """function'(value) per pair, by autograd on the scalars (cheap: no network involved)."""
    s = values.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (derivative,) = torch.autograd.grad(function(s).sum(), s)
    return derivative


class GradCAM(BasePairCAM):
    """Selvaraju et al. 2017: channel weights are the spatially averaged gradients."""

    def signed_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        # One batched matrix product: no B×C×h×w temporary.
        return torch.einsum("bc,bchw->bhw", gradients.mean(dim=(2, 3)), activations)


class HiResCAM(BasePairCAM):
    """Draelos & Carin 2020: element-wise gradient × activation, faithful for any head."""

    def signed_map(self, activations: Tensor, gradients: Tensor) -> Tensor:
        return (gradients * activations).sum(dim=1)


CAM_METHODS: dict[str, type[BasePairCAM]] = {"gradcam": GradCAM, "hirescam": HiResCAM}
