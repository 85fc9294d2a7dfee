"""Explanations in words, for the command line: one place says what a ``PairExplanation`` means, so the
engine's ``compare``, the indexer's ``search`` and the demo print the same sentences."""

from __future__ import annotations

from engine.explain.concepts import describe_concepts
from engine.explain.decision import verification_sentence
from engine.explain.masking import effect_sentences
from engine.explain.pairs import PairExplanation


def decision_line(explanation: PairExplanation) -> str:
    """The decision in one line, e.g. ``similarity 0.4123 → match by geometry (threshold 0.914)``."""
    by = explanation.decided_by
    decision = "no match" if by is None else "match" if by == "head" else f"match by {by}"
    return f"similarity {explanation.similarity:.4f} → {decision} (threshold {explanation.threshold:.3f})"


def explanation_lines(explanation: PairExplanation, *, names: tuple[str, str] = ("image a", "image b"),
                      regions: bool = True) -> list[str]:
    """What an explanation says, one line each, of what it carries: its geometric verification (inliers,
    and whether they verify the pair), the concepts both images show (a match) or that differ (no match),
    the measured effect of masking each map's region, and with ``regions`` the corresponding regions (boxes in the original images' pixels). ``names`` call images
    a and b otherwise (search: the query and the match)."""
    lines = []
    if explanation.verification is not None:
        lines.append(verification_sentence(explanation.verification))
    if explanation.concepts is not None:
        lines.append(("what both show: " if explanation.is_match else "what differs: ")
                     + describe_concepts(explanation.concepts))
    lines += effect_sentences(explanation, names=names)
    if regions:
        lines += [f"  region {c['rank']}: A {c['box_a']} ↔ B {c['box_b']}  "
                  f"({100 * c['share']:.1f}% of the local-match evidence)" for c in explanation.correspondences or ()]
    return lines
