"""Compact descriptions: what re-scoring and explaining a stored item needs, in a few KiB instead of its
projections (196 cells × 384 float16 ≈ 147 KiB for the ``whymatch`` preset).

The head compares two images through their signature only (``MatchNet.signature``: the unit global
embedding and one unit local descriptor per feature-map cell), so a description keeps the signature:
the embedding as float16 and each local descriptor as a product-quantisation code (``subquantizers``
bytes a cell: the descriptor cut into that many slices, each replaced by the nearest of 256 centroids
of its codebook), optionally after an orthogonal rotation learned with the codebooks (OPQ: it spreads
the descriptor's variance evenly over the slices, so each codebook wastes fewer centroids). The
codebooks (and rotation) are fitted once per model, on the local descriptors of its *training* photos,
and travel next to its checkpoint (``descriptions.safetensors`` + ``descriptions.json``).

One packed description is ``[h, w]`` (uint8: the cell grid) + the embedding (little-endian float16) +
the norms (float16: the pooled embedding's before normalising, then each cell's local projection's) + the
codes (uint8, cell-major, row by row of the grid). Decoded descriptors are re-normalised, so the head
sees unit vectors (its soft-max bounds rely on |cosine| ≤ 1). Scoring needs the signature only; the
norms are what ``as_projections`` needs to hand every path that starts from projections
(``cell_contributions``, ``explain_projections``) tensors of the projections' scale, so that Grad-CAM
weighs the local and the global term as it does on the stored projections.
"""

from __future__ import annotations

import hashlib
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
OPQ_CELLS = 32768  # cells the rotation is learned on (FAISS samples them with its own fixed seed)


