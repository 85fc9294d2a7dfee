"""Model randomisation sanity check (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

A map that looks the same whether the layers explained are trained or random shows the image's edges
and textures, not what the model learned. So the maps of the trained network are compared with those
of a copy whose trained layers (the head's projections) — and optionally the backbone's last
convolution, whose activations Grad-CAM reads — are re-drawn from their initial distributions. The
head's scalar weights, temperature and calibration are kept, so the copy's scores stay in the same
range. Maps are compared per Grad-CAM *target* (similarity and 1 − similarity for each image), not per
factual/counterfactual name, because the random copy may decide the other way. The comparison is
Spearman's rank correlation: near 1 means the map ignores the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from engine.explain.cam import CAM_METHODS, dissimilarity, similarity
from engine.images import ImageSource
from engine.inference import SimilarityModel
from engine.nn.siamese import SiameseNet

TARGET_MAPS = ("similarity_a", "similarity_b", "dissimilarity_a", "dissimilarity_b")


def randomised_copy(model: SimilarityModel, *, backbone: bool = False, seed: int = 0) -> SimilarityModel:
    """A copy of ``model`` with its trained layers (tuned backbone blocks included) and, with
    ``backbone``, the backbone's last convolution and what follows it re-initialised; ``model``
    itself is untouched. The weights are drawn on the CPU, so a seed gives the same copy on any device."""
    net = copy.deepcopy(model.net).cpu()
    modules = [m for name, m in net.named_modules() if not name.startswith("backbone")] + list(net.backbone_parts[1].modules())
    if backbone:
        layers = list(net.backbone.stem.modules())
        last_conv = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
        modules += layers[last_conv:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return SimilarityModel(net, model.config, model.batch_size, model.device)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN when either input is constant."""
    rx, ry = _average_ranks(np.ravel(x)), _average_ranks(np.ravel(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - (counts - 1) / 2.0) - 1.0)[inverse]


def target_maps(net: SiameseNet, fmap_a: Tensor, fmaps_b: Tensor, method: str = "gradcam") -> dict[str, np.ndarray]:
    """k×h×w maps of image a against each of k images b, per target (``TARGET_MAPS``)."""
    cam = CAM_METHODS[method](net.evidence_fmaps, net.score_from_evidence)
    fmap_a, fmaps_b = fmap_a.to(net.head_device), fmaps_b.to(net.head_device)
    cams = cam(fmap_a.expand(len(fmaps_b), -1, -1, -1), fmaps_b, targets=[similarity, dissimilarity])
    return {
        "similarity_a": cams.maps_a[0].cpu().numpy(), "similarity_b": cams.maps_b[0].cpu().numpy(),
        "dissimilarity_a": cams.maps_a[1].cpu().numpy(), "dissimilarity_b": cams.maps_b[1].cpu().numpy(),
    }


def map_rank_correlations(trained: SiameseNet, randomised: SiameseNet, fmap_a: Tensor, fmaps_b: Tensor,
                          method: str = "gradcam", fmaps_random: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """Mean Spearman correlation, over the k pairs, of each target's maps from the two networks
    (``mean``: over the four); ``fmaps_random`` are the copy's own feature maps when its backbone differs."""
    first = target_maps(trained, fmap_a, fmaps_b, method)
    second = target_maps(randomised, *(fmaps_random or (fmap_a, fmaps_b)), method)
    result = {name: _finite_mean([spearman(x, y) for x, y in zip(first[name], second[name])]) for name in TARGET_MAPS}
    result["mean"] = _finite_mean([result[name] for name in TARGET_MAPS])
    return result


def _finite_mean(values: Sequence[float]) -> float:
    """Mean over the defined correlations (an all-zero map has none); NaN when there is none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def sanity_check(model: SimilarityModel, image_a: ImageSource, images_b: Sequence[ImageSource], *,
                 backbone: bool = False, method: str = "gradcam", seed: int = 0) -> dict[str, float]:
    """Rank correlations between the maps of ``model`` and of its randomised copy for image a
    against each of images_b: per target and their ``mean``. Low values pass the check."""
    randomised = randomised_copy(model, backbone=backbone, seed=seed)
    pixels = model.pixels([image_a, *images_b])
    fmaps = model.fmaps_from_pixels(pixels)
    random_fmaps = randomised.fmaps_from_pixels(pixels) if backbone else fmaps
    return map_rank_correlations(model.net, randomised.net, fmaps[:1], fmaps[1:], method,
                                 fmaps_random=(random_fmaps[:1], random_fmaps[1:]))
