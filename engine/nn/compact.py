"""Compact descriptions: what re-scoring and explaining a stored item needs, in a few KiB instead of its
projections (196 cells × 384 float16 ≈ 147 KiB for the ``whymatch`` preset).

The head compares two images through their signature only (``MatchNet.signature``: the unit global
embedding and one unit local descriptor per feature-map cell), so a description keeps the signature:
the embedding as float16 and each local descriptor as a product-quantisation code (``subquantizers``
bytes a cell: the descriptor cut into that many slices, each replaced by the nearest of 256 centroids
of its codebook). The codebooks are fitted once per model, on the local descriptors of its *training*
photos, and travel next to its checkpoint (``descriptions.safetensors`` + ``descriptions.json``).

One packed description is ``[h, w]`` (uint8: the cell grid) + the embedding (little-endian float16) +
the codes (uint8, cell-major, row by row of the grid). Decoded descriptors are re-normalised, so the
head sees unit vectors (its soft-max bounds rely on |cosine| ≤ 1) and ``as_projections`` can hand them to
every path that starts from projections (``cell_contributions``, ``explain_projections``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.nn.siamese import MatchNet

CODEBOOKS_FILE = "descriptions.safetensors"
CODEC_CONFIG_FILE = "descriptions.json"
CENTROIDS = 256  # one uint8 code per slice
GRID_BYTES = 2
CODE_CHUNK = 4096  # cells quantised per step


@dataclass
class DescriptionCodec:
    """Product quantiser of the local descriptors plus the float16 embedding: fit, encode, decode, save, load.

    ``codebooks`` is subquantizers × 256 × (cell_dim / subquantizers) float32; ``fitted_on`` says which
    photos (and how many cells) the codebooks were fitted on, so a codec can be traced to its data."""

    codebooks: Tensor
    embed_dim: int
    fitted_on: dict = field(default_factory=dict)

    @property
    def subquantizers(self) -> int:
        return self.codebooks.shape[0]

    @property
    def cell_dim(self) -> int:
        return self.codebooks.shape[0] * self.codebooks.shape[2]

    def item_bytes(self, cells: int) -> int:
        """Bytes of one packed description with ``cells`` local descriptors."""
        return GRID_BYTES + 2 * self.embed_dim + cells * self.subquantizers

    @classmethod
    def fit(cls, cells: Tensor, embed_dim: int, subquantizers: int = 32, *, iterations: int = 25, seed: int = 1234,
            fitted_on: dict | None = None) -> DescriptionCodec:
        """Codebooks by k-means (FAISS) on each slice of ``cells`` (n × cell_dim unit descriptors, n ≥ 256)."""
        import faiss  # defers FAISS: only fitting needs it, encoding and decoding are plain torch

        n, dim = cells.shape
        if dim % subquantizers:
            raise ValueError(f"{subquantizers} subquantizers do not divide the cell dimension {dim}")
        if n < CENTROIDS:
            raise ValueError(f"fitting needs at least {CENTROIDS} cells, got {n}")
        quantizer = faiss.ProductQuantizer(dim, subquantizers, 8)
        quantizer.cp.niter = iterations
        quantizer.cp.seed = seed
        quantizer.train(np.ascontiguousarray(cells.detach().float().numpy()))
        centroids = faiss.vector_to_array(quantizer.centroids).reshape(subquantizers, CENTROIDS, dim // subquantizers)
        return cls(torch.from_numpy(centroids.copy()), embed_dim, dict(fitted_on or {}, cells=n, iterations=iterations, seed=seed))

    def codes(self, cells: Tensor) -> Tensor:
        """B × N × subquantizers uint8 codes of B × N × cell_dim descriptors (nearest centroid per slice)."""
        b, n, dim = cells.shape
        if dim != self.cell_dim:
            raise ValueError(f"the codec quantises {self.cell_dim}-d cells, got {dim}-d")
        slices = cells.detach().float().reshape(b * n, self.subquantizers, -1).transpose(0, 1)
        # Nearest centroid = largest 2·x·c − |c|² (|x|² is the same for all centroids), a chunk of cells at
        # a time so that the M × chunk × 256 scores stay small.
        half_norms = (self.codebooks**2).sum(dim=2).unsqueeze(1) / 2
        nearest = torch.cat([(part @ self.codebooks.transpose(1, 2) - half_norms).argmax(dim=2)
                             for part in slices.split(CODE_CHUNK, dim=1)], dim=1)
        return nearest.transpose(0, 1).reshape(b, n, self.subquantizers).to(torch.uint8)

    def reconstruct(self, codes: Tensor) -> Tensor:
        """B × N × cell_dim unit descriptors from their codes."""
        b, n, m = codes.shape
        parts = self.codebooks[torch.arange(m), codes.long().reshape(-1, m)]
        return F.normalize(parts.reshape(b, n, self.cell_dim), dim=2)

    def encode(self, embedding: Tensor, cells: Tensor, grid: tuple[int, int]) -> list[bytes]:
        """Packed descriptions of B images from their signature (``MatchNet.signature``: B × embed_dim unit
        embeddings, B × (h·w) × cell_dim unit descriptors of an h × w grid)."""
        h, w = grid
        if cells.shape[1] != h * w or not (0 < h < 256 and 0 < w < 256):
            raise ValueError(f"{cells.shape[1]} cells do not form a {h}×{w} grid of at most 255×255")
        if embedding.shape[1] != self.embed_dim:
            raise ValueError(f"the codec stores {self.embed_dim}-d embeddings, got {embedding.shape[1]}-d")
        head = np.array([h, w], dtype=np.uint8).tobytes()
        embeddings = embedding.detach().float().numpy().astype("<f2")
        codes = self.codes(cells).numpy()
        return [head + e.tobytes() + c.tobytes() for e, c in zip(embeddings, codes)]

    def decode(self, blobs: Sequence[bytes]) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        """(embeddings B × embed_dim, descriptors B × N × cell_dim), float32 and unit length, and the grid
        (h, w) they share: the signature the head scores (``MatchNet.signature_logit``)."""
        if not len(blobs):
            raise ValueError("decode needs at least one description")
        grids = {tuple(bytes(blob[:GRID_BYTES])) for blob in blobs}
        if len(grids) != 1:
            raise ValueError(f"descriptions of different grids cannot be decoded together: {sorted(grids)}")
        h, w = grids.pop()
        size = self.item_bytes(h * w)
        if any(len(blob) != size for blob in blobs):
            raise ValueError(f"a {h}×{w} description is {size} bytes for this codec")
        raw = np.frombuffer(b"".join(bytes(blob) for blob in blobs), dtype=np.uint8).reshape(len(blobs), size)
        embed_end = GRID_BYTES + 2 * self.embed_dim
        embedding = torch.from_numpy(raw[:, GRID_BYTES:embed_end].copy().view("<f2").astype(np.float32))
        codes = torch.from_numpy(raw[:, embed_end:].reshape(len(blobs), h * w, self.subquantizers).copy())
        return (F.normalize(embedding, dim=1), self.reconstruct(codes)), (h, w)

    def save(self, directory: str | Path) -> Path:
        """Write the codebooks and the codec's settings next to a checkpoint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"codebooks": self.codebooks.contiguous()}, str(directory / CODEBOOKS_FILE))
        settings = {"codec": "product-quantiser", "embed_dim": self.embed_dim, "cell_dim": self.cell_dim,
                    "subquantizers": self.subquantizers, "centroids": CENTROIDS, "fitted_on": self.fitted_on}
        (directory / CODEC_CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DescriptionCodec:
        """The codec saved in a checkpoint directory (safetensors and JSON only: nothing is unpickled)."""
        directory = Path(directory)
        settings = json.loads((directory / CODEC_CONFIG_FILE).read_text())
        codebooks = load_file(str(directory / CODEBOOKS_FILE))["codebooks"].float()
        if codebooks.shape != (settings["subquantizers"], CENTROIDS, settings["cell_dim"] // settings["subquantizers"]):
            raise ValueError(f"{directory / CODEBOOKS_FILE} does not match {CODEC_CONFIG_FILE}: codebooks {tuple(codebooks.shape)}")
        return cls(codebooks, int(settings["embed_dim"]), settings.get("fitted_on", {}))


def as_projections(net: MatchNet, signature: tuple[Tensor, Tensor], grid: tuple[int, int]) -> Tensor:
    """B × (embed_dim + local_dim) × h × w projections whose ``signature_from_projections`` is ``signature``,
    for the paths that take projections (``cell_contributions``, correspondences, ``explain_projections``).

    The per-cell scale of the projections and the per-cell part of the embedding are not stored, so
    Grad-CAM from these is Grad-CAM of the decoded unit descriptors, not of the backbone's layer; the
    cell contributions (the local match, term by term) are exact for the decoded descriptors."""
    embedding, cells = (part.to(net.head_dtype) for part in signature)
    h, w = grid
    embed_part = (embedding - net.embed_proj.bias).unsqueeze(2).expand(-1, -1, h * w)
    local_part = cells.transpose(1, 2) - net.local_proj.bias.view(1, -1, 1)
    return torch.cat([embed_part, local_part], dim=1).reshape(len(cells), -1, h, w)
