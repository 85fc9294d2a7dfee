"""Pictures of explanations: heatmaps blended on the photos, and the paper-style pair figure."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from engine.explain import PairExplanation


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heatmap (h×w in [0, 1]) upsampled to the photo, coloured (JET) and blended on it."""
    rgb = np.asarray(image.convert("RGB"))
    resized = cv2.resize(heatmap.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)
    coloured = cv2.applyColorMap(np.uint8(255 * np.clip(resized, 0, 1)), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * coloured.astype(np.float32)
    return Image.fromarray(np.uint8(np.clip(blended, 0, 255)))


def pair_figure(image_a: Image.Image, image_b: Image.Image, explanation: PairExplanation, path: str | Path, *, titles: tuple[str, str] = ("image A", "image B")) -> Path:
    """A figure like the paper's: for each image the original, the factual and the counterfactual map."""
    decision = "match" if explanation.is_match else "no match"
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.2))
    rows = [
        (image_a, explanation.factual_a, explanation.counterfactual_a, titles[0]),
        (image_b, explanation.factual_b, explanation.counterfactual_b, titles[1]),
    ]
    for row, (image, factual, counterfactual, title) in zip(axes, rows):
        panels = [(image, title), (overlay(image, factual), f"factual ({decision})"),
                  (overlay(image, counterfactual), "counterfactual")]
        for ax, (picture, label) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.suptitle(f"similarity {explanation.similarity:.3f} — {decision} (threshold {explanation.threshold:.2f})", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
