"""Where a catalogue lives: its data directory, its database and how it is indexed."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def sqlite_url(data_dir: Path) -> str:
    """The embedded default database: SQLite in the data directory."""
    return f"sqlite:///{(Path(data_dir) / 'whymatch.db').as_posix()}"


def vectors_path(data_dir: Path) -> str:
    """The embedded default vector store: the ``vectors`` folder of the data directory."""
    return (Path(data_dir) / "vectors").as_posix()


class StorageSettings(BaseSettings):
    """The catalogue's storage, from ``WHYMATCH_*`` environment variables (or a ``.env`` file); read once
    by the entry point and passed to ``Catalogue.from_settings``."""

    model_config = SettingsConfigDict(env_prefix="WHYMATCH_", env_file=".env", extra="ignore")

    # The catalogue's database, index and caches; relative to where the command runs.
    data_dir: Path = Path("data")
    # The catalogue database: SQLite in ``data_dir`` unless this names another (e.g. PostgreSQL:
    # ``postgresql+psycopg://user:password@host:5432/whymatch``).
    database_url: str = ""
    # The vector shards (embeddings and head descriptions, ``indexer.vectors``): a folder or any URL fsspec
    # reaches (e.g. ``s3://bucket/catalogue/vectors``); ``vectors`` in ``data_dir`` unless set.
    vectors_url: str = ""
    # Images per indexing transaction and pairs per scoring batch.
    batch_size: int = 32
    # A FAISS ``index_factory`` string (e.g. ``HNSW32``, ``IVF1024,PQ32``); None = chosen by catalogue size.
    index_factory: str | None = None

    @model_validator(mode="after")
    def _default_database_url(self) -> StorageSettings:
        if not self.database_url:
            self.database_url = sqlite_url(self.data_dir)
        if not self.vectors_url:
            self.vectors_url = vectors_path(self.data_dir)
        return self
