"""The model's configuration: ``ModelConfig`` travels with a checkpoint; ``ModelSettings`` says which
checkpoint runs and how (storage and API settings belong to the indexer and the API)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Images per backbone pass. On a 2-core CPU a MobileNetV2 at 448 px runs fastest per image in batches of
# 1–2 and about 1.7× slower per image in batches of 32 (the activations no longer fit in cache):
# benchmarks/speed.py measures it.
BACKBONE_BATCH = 2

Preset = Literal["whymatch", "paper"]
# Where the model runs: ``auto`` takes a CUDA GPU when torch sees one, else the CPU.
Device = Literal["auto", "cpu", "cuda"]
# How a pair's maps are made (``engine.explain.pairs.pair_explainer``), named here, free of torch, for the
# commands' choices: Grad-CAM variants (``engine.explain.cam``) and coalition attributions
# (``engine.explain.coalitions``).
EXPLANATION_METHODS = ("gradcam", "hirescam", "coalitions")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model around its trained weights (saved as ``config.json``)."""

    preset: Preset = "whymatch"
    backbone: str = "mobilenet_v2"
    backbone_weights: str | None = None
    input_size: int = 448
    embed_dim: int = 256
    local_dim: int = 128
    # The backbone's last blocks fine-tuned with the head (0: the whole backbone is frozen). Their
    # weights are saved in the checkpoint; the ImageNet concepts then read a fine-tuned map.
    tuned_blocks: int = 0
    # Decision threshold: best accuracy on balanced pairs (a match / no match for one pair).
    threshold: float = 0.5
    # Duplicate detection across a catalogue, where duplicates are rare: best F1 over every pair of
    # the inner validation split (duplicate groups only; None: use ``threshold``).
    duplicate_threshold: float | None = None
    # Per-pair false-match rates measured on the inner validation split's dissimilar pairs and the lowest
    # threshold reaching each, [[rate, threshold], ...], rates falling: dedup places its default threshold
    # on it for the size of the catalogue it runs on (expected false pairs = rate × the catalogue's pairs).
    false_match_table: list[list[float]] | None = None
    bf16: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_preset(cls, preset: Preset, **overrides: Any) -> ModelConfig:
        """Defaults of a preset; ``paper`` is the seed method (224 px input, 2-d embedding, fp32)."""
        base: dict[str, Any] = {"preset": preset}
        if preset == "paper":
            base.update(backbone="mobilenet_v2", input_size=224, embed_dim=2, local_dim=0, bf16=False)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def metric(self) -> Literal["cosine", "l2"]:
        """How embeddings compare: L2-normalised cosine, or the paper's Euclidean distance."""
        return "l2" if self.preset == "paper" else "cosine"

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, path: Path) -> ModelConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown model config keys {sorted(unknown)}")
        return cls(**data)


class ModelSettings(BaseSettings):
    """Which model runs and how, from ``WHYMATCH_*`` environment variables (or a ``.env`` file); read once
    by the entry point (``whymatch``'s main) and passed down."""

    model_config = SettingsConfigDict(env_prefix="WHYMATCH_", env_file=".env", extra="ignore")

    # A checkpoint directory (config.json + model.safetensors); None: the shipped model.
    model_path: Path | None = None
    # torch threads; 0 leaves torch's default.
    threads: int = 0
    # auto: a CUDA GPU when one is usable, else the CPU; cuda fails where there is none.
    device: Device = "auto"
    # Images per backbone pass (see BACKBONE_BATCH).
    backbone_batch: int = Field(BACKBONE_BATCH, gt=0)
    # Where training caches backbone features; None: ``cache/features`` in the catalogue's data directory.
    feature_cache: Path | None = None
