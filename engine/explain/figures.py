"""Pictures of explanations: heatmaps blended on the photos, and the paper-style pair figure."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import ConnectionPatch, Rectangle
from PIL import Image

from engine.explain.concepts import describe_concepts
from engine.explain.decision import verification_sentence
from engine.explain.pairs import PairExplanation


def overlay(image: Image.Image | np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The heatmap (h×w in [0, 1]) upsampled to the photo (a PIL image or an H×W×3 uint8 RGB array, as
    ``SimilarityModel.load`` gives), coloured (JET) and blended on it."""
    rgb = image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB"))
    resized = cv2.resize(heatmap.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)
    coloured = cv2.applyColorMap(np.uint8(255 * np.clip(resized, 0, 1)), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * coloured.astype(np.float32)
    return Image.fromarray(np.uint8(np.clip(blended, 0, 255)))


def pair_figure(
    image_a: Image.Image | np.ndarray,
    image_b: Image.Image | np.ndarray,
    explanation: PairExplanation,
    path: str | Path,
    *,
    titles: tuple[str, str] = ("image A", "image B"),
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> Path:
    """A figure like the paper's: for each image the original, the factual and the counterfactual map.

    When the explanation carries them, the correspondences are drawn as numbered boxes joined by
    lines on the originals, the verified inlier matches (``explanation.verification``) as thin lines
    between the originals with a dot at each end, and the verification and the concepts are written
    under the title. Boxes and points are in the pixels of the original images, whose (width, height)
    ``sizes`` gives when the pictures were decoded smaller.
    """
    by = explanation.decided_by
    decision = "match" if explanation.is_match else "no match"
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.2))
    rows = [
        (image_a, explanation.factual_a, explanation.counterfactual_a, titles[0], "a"),
        (image_b, explanation.factual_b, explanation.counterfactual_b, titles[1], "b"),
    ]
    for row, (image, factual, counterfactual, title, side) in zip(axes, rows):
        panels = [(image, title), (overlay(image, factual), f"factual ({decision})" + effect_label(explanation, f"factual_{side}")),
                  (overlay(image, counterfactual), "counterfactual" + effect_label(explanation, f"counterfactual_{side}"))]
        for ax, (picture, label) in zip(row, panels):
            ax.imshow(picture)
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    shown = [_size(image_a), _size(image_b)]
    scales = [(p[0] / s[0], p[1] / s[1]) for p, s in zip(shown, sizes or shown)]
    if explanation.verification and explanation.verification.get("lines"):
        draw_verification(fig, axes[0][0], axes[1][0], explanation.verification, scales)
    if explanation.correspondences:
        draw_correspondences(fig, axes[0][0], axes[1][0], explanation.correspondences, scales)
    decided = "" if by in (None, "head") else f" by {by}"
    fig.suptitle(f"similarity {explanation.similarity:.3f} — {decision}{decided} (threshold {explanation.threshold:.2f})",
                 fontsize=11)
    notes = []
    if explanation.verification is not None:
        notes.append(verification_sentence(explanation.verification))
    if explanation.concepts is not None:
        label = "what both show" if explanation.is_match else "what differs"
        notes.append(f"{label}: {describe_concepts(explanation.concepts)}")
    for n, note in enumerate(notes):
        fig.text(0.5, 0.925 - 0.027 * n, note, ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93 - 0.027 * max(len(notes) - 1, 0) if notes else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def effect_label(explanation: PairExplanation, name: str) -> str:
    """A second title line with the similarity once the map's region is masked, when measured."""
    entry = (explanation.effects or {}).get(name)
    if entry is None:
        return ""
    return f"\nmasked: {explanation.similarity:.2f} → {entry['masked_similarity']:.2f}"


VERIFICATION_COLOUR = "#39ff14"
"""The inlier lines' colour: neon green, apart from the correspondence boxes' tab10 colours."""


def draw_verification(fig: plt.Figure, ax_a: plt.Axes, ax_b: plt.Axes, verification: dict,
                      scales: list[tuple[float, float]]) -> list[ConnectionPatch]:
    """The verified inlier matches (``verification["lines"]``: [xa, ya, xb, yb] in original pixels) as thin
    lines from image a to image b, a dot at each end; returns the lines (gid ``"verification"``)."""
    lines = np.asarray(verification["lines"], dtype=np.float64).reshape(-1, 4)
    (sxa, sya), (sxb, syb) = scales
    a, b = lines[:, :2] * (sxa, sya), lines[:, 2:] * (sxb, syb)
    style = {"color": VERIFICATION_COLOUR, "alpha": 0.8}
    for ax, points in ((ax_a, a), (ax_b, b)):
        limits = ax.get_xlim(), ax.get_ylim()
        ax.scatter(points[:, 0], points[:, 1], s=5, zorder=3, **style)
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])  # the photo's extent, as imshow set it
    drawn = []
    for start, end in zip(a, b):
        patch = ConnectionPatch(tuple(start), tuple(end), "data", "data", axesA=ax_a, axesB=ax_b, linewidth=0.5, **style)
        patch.set_gid("verification")
        fig.add_artist(patch)
        drawn.append(patch)
    return drawn


def draw_correspondences(fig: plt.Figure, ax_a: plt.Axes, ax_b: plt.Axes, correspondences: list[dict],
                         scales: list[tuple[float, float]]) -> None:
    """Numbered boxes (one colour per rank) on both images, each pair joined by a line."""
    colours = plt.get_cmap("tab10").colors
    for c in correspondences:
        colour = colours[(c["rank"] - 1) % len(colours)]
        centres = []
        for ax, box, (sx, sy) in ((ax_a, c["box_a"], scales[0]), (ax_b, c["box_b"], scales[1])):
            x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2))
            ax.text(x0 + 2, y0 + 2, str(c["rank"]), color="white", fontsize=8, fontweight="bold", va="top",
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1})
            centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
        fig.add_artist(ConnectionPatch(centres[0], centres[1], "data", "data", axesA=ax_a, axesB=ax_b,
                                       color=colour, linewidth=1, alpha=0.7))
