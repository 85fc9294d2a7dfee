"""Do the named concepts point at what the pair's score rests on? Masking each concept's regions
against masking random regions of the same area (``concept_masking_check``, ``benchmarks/concepts.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.explain.concepts import concept_maps, explain_concepts
from engine.explain.pairs import explain_fmaps
from engine.images import ImageSource
from engine.inference import SimilarityModel


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
    regions = concept_maps(backbone, fmaps, [c["index"] for c in concepts], factual).cpu()

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
