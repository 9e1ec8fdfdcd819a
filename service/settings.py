"""The one settings object for API, worker and CLI, read from ``ANTIDOTE_*`` variables.

With nothing set, everything lives under ``./var``: SQLite for state, a filesystem broker for
the queue, and the blob store. Setting ``ANTIDOTE_DATABASE_URL`` and ``ANTIDOTE_BROKER_URL``
switches to PostgreSQL and Redis without any other change.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANTIDOTE_", extra="ignore")

    data_dir: Path = Field(default=Path("var"), description="Embedded state: database, blobs, lab.")
    lab_cache_dir: Path | None = Field(
        default=None, description="Cache of clean lab models; defaults to DATA_DIR/lab-cache."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; defaults to SQLite at DATA_DIR/antidote.db."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker; defaults to a filesystem queue under DATA_DIR."
    )
    blob_dir: Path | None = Field(
        default=None, description="Blob store; defaults to DATA_DIR/blobs."
    )

    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="413 above this.")
    max_active_jobs: int = Field(
        default=1000, gt=0, description="Unfinished jobs per tenant before 429."
    )
    page_size_default: int = Field(default=50, gt=0)
    page_size_max: int = Field(default=500, gt=0)
    page_token_secret: str = Field(
        default="", description="Signs page tokens; set the same value on every API replica."
    )
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0, description="Key retention.")

    hard_time_limit_s: int = Field(default=6 * 3600, gt=0, description="The worker kills a job.")
    soft_time_limit_s: int | None = Field(
        default=None, description="The job fails cleanly; defaults to the hard limit minus 5 min."
    )
    max_attempts: int = Field(default=3, ge=1, description="Worker losses before FAILED.")
    lease_s: float = Field(
        default=120.0, gt=0, description="A RUNNING job whose lease lapses is handed back."
    )
    reaper_interval_s: float = Field(default=30.0, gt=0)
    requeue_pending_after_s: float = Field(
        default=1800.0, gt=0, description="Re-publish PENDING jobs whose message may be lost."
    )
    stale_upload_s: float = Field(
        default=3600.0, gt=0, description="Half-written uploads older than this are swept."
    )
    progress_interval_s: float = Field(default=1.0, ge=0, description="Throttle of DB writes.")
    worker_queue: str = Field(default="gpu", description="The queue purification tasks go to.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where the worker runs jobs: auto is CUDA when the worker has one.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="Precision of the frozen towers in the worker's optimisation loops: auto is "
        "bf16 autocast on CUDA and fp32 elsewhere (the artifacts are fp32 either way).",
    )

    @field_validator("database_url")
    @classmethod
    def _psycopg_driver(cls, value: str | None) -> str | None:
        """``postgresql://`` means psycopg 3 here, the one driver we install."""
        if value and value.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        return value

    @property
    def lab_cache(self) -> Path:
        return self.lab_cache_dir or self.data_dir / "lab-cache"

    @property
    def blobs(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'antidote.db').resolve()}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        """Where the embedded filesystem broker keeps its messages."""
        return (self.data_dir / "broker").resolve()

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def soft_limit_s(self) -> int:
        return self.soft_time_limit_s or max(1, self.hard_time_limit_s - 300)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
