"""whymatch's engine: embed, score and explain image pairs with a Siamese network and Grad-CAM."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.explain.pairs import PairExplanation
    from engine.inference import SimilarityModel, load_model

# Exports load on first use, so that the ``whymatch`` command starts (and answers --help or a usage
# error) without importing torch and FastAPI.
_EXPORTS = {
    "PairExplanation": "engine.explain.pairs",
    "SimilarityModel": "engine.inference",
    "load_model": "engine.inference",
}

__all__ = ["PairExplanation", "SimilarityModel", "load_model"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
