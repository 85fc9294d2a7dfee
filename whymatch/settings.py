"""All settings of one ``whymatch`` run, read once from the environment by the CLI's main and passed down:
each owner's typed object (the model's, the catalogue storage's, the API's)."""

from __future__ import annotations

from dataclasses import dataclass

from api.settings import ApiSettings
from engine.config import ModelSettings
from indexer.settings import StorageSettings


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    storage: StorageSettings
    api: ApiSettings

    @classmethod
    def from_environment(cls) -> Settings:
        storage = StorageSettings()
        model = ModelSettings()
        if model.feature_cache is None:
            model = model.model_copy(update={"feature_cache": storage.data_dir / "cache" / "features"})
        return cls(model=model, storage=storage, api=ApiSettings())
