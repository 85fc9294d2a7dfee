"""Typed configuration: ``ModelConfig`` travels with a checkpoint; ``Settings`` is read once per process."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    threshold: float = 0.5
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
    batch_size: int = 32
    data_dir: Path = Path("data")
    # The catalogue database: SQLite in ``data_dir`` unless this names another (e.g. PostgreSQL:
    # ``postgresql+psycopg://user:password@host:5432/whymatch``).
    database_url: str | None = None
    # A FAISS ``index_factory`` string (e.g. ``HNSW32``, ``IVF1024,PQ32``); None = chosen by catalogue size.
    index_factory: str | None = None

    @model_validator(mode="after")
    def _default_database_url(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'whymatch.db').as_posix()}"
        return self
