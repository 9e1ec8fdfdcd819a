"""Idempotency keys: a retried ``POST /v1/jobs`` with the same key and body gets the same job."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import Problem
from service.models import IdempotencyRecord, Job


def replay(session: Session, *, tenant: str, key: str, fingerprint: str) -> Job | None:
    """The job an unexpired key made, or None; the key with another body is a 422."""
    record = session.execute(
        select(IdempotencyRecord).where(
            IdempotencyRecord.tenant == tenant,
            IdempotencyRecord.key == key,
            IdempotencyRecord.expire_time > utcnow(),
        )
    ).scalar_one_or_none()
    if record is None:
        return None
    if record.fingerprint != fingerprint:
        raise Problem(
            422,
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was used with a different request body",
        )
    return session.get(Job, record.job_id)


def remember(
    session: Session, *, tenant: str, key: str, fingerprint: str, job_id: str, ttl_s: int
) -> None:
    """Records that ``key`` made ``job_id``, for ``ttl_s``; committed with the job."""
    session.add(
        IdempotencyRecord(
            tenant=tenant,
            key=key,
            fingerprint=fingerprint,
            job_id=job_id,
            expire_time=utcnow() + timedelta(seconds=ttl_s),
        )
    )
