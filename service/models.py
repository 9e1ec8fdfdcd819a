"""The tables: API keys, uploaded files, jobs, their artifacts, and idempotency records."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, UTCDateTime, utcnow


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
UNFINISHED = frozenset(JobState) - TERMINAL


class ApiKey(Base):
    """Keys are stored as sha256 digests: they are random and long, so no slow hash is needed."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoke_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class File(Base):
    """An upload; its bytes live in the blob store under ``sha256``, shared across tenants."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("tenant", "sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_order", "tenant", "create_time", "id"),
        Index("ix_jobs_state_lease", "state", "lease_until"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The claim token of the attempt that holds the job; writes from any other are refused.
    runner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    publish_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    start_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    end_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Artifact(Base):
    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(64))


class IdempotencyRecord(Base):
    """A job-creating request seen under a key: a replay gets the same job, another body a 422."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("tenant", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime())
