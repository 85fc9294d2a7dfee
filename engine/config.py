"""Typed configuration: ``ModelConfig`` travels with a checkpoint; ``Settings`` is read once per process."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Images per backbone pass. On a 2-core CPU a MobileNetV2 at 448 px runs fastest per image in batches of
# 1–2 and about 1.7× slower per image in batches of 32 (the activations no longer fit in cache):
# benchmarks/speed.py measures it.
BACKBONE_BATCH = 2

Preset = Literal["whymatch", "paper"]


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


class Settings(BaseSettings):
    """Process-wide settings from ``WHYMATCH_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="WHYMATCH_", env_file=".env", extra="ignore")

    model_path: Path | None = None
    threads: int = 0
    # Images per indexing transaction and pairs per scoring batch.
    batch_size: int = 32
    # Images per backbone pass (see BACKBONE_BATCH).
    backbone_batch: int = Field(BACKBONE_BATCH, gt=0)
    data_dir: Path = Path("data")
    # The catalogue database: SQLite in ``data_dir`` unless this names another (e.g. PostgreSQL:
    # ``postgresql+psycopg://user:password@host:5432/whymatch``).
    database_url: str | None = None
    # A FAISS ``index_factory`` string (e.g. ``HNSW32``, ``IVF1024,PQ32``); None = chosen by catalogue size.
    index_factory: str | None = None

    # REST API (``whymatch serve``, README "REST API and web page"). Writes need ``Authorization: Bearer <api_token>``;
    # without one configured the API refuses writes (``whymatch serve`` generates and prints one instead).
    api_token: SecretStr | None = None
    # When set, reads need it too (or the write token); unset, reads are open.
    api_read_token: SecretStr | None = None
    # Origins allowed to call the API from a browser (comma-separated or a JSON list); empty = CORS off.
    cors_origins: Annotated[list[str], NoDecode] = []
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)  # per uploaded image
    max_pixels: int = Field(60_000_000, gt=0)  # per uploaded image, checked before decoding (bombs)
    max_upload_files: int = Field(64, gt=0)  # images per POST /api/index
    api_workers: int = Field(2, gt=0)  # threads running model calls concurrently
    upload_dir: Path | None = None  # where POST /api/index stores images; None = data_dir/uploads
    explanation_cache_size: int = Field(1024, gt=0)  # explained pairs kept for overlay PNGs

    @field_validator("api_token", "api_read_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _default_database_url(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'whymatch.db').as_posix()}"
        return self
