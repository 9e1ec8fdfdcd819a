"""The one settings object for API, worker and CLI, read from ``ANTIDOTE_*`` variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANTIDOTE_", extra="ignore")

    data_dir: Path = Field(default=Path("var"), description="Embedded state: database, blobs, lab.")
    lab_cache_dir: Path | None = Field(
        default=None, description="Cache of clean lab models; defaults to DATA_DIR/lab-cache."
    )

    @property
    def lab_cache(self) -> Path:
        return self.lab_cache_dir or self.data_dir / "lab-cache"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
