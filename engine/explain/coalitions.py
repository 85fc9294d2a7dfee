"""Coalition attributions for pairs: which cells of *both* images the head's logit rests on, read off
the head by removing cells together rather than from its gradient at the pair as it is.

The head matches each cell softly against all of the other image's cells, so another part of the room
stands in for a removed one: what a cell is worth shows only in coalitions. Here a *removed* cell's
projection (the stored description, ``SiameseNet.project``) is swapped for the same cell of a removed
description of that image, and only the head re-scores the pair (``SiameseNet.coalition_evidence``): no
backbone pass per coalition, so a thousand coalitions over both images' cells cost a few matrix products. The
removed description is that of the image's blurred version where the caller has it (``SimilarityModel.explain``
computes it from the pixels: one more backbone pass per image), else each image's mean cell
(``mean_cells``), which needs no pass and so serves explanations made from stored descriptions alone.

The value explained is the head's *evidence* (the score's logit), never the probability: a match's
probability saturates at 1, where removing a cell changes nothing measurable. The estimator regresses the
evidence on the keep masks (least squares with an intercept) over coalitions each keeping a cell with
probability 1/2, drawn with their complements (antithetic pairs halve the variance): the coefficient of
a cell is its Banzhaf value, the mean change of the evidence when that cell is kept rather than removed,
averaged over what the other cells of both images do. The same seeded masks serve every pair, so the
regression's normal equations are factorised once per batch and the maps are reproducible.

Maps follow ``engine.explain.cam``'s contract: ``explainer(acts_a, acts_b, targets) → PairCams``, a
target's map being the positive part of the signed values times the sign of target'(score).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.explain.cam import PairCams, Target, maps_for_targets
from engine.nn.siamese import SiameseNet

DEFAULT_COALITIONS = 1024
RIDGE = 1e-3


def mean_cells(projections: Tensor) -> Tensor:
    """The description-only removal: every cell replaced by the image's mean cell (B×P×h×w)."""
    return projections.mean(dim=(2, 3), keepdim=True).expand_as(projections)


class PairCoalitions:
    """Banzhaf values of every cell of both images for the pair's evidence, by regression over seeded
    random coalitions (module docstring). ``removed``: the removed descriptions of images a and b (each
    1×P×h×w or k×P×h×w, like the projections explained); None takes ``mean_cells``."""

    def __init__(self, net: SiameseNet, removed: tuple[Tensor, Tensor] | None = None, *,
                 coalitions: int = DEFAULT_COALITIONS, seed: int = 0) -> None:
        if coalitions < 2:
            raise ValueError(f"coalitions must be at least 2, got {coalitions}")
        self.net = net
        self.removed = removed
        self.coalitions = coalitions
        self.seed = seed

    def keep_masks(self, cells: int) -> Tensor:
        """coalitions × cells 0/1 masks (1: kept), half of them the complements of the other half."""
        generator = torch.Generator().manual_seed(self.seed)
        half = (torch.rand(self.coalitions // 2, cells, generator=generator) < 0.5).float()
        masks = torch.cat([half, 1 - half])
        return masks if len(masks) == self.coalitions else torch.cat([masks, torch.ones(1, cells)])

    def signed_values(self, proj_a: Tensor, proj_b: Tensor, removed_a: Tensor, removed_b: Tensor) -> tuple[Tensor, Tensor]:
        """k×N_a and k×N_b values (evidence units) of the pairs (proj_a[i], proj_b[i])."""
        n_a, n_b = proj_a[0, 0].numel(), proj_b[0, 0].numel()
        keep = self.keep_masks(n_a + n_b).to(self.net.head_device, self.net.head_dtype)
        design = torch.cat([torch.ones(len(keep), 1, dtype=keep.dtype, device=keep.device), keep], dim=1)
        # Least squares by the normal equations, factorised once for all pairs (the masks are shared); the
        # small ridge keeps them solvable when there are fewer coalitions than cells.
        gram = design.T @ design
        factor = torch.linalg.cholesky(gram + RIDGE * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
        evidence = torch.stack([
            self.net.coalition_evidence(proj_a[i : i + 1], proj_b[i : i + 1], removed_a[i : i + 1], removed_b[i : i + 1],
                                        keep[:, :n_a], keep[:, n_a:])
            for i in range(len(proj_a))], dim=1)
        fitted = torch.cholesky_solve(design.T @ evidence, factor).T[:, 1:]
        return fitted[:, :n_a], fitted[:, n_a:]

    def __call__(self, acts_a: Tensor, acts_b: Tensor, targets: Sequence[Target]) -> PairCams:
        """Scores and maps of the pairs (acts_a[i], acts_b[i]) of projections, on the net's device."""
        with torch.no_grad():
            acts_a, acts_b = self.net.working(acts_a), self.net.working(acts_b)
            removed_a, removed_b = (mean_cells(acts_a), mean_cells(acts_b)) if self.removed is None else (
                self.net.working(r).expand_as(acts) for r, acts in zip(self.removed, (acts_a, acts_b)))
            scores = self.net.score_from_evidence(self.net.evidence_projections(acts_a, acts_b))
            signed_a, signed_b = self.signed_values(acts_a, acts_b, removed_a, removed_b)
        shape_a, shape_b = (len(acts_a), *acts_a.shape[2:]), (len(acts_b), *acts_b.shape[2:])
        return maps_for_targets(scores, signed_a.view(shape_a), signed_b.view(shape_b), targets)


COALITION_METHODS: dict[str, type[PairCoalitions]] = {"coalitions": PairCoalitions}
