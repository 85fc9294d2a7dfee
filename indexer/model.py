"""What the indexer needs of a model: ``CatalogueModel``, which ``engine.SimilarityModel`` satisfies.

A structural type, so that a test's stand-in (or a wrapper) serves as well as the engine's model, and
so that importing the indexer imports neither torch nor the engine's inference code: the types it
names are read only by type checkers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor, nn

    from engine.config import ModelConfig
    from engine.explain.pairs import PairExplanation
    from engine.images import ImageSource

Picture = np.ndarray
"""An image decoded as the model sees it (H×W×3 uint8 RGB, ``CatalogueModel.load``)."""


class CatalogueModel(Protocol):
    """The model an index run embeds and describes with, search and dedup re-score and explain with, and
    ``Catalogue`` compares two images with."""

    config: ModelConfig
    net: nn.Module  # its weights are part of the catalogue's model key (``indexing.model_fingerprint``)
    description_format: str  # the layout of packed descriptions, also part of the model key
    # The layout whose descriptions by the same weights ``recode_descriptions`` converts (None: none).
    recodable_format: str | None

    @property
    def threshold(self) -> float: ...

    @property
    def duplicate_threshold(self) -> float: ...

    @property
    def metric(self) -> str: ...

    def load(self, images: Sequence[ImageSource]) -> list[Picture]: ...

    def feature_maps(self, images: Sequence[ImageSource]) -> Tensor: ...

    def embed_fmaps(self, fmaps: Tensor) -> np.ndarray: ...

    def describe_fmaps(self, fmaps: Tensor) -> list[bytes]: ...

    def encode(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, list[bytes]]: ...

    def recode_descriptions(self, packed: Sequence[bytes]) -> list[bytes]: ...

    def score_described(self, packed_a: Sequence[bytes], packed_b: Sequence[bytes]) -> np.ndarray: ...

    def compare(self, image_a: ImageSource, image_b: ImageSource, *, method: str = ..., effects: bool = ...,
                correspondences: bool = ..., concepts: bool = ..., sizes: tuple[tuple[int, int], tuple[int, int]] | None = ...,
                figure: str | os.PathLike | None = ..., titles: tuple[str, str] = ..., verify: bool = ...) -> PairExplanation: ...

    def explain_described(self, packed_a: bytes, packed_b: Sequence[bytes], method: str = ..., *,
                          correspondences: bool = ..., sizes: Sequence[tuple[int, int]] | None = ...,
                          verifications: Sequence[dict | None] | None = ...) -> list[PairExplanation]: ...

    def explain_feature_maps(self, fmap_a: Tensor, fmaps_b: Tensor, method: str = ..., *, correspondences: bool = ...,
                             concepts: bool = ..., sizes: Sequence[tuple[int, int]] | None = ...,
                             verifications: Sequence[dict | None] | None = ...) -> list[PairExplanation]: ...

    def add_effects(self, image_a: ImageSource, images_b: Sequence[ImageSource], explanations: Sequence[PairExplanation], *,
                    fmap_a: Tensor | None = ..., fmaps_b: Tensor | None = ...) -> list[PairExplanation]: ...
