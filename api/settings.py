"""The REST API's settings (README, "REST API and web page"): tokens, CORS, upload limits, workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ApiSettings(BaseSettings):
    """From ``WHYMATCH_*`` environment variables (or a ``.env`` file); read once by ``whymatch serve`` and
    passed to ``create_app``."""

    model_config = SettingsConfigDict(env_prefix="WHYMATCH_", env_file=".env", extra="ignore")

    # Writes need ``Authorization: Bearer <api_token>``; without one configured the API refuses writes
    # (``whymatch serve`` generates and prints one instead).
    api_token: SecretStr | None = None
    # When set, reads need it too (or the write token); unset, reads are open.
    api_read_token: SecretStr | None = None
    # Origins allowed to call the API from a browser (comma-separated or a JSON list); empty = CORS off.
    cors_origins: Annotated[list[str], NoDecode] = []
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)  # per uploaded image
    max_pixels: int = Field(60_000_000, gt=0)  # per uploaded image, checked before decoding (bombs)
    max_upload_files: int = Field(64, gt=0)  # images per POST /api/index
    api_workers: int = Field(2, gt=0)  # threads running model calls concurrently
    upload_dir: Path | None = None  # where POST /api/index stores images; None = the catalogue's data_dir/uploads
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