@dataclass
class DescriptionCodec:
    """Product quantiser of the local descriptors plus the float16 embedding: fit, encode, decode, save, load.

    ``codebooks`` is subquantizers × 256 × (cell_dim / subquantizers) float32; ``rotation`` (cell_dim ×
    cell_dim, orthogonal, or None) turns a descriptor into the space the codebooks quantise; ``fitted_on``
    says which photos (and how many cells) the codebooks were fitted on, so a codec can be traced to its data."""

    codebooks: Tensor
    embed_dim: int
    fitted_on: dict = field(default_factory=dict)
    rotation: Tensor | None = None

    @property
    def subquantizers(self) -> int:
        return self.codebooks.shape[0]

    @property
    def cell_dim(self) -> int:
        return self.codebooks.shape[0] * self.codebooks.shape[2]

    def item_bytes(self, cells: int) -> int:
        """Bytes of one packed description with ``cells`` local descriptors."""
        return GRID_BYTES + 2 * self.embed_dim + 2 + cells * (2 + self.subquantizers)

    @property
    def name(self) -> str:
        """What the codec is, for a catalogue's model fingerprint and the benchmarks."""
        return f"{'OPQ' if self.rotation is not None else 'PQ'}{self.subquantizers}x8"

    @property
    def format(self) -> str:
        """The layout of its packed descriptions, codebooks and rotation included (a digest of them): two
        codecs of the same format decode each other's bytes alike."""
        digest = hashlib.sha256(self.name.encode())
        for tensor in (self.codebooks, self.rotation):
            if tensor is not None:
                digest.update(tensor.detach().float().contiguous().numpy().tobytes())
        return f"{self.name}-{self.embed_dim}-2:{digest.hexdigest()[:16]}"

    @classmethod
    def fit(cls, cells: Tensor, embed_dim: int, subquantizers: int = 32, *, rotate: bool = False, iterations: int = 25,
            seed: int = 1234, fitted_on: dict | None = None) -> DescriptionCodec:
        """Codebooks by k-means (FAISS) on each slice of ``cells`` (n × cell_dim unit descriptors, n ≥ 256),
        every cell used (FAISS would otherwise sample 256 a centroid); with ``rotate``, an OPQ rotation
        learned first (``iterations`` rounds, on at most ``OPQ_CELLS`` of the cells) and the codebooks
        fitted on the rotated cells."""
        import faiss  # defers FAISS: only fitting needs it, encoding and decoding are plain torch

        n, dim = cells.shape
        if dim % subquantizers:
            raise ValueError(f"{subquantizers} subquantizers do not divide the cell dimension {dim}")
        if n < CENTROIDS:
            raise ValueError(f"fitting needs at least {CENTROIDS} cells, got {n}")
        x = np.ascontiguousarray(cells.detach().float().numpy())
        rotation = None
        if rotate:
            opq = faiss.OPQMatrix(dim, subquantizers)
            opq.niter, opq.max_train_points = iterations, OPQ_CELLS
            opq.train(x)
            rotation = torch.from_numpy(faiss.vector_to_array(opq.A).reshape(dim, dim).copy())
            x = np.ascontiguousarray(x @ rotation.numpy().T)
        quantizer = faiss.ProductQuantizer(dim, subquantizers, 8)
        quantizer.cp.niter = iterations
        quantizer.cp.seed = seed
        quantizer.cp.max_points_per_centroid = max(1, -(-n // CENTROIDS))
        quantizer.train(x)
        centroids = faiss.vector_to_array(quantizer.centroids).reshape(subquantizers, CENTROIDS, dim // subquantizers)
        return cls(torch.from_numpy(centroids.copy()), embed_dim, dict(fitted_on or {}, cells=n, iterations=iterations, seed=seed),
                   rotation)

    def codes(self, cells: Tensor) -> Tensor:
        """B × N × subquantizers uint8 codes of B × N × cell_dim descriptors (nearest centroid per slice)."""
        b, n, dim = cells.shape
        if dim != self.cell_dim:
            raise ValueError(f"the codec quantises {self.cell_dim}-d cells, got {dim}-d")
        cells = cells.detach().float()
        if self.rotation is not None:
            cells = cells @ self.rotation.T
        slices = cells.reshape(b * n, self.subquantizers, -1).transpose(0, 1)
        # Nearest centroid = largest 2·x·c − |c|² (|x|² is the same for all centroids), a chunk of cells at
        # a time so that the M × chunk × 256 scores stay small.
        half_norms = (self.codebooks**2).sum(dim=2).unsqueeze(1) / 2
        nearest = torch.cat([(part @ self.codebooks.transpose(1, 2) - half_norms).argmax(dim=2)
                             for part in slices.split(CODE_CHUNK, dim=1)], dim=1)
        return nearest.transpose(0, 1).reshape(b, n, self.subquantizers).to(torch.uint8)

    def reconstruct(self, codes: Tensor) -> Tensor:
        """B × N × cell_dim unit descriptors from their codes."""
        b, n, m = codes.shape
        cells = self.codebooks[torch.arange(m), codes.long().reshape(-1, m)].reshape(b, n, self.cell_dim)
        if self.rotation is not None:
            cells = cells @ self.rotation
        return F.normalize(cells, dim=2)

    def encode(self, embedding: Tensor, cells: Tensor, grid: tuple[int, int], norms: tuple[Tensor, Tensor]) -> list[bytes]:
        """Packed descriptions of B images from their signature (``MatchNet.signature``: B × embed_dim unit
        embeddings, B × (h·w) × cell_dim unit descriptors of an h × w grid) and the norms it dropped
        (``projection_norms``: B and B × (h·w))."""
        h, w = grid
        if cells.shape[1] != h * w or not (0 < h < 256 and 0 < w < 256):
            raise ValueError(f"{cells.shape[1]} cells do not form a {h}×{w} grid of at most 255×255")
        if embedding.shape[1] != self.embed_dim:
            raise ValueError(f"the codec stores {self.embed_dim}-d embeddings, got {embedding.shape[1]}-d")
        head = np.array([h, w], dtype=np.uint8).tobytes()
        embeddings = embedding.detach().float().numpy().astype("<f2")
        scales = torch.cat([norms[0].reshape(-1, 1), norms[1].reshape(len(cells), -1)], dim=1).detach().float().numpy().astype("<f2")
        codes = self.codes(cells).numpy()
        return [head + e.tobytes() + n.tobytes() + c.tobytes() for e, n, c in zip(embeddings, scales, codes)]

    def decode(self, blobs: Sequence[bytes]) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        """(embeddings B × embed_dim, descriptors B × N × cell_dim), float32 and unit length, and the grid
        (h, w) they share: the signature the head scores (``MatchNet.signature_logit``)."""
        raw, grid = self._raw(blobs)
        return self._signature(raw, grid), grid

    def decode_with_norms(self, blobs: Sequence[bytes]) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[int, int]]:
        """``decode``'s signature, the stored norms (``projection_norms``: B and B × N, float32) and the grid,
        from one pass over the blobs: together what ``as_projections`` rebuilds projections from."""
        raw, grid = self._raw(blobs)
        return self._signature(raw, grid), self._norms(raw, grid), grid

    def _signature(self, raw: np.ndarray, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The unit signature stored in ``_raw``'s rows."""
        n = grid[0] * grid[1]
        embed_end = GRID_BYTES + 2 * self.embed_dim
        embedding = torch.from_numpy(raw[:, GRID_BYTES:embed_end].copy().view("<f2").astype(np.float32))
        codes = torch.from_numpy(raw[:, embed_end + 2 * (1 + n):].reshape(len(raw), n, self.subquantizers).copy())
        return F.normalize(embedding, dim=1), self.reconstruct(codes)

    def _norms(self, raw: np.ndarray, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The norms stored in ``_raw``'s rows."""
        start = GRID_BYTES + 2 * self.embed_dim
        scales = torch.from_numpy(raw[:, start : start + 2 * (1 + grid[0] * grid[1])].copy().view("<f2").astype(np.float32))
        return scales[:, 0], scales[:, 1:]

    def _raw(self, blobs: Sequence[bytes]) -> tuple[np.ndarray, tuple[int, int]]:
        """B × item_bytes uint8 rows of descriptions of one grid, checked, and that grid."""
        if not len(blobs):
            raise ValueError("decode needs at least one description")
        grids = {tuple(bytes(blob[:GRID_BYTES])) for blob in blobs}
        if len(grids) != 1:
            raise ValueError(f"descriptions of different grids cannot be decoded together: {sorted(grids)}")
        h, w = grids.pop()
        size = self.item_bytes(h * w)
        if any(len(blob) != size for blob in blobs):
            raise ValueError(f"a {h}×{w} description is {size} bytes for this codec")
        return np.frombuffer(b"".join(bytes(blob) for blob in blobs), dtype=np.uint8).reshape(len(blobs), size), (h, w)

    def save(self, directory: str | Path) -> Path:
        """Write the codebooks and the codec's settings next to a checkpoint."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"codebooks": self.codebooks.contiguous()}
        if self.rotation is not None:
            tensors["rotation"] = self.rotation.contiguous()
        save_file(tensors, str(directory / CODEBOOKS_FILE))
        settings = {"codec": "product-quantiser", "rotation": self.rotation is not None, "embed_dim": self.embed_dim,
                    "cell_dim": self.cell_dim, "subquantizers": self.subquantizers, "centroids": CENTROIDS, "fitted_on": self.fitted_on}
        (directory / CODEC_CONFIG_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DescriptionCodec:
        """The codec saved in a checkpoint directory (safetensors and JSON only: nothing is unpickled)."""
        directory = Path(directory)
        settings = json.loads((directory / CODEC_CONFIG_FILE).read_text())
        tensors = load_file(str(directory / CODEBOOKS_FILE))
        codebooks = tensors["codebooks"].float()
        dim = settings["cell_dim"]
        if codebooks.shape != (settings["subquantizers"], CENTROIDS, dim // settings["subquantizers"]):
            raise ValueError(f"{directory / CODEBOOKS_FILE} does not match {CODEC_CONFIG_FILE}: codebooks {tuple(codebooks.shape)}")
        rotation = tensors["rotation"].float() if settings.get("rotation") else None
        if rotation is not None and rotation.shape != (dim, dim):
            raise ValueError(f"{directory / CODEBOOKS_FILE} does not match {CODEC_CONFIG_FILE}: rotation {tuple(rotation.shape)}")
        return cls(codebooks, int(settings["embed_dim"]), settings.get("fitted_on", {}), rotation)


def projection_norms(net: MatchNet, projections: Tensor) -> tuple[Tensor, Tensor]:
    """What ``signature_from_projections`` normalises away: the norm of each image's pooled embedding
    (bias included; B) and of each cell's local projection (bias included; B × h·w)."""
    pooled, local = net.unnormalised_signature(projections)
    return pooled.norm(dim=1), local.norm(dim=1).flatten(1)


def as_projections(net: MatchNet, signature: tuple[Tensor, Tensor], grid: tuple[int, int],
                   norms: tuple[Tensor, Tensor]) -> Tensor:
    """B × (embed_dim + local_dim) × h × w projections whose ``signature_from_projections`` is ``signature``
    and whose norms are ``norms`` (``projection_norms``), for the paths that take projections
    (``cell_contributions``, correspondences, ``explain_projections``).

    Each cell's local part is its decoded descriptor at the stored scale, so the cell contributions (the
    local match, term by term) are exact for the decoded descriptors and the local term's Grad-CAM is
    that of the stored projections up to quantisation. The embedding's per-cell part is not stored: every
    cell gets the pooled one, so the global term adds the same amount to every cell of a map, where on the
    stored projections it varies from cell to cell."""
    embedding, cells = (part.to(net.head_dtype) for part in signature)
    pooled, cell_norms = (part.to(net.head_dtype) for part in norms)
    h, w = grid
    embed_part = (pooled.unsqueeze(1) * embedding - net.embed_proj.bias).unsqueeze(2).expand(-1, -1, h * w)
    local_part = (cell_norms.unsqueeze(2) * cells).transpose(1, 2) - net.local_proj.bias.view(1, -1, 1)
    return torch.cat([embed_part, local_part], dim=1).reshape(len(cells), -1, h, w)
