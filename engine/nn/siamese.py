"""Siamese networks: a shared branch (backbone → pooled embedding) and a head that scores a pair.

Both networks share the contract the rest of the engine relies on:

* ``backbone.features(x)`` — the Grad-CAM layer's activations (an ImageNet backbone, frozen but for
  its last ``config.tuned_blocks`` blocks);
* ``embed_fmap(fmap)`` — the embedding stored in FAISS;
* ``project(fmap)`` — the bias-free per-cell linear projections that are the head's *only* view of a
  feature map (the first layer of every path from the feature map to the score is linear per cell:
  a 1×1 convolution, or a linear layer after average pooling, which equals the pooled per-cell
  projection). They are the stored *description* of an image, and Grad-CAM on them is exactly
  Grad-CAM on the feature map: with g_q = d evidence / d projection at cell q and W the projection,
  d evidence / d A_q = Wᵀ g_q, so Σ_c (mean_q Wᵀg_q)_c A_cp = (mean_q g_q) · (W A_p) (and likewise
  cell by cell for HiResCAM);
* ``signature(fmap)`` / ``signature_from_projections(p)`` — what a pair compares (the embedding and
  unit local descriptors), ``score_signatures(sa, sb)`` the similarity in (0, 1), differentiable with
  respect to *both* images and never clipped, so every pair has gradients for Grad-CAM.

Only the layers after the backbone, and the tuned blocks, are trained and saved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.nn.backbones import Backbone
from engine.config import ModelConfig

# Pairs scored per step by ``score_pairs``. A pair's intermediates are N_a×N_b per matrix (196×196
# floats at 448 px): a few pairs' worth stays in the CPU cache, thousands stream through memory.
# Measured on 2 cores: 0.14 ms per pair in steps of 16, 0.60 ms in one step of 2000.
PAIR_CHUNK = 16
# On a GPU a step is a few kernel launches whatever its size, so steps are large: 512 pairs' 196×196
# float32 intermediates take a few hundred MB.
GPU_PAIR_CHUNK = 512
# exp(±80) and sums of a few thousand such terms stay within float32 (max ~3.4e38, min normal ~1.2e-38).
MAX_INVERSE_TEMPERATURE = 80.0


class SiameseNet(nn.Module):
    """Shared parts of both presets: the backbone (frozen but for its tuned blocks) and the trained-state helpers."""

    def __init__(self, backbone: Backbone, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.backbone.requires_grad_(False)
        self.backbone_parts[1].requires_grad_(True)

    @property
    def backbone_parts(self) -> tuple[nn.Sequential, nn.Sequential]:
        """(frozen, tuned) blocks of the backbone's stem (views sharing its modules)."""
        return self.backbone.split(self.config.tuned_blocks)

    def features_from_frozen(self, frozen: Tensor) -> Tensor:
        """The Grad-CAM layer's activations from the frozen blocks' output (what training caches)."""
        return self.backbone.cam(self.backbone_parts[1](frozen.to(self.head_device)))

    def working(self, tensor: Tensor) -> Tensor:
        """Feature maps may arrive in bfloat16 (autocast) or float16 (stored descriptions), and on the CPU
        while the net runs on a GPU; the trained layers compute in their own precision (float32, or
        float64 for a reference) on their own device."""
        head = self._head_parameter()
        return tensor.to(head.device, head.dtype)

    @property
    def head_dtype(self) -> torch.dtype:
        """The precision of the trained layers (those after the backbone)."""
        return self._head_parameter().dtype

    @property
    def head_device(self) -> torch.device:
        """Where the trained layers, and so every step of the head, run."""
        return self._head_parameter().device

    def _head_parameter(self) -> nn.Parameter:
        return next(p for name, child in self.named_children() if name != "backbone" for p in child.parameters())

    def embed_fmap(self, fmap: Tensor) -> Tensor:
        raise NotImplementedError

    def project(self, fmap: Tensor) -> Tensor:
        """B×P×h×w bias-free per-cell projections of the feature maps (in the head's precision)."""
        raise NotImplementedError

    def signature(self, fmap: Tensor) -> tuple[Tensor, ...]:
        """Per-image tensors a pair compares (batch first), straight from the feature maps."""
        raise NotImplementedError

    def signature_from_projections(self, projections: Tensor) -> tuple[Tensor, ...]:
        """The same signature from ``project``'s output (equal up to rounding)."""
        raise NotImplementedError

    def signature_logit(self, sig_a: tuple[Tensor, ...], sig_b: tuple[Tensor, ...]) -> Tensor:
        """The evidence (see ``evidence_fmaps``) of pairs of signatures."""
        raise NotImplementedError

    def score_from_evidence(self, evidence: Tensor) -> Tensor:
        raise NotImplementedError

    def score_signatures(self, sig_a: tuple[Tensor, ...], sig_b: tuple[Tensor, ...]) -> Tensor:
        return self.score_from_evidence(self.signature_logit(sig_a, sig_b))

    def score_pairs(self, sig_a: tuple[Tensor, ...], rows_a: Sequence[int], sig_b: tuple[Tensor, ...],
                    rows_b: Sequence[int]) -> Tensor:
        """Scores of the pairs (row ``rows_a[n]`` of ``sig_a``, row ``rows_b[n]`` of ``sig_b``), ``PAIR_CHUNK``
        at a time (``GPU_PAIR_CHUNK`` on a GPU)."""
        return self.score_from_evidence(self.evidence_pairs(sig_a, rows_a, sig_b, rows_b))

    def evidence_pairs(self, sig_a: tuple[Tensor, ...], rows_a: Sequence[int], sig_b: tuple[Tensor, ...],
                       rows_b: Sequence[int]) -> Tensor:
        """The evidence (the score's logit, see ``evidence_fmaps``) of the pairs ``score_pairs`` scores."""
        step = PAIR_CHUNK if self.head_device.type == "cpu" else GPU_PAIR_CHUNK
        parts = [self.signature_logit(tuple(part[rows_a[s : s + step]] for part in sig_a),
                                      tuple(part[rows_b[s : s + step]] for part in sig_b))
                 for s in range(0, len(rows_a), step)]
        return torch.cat(parts) if parts else torch.zeros(0, device=self.head_device)

    # Whether ``cell_contributions`` decomposes the score exactly (correspondences then need no map weighting).
    exact_cell_contributions = False

    def cell_contributions(self, projs_a: Tensor, projs_b: Tensor) -> Tensor:
        """k×N_a×N_b: how much each pair of cells (i of a, j of b) adds to each pair's similarity, from
        the images' projections (k each). Here the cosine of the two cells' projections: a similarity
        of regions, not a decomposition."""
        cells_a = F.normalize(projs_a.flatten(2).transpose(1, 2), dim=2)
        cells_b = F.normalize(projs_b.flatten(2).transpose(1, 2), dim=2)
        return cells_a @ cells_b.transpose(1, 2)

    def describe(self, fmap: Tensor) -> tuple[Tensor]:
        """What is stored per image: its projections, from which it is scored and explained."""
        return (self.project(fmap),)

    def evidence_projections(self, proj_a: Tensor, proj_b: Tensor) -> Tensor:
        return self.signature_logit(self.signature_from_projections(proj_a), self.signature_from_projections(proj_b))

    def coalition_evidence(self, proj_a: Tensor, proj_b: Tensor, removed_a: Tensor, removed_b: Tensor,
                           keep_a: Tensor, keep_b: Tensor, chunk: int = 64) -> Tensor:
        """The evidence of one pair under n coalitions of cells: image a (1×P×h×w projections) with the
        cells where ``keep_a`` (n×h·w, 0/1) is 0 taken from ``removed_a`` instead, against image b likewise.
        Generic: the mixed projections are built ``chunk`` coalitions at a time and scored by the head."""
        shape_a, shape_b = proj_a.shape[1:], proj_b.shape[1:]
        parts = []
        for s in range(0, len(keep_a), chunk):
            ka = keep_a[s : s + chunk].to(proj_a.dtype).view(-1, 1, *shape_a[1:])
            kb = keep_b[s : s + chunk].to(proj_b.dtype).view(-1, 1, *shape_b[1:])
            parts.append(self.evidence_projections(torch.lerp(removed_a, proj_a, ka), torch.lerp(removed_b, proj_b, kb)))
        return torch.cat(parts) if parts else torch.zeros(0, device=self.head_device)

    def score_fmaps(self, fmap_a: Tensor, fmap_b: Tensor) -> Tensor:
        return self.score_signatures(self.signature(fmap_a), self.signature(fmap_b))

    def evidence_fmaps(self, fmap_a: Tensor, fmap_b: Tensor) -> Tensor:
        """An unbounded, increasing function of the score (its logit); Grad-CAM differentiates this
        so that a saturated score (similarity rounding to 1.0 in float32) cannot blank the maps."""
        return self.signature_logit(self.signature(fmap_a), self.signature(fmap_b))

    def forward(self, images_a: Tensor, images_b: Tensor) -> Tensor:
        """Similarity of two image batches (for hooks-based Grad-CAM tools that call the module)."""
        return self.score_fmaps(self.backbone.features(images_a), self.backbone.features(images_b))

    def train(self, mode: bool = True) -> SiameseNet:
        super().train(mode)
        self.backbone.eval()
        return self

    def trained_state_dict(self) -> dict[str, Tensor]:
        """The parameters a checkpoint stores: everything but the (packaged) backbone's frozen blocks."""
        frozen, tuned = self.backbone_parts
        kept = tuple(f"backbone.stem.{len(frozen) + i}." for i in range(len(tuned)))
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.") or k.startswith(kept)}

    def load_trained_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = set(self.trained_state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        self.load_state_dict({**self.backbone_state(), **state}, strict=True)

    def backbone_state(self) -> dict[str, Tensor]:
        return {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}


Net = TypeVar("Net", bound=type[SiameseNet])
# Preset name → network class (``ModelConfig.preset``): a new head registers here, as backbones do.
PRESETS: dict[str, type[SiameseNet]] = {}


def register_preset(name: str) -> Callable[[Net], Net]:
    def register(cls: Net) -> Net:
        PRESETS[name] = cls
        return cls

    return register


@register_preset("whymatch")
class MatchNet(SiameseNet):
    """whymatch's model: a global embedding for retrieval plus a local-matching head for re-scoring.

    The head compares every location of one feature map with every location of the other (a soft
    mutual nearest-neighbour match of projected local descriptors) and combines that with the
    global cosine: the same room photographed from another angle shares many local parts even when
    the pooled descriptors drift apart. Symmetric in (a, b) by construction.
    """

    def __init__(self, backbone: Backbone, config: ModelConfig) -> None:
        super().__init__(backbone, config)
        channels = backbone.channels
        self.embed_proj = nn.Linear(channels, config.embed_dim)
        self.local_proj = nn.Conv2d(channels, config.local_dim, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.tensor(-3.0))
        self.head_weights = nn.Parameter(torch.tensor([2.0, 2.0]))
        self.head_bias = nn.Parameter(torch.tensor(-2.0))
        # Platt scaling (scale, shift) fitted after training so the score reads as a probability.
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def embed_fmap(self, fmap: Tensor) -> Tensor:
        return F.normalize(self.embed_proj(self.working(fmap).mean(dim=(2, 3))), dim=1)

    def local_descriptors(self, fmap: Tensor) -> Tensor:
        """B×HW×D unit-length descriptors, one per feature-map cell."""
        return F.normalize(self.local_proj(self.working(fmap)).flatten(2).transpose(1, 2), dim=2)

    def project(self, fmap: Tensor) -> Tensor:
        weight = torch.cat([self.embed_proj.weight, self.local_proj.weight.flatten(1)])
        return torch.einsum("pc,bchw->bphw", weight, self.working(fmap))

    def signature(self, fmap: Tensor) -> tuple[Tensor, Tensor]:
        return self.embed_fmap(fmap), self.local_descriptors(fmap)

    def unnormalised_signature(self, projections: Tensor) -> tuple[Tensor, Tensor]:
        """The signature before normalising, from ``project``'s output: the pooled embedding (B × embed_dim)
        and each cell's local projection (B × local_dim × h × w), biases added. Both the signature and what
        normalising it drops (``engine.nn.compact.projection_norms``, stored in compact descriptions) are
        read off these, so a description's norms always belong to its signature."""
        embed, local = self.working(projections).split([self.config.embed_dim, self.config.local_dim], dim=1)
        return embed.mean(dim=(2, 3)) + self.embed_proj.bias, local + self.local_proj.bias.view(1, -1, 1, 1)

    def signature_from_projections(self, projections: Tensor) -> tuple[Tensor, Tensor]:
        pooled, local = self.unnormalised_signature(projections)
        return F.normalize(pooled, dim=1), F.normalize(local.flatten(2).transpose(1, 2), dim=2)

    def match_weights(self, corr: Tensor) -> Tensor:
        """exp(corr / temperature): the unnormalised weights of both the row and the column softmax.

        The descriptors are unit vectors, so |corr| ≤ 1 and, with the temperature floored at
        ``1 / MAX_INVERSE_TEMPERATURE``, no weight nor any sum of them over- or underflows in float32:
        the max-shift of a general softmax is not needed, and one exponential serves both directions.
        """
        inverse_temperature = torch.exp(-self.log_temperature).clamp(max=MAX_INVERSE_TEMPERATURE)
        return torch.exp(corr * inverse_temperature)

    def local_match(self, la: Tensor, lb: Tensor) -> Tensor:
        """Mean soft-best-match similarity of each cell to the other image's cells, both ways."""
        corr = la @ lb.transpose(1, 2)
        weights = self.match_weights(corr)
        weighted = weights * corr
        a_to_b = (weighted.sum(dim=2) / weights.sum(dim=2)).mean(dim=1)
        b_to_a = (weighted.sum(dim=1) / weights.sum(dim=1)).mean(dim=1)
        return (a_to_b + b_to_a) / 2

    exact_cell_contributions = True

    def cell_contributions(self, projs_a: Tensor, projs_b: Tensor) -> Tensor:
        """The exact terms of the local-match term (``engine.explain.correspondences``): they sum to
        ``local_match`` of the pair."""
        local_a = self.signature_from_projections(projs_a)[1]
        local_b = self.signature_from_projections(projs_b)[1]
        corr = local_a @ local_b.transpose(1, 2)
        weights = self.match_weights(corr)
        rows = weights / (weights.sum(dim=2, keepdim=True) * corr.shape[1])
        cols = weights / (weights.sum(dim=1, keepdim=True) * corr.shape[2])
        return corr * (rows + cols) / 2

    def coalition_evidence(self, proj_a: Tensor, proj_b: Tensor, removed_a: Tensor, removed_b: Tensor,
                           keep_a: Tensor, keep_b: Tensor, chunk: int = 64) -> Tensor:
        """As the generic method, without building any mixed projections: each cell's unit descriptor is
        one of two (kept or removed), so every coalition's match weights are entries of four
        N_a×N_b matrices (a's cell kept or not × b's cell kept or not), and their row and column sums
        over a coalition are matrix products of the keep masks with those matrices; the pooled
        embedding is linear in the masks. Thousands of coalitions cost a few matrix products, in one step
        (``chunk`` is not needed: no intermediate grows with more than the number of coalitions × cells)."""
        dims = [self.config.embed_dim, self.config.local_dim]
        keep_a, keep_b = keep_a.to(self.head_dtype), keep_b.to(self.head_dtype)

        def parts(kept: Tensor, removed: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
            cells = torch.stack([self.working(removed)[0], self.working(kept)[0]]).flatten(2)  # 2×P×N: removed, kept
            embed, local = cells.split(dims, dim=1)
            pooled = embed[0].sum(dim=1) + keep @ (embed[1] - embed[0]).T
            embedding = F.normalize(pooled / cells.shape[2] + self.embed_proj.bias, dim=1)
            units = F.normalize(local + self.local_proj.bias.view(1, -1, 1), dim=1)  # 2×D×N
            return embedding, units

        emb_a, units_a = parts(proj_a, removed_a, keep_a)
        emb_b, units_b = parts(proj_b, removed_b, keep_b)
        corr = torch.einsum("xdi,ydj->xyij", units_a, units_b)  # [state of a's cell, state of b's cell]
        weights = self.match_weights(corr)
        both = torch.stack([weights, weights * corr])  # [w or w·corr, x, y, i, j]
        n_a, n_b = corr.shape[2], corr.shape[3]
        # Row sums over b's cells for each state x of a's cell: Σ_y masks_b(y) @ M[x, y]ᵀ.
        masks_b = torch.cat([1 - keep_b, keep_b], dim=1)  # n×(2·N_b): removed first, as state 0
        masks_a = torch.cat([1 - keep_a, keep_a], dim=1)
        rows = masks_b @ both.permute(2, 4, 0, 1, 3).reshape(2 * n_b, -1)  # (y, j) × (w/v, x, i)
        cols = masks_a @ both.permute(1, 3, 0, 2, 4).reshape(2 * n_a, -1)  # (x, i) × (w/v, y, j)
        rows, cols = rows.view(-1, 2, 2, n_a), cols.view(-1, 2, 2, n_b)
        pick_a, pick_b = keep_a.unsqueeze(1), keep_b.unsqueeze(1)
        rows = torch.lerp(rows[:, :, 0], rows[:, :, 1], pick_a)  # n×(w/v)×N_a at each cell's own state
        cols = torch.lerp(cols[:, :, 0], cols[:, :, 1], pick_b)
        local = ((rows[:, 1] / rows[:, 0]).mean(dim=1) + (cols[:, 1] / cols[:, 0]).mean(dim=1)) / 2
        return self.calibration[0] * self.logit_from_terms((emb_a * emb_b).sum(dim=1), local) + self.calibration[1]

    def head_logit(self, sig_a: tuple[Tensor, Tensor], sig_b: tuple[Tensor, Tensor]) -> Tensor:
        """The trained logit, before calibration."""
        return self.logit_from_terms((sig_a[0] * sig_b[0]).sum(dim=1), self.local_match(sig_a[1], sig_b[1]))

    def logit_from_terms(self, cosine: Tensor, local: Tensor) -> Tensor:
        """The trained logit from its two terms: the embeddings' cosine and the local match."""
        weights = F.softplus(self.head_weights)
        return 10 * (weights[0] * cosine + weights[1] * local + self.head_bias)

    def signature_logit(self, sig_a: tuple[Tensor, Tensor], sig_b: tuple[Tensor, Tensor]) -> Tensor:
        return self.calibration[0] * self.head_logit(sig_a, sig_b) + self.calibration[1]

    def score_from_evidence(self, evidence: Tensor) -> Tensor:
        return torch.sigmoid(evidence)


@register_preset("paper")
class PaperNet(SiameseNet):
    """The seed method (Livieris et al. 2023): GAP → Linear 256 → ReLU → Linear 2, Euclidean distance.

    Fixed: the similarity is 1 / (1 + distance), smooth and strictly decreasing everywhere, instead
    of a distance clipped at 1 (which zeroed the gradients of every dissimilar pair and blanked its
    heatmaps); unlike exp(-distance) its gradient cannot underflow for far-apart pairs.
    """

    def __init__(self, backbone: Backbone, config: ModelConfig) -> None:
        super().__init__(backbone, config)
        self.mlp = nn.Sequential(nn.Linear(backbone.channels, 256), nn.ReLU(), nn.Linear(256, config.embed_dim))

    def embed_fmap(self, fmap: Tensor) -> Tensor:
        return self.mlp(self.working(fmap).mean(dim=(2, 3)))

    def project(self, fmap: Tensor) -> Tensor:
        return torch.einsum("pc,bchw->bphw", self.mlp[0].weight, self.working(fmap))

    def signature(self, fmap: Tensor) -> tuple[Tensor]:
        return (self.embed_fmap(fmap),)

    def signature_from_projections(self, projections: Tensor) -> tuple[Tensor]:
        hidden = torch.relu(self.working(projections).mean(dim=(2, 3)) + self.mlp[0].bias)
        return (self.mlp[2](hidden),)

    @staticmethod
    def distance(emb_a: Tensor, emb_b: Tensor) -> Tensor:
        # The epsilon keeps the gradient of the norm finite for identical embeddings.
        diff = emb_a - emb_b
        return torch.sqrt((diff * diff).sum(dim=1) + 1e-12)

    def signature_logit(self, sig_a: tuple[Tensor], sig_b: tuple[Tensor]) -> Tensor:
        return -torch.log1p(self.distance(sig_a[0], sig_b[0]))

    def score_from_evidence(self, evidence: Tensor) -> Tensor:
        return torch.exp(evidence)


def signatures(net: SiameseNet, fmaps: Tensor, chunk: int = 256) -> tuple[Tensor, ...]:
    """Per-image signatures of many feature maps, in chunks to bound memory."""
    with torch.inference_mode():
        parts = [net.signature(fmaps[s : s + chunk].float()) for s in range(0, len(fmaps), chunk)]
    return tuple(torch.cat(column) for column in zip(*parts))


def build_net(config: ModelConfig, backbone: Backbone) -> SiameseNet:
    """The network of a preset (``PRESETS``) around an already-built backbone."""
    if config.preset not in PRESETS:
        raise ValueError(f"unknown preset {config.preset!r}; choose from {', '.join(sorted(PRESETS))}")
    return PRESETS[config.preset](backbone, config)
