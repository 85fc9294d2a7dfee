"""Masking effects: how a pair's score moves when part of one image is filled.

Each of the four maps of an explanation, its top ``area`` fraction of the image's pixels (20% by
default) filled, is re-scored against the other image: "masking the factual region of image b lowers
the similarity from 0.91 to 0.37". All masked variants of k explanations share batched backbone
passes. The same machinery (fills, per-pixel sort keys from a cell map, batched scoring of masked
variants) serves the faithfulness curves of ``engine.eval.faithfulness``.

Fills: ``blur`` (Gaussian, σ = 1/32 of the side, i.e. half a feature cell of MobileNetV2; computed at
a quarter of the resolution and upsampled, which is indistinguishable once blurred and much cheaper)
or ``mean`` (the image's own mean colour). Ties between cells (e.g. the zeros of a ReLU map) are
broken by a seeded random map, so results are reproducible and no raster order sneaks in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.explain.decision import decided_by
from engine.explain.pairs import MAP_NAMES, PairExplanation
from engine.nn.siamese import SiameseNet, signatures

FILLS = ("blur", "mean")
DEFAULT_FILL = "blur"
DEFAULT_AREA = 0.2
BLUR_SIGMA = 1 / 32
BLUR_REDUCTION = 4
TIE_BREAK = 1e-4
# The smallest move of the evidence (logit units) worth saying when the similarity does not show it.
EVIDENCE_STEP = 0.05


class PixelScorer(Protocol):
    """What masking needs of a model: its network, its backbone pass on preprocessed pixels and how
    many images that pass takes at once (``engine.inference.SimilarityModel`` is one)."""

    net: SiameseNet
    batch_size: int

    def fmaps_from_pixels(self, pixels: Tensor) -> Tensor: ...


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
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixels.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(channels, 1, 1, 1)
    small = F.conv2d(F.pad(small, (radius, radius, 0, 0), mode="replicate"), kernel.view(channels, 1, 1, -1), groups=channels)
    small = F.conv2d(F.pad(small, (0, 0, radius, radius), mode="replicate"), kernel.view(channels, 1, -1, 1), groups=channels)
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The random baseline's importance (and the tie-break of every other map)."""
    return rng.random(shape).astype(np.float32)



def importance_key(importance: np.ndarray, size: tuple[int, int], tie_break: np.ndarray) -> Tensor:
    """Per-pixel sort key: the h×w map (plus a tiny tie-break) upsampled bilinearly to H×W; a stack
    of m maps (m×h×w) gives m×H×W keys in one call."""
    cells = torch.from_numpy(np.asarray(importance, np.float32) + TIE_BREAK * tie_break)
    stacked = cells.reshape(-1, 1, *cells.shape[-2:])
    return F.interpolate(stacked, size=size, mode="bilinear", align_corners=False).view(*cells.shape[:-2], *size)


def top_region(key: Tensor, area: float) -> Tensor:
    """Boolean mask of the ``area`` fraction of pixels with the largest key (exact count), for an
    H×W key or, map by map, for a stack of them."""
    if not 0.0 < area <= 1.0:
        raise ValueError(f"area must be in (0, 1], got {area}")
    flat = key.reshape(-1, key.shape[-2] * key.shape[-1])
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=key.device)
    mask.scatter_(1, torch.topk(flat, round(area * flat.shape[1]), dim=1, sorted=False).indices, True)
    return mask.view_as(key)



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
    than ``where`` broadcasting a bool mask over channels-last pixels. The masks are drawn on the CPU;
    the pixels may be on the model's device."""
    s = variants.source[v]
    sources = variants.sources
    return torch.lerp(variants.filled[s : s + 1], sources[s : s + 1], variants.keep[v].to(sources.device, sources.dtype))


def score_variants(model: PixelScorer, variants: Variants) -> np.ndarray:
    """Pair scores of all variants (see ``evidence_variants``)."""
    with torch.inference_mode():
        return model.net.score_from_evidence(torch.from_numpy(evidence_variants(model, variants))).numpy().astype(np.float32)


def evidence_variants(model: PixelScorer, variants: Variants) -> np.ndarray:
    """The head's evidence (the score's logit) of all variants: ``model.batch_size`` masked images per
    backbone pass, then every pair scored by the head at once, each unmasked partner described once."""
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
        return model.net.evidence_pairs(described, rows_a, described, rows_b).cpu().numpy().astype(np.float32)



def effects_from_tensors(
    model: PixelScorer,
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
    evidence = evidence_variants(model, variants)
    with torch.inference_mode():
        scores = model.net.score_from_evidence(torch.from_numpy(evidence)).numpy()
        sig_a, sig_b = signatures(model.net, fmap_a), signatures(model.net, fmaps_b)
        originals = model.net.evidence_pairs(sig_a, [0] * len(fmaps_b), sig_b, list(range(len(fmaps_b)))).tolist()
    results = [{"fill": fill, "area": area, "evidence": original, **dict.fromkeys(MAP_NAMES)} for original in originals]
    for (i, name), masked, masked_evidence in zip(entries, scores, evidence):
        explanation = explanations[i]
        results[i][name] = {
            "masked_similarity": float(masked),
            "change": float(masked) - explanation.similarity,
            "masked_evidence": float(masked_evidence),
            "evidence_change": float(masked_evidence) - originals[i],
            # The final decision with the geometry held as measured: masking moves the head's score only.
            "flips": (decided_by(float(masked), explanation.threshold, explanation.verification) is not None)
                     != explanation.is_match,
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
        if abs(after - before) < 0.005 and abs(entry.get("evidence_change", 0.0)) >= EVIDENCE_STEP:
            # A saturated similarity hides the move; the evidence (its logit) shows it.
            was, now = effects["evidence"], entry["masked_evidence"]
            verb = (f"leaves the similarity at {before:.2f} but {'raises' if now > was else 'lowers'} the head's evidence "
                    f"(its logit) from {was:.1f} to {now:.1f}")
        elif abs(after - before) < 0.005:
            verb = f"leaves the similarity at {before:.2f}"
        else:
            verb = f"{'raises' if after > before else 'lowers'} the similarity from {before:.2f} to {after:.2f}"
        sentence = f"masking the {role} region of {image} ({effects['area']:.0%} of its area, {filled}) {verb}"
        if entry["flips"]:
            sentence += f", which flips the decision to {'no match' if explanation.is_match else 'match'}"
        sentences.append(sentence)
    return sentences
