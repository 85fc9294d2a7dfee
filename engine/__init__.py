"""whymatch's engine: embed, score and explain image pairs with a Siamese network and Grad-CAM."""

from engine.explain import PairExplanation
from engine.inference import SimilarityModel, load_model

__all__ = ["PairExplanation", "SimilarityModel", "load_model"]
