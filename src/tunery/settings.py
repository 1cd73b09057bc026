"""Settings, read once from the environment (TUNERY_*) and passed down."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where tunery keeps its files and how it reaches them."""

    model_config = SettingsConfigDict(env_prefix="TUNERY_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".tunery",
        description="Data directory: model cache, runs, database, artifacts (TUNERY_HOME).",
    )
    model_cache_dir: Path | None = Field(
        None, description="Where converted base models are cached (TUNERY_MODEL_CACHE_DIR; default HOME/models)."
    )

    @property
    def model_cache(self) -> Path:
        return self.model_cache_dir or self.home / "models"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def download_dir(self) -> Path:
        return self.home / "downloads"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
